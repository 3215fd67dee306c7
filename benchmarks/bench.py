"""Speed and memory of nanoflant5 against transformers (and CTranslate2 when it is installed), on CPU, fp32.

    python benchmarks/bench.py            # flan-t5-small and flan-t5-base architectures, 3 timed repeats
    python benchmarks/bench.py --quick    # small only, 1 repeat
    python benchmarks/bench.py --modes    # also the low-precision modes (bfloat16, int8, w8a8) beside CTranslate2 int8
    python benchmarks/bench.py --first-call  # also the first call of a fresh process (eager; compiled, cold/warm)
    python benchmarks/bench.py --as-cpu avx2  # every library limited to AVX2, as on AMD Zen 2/3 or Intel's client CPUs

The checkpoints have random weights (tests/helpers.make_checkpoint with the preset's sizes): speed does not depend
on the weights, and the helper's weights make greedy and beam outputs vary, so "outputs equal" means something.
Each generation row: inputs of 64 tokens, exactly 64 new tokens (min_new_tokens = max_new_tokens = 64); tokens/s is
batch * 64 / seconds (returned tokens, also for beam search). Implementations run alternately (ours, transformers,
CTranslate2, ours, ...) after one warm-up each; the median of --repeats runs is reported, and with each ratio the
lowest and highest of the per-run ratios (each run against transformers' run in the same round), which shows how
much the shared machine moved the ratio during the benchmark.
The "mixed b8" row is what a server runs: 32 requests of 16-64 new tokens (forced) through nanoflant5's
continuous-batching engine, 8 rows a step, requests joining as rows free up (so a step's rows sit at different
positions); transformers and CTranslate2, which have no continuous batching, run them in static batches of 8, each
decoded to its longest request. tokens/s counts the requested tokens.
With --modes: nanoflant5 in bfloat16, with quantize="int8" and "w8a8", and CTranslate2's int8 model (int8_float32
on CPU), run on the same rows, and each one's agreement with float32 (nanoflant5's, which is transformers') over 64
prompts of greedy decoding: the share of rows identical and the mean position of the first differing token among the
others. These modes are not token-equal to float32; the random weights make outputs far more sensitive to rounding
than trained ones, so agreement here is a lower bound, comparable between implementations on the same model.
Each row also says which kernels nanoflant5's decoding step took (speed.last_path).
Peak memory: each implementation is loaded in a fresh subprocess that imports only its own library, runs the
beam-4 batch-8 generation and the encoder prefill once, and reports its peak RSS (VmHWM of /proc/self/status);
with --compile, nanoflant5's subprocess compiles too.
"""

from __future__ import annotations

import argparse
import json
import os
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
SETTINGS = [("greedy b1", 1, 1), ("beam4 b1", 1, 4), ("greedy b8", 8, 1), ("beam4 b8", 8, 4), ("greedy b32", 32, 1)]
MODES = {"nanoflant5 bf16": dict(dtype=torch.bfloat16), "nanoflant5 int8": dict(quantize="int8"),
         "nanoflant5 w8a8": dict(quantize="w8a8")}
AGREE_PROMPTS = 64
MIXED_REQUESTS, MIXED_ROWS = 32, 8  # the mixed-positions row: requests of 16-64 new tokens, 8 rows a step
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


