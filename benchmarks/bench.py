"""Speed and memory of nanoflant5 against transformers (and CTranslate2 when it is installed), on CPU, fp32.

    python benchmarks/bench.py            # flan-t5-small and flan-t5-base architectures, 3 timed repeats
    python benchmarks/bench.py --quick    # small only, 1 repeat

The checkpoints have random weights (tests/helpers.make_checkpoint with the preset's sizes): speed does not depend
on the weights, and the helper's weights make greedy and beam outputs vary, so "outputs equal" means something.
Each generation row: inputs of 64 tokens, exactly 64 new tokens (min_new_tokens = max_new_tokens = 64); tokens/s is
batch * 64 / seconds (returned tokens, also for beam search). Implementations run alternately (ours, transformers,
CTranslate2, ours, ...) after one warm-up each; the median of --repeats runs is reported, and with each ratio the
lowest and highest of the per-run ratios (each run against transformers' run in the same round), which shows how
much the shared machine moved the ratio during the benchmark.
Peak memory: each implementation is loaded in a fresh subprocess that imports only its own library, runs the
beam-4 batch-8 generation and the encoder prefill once, and reports its peak RSS (VmHWM of /proc/self/status);
with --compile, nanoflant5's subprocess compiles too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # for helpers.make_checkpoint / random_batch

MODELS = {"small": "flan-t5-small", "base": "flan-t5-base"}
SETTINGS = [("greedy b1", 1, 1), ("beam4 b1", 1, 4), ("greedy b8", 8, 1), ("beam4 b8", 8, 4)]
IN_LEN, NEW = 64, 64
ENC_BATCH, ENC_LEN = 8, 512
THREADS = 2
DEVICE, DTYPE = torch.device("cpu"), torch.float32  # --device / --dtype
COMPILE = False  # --compile: nanoflant5's generate(compile=True); the warm-up run absorbs the compilation
TOKENIZER_FILES = ["spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint(cache: Path, name: str) -> Path:
    """A random-weight checkpoint of the preset's architecture, written once and reused."""
    from nanoflant5 import PRESETS

    folder = cache / name
    if (folder / "model.safetensors").exists():
        return folder
    from helpers import make_checkpoint

    c = PRESETS[name]
    print(f"[bench] writing random {name} checkpoint to {folder}", file=sys.stderr)
    make_checkpoint(folder, "gated-gelu-untied", seed=0, vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv,
                    d_ff=c.d_ff, num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
                    num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
                    relative_attention_max_distance=c.relative_attention_max_distance)
    for f in TOKENIZER_FILES:  # FLAN-T5's tokenizer (shared by all sizes); CTranslate2's converter needs one
        shutil.copy(ROOT / "tests/fixtures/flan-t5-small" / f, folder / f)
    return folder


def ct2_convert(folder: Path):
    """The CTranslate2 model folder for a checkpoint (converted in a subprocess, keeping ctranslate2 out of this
    one), or (None, reason) when ctranslate2 is missing or the conversion fails."""
    out = folder.parent / (folder.name + "-ct2")
    if not (out / "model.bin").exists():
        code = ("import ctranslate2, sys; ctranslate2.converters.TransformersConverter(sys.argv[1])"
                ".convert(sys.argv[2], quantization=None, force=True)")
        r = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"not installed or conversion failed: {last[:200]}"
    return out, None


# ------------------------------------------------------------------------------------------------ runners

def inputs(batch: int, length: int, seed: int = 0):
    from helpers import random_batch

    ids, mask = random_batch(32000, [length] * batch, seed=seed)  # ordinary pieces (no sentinels), ending in </s>
    return ids.to(DEVICE), mask.to(DEVICE)


def load_runners(folder: Path, impls):
    """name -> (generate(ids, mask, beams) -> LongTensor rows, encode(ids, mask) -> tensor or None)."""
    runners = {}
    if "nanoflant5" in impls:
        from nanoflant5 import T5

        ours = T5.from_pretrained(folder, dtype=DTYPE, device=DEVICE)
        runners["nanoflant5"] = (
            lambda ids, mask, beams: ours.generate(ids, mask, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams,
                                                   compile=COMPILE),
            lambda ids, mask: ours.encode(ids, mask))
    if "transformers" in impls:
        from transformers import T5ForConditionalGeneration

        hf = T5ForConditionalGeneration.from_pretrained(folder, dtype=DTYPE).to(DEVICE).eval()
        runners["transformers"] = (
            lambda ids, mask, beams: hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                 max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams),
            lambda ids, mask: hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    if "ctranslate2" in impls:
        runners["ctranslate2"] = (CT2Worker(folder).generate, None)
    return runners


