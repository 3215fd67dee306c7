"""Serving throughput and latency: `nanoflant5 serve` under 1, 8 and 32 concurrent clients, against the same prompts
through model.generate() one at a time and as static batches (not tests).

    python benchmarks/serve_bench.py                    # flan-t5-small architecture, random weights
    python benchmarks/serve_bench.py --lengths forced --new-tokens 64

The figures are those of vLLM's `bench serve`: request throughput, output tokens/s, time to first token (TTFT),
time per output token after the first (TPOT) and end-to-end latency, median and p99. Every request is greedy and
streamed, with up to --new-tokens new tokens: `--lengths natural` lets each end where the model ends it (as a real
workload does: a static batch then runs until its longest row ends), `--lengths forced` makes every request exactly
--new-tokens long (min_tokens = max_tokens: no mode can gain from lengths, and clients finish and send their next
prompts together). Every mode generates the same tokens; the server's texts are checked equal to generate()'s.
The server runs in a subprocess on 127.0.0.1 with the same thread count; generate() runs in this process while the
server is idle. Targets (the serve issue, flan-t5-small): at 32 clients >= 3x the one-at-a-time throughput and
>= 0.8x the static batch's; median TTFT at 8 clients <= 3x a lone request's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

THREADS = 2
WORDS = ("the cat sat on a mat while seven quick brown foxes jumped over lazy dogs near old river banks please "
         "translate summarize answer question German French story about weather city music").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(n)]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


async def client_run(url: str, texts: list[str], concurrency: int, new_tokens: int, forced: bool = True):
    """All prompts through the server, `concurrency` at a time, streamed: per request (ttft, tpot, e2e, text,
    generated tokens)."""
    import httpx

    limit = asyncio.Semaphore(concurrency)

    async def one(client, text):
        async with limit:
            body = dict(prompt=text, max_tokens=new_tokens, min_tokens=new_tokens if forced else 0, temperature=0,
                        stream=True, stream_options={"include_usage": True})
            start = time.perf_counter()
            first, parts, tokens = None, [], 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        data = json.loads(line[6:])
                        if data["choices"]:
                            if first is None:
                                first = time.perf_counter()
                            parts.append(data["choices"][0]["text"])
                        else:
                            tokens = data["usage"]["completion_tokens"]
            end = time.perf_counter()
            first = first or end  # (an empty answer)
            return first - start, (end - first) / max(tokens - 1, 1), end - start, "".join(parts), tokens

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, t) for t in texts))
        return results, time.perf_counter() - start


def summary(name, results, seconds):
    n = len(results)
    row = {"mode": name, "requests": n, "req/s": n / seconds, "out tok/s": sum(r[4] for r in results) / seconds}
    for i, label in enumerate(("TTFT", "TPOT", "E2E")):
        values = [r[i] * 1000 for r in results]
        row[f"{label} ms median"] = statistics.median(values)
        row[f"{label} ms p99"] = pct(values, 99)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small", choices=("small", "base"))
    p.add_argument("--requests", type=int, default=64, help="prompts per concurrency level")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lengths", choices=("natural", "forced"), default="natural")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--cache-dir", default="/tmp/nanoflant5-bench")
    args = p.parse_args()
    torch.set_num_threads(THREADS)

    import bench  # benchmarks/bench.py: the random checkpoints and the CPU's name
    from helpers import free_port

    from nanoflant5 import T5, Tokenizer

    folder = bench.checkpoint(Path(args.cache_dir), bench.MODELS[args.model])
    texts = prompts(args.requests)
    levels = [int(c) for c in args.concurrency.split(",")]
    new = args.new_tokens
    rows = []

    # the server: one subprocess for every level, warmed up first
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "nanoflant5", "serve", "--model", str(folder), "--port",
                               str(port), "--max-batch-size", str(max(levels)), "--max-queue", str(args.requests)],
                              env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        import httpx
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        forced = args.lengths == "forced"
        asyncio.run(client_run(url, texts[:8], 8, new, forced))  # warm-up
        served = {}
        for c in levels:
            results, seconds = asyncio.run(client_run(url, texts, c, new, forced))
            rows.append(summary(f"serve, {c} clients", results, seconds))
            served[c] = [r[3] for r in results]
            print(f"[serve_bench] {rows[-1]['mode']}: {rows[-1]['req/s']:.2f} req/s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    # generate() in this process: one request at a time, then static batches of the largest level
    model = T5.from_pretrained(folder)
    tok = Tokenizer.from_pretrained(folder)
    settings = dict(max_new_tokens=new, min_new_tokens=new if forced else 0)

    def tokens(row):  # generated tokens, </s> included (as the server counts them)
        return int((row[1:] != model.config.pad_token_id).sum())

    with torch.inference_mode():
        model.generate(*tok.encode(texts[:2]), **settings)  # warm-up
        results, start = [], time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            out = model.generate(*tok.encode([text]), **settings)
            e2e = time.perf_counter() - t0
            results.append((e2e, e2e / max(tokens(out[0]), 1), e2e, tok.decode(out[0]), tokens(out[0])))
        rows.append(summary("generate(), one at a time", results, time.perf_counter() - start))
        alone = [r[3] for r in results]
        batch = max(levels)
        results, start = [], time.perf_counter()
        for i in range(0, len(texts), batch):
            t0 = time.perf_counter()
            ids, mask = tok.encode(texts[i:i + batch])
            out = model.generate(ids, mask, **settings)
            e2e = time.perf_counter() - t0
            results += [(e2e, e2e / out.shape[1], e2e, tok.decode(row), tokens(row)) for row in out]
        rows.append(summary(f"generate(), static batches of {batch}", results, time.perf_counter() - start))

    same = {c: sum(a == b for a, b in zip(served[c], alone)) for c in levels}
    print(f"\nCommand: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})  \n"
          f"{bench.cpu_model()}; torch {torch.__version__}, {THREADS} threads, float32, eager; flan-t5-{args.model} "
          f"architecture, random weights; {args.requests} prompts of 8-60 words, greedy, "
          f"{'exactly' if forced else 'up to'} {new} new tokens each; streamed.\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in row.items()) + " |")
    by = {r["mode"]: r for r in rows}
    top = by[f"serve, {max(levels)} clients"]["req/s"]
    print("\nServer texts equal to generate() alone: " + ", ".join(f"{c} clients {same[c]}/{len(texts)}"
                                                              for c in levels))
    print(f"{max(levels)} clients: {top / by['generate(), one at a time']['req/s']:.2f}x the one-at-a-time "
          f"throughput (target >= 3x), {top / by[f'generate(), static batches of {batch}']['req/s']:.2f}x the static "
          f"batch's (target >= 0.8x)")
    if 1 in levels and 8 in levels:
        ratio = by["serve, 8 clients"]["TTFT ms median"] / by["serve, 1 clients"]["TTFT ms median"]
        print(f"Median TTFT at 8 clients: {ratio:.2f}x a lone request's (target <= 3x)")


if __name__ == "__main__":
    main()