def ct2_convert(folder: Path, quantization: str | None = None):
    """The CTranslate2 model folder for a checkpoint (converted in a subprocess, keeping ctranslate2 out of this
    one), or (None, reason) when ctranslate2 is missing or the conversion fails."""
    out = ct2_dir(folder, quantization)
    if not (out / "model.bin").exists():
        code = ("import ctranslate2, sys; ctranslate2.converters.TransformersConverter(sys.argv[1])"
                ".convert(sys.argv[2], quantization=sys.argv[3] if len(sys.argv) > 3 else None, force=True)")
        r = subprocess.run([sys.executable, "-c", code, str(folder), str(out)] + [quantization] * bool(quantization),
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"not installed or conversion failed: {last[:200]}"
    return out, None


def ct2_dir(folder: Path, quantization: str | None = None) -> Path:
    return folder.parent / (folder.name + "-ct2" + (f"-{quantization}" if quantization else ""))


# ------------------------------------------------------------------------------------------------ runners

def inputs(batch: int, length: int, seed: int = 0):
    from helpers import random_batch

    ids, mask = random_batch(32000, [length] * batch, seed=seed)  # ordinary pieces (no sentinels), ending in </s>
    return ids.to(DEVICE), mask.to(DEVICE)


def load_runners(folder: Path, impls):
    """name -> (generate(ids, mask, beams) -> LongTensor rows, encode(ids, mask) -> tensor or None)."""
    runners = {}
    from nanoflant5 import T5, speed

    for name in [i for i in impls if i.startswith("nanoflant5")]:
        ours = T5.from_pretrained(folder, device=DEVICE, **MODES.get(name, dict(dtype=DTYPE)))
        runners[name] = (
            lambda ids, mask, beams, new=NEW, ours=ours: ours.generate(ids, mask, max_new_tokens=new,
                                                                       min_new_tokens=new, num_beams=beams,
                                                                       compile=COMPILE),
            lambda ids, mask, ours=ours: speed.encode(ours, ids, mask),  # generate()'s encoder pass
            lambda ids, mask, lengths, ours=ours: engine_run(ours, ids, mask, lengths))
    if "transformers" in impls:
        from transformers import T5ForConditionalGeneration

        hf = T5ForConditionalGeneration.from_pretrained(folder, dtype=DTYPE).to(DEVICE).eval()
        runners["transformers"] = (
            lambda ids, mask, beams, new=NEW: hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                          max_new_tokens=new, min_new_tokens=new, num_beams=beams),
            lambda ids, mask: hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    if "ctranslate2" in impls:
        runners["ctranslate2"] = (CT2Worker(ct2_dir(folder)).generate, None)
    if "ctranslate2 int8" in impls:
        runners["ctranslate2 int8"] = (CT2Worker(ct2_dir(folder, "int8"), "int8_float32").generate, None)
    return runners


class CT2Worker:
    """CTranslate2 in a process of its own (benchmarks/ct2_worker.py, which does not import torch): once it has
    run in a process, its OpenMP runtime slows torch there by ~40% (nanoflant5 greedy b1 small: 103 -> 59 tok/s).
    The worker times each call itself; token ids go through a pipe."""

    def __init__(self, model_dir: Path, compute_type: str = "default"):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "ct2_worker.py"), str(model_dir),
                                      str(THREADS), compute_type], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.seconds = None

    def generate(self, ids, mask, beams, new=NEW):
        request = {"src": [row[m.bool()].tolist() for row, m in zip(ids, mask)], "beams": beams, "new": new}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.seconds = reply["seconds"]
        rows = reply["rows"]
        width = max(map(len, rows))
        return torch.tensor([[0] + r + [0] * (width - len(r)) for r in rows])  # start token first, like HF


def engine_run(model, ids, mask, lengths):
    """Continuous batching (nanoflant5's engine, MIXED_ROWS rows a step): the requests join as rows free up, so a
    step's rows sit at different positions. -> the requests' rows."""
    from nanoflant5.engine import Engine, Request

    engine = Engine(model, max_batch_size=MIXED_ROWS, max_new_tokens=max(lengths))
    requests = [engine.submit(Request(row[m.bool()].tolist(), dict(max_new_tokens=n, min_new_tokens=n)))
                for row, m, n in zip(ids, mask, lengths)]
    engine.run_until_idle()
    return [r.rows[0] for r in requests]


def static_batches(generate, ids, mask, lengths):
    """The same requests in static batches of MIXED_ROWS (each decoded for its longest request's length), as an
    implementation without continuous batching runs them. -> each request's row, cut to its length."""
    rows, seconds = [], 0.0
    worker = getattr(generate, "__self__", None)
    for i in range(0, len(lengths), MIXED_ROWS):
        n = max(lengths[i:i + MIXED_ROWS])
        out = generate(ids[i:i + MIXED_ROWS], mask[i:i + MIXED_ROWS], 1, new=n)
        rows += [row[:1 + k] for row, k in zip(out, lengths[i:i + MIXED_ROWS])]
        seconds += worker.seconds if isinstance(worker, CT2Worker) else 0.0
    if isinstance(worker, CT2Worker):
        worker.seconds = seconds  # race() reads the worker's own timing
    return rows