class CT2Worker:
    """CTranslate2 in a process of its own (benchmarks/ct2_worker.py, which does not import torch): once it has
    run in a process, its OpenMP runtime slows torch there by ~40% (nanoflant5 greedy b1 small: 103 -> 59 tok/s).
    The worker times each call itself; token ids go through a pipe."""

    def __init__(self, folder: Path):
        ct2_dir = folder.parent / (folder.name + "-ct2")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "ct2_worker.py"), str(ct2_dir),
                                      str(THREADS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.seconds = None

    def generate(self, ids, mask, beams):
        request = {"src": [row[m.bool()].tolist() for row, m in zip(ids, mask)], "beams": beams, "new": NEW}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.seconds = reply["seconds"]
        rows = reply["rows"]
        width = max(map(len, rows))
        return torch.tensor([[0] + r + [0] * (width - len(r)) for r in rows])  # start token first, like HF


def timed(fn, *args):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def race(runners: dict, call, repeats: int):
    """One warm-up each, then `repeats` alternating runs. -> name -> (seconds of each run, output of the last run)."""
    times = {n: [] for n in runners}
    outs = {}
    for n in runners:
        call(runners[n])
    for _ in range(repeats):
        for n in runners:
            dt, outs[n] = timed(call, runners[n])
            worker = getattr(runners[n][0], "__self__", None)
            times[n].append(worker.seconds if isinstance(worker, CT2Worker) else dt)
    return {n: (times[n], outs[n]) for n in runners}


def bench_model(name: str, folder: Path, ct2_ok: bool, repeats: int):
    impls = ["nanoflant5", "transformers"] + (["ctranslate2"] if ct2_ok else [])
    runners = load_runners(folder, impls)
    rows = []
    for label, batch, beams in SETTINGS:
        ids, mask = inputs(batch, IN_LEN, seed=batch)
        res = race(runners, lambda r: r[0](ids, mask, beams), repeats)
        hf_out = res["transformers"][1]
        tps = speeds(res, batch * NEW)
        ours_out = res["nanoflant5"][1]
        same = sum(torch.equal(a, b) for a, b in zip(ours_out, hf_out)) if ours_out.shape == hf_out.shape else 0
        equal = "yes" if same == len(hf_out) else f"**{same}/{len(hf_out)} rows**"
        if "ctranslate2" in res:
            ct = res["ctranslate2"][1]
            same = sum(torch.equal(a[:NEW + 1], b[:NEW + 1]) for a, b in zip(ct, hf_out)) if ct.shape[1] >= NEW + 1 else 0
            equal += f"; ct2 {same}/{batch} rows"
        rows.append((name, label, tps, equal))
        print(f"[bench] {name} {label}: {rates(tps)} ({equal})", file=sys.stderr)
    ids, mask = inputs(ENC_BATCH, ENC_LEN, seed=7)
    enc = {n: r for n, r in runners.items() if r[1] is not None}
    with torch.inference_mode():
        res = race(enc, lambda r: r[1](ids, mask), repeats)
    diff = (res["nanoflant5"][1] - res["transformers"][1]).abs().max().item()
    scale = res["transformers"][1].abs().max().item()
    tps = speeds(res, ENC_BATCH * ENC_LEN)
    rows.append((name, f"encoder b{ENC_BATCH}x{ENC_LEN}", tps, f"max abs diff {diff:.1e} (of max {scale:.1e})"))
    print(f"[bench] {name} encoder: {rates(tps)}", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------ peak memory

def memory_child(impl: str, folder: str):
    """Run in a fresh process: load one implementation, run the biggest workloads once, print peak RSS in MiB."""
    torch.set_num_threads(THREADS)
    with torch.inference_mode():
        if impl == "ctranslate2":  # the worker's own peak: run it and read its /proc status before it exits
            worker = CT2Worker(Path(folder))
            worker.generate(*inputs(8, IN_LEN, seed=8), 4)
            status = Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines()
            print(int(next(s for s in status if s.startswith("VmHWM:")).split()[1]) / 1024)
            return
        elif impl != "baseline":
            gen, enc = load_runners(Path(folder), [impl])[impl]
            gen(*inputs(8, IN_LEN, seed=8), 4)
            if enc is not None:
                enc(*inputs(ENC_BATCH, ENC_LEN, seed=7))
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)  # KiB -> MiB


def peak_rss(impl: str, folder: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", impl, str(folder)] + ["--compile"] * COMPILE,
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


# ------------------------------------------------------------------------------------------------ report

def speeds(res, tokens: int):
    """name -> (tokens/s at the median time, tokens/s of each run) from race()'s result."""
    return {n: (tokens / statistics.median(times), [tokens / t for t in times]) for n, (times, _) in res.items()}


def rates(tps):
    """speeds()' medians as one progress line."""
    return ", ".join(f"{n} {v[0]:.1f} tok/s" for n, v in tps.items())


def fmt(tps, n):
    return f"{tps[n][0]:.1f}" if n in tps else "—"


def ratio(tps, n):
    """The ratio of the medians to transformers', and (over several runs) the range of the per-run ratios."""
    if n not in tps:
        return "—"
    runs = [a / b for a, b in zip(tps[n][1], tps["transformers"][1])]
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{tps[n][0] / tps['transformers'][0]:.2f}x{spread}"


def cpu_model() -> str:
    """The CPU's model name, as lscpu prints it (speed claims hold for one CPU: MKL is fast on Intel, slow on AMD)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        flags = next(line for line in info if line.startswith("flags")).split()
        features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
        return f"{names[0]} ({len(names)} logical CPUs; {' '.join(features)})"
    except (OSError, IndexError, StopIteration):
        import platform
        return platform.processor() or "CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,base", help="comma-separated: small, base")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small only, 1 repeat")
    p.add_argument("--cache-dir", default="/tmp/nanoflant5-bench", help="where the random checkpoints are kept")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda: no CTranslate2, no peak RSS)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--compile", action="store_true", help="nanoflant5 with generate(compile=True)")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE, DTYPE, COMPILE
    DEVICE, DTYPE, COMPILE = torch.device(args.device), getattr(torch, args.dtype), args.compile
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.quick:
        args.models, args.repeats = "small", 1
    if DEVICE.type != "cpu":
        args.no_memory = True
    torch.set_num_threads(THREADS)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    rows, mem, ct2_notes = [], [], {}
    for key in args.models.split(","):
        name = MODELS[key.strip()]
        folder = checkpoint(cache, name)
        ct2_dir, why = ct2_convert(folder) if DEVICE.type == "cpu" else (None, "CPU only in this benchmark")
        if why:
            ct2_notes[name] = why
        with torch.inference_mode():
            rows += bench_model(name, folder, ct2_dir is not None, args.repeats)
        if not args.no_memory:
            impls = ["baseline", "transformers", "nanoflant5"] + (["ctranslate2"] if ct2_dir else [])
            mem.append((name, {i: peak_rss(i, folder) for i in impls}))

    print(f"\nCommand: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})  \ntorch {torch.__version__}, {THREADS} threads, {args.dtype}, "
          f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else cpu_model()}{'; nanoflant5 compiled' * COMPILE}; "
          f"inputs {IN_LEN} tokens, {NEW} new tokens forced; median of {args.repeats} alternating runs after a warm-up"
          f"{'; ratio (lowest-highest per-run ratio)' * (args.repeats > 1)}.\n")
    print("| model | setting | transformers tok/s | nanoflant5 tok/s | ratio | CTranslate2 tok/s | ratio | outputs equal |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, label, tps, equal in rows:
        print(f"| {name} | {label} | {fmt(tps, 'transformers')} | {fmt(tps, 'nanoflant5')} | {ratio(tps, 'nanoflant5')}"
              f" | {fmt(tps, 'ctranslate2')} | {ratio(tps, 'ctranslate2')} | {equal} |")
    for name, why in ct2_notes.items():
        print(f"\nCTranslate2 skipped for {name}: {why}")
    if mem:
        print("\nPeak RSS (MiB; fresh subprocess per implementation: import, load, beam4 b8 generation, encoder "
              f"b{ENC_BATCH}x{ENC_LEN} (not CTranslate2); baseline = `import torch` only):\n")
        impls = ["baseline", "transformers", "nanoflant5", "ctranslate2"]
        print("| model | " + " | ".join(impls) + " |\n|---|" + "---:|" * len(impls))
        for name, m in mem:
            print(f"| {name} | " + " | ".join(f"{m[i]:.0f}" if i in m else "—" for i in impls) + " |")


if __name__ == "__main__":
    main()
