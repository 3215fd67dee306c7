"""MMLU loglikelihood requests through nanoflant5's lm-evaluation-harness model against lm-eval's own `hf` model
(backend=seq2seq), in one process, alternating, float32 on CPU.

    python benchmarks/eval_bench.py                                   # 40 questions, 5-shot, flan-t5-small sizes
    python benchmarks/eval_bench.py --data ../shared/data/mmlu --questions 100 --model base

The checkpoint has random weights of the preset's sizes with FLAN-T5's tokenizer (bench.py writes it). The prompts
are lm-eval's MMLU format (subject line, 5 dev examples, the question, "Answer:"), the continuations " A" .. " D";
contexts over max_length (512) lose tokens from the left in both. Reported: requests/s of each and their ratio, and
whether both pick the same letter for every question (float32: the sums agree to ~1e-4, not exactly).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def mmlu_requests(data: Path, questions: int, shots: int = 5):
    from helpers import mmlu_context, mmlu_rows
    from lm_eval.api.instance import Instance

    dev_dir, test_dir = data / "dev", data / "test"
    if not test_dir.is_dir():  # the repository's fixture: one dev file, its questions also used as test questions
        dev_dir = test_dir = data
    requests, subjects = [], sorted(p.name[:-len("_dev.csv")] for p in dev_dir.glob("*_dev.csv"))
    for subject in subjects:
        dev = mmlu_rows(dev_dir / f"{subject}_dev.csv")
        test_file = test_dir / f"{subject}_test.csv"
        for row in mmlu_rows(test_file) if test_file.exists() else dev:
            context = mmlu_context(subject, dev[:shots], row)
            requests += [Instance("loglikelihood", {}, (context, f" {letter}"), len(requests)) for letter in "ABCD"]
            if len(requests) >= 4 * questions:
                return requests
    return requests


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=("small", "base"))
    p.add_argument("--data", default=str(ROOT / "tests" / "fixtures" / "mmlu"), help="MMLU CSV folder (dev/, test/)")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default="/tmp/nanoflant5-bench")
    args = p.parse_args()
    torch.set_num_threads(2)

    from bench import MODELS, checkpoint, cpu_model  # (puts tests/ on the path, for helpers)
    from helpers import lm_eval_hf

    from nanoflant5.harness import NanoFlanT5

    folder = checkpoint(Path(args.cache_dir), MODELS[args.model])
    requests = mmlu_requests(Path(args.data), args.questions)
    common = dict(dtype="float32", batch_size=args.batch_size, max_length=512, device="cpu")
    ours = NanoFlanT5(pretrained=str(folder), **common)
    theirs, _ = lm_eval_hf(folder, **common)  # with the checkpoint's output layer (lm-eval 0.4.13 ties it)
    runners = {"nanoflant5": ours, "lm-eval hf": theirs}
    times = {n: [] for n in runners}
    answers = {}
    for n, lm in runners.items():  # warm-up
        lm.loglikelihood(requests[:8], disable_tqdm=True)
    for _ in range(args.repeats):
        for n, lm in runners.items():
            start = time.perf_counter()
            answers[n] = lm.loglikelihood(requests, disable_tqdm=True)
            times[n].append(time.perf_counter() - start)
    picks = {n: [max(range(4), key=lambda j: a[i + j][0]) for i in range(0, len(a), 4)] for n, a in answers.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(answers["nanoflant5"], answers["lm-eval hf"]))
    rate = {n: len(requests) / statistics.median(t) for n, t in times.items()}
    runs = [b / a for a, b in zip(times["nanoflant5"], times["lm-eval hf"])]
    print(f"\nCommand: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}); {cpu_model()}; torch "
          f"{torch.__version__}, 2 threads, float32; flan-t5-{args.model} sizes, random weights; {len(requests)} "
          f"requests ({len(requests) // 4} questions, 5-shot, max_length 512), batch size {args.batch_size}; median "
          f"of {args.repeats} alternating runs after a warm-up.\n")
    print("| model | lm-eval hf requests/s | nanoflant5 requests/s | ratio | same letter | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| flan-t5-{args.model} | {rate['lm-eval hf']:.1f} | {rate['nanoflant5']:.1f} | "
          f"{rate['nanoflant5'] / rate['lm-eval hf']:.2f}x ({min(runs):.2f}-{max(runs):.2f}) | "
          f"{sum(a == b for a, b in zip(picks['nanoflant5'], picks['lm-eval hf']))}/{len(picks['nanoflant5'])} | "
          f"{diff:.1e} |")


if __name__ == "__main__":
    main()