def timed(fn, *args):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def race(runners: dict, call, repeats: int, paths: dict | None = None):
    """One warm-up each, then `repeats` alternating runs. -> name -> (seconds of each run, output of the last run).
    paths: filled with nanoflant5's kernel path per runner."""
    from nanoflant5 import speed

    times = {n: [] for n in runners}
    outs = {}
    for n in runners:
        call(runners[n])
        if paths is not None and n.startswith("nanoflant5"):
            paths[n] = speed.last_path
    for _ in range(repeats):
        for n in runners:
            dt, outs[n] = timed(call, runners[n])
            worker = getattr(runners[n][0], "__self__", None)
            times[n].append(worker.seconds if isinstance(worker, CT2Worker) else dt)
    return {n: (times[n], outs[n]) for n in runners}


def bench_model(name: str, folder: Path, ct2_ok: bool, repeats: int, modes: list):
    impls = ["nanoflant5", "transformers"] + (["ctranslate2"] if ct2_ok else []) + modes
    runners = load_runners(folder, impls)
    rows = []
    for label, batch, beams in SETTINGS:
        ids, mask = inputs(batch, IN_LEN, seed=batch)
        paths = {}
        res = race(runners, lambda r: r[0](ids, mask, beams), repeats, paths)
        hf_out = res["transformers"][1]
        tps = speeds(res, batch * NEW)
        ours_out = res["nanoflant5"][1]
        same = sum(torch.equal(a, b) for a, b in zip(ours_out, hf_out)) if ours_out.shape == hf_out.shape else 0
        equal = "yes" if same == len(hf_out) else f"**{same}/{len(hf_out)} rows**"
        if "ctranslate2" in res:
            ct = res["ctranslate2"][1]
            same = sum(torch.equal(a[:NEW + 1], b[:NEW + 1]) for a, b in zip(ct, hf_out)) if ct.shape[1] >= NEW + 1 else 0
            equal += f"; ct2 {same}/{batch} rows"
        rows.append((name, label, tps, equal, paths))
        print(f"[bench] {name} {label}: {rates(tps)} ({equal}; {paths})", file=sys.stderr)
    lengths = [16 + (i * 37) % 49 for i in range(MIXED_REQUESTS)]  # 16-64, mixed
    ids, mask = inputs(MIXED_REQUESTS, IN_LEN, seed=5)
    mixed = {n: r for n, r in runners.items() if n in ("nanoflant5", "transformers", "ctranslate2")}
    paths = {}
    res = race(mixed, lambda r: r[2](ids, mask, lengths) if len(r) > 2 else static_batches(r[0], ids, mask, lengths),
               repeats, paths)
    tps = speeds(res, sum(lengths))
    same = sum(torch.equal(a, b[:len(a)]) for a, b in zip(res["nanoflant5"][1], res["transformers"][1]))
    label = f"mixed b{MIXED_ROWS}"
    rows.append((name, label, tps, f"{same}/{MIXED_REQUESTS} requests",
                 {"nanoflant5": "engine (last step: " + paths.get("nanoflant5", "") + ")"}))
    print(f"[bench] {name} {label}: {rates(tps)} ({same}/{MIXED_REQUESTS})", file=sys.stderr)
    ids, mask = inputs(ENC_BATCH, ENC_LEN, seed=7)
    enc = {n: r for n, r in runners.items() if r[1] is not None}
    with torch.inference_mode():
        res = race(enc, lambda r: r[1](ids, mask), repeats)
    diff = (res["nanoflant5"][1] - res["transformers"][1]).abs().max().item()
    scale = res["transformers"][1].abs().max().item()
    tps = speeds(res, ENC_BATCH * ENC_LEN)
    rows.append((name, f"encoder b{ENC_BATCH}x{ENC_LEN}", tps, f"max abs diff {diff:.1e} (of max {scale:.1e})", {}))
    print(f"[bench] {name} encoder: {rates(tps)}", file=sys.stderr)
    agree = agreement(runners, modes) if modes else {}
    return rows, agree


