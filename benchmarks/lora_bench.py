"""A LoRA training step: nanoflant5 against transformers + peft, and against nanoflant5's full fine-tuning, on CPU.

    python benchmarks/lora_bench.py                   # 10 timed steps per run, 2 runs per implementation
    python benchmarks/lora_bench.py --quick           # 3 steps, 1 run each

Model: the random flan-t5-small-architecture checkpoint of benchmarks/train_bench.py (written once to --cache-dir),
fp32, dropout 0. Data: train_bench's synthetic batches with --batch-size rows of 128 input and 32 target tokens.
LoRA: r 16, alpha 32, dropout 0.05 on --targets (default q,v, peft's default for T5). Step: forward, mean token
cross-entropy, backward, clip_grad_norm_(1.0) over the trained parameters, AdamW(lr=1e-4, fused).step(), zero_grad.
"nanoflant5 lora" is train.py's pieces with lora.add_adapters; "peft lora" is transformers'
T5ForConditionalGeneration with peft.get_peft_model(LoraConfig(...)); "nanoflant5 full" trains every weight.

Method (train_bench's): every run is a fresh subprocess that imports only what it runs, trains 2 warm-up + --steps
steps and reports each timed step and its peak RSS (VmHWM of /proc/self/status: weights, activations, gradients and
optimizer state; torch's CPU allocations are invisible to tracemalloc). Runs alternate --repeats times; the table
gives the median step of all runs and the largest peak RSS. The loss of the first step (before any update) is
printed for each: the same model, so it must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_bench  # noqa: E402  (the checkpoint, the batches, peak RSS)

IMPLS = ["nanoflant5 lora", "peft lora", "nanoflant5 full"]
R, ALPHA, DROPOUT, IN_LEN, OUT_LEN = 16, 32, 0.05, 128, 32


def child(impl: str, folder: str, steps: int, batch_size: int, targets: str):
    import contextlib

    torch.set_num_threads(train_bench.THREADS)
    torch.manual_seed(train_bench.SEED)
    if impl.startswith("nanoflant5"):
        from nanoflant5 import T5, lora
        from nanoflant5.train import TrainArgs, loss_sum, make_optimizer

        model = T5.from_pretrained(folder)
        if impl.endswith("lora"):
            lora.add_adapters(model, lora.parse_targets(targets, model.config), R, ALPHA, DROPOUT)
        optimizer = make_optimizer(model, TrainArgs(model=folder, data="", output="", lr=train_bench.LR))

        def mean_loss(ids, mask, labels):
            return loss_sum(model, ids, mask, labels, contextlib.nullcontext()) / (labels != -100).sum()
    else:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import T5ForConditionalGeneration

        model = get_peft_model(T5ForConditionalGeneration.from_pretrained(folder), LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM, r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
            target_modules="all-linear" if targets == "all-linear" else targets.split(",")))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_bench.LR,
                                      weight_decay=0.0, fused=True)

        def mean_loss(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.train()
    fused = contextlib.nullcontext()
    if impl.startswith("nanoflant5"):  # as train.py: one-call layer norms and activations
        from nanoflant5 import speed

        fused = speed.fused_layers(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    train_bench.IN_LEN, train_bench.OUT_LEN = IN_LEN, OUT_LEN  # the lengths train_bench.batches() draws
    times, losses = [], []
    with fused:
        for step, (ids, mask, labels) in enumerate(train_bench.batches(train_bench.WARMUP + steps, batch_size)):
            t0 = time.perf_counter()
            loss = mean_loss(ids, mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(loss.item())
            if step >= train_bench.WARMUP:
                times.append(dt)
    print(json.dumps(dict(times=times, losses=losses, rss=train_bench.peak_rss_mib(),
                          trained=sum(p.numel() for p in trained))))


def run(impl: str, folder: Path, steps: int, batch_size: int, targets: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(folder), "--steps", str(steps), "--batch-size",
           str(batch_size), "--targets", targets]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="runs per implementation, alternating")
    p.add_argument("--targets", default="q,v", help="LoRA targets (q,v or all-linear, ...)")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 run per implementation")
    p.add_argument("--cache-dir", default="/tmp/nanoflant5-train-bench")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.steps, args.batch_size, args.targets)
    if args.quick:
        args.steps, args.repeats = 3, 1

    folder = train_bench.checkpoint(Path(args.cache_dir))
    results = {impl: [] for impl in IMPLS}
    for r in range(args.repeats):
        for impl in IMPLS:
            print(f"[lora_bench] run {r + 1}/{args.repeats}: {impl}", file=sys.stderr)
            results[impl].append(run(impl, folder, args.steps, args.batch_size, args.targets))

    rows = {impl: dict(step=statistics.median(t for res in runs for t in res["times"]),
                       rss=max(res["rss"] for res in runs), trained=runs[0]["trained"],
                       first=runs[0]["losses"][0]) for impl, runs in results.items()}
    print(f"\nLoRA training step, flan-t5-small architecture (random weights), fp32, CPU ({cpu_model()}), "
          f"{train_bench.THREADS} threads; batch {args.batch_size} x ({IN_LEN} input + {OUT_LEN} target tokens); "
          f"LoRA r {R}, alpha {ALPHA}, dropout {DROPOUT}, targets {args.targets}; AdamW lr {train_bench.LR}, clip "
          f"1.0; median of {args.steps} timed steps x {args.repeats} run(s), after {train_bench.WARMUP} warm-up "
          "steps; peak RSS = VmHWM of each fresh process.\n")
    print("| implementation | trained parameters | median step (ms) | peak RSS (MiB) | first loss |")
    print("|---|---:|---:|---:|---:|")
    for impl, row in rows.items():
        print(f"| {impl} | {row['trained']:,} | {row['step'] * 1e3:.0f} | {row['rss']:.0f} | {row['first']:.5f} |")
    n = rows["nanoflant5 lora"]
    for other in IMPLS[1:]:
        h = rows[other]
        print(f"| speed {other} / nanoflant5 lora (step time ratio) | | {h['step'] / n['step']:.2f}x | "
              f"memory {n['rss'] / h['rss']:.2f} of it | |")
    print("\nCommand: python " + " ".join([str(Path(__file__).resolve().relative_to(ROOT))] + sys.argv[1:]))


if __name__ == "__main__":
    main()