def agreement(runners: dict, modes: list):
    """Each mode's greedy rows for AGREE_PROMPTS prompts against nanoflant5's float32 rows: (share identical, mean
    position of the first differing token among the rows that differ)."""
    ids, mask = inputs(AGREE_PROMPTS, IN_LEN, seed=99)
    want = runners["nanoflant5"][0](ids, mask, 1)
    out = {}
    for mode in modes:
        got = runners[mode][0](ids, mask, 1)
        n = min(got.shape[1], want.shape[1])
        differs = got[:, :n] != want[:, :n]
        first = [int(row.nonzero()[0]) for row in differs if row.any()]
        out[mode] = (1 - len(first) / len(want), sum(first) / len(first) if first else None)
        print(f"[bench] {mode}: {out[mode]}", file=sys.stderr)
    return out


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


def ratio(tps, n, base="transformers"):
    """The ratio of the medians to base's, and (over several runs) the range of the per-run ratios."""
    if n not in tps or base not in tps:
        return "—"
    runs = [a / b for a, b in zip(tps[n][1], tps[base][1])]
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{tps[n][0] / tps[base][0]:.2f}x{spread}"


def first_calls(folder: Path):
    """path -> (first, second, third call's seconds, import + load seconds), each path in a fresh process."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for path, mode in [("eager (default)", "eager"), ("compile=True, cold cache", "compile"),
                           ("compile=True, warm cache", "compile")]:
            r = subprocess.run([sys.executable, __file__, "--first-call-child", mode, str(folder)], check=True,
                               capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            out[path] = [float(t) for t in r.stdout.split()[-4:]]
            print(f"[bench] first calls, {path}: {out[path]}", file=sys.stderr)
    return out


def first_call_child(mode: str, folder: str):
    start = time.perf_counter()
    torch.set_num_threads(THREADS)
    from nanoflant5 import T5

    model = T5.from_pretrained(folder)
    loaded = time.perf_counter() - start
    ids, mask = inputs(1, IN_LEN, seed=1)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            model.generate(ids, mask, max_new_tokens=NEW, min_new_tokens=NEW, compile=mode == "compile")
            times.append(time.perf_counter() - t)
    print(*times, loaded)


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


def as_cpu(name: str) -> bool:
    """Set the environment in which this CPU runs as `name` would (kernels.AS_CPU). -> whether it changed, i.e. the
    process must start again to take it."""
    from nanoflant5.kernels import AS_CPU

    changed = any(os.environ.get(k) != v for k, v in AS_CPU[name].items())
    os.environ.update(AS_CPU[name])
    return changed


def limits_note() -> str:
    from nanoflant5.kernels import AS_CPU

    limits = [f"{k}={os.environ[k]}" for k in dict.fromkeys(k for env in AS_CPU.values() for k in env)
              if os.environ.get(k)]
    return f"; run with {', '.join(limits)}" if limits else ""


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
    p.add_argument("--modes", action="store_true", help="also bfloat16, int8 and w8a8 (and CTranslate2 int8)")
    p.add_argument("--first-call", action="store_true", help="also the first calls of fresh processes")
    p.add_argument("--as-cpu", choices=("avx2", "zen4"), help="run as a CPU with AVX2 only (AMD Zen 2/3, Intel's "
                   "client CPUs) or as AMD Zen 4 would, as far as instructions go (kernels.AS_CPU)")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--first-call-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.as_cpu and as_cpu(args.as_cpu):
        os.execv(sys.executable, [sys.executable] + sys.argv)  # afresh, so that every library reads the limits
    global DEVICE, DTYPE, COMPILE
    DEVICE, DTYPE, COMPILE = torch.device(args.device), getattr(torch, args.dtype), args.compile
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.first_call_child:
        return first_call_child(*args.first_call_child)
    if args.quick:
        args.models, args.repeats = "small", 1
    if DEVICE.type != "cpu":
        args.no_memory = True
    torch.set_num_threads(THREADS)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    rows, mem, ct2_notes, agree, first = [], [], {}, {}, {}
    for key in args.models.split(","):
        name = MODELS[key.strip()]
        folder = checkpoint(cache, name)
        ct2_dir, why = ct2_convert(folder) if DEVICE.type == "cpu" else (None, "CPU only in this benchmark")
        if why:
            ct2_notes[name] = why
        modes = list(MODES) if args.modes else []
        if args.modes and ct2_dir is not None and ct2_convert(folder, "int8")[0] is not None:
            modes.append("ctranslate2 int8")
        if args.first_call:  # first, while this process holds no model (a fresh process's memory is not contended)
            first[name] = first_calls(folder)
        with torch.inference_mode():
            model_rows, agree[name] = bench_model(name, folder, ct2_dir is not None, args.repeats, modes)
        rows += model_rows
        if not args.no_memory:
            impls = ["baseline", "transformers", "nanoflant5"] + (["ctranslate2"] if ct2_dir else [])
            mem.append((name, {i: peak_rss(i, folder) for i in impls}))

    print(f"\nCommand: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})  \ntorch {torch.__version__}, {THREADS} threads, {args.dtype}, "
          f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else cpu_model()}{limits_note()}"
          f"{'; nanoflant5 compiled' * COMPILE}; "
          f"inputs {IN_LEN} tokens, {NEW} new tokens forced; median of {args.repeats} alternating runs after a warm-up"
          f"{'; ratio (lowest-highest per-run ratio)' * (args.repeats > 1)}.\n")
    print("| model | setting | transformers tok/s | nanoflant5 tok/s | ratio | CTranslate2 tok/s | ratio | "
          "nanoflant5 / CTranslate2 | outputs equal | nanoflant5's kernels |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name, label, tps, equal, paths in rows:
        print(f"| {name} | {label} | {fmt(tps, 'transformers')} | {fmt(tps, 'nanoflant5')} | {ratio(tps, 'nanoflant5')}"
              f" | {fmt(tps, 'ctranslate2')} | {ratio(tps, 'ctranslate2')} | {ratio(tps, 'nanoflant5', 'ctranslate2')}"
              f" | {equal} | {paths.get('nanoflant5', '')} |")
    if args.modes:
        print("\nLow-precision modes (not token-equal to float32), tok/s and the ratio to CTranslate2 int8 "
              "(int8_float32) in the same rounds:\n")
        names = list(MODES) + ["ctranslate2 int8"]
        short = [m.removeprefix("nanoflant5 ") for m in MODES]  # bf16, int8, w8a8
        print("| model | setting | " + " | ".join(f"{m} tok/s" for m in names) + " | "
              + " | ".join(f"{m} / ct2 int8" for m in short) + " | kernels (" + "; ".join(short) + ") |")
        print("|---|---|" + "---:|" * (len(names) + len(short)) + "---|")
        for name, label, tps, equal, paths in rows:
            if "nanoflant5 int8" not in tps:
                continue
            if "encoder" in label:
                print(f"| {name} | {label} | " + " | ".join(fmt(tps, m) for m in names) + " | —" * len(short)
                      + f" | (transformers fp32 {fmt(tps, 'transformers')}) |")
            else:
                print(f"| {name} | {label} | " + " | ".join(fmt(tps, m) for m in names) + " | "
                      + " | ".join(ratio(tps, m, "ctranslate2 int8") for m in MODES) + " | "
                      + "; ".join(paths.get(m, "") for m in MODES) + " |")
        print(f"\nAgreement with float32, greedy, {AGREE_PROMPTS} prompts of {IN_LEN} tokens, {NEW} new tokens: rows "
              "identical, and the mean position of the first differing token in the others:\n")
        print("| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for name, res in agree.items():
            print(f"| {name} | " + " | ".join(f"{res[m][0]:.0%}, {res[m][1] or 0:.1f}" if m in res else "—"
                                             for m in names) + " |")
    if first:
        print("\nFirst calls of a fresh process (greedy b1, 64 new tokens; seconds): the default path (eager), and "
              "compile=True with an empty compile cache, then again with the cache it left:\n")
        print("| model | path | first call | second | third | import + load |\n|---|---|---:|---:|---:|---:|")
        for name, res in first.items():
            for path, times in res.items():
                print(f"| {name} | {path} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
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
