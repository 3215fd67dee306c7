"""The speed machinery of decoding, apart from the algorithms it speeds up (generate.py), behind one object:
generate.py makes a Speedups for each call (`decoding`) and asks it for the step's output (`head`), greedy tokens
(`greedy`), beam search's candidates (`top_k`) and the compiled step (`compiled`). What it does:

- faster kernels for a decoding step's linear layers on CPU (fast_linears): nanoflant5's own for 1-4 rows
  of float32 (kernels.py), else packed GEMMs (nanoflant5's panel_linear, MKL's or oneDNN's, whichever measures
  fastest on the CPU at hand), with packed copies kept between compiled calls;
- the layer norms, activations and attention through kernels in eager decoding (fast_layers, fast_attention), and
  each decoder block's step in one kernel call (fast_blocks);
- greedy decoding's output layer read as int8 (OutputScreen), which still picks the full layer's token;
- argmax and top-k by blocks of the vocabulary on CPU (argmax, top_k), exactly torch's results;
- torch.compile of the decoding step, with an eager fallback (compiled_step).

None of it changes a token: each piece is tested against the plain path (tests/test_generate.py, test_screen.py,
test_kernels.py). docs/performance.md has the measurements behind each choice.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import weakref
from contextlib import contextmanager
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .config import GenerationConfig
from . import kernels
from .model import T5, Encoder, FeedForward, RMSNorm, padding_mask, relative_position_bucket, use_flex
from .quantize import Int8Linear, W8A8Linear

# Faster kernels for the decoding step's linear layers on CPU (see fast_linears): nanoflant5's own for 1-4 rows of
# float32 (kernels.py), and packed GEMMs (PACKERS) where they measure faster than F.linear.
KERNELS = True  # tests switch them off to compare with the packed GEMMs
PACK_ROWS = range(1, 65)  # rows per step for which packed GEMMs are considered
PACK_MIN_STEPS = 16
KEEP_BYTES = 2 ** 31  # compiled decoding keeps packed copies between calls up to this size (see fast_linears)


class Speedups:
    """What one generate()/stream() call's decoding loops ask of the speed machinery (see `decoding`).
    screen: greedy decoding's OutputScreen, or None (then the step returns logits)."""

    def __init__(self, model: T5, g: GenerationConfig, rows: int, dtype: torch.dtype, compile: bool, scores: bool):
        self.model, self.compile, self.dtype = model, compile, dtype
        self.screen = None if scores else output_screen(model, g, rows)
        # blockwise top-k may order equal entries unlike torch.topk: only where equal scores do not come up (they are
        # common with half-precision activations)
        self.blockwise_top_k = dtype in (torch.float32, torch.float64)

    def head(self, hidden):
        """The decoding step's output for the decoder's last hidden states (N, d_model): float32 logits (N, vocab),
        or the screen's bounds for the output layer's inputs (computed in the step's graph when compiled)."""
        if self.screen is not None:
            return self.screen.bounds(self.model.head_inputs(hidden))
        return self.model.logits(hidden).float()

    def greedy(self, out, process):
        """The greedy tokens (N,) from the step's output and `process` (transformers' greedy logits processors, in
        place): argmax(process(logits)). Uses `out` up."""
        return self.screen.argmax(out, process) if self.screen is not None else argmax(process(out))

    def top_k(self, scores, k: int):
        return top_k(scores, k) if self.blockwise_top_k else scores.topk(k)

    def compiled(self, step, device):
        """The decoding step as the loops call it: through torch.compile (compiled_step) if this call compiles."""
        if not self.compile:
            return step
        key = compile_key(self.model, self.dtype)
        return compiled_step(step, device, on_compiled=lambda seconds: record_compile_seconds(key, seconds))


@contextmanager
def decoding(model: T5, g: GenerationConfig, rows: int, dtype: torch.dtype, compile: bool | None = None,
             scores: bool = False):
    """The Speedups of a decoding call of `rows` rows a step in activations of `dtype`; inside the block, the step's
    linear layers run on the fastest kernels that pay (fast_linears). compile: the step goes through torch.compile
    (and keeps its packed weights between calls); None: once compiling pays (compile_pays). scores: the caller needs
    every token's probability (no screen)."""
    global last_path
    if compile is None:
        compile = compile_pays(model, dtype)
    fast = Speedups(model, g, rows, dtype, compile, scores)
    start = time.perf_counter()
    with fast_linears(model, rows, g.new_tokens, output_layer=fast.screen is None, keep=compile), \
            fast_layers(model, compile), fast_attention(model, compile), fast_blocks(model, rows, compile):
        last_path += (" + int8 screen" * (fast.screen is not None) + " + compiled" * compile
                      + " + decoder_block" * (not compile and model in _BLOCKS_TAKEN))
        yield fast
    if not compile:
        _EAGER_SECONDS[model] = _EAGER_SECONDS.get(model, 0.0) + time.perf_counter() - start


# compile=None, generate()'s default: a model decodes eagerly until compiling pays, by the rule of renting skis until
# their rent has cost as much as buying them (Karlin, Manasse, McGeoch & Owicki 1994, "Competitive randomized
# algorithms for nonuniform problems"): once the model's eager decoding in this process has taken as long as
# compiling its step takes, it is compiled. Whatever the work to come, that costs at most about twice the better of
# "never compile" and "compile at once". A short job (a CLI call, a first request) never waits for a compiler; a long
# or repeated one is compiled early in it. How long compiling takes is measured when it happens and kept beside
# torch's compile cache (a later process with that cache compiles in ~9 s instead of ~33 s for flan-t5-small), else
# COMPILE_SECONDS is assumed. Except where the eager step runs each decoder block in one kernel call (fast_blocks:
# float32 activations on CPU, the int8 modes too): there the eager step measured as fast as the compiled one or
# faster (flan-t5-small greedy b1 0.382 against 0.421 s, b8 0.633 / 0.704, b32 1.457 / 1.635; flan-t5-base greedy
# b1 1.227 / 1.237), so compiling would not pay, and compile=None stays eager.
COMPILE_AUTO = True  # tests switch it off: their default path stays eager
COMPILE_SECONDS = 30.0  # the guess before a measurement: flan-t5-small's step with an empty cache took 33 s here
MIN_COMPILE_SECONDS = 2.0  # no compile has taken less (nor is the file of measurements read before)
_EAGER_SECONDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> eager decoding seconds so far
_COMPILE_FAILED: set = set()  # device types where compiling failed in this process: not tried again unasked
_COMPILING: weakref.WeakSet = weakref.WeakSet()  # models compile=None compiles
_BLOCKS_TAKEN: weakref.WeakSet = weakref.WeakSet()  # models whose last eager decoding took fast_blocks
_MEASURED: set = set()  # compile keys timed in this process (a later compile of the same key reuses dynamo's work)


def compile_pays(model: T5, dtype: torch.dtype) -> bool:
    """Whether compile=None compiles this call's decoding step (see above; CPU only: compiling on GPU is untested)."""
    device = model.shared.weight.device
    if not COMPILE_AUTO or device.type != "cpu" or device.type in _COMPILE_FAILED:
        return False
    if model in _COMPILING:
        return True
    if model in _BLOCKS_TAKEN:  # (see above)
        return False
    spent = _EAGER_SECONDS.get(model, 0.0)
    if spent >= MIN_COMPILE_SECONDS and spent >= compile_seconds(compile_key(model, dtype)):
        _COMPILING.add(model)  # from now on (its compiled graphs are kept)
        return True
    return False


def compile_key(model: T5, dtype: torch.dtype) -> str:
    """What a compiled step's cost depends on: the architecture, the dtype, int8 layers, torch's version."""
    from dataclasses import asdict

    quantized = sorted({m.mode for m in model.modules() if isinstance(m, Int8Linear)})
    return json.dumps([asdict(model.config), str(dtype), quantized, torch.__version__], sort_keys=True, default=str)


def compile_seconds_file() -> str:
    """Beside torch's compile cache (TORCHINDUCTOR_CACHE_DIR), so that the two go together."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.join(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir(),
                        "nanoflant5-compile-seconds.json")


def measured_compile_seconds(path: str) -> dict:
    """The file of measurements: compile key -> seconds ({} if missing or unreadable)."""
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def compile_seconds(key: str) -> float:
    """The seconds compiling this key's step took when it was last measured with this compile cache, or the guess."""
    try:
        return float(measured_compile_seconds(compile_seconds_file()).get(key, COMPILE_SECONDS))
    except (ValueError, TypeError):
        return COMPILE_SECONDS


def record_compile_seconds(key: str, seconds: float):
    """Keep the measurement for later processes (the first compile of a key in a process only: a later one in the
    same process reuses dynamo's work and would understate it). Written atomically; a failure to write is ignored."""
    from .load import write_atomically

    if key in _MEASURED:
        return
    _MEASURED.add(key)
    path = compile_seconds_file()
    known = measured_compile_seconds(path)
    known[key] = round(seconds, 2)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(known)))
    except OSError:
        pass


def compiled_step(step, device, on_compiled=None):
    """torch.compile of a decoding step, with dynamic shapes so one compilation serves every position (and later
    calls with the same model). If compiling fails (no C++ compiler for the CPU backend, an unsupported setup), one
    warning, then the eager step. on_compiled(seconds): called once with how long the first compiled call took."""
    fast = torch.compile(step, dynamic=True, options={"cpp_wrapper": True} if device.type == "cpu" else None)
    first = True

    def run(tokens, pos: int):
        nonlocal fast, first
        if fast is not None and pos > 0:  # position 0 runs eagerly: dynamo would compile a graph just for it
            try:
                start = time.perf_counter()
                out = fast(tokens, pos)
                if first and on_compiled is not None:
                    on_compiled(time.perf_counter() - start)
                first = False
                return out
            except Exception as e:  # a step that fails eagerly too raises again below
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"torch.compile failed, decoding eagerly: {type(e).__name__}: {first_line}")
                _COMPILE_FAILED.add(device.type)
                fast = None
        return step(tokens, pos)

    return run


class Packer(NamedTuple):
    """A GEMM on copies of the weights laid out ahead for a row count."""
    pack: Callable  # (weight, rows) -> the packed copy
    run: Callable  # (x, packed copy, weight, rows) -> F.linear(x, weight)
    dtypes: tuple  # the weight dtypes it takes
    ready: Callable = lambda: True  # whether it can run here


def pack_panels(w, rows: int = 0):
    """w (N, K) as kernels.panel_linear reads it, for any number of rows: (ceil(N / 64), K, 64), each panel's 64
    output columns' weights k by k, zeros past N."""
    N, K = w.shape
    panels = -(-N // 64)
    if N % 64:
        w = torch.cat([w, w.new_zeros(panels * 64 - N, K)])
    return w.reshape(panels, 64, K).transpose(1, 2).contiguous()


def pack_bf16_panels(w, rows: int = 0):
    """w (N, K) bfloat16 as kernels.bf16_panel_linear reads it: (ceil(N / 64), ceil(K / 2), 64, 2), each panel's 64
    output columns' weights a pair of k's at a time, zeros past N and K."""
    N, K = w.shape
    w = F.pad(w, (0, K % 2, 0, -N % 64))
    return w.reshape(-1, 64, (K + 1) // 2, 2).transpose(1, 2).contiguous()


# Which packed GEMM is fastest depends on the CPU and the rows (on AMD EPYC (Zen 4) MKL takes slow paths and oneDNN's
# measured ~3x faster than it (issue 20); bfloat16 oneDNN's, on AMX where the CPU has it, or nanoflant5's on
# AVX512-BF16), so it is measured on the CPU at hand on first use (choose_packer). "panels" is nanoflant5's own
# (kernels.panel_linear, float32), "bf16_panels" its bfloat16 one (kernels.bf16_panel_linear: on an AMD EPYC (Zen 4),
# flan-t5-base's decoder linears at 8 rows 7.3-7.6 ms against oneDNN's 10.2-11.6, at 32 rows 19.9-20.6 against
# 20.3-21.5).
PACKERS: dict[str, Packer] = {}
if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
    PACKERS["mkl"] = Packer(lambda w, rows: torch.ops.mkl._mkl_reorder_linear_weight(w, rows),
                            lambda x, packed, w, rows: torch.ops.mkl._mkl_linear(x, packed, w, None, rows),
                            (torch.float32,))
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    PACKERS["onednn"] = Packer(lambda w, rows: torch.ops.mkldnn._reorder_linear_weight(w, rows),
                               lambda x, packed, w, rows: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                             [], ""),
                               (torch.float32,) + (torch.bfloat16,) * torch.ops.mkldnn._is_mkldnn_bf16_supported())
PACKERS["panels"] = Packer(pack_panels, lambda x, packed, w, rows: torch.ops.nanoflant5_cpu.panel_linear(
    x, packed, w.shape[0]), (torch.float32,), lambda: KERNELS and kernels.available())
PACKERS["bf16_panels"] = Packer(pack_bf16_panels, lambda x, packed, w, rows: torch.ops.nanoflant5_cpu.bf16_panel_linear(
    x, packed, w.shape[0]), (torch.bfloat16,), lambda: KERNELS and kernels.available() and kernels.BF16_PANELS)
PACKING = True  # tests switch packing off to compare with plain F.linear
last_path = ""  # what the last fast_linears block ran the linears on (the bench prints it)
PACKER = None  # None: the measured choice; a name of PACKERS: that one wherever it takes the weight (tests)
MEASURE_BYTES = 2 ** 25  # choose_packer's weights
MEASURE_ROUNDS = 5
_CHOSEN: dict[tuple, str] = {}  # (dtype, rows) -> the name of the fastest packer


def choose_packer(weight, rows: int):
    """The name of the fastest packed GEMM for `rows` rows times weights of this dtype (None: none takes them).
    Measured on first use for each dtype and row count, as a decoding step runs them: each candidate over
    MEASURE_BYTES of random (1024, 1024) weights, more than the caches near a core hold, so they stream from farther
    away (each candidate's best of MEASURE_ROUNDS passes, the candidates taking turns, after a warm-up; ~0.2 s),
    and remembered for the process. Measuring one weight of the layer's shape in cache instead favoured MKL's by
    5-8%, while in decoding panel_linear runs flan-t5-base's decoder linears 1.2-1.4x faster at 8-32 rows. F.linear
    is not a candidate: a decoding step's weights stream from memory, where it was slower than every packed GEMM at
    4-64 rows (flan-t5-base's decoder linears at 8 rows: 43.7 ms, MKL's packed 31, panel_linear 24; on AMD EPYC
    11.7 against oneDNN's 3.1 ms), but over MEASURE_BYTES, which a large L3 cache holds, it can measure
    within a few % of panel_linear, and a bench run that picked it was 1.14-1.35x slower at greedy b8."""
    candidates = [name for name, p in PACKERS.items() if weight.dtype in p.dtypes and p.ready()]
    if PACKER is not None or not candidates:
        return PACKER if PACKER in candidates else None
    key = (weight.dtype, rows)
    if key not in _CHOSEN and len(candidates) == 1:
        _CHOSEN[key] = candidates[0]
    if key not in _CHOSEN:
        gen = torch.Generator().manual_seed(0)
        ws = [torch.randn(1024, 1024, generator=gen).to(weight.dtype)
              for _ in range(max(1, MEASURE_BYTES // (2 ** 20 * weight.element_size())))]
        x = torch.randn(rows, 1024, generator=gen).to(weight.dtype)
        packed = {name: [PACKERS[name].pack(w, rows) for w in ws] for name in candidates}
        times = best_times({name: lambda name=name: [PACKERS[name].run(x, p, w, rows) for p, w in zip(packed[name], ws)]
                            for name in candidates}, MEASURE_ROUNDS)
        _CHOSEN[key] = min(times, key=times.get)
    return _CHOSEN[key]


def best_times(runs: dict, rounds: int) -> dict:
    """Each run's best time (s) of `rounds`, the runs taking turns, so that a busy moment of the machine does not fall
    on one of them only, after a round that warms up."""
    times = {name: float("inf") for name in runs}
    for i in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i:
                times[name] = min(times[name], time.perf_counter() - start)
    return times


@contextmanager
def fast_linears(model: T5, rows: int, steps: int, output_layer: bool = True, keep: bool = False,
                 packing: bool = True, panels: weakref.WeakKeyDictionary | None = None):
    """Inside the block, a decoding step's linear layers (self- and cross-attention, feed-forward, output layer) run
    on faster CPU kernels than F.linear, for the number of rows every step feeds, where that pays: CPU, float32 or
    bfloat16, no autocast, 16 or more steps.
    - 1-4 rows of float32 or bfloat16: kernels.rows_linear (built on first use; see kernels.py), which reads each
      weight once a step, in order, with software prefetch. Compiled generations, against MKL's matrix-vector
      product (1 row) and packed GEMM (4 rows): flan-t5-small greedy b1 1.02x, beam4 b1 1.19x faster; flan-t5-base
      1.05x and 1.22x.
    - Otherwise (1-64 rows): a packed GEMM (PACKERS: nanoflant5's panel_linear, MKL's, oneDNN's) on copies of the
      weights laid out ahead, the one that measured fastest for the row count and dtype (choose_packer). For 4 to 64
      rows of float32 MKL's packed GEMM made whole generations 1.1-1.3x faster than F.linear on an Intel Xeon, and
      panel_linear 1.10-1.15x faster than MKL's (8-32 rows, flan-t5-small and -base); packing costs about two steps,
      which does not pay for short generations. The copies (~1.35x those weights' memory) are made on entry and
      dropped on exit, unless keep=True (compiled decoding, which keeps its graphs too) and they take at most
      KEEP_BYTES (flan-t5-base's: 0.67 GB): then they stay with the layers for the next call with the same row count,
      which uses them only if the weights still have the fingerprints they had when packed, so weights changed between
      calls (training) never meet a stale copy. Checking costs a quarter of packing; keeping made compiled beam4 b1
      decoding 1.05-1.16x faster here, batch 8 up to 1.05x. bfloat16 (oneDNN, AMX): flan-t5-small's step linears
      2.7/2.9/3.8/6.7 ms at 1/8/32/64 rows against F.linear's 5.0/4.3/6.0/10.2 ms; eager generations 1.1-1.3x faster.
    output_layer=False: not the output layer (greedy decoding reads it through an OutputScreen). packing=False: no
    packed copies for the row count (continuous batching, whose row count changes from step to step), only the
    kernels, and panel_linear's copies in `panels` (linear -> (weight, copy)) where it measures fastest: they serve
    any row count, so the caller (the engine, whose weights do not change under it) keeps them; made on first use,
    again for a layer whose weight was replaced."""
    linears = [model.lm_head] * output_layer + [linear for b in model.decoder.blocks
                                 for linear in (b.attn.qkv, b.attn.o, b.cross.q, b.cross.o, b.ffn.wi, b.ffn.wo)]
    global last_path
    if any(type(linear) is not nn.Linear for linear in linears):  # int8 layers (quantize.py) bring their kernel
        float32 = model.shared.weight.dtype == torch.float32
        kernel = linears[-1].kernel(rows) if float32 and kernels.available() else None
        last_path = f"{type(linears[-1]).__name__} layers: {kernel or 'F.linear'}"
        yield
        return
    dtype = linears[-1].weight.dtype
    cpu = (steps >= PACK_MIN_STEPS and not torch.is_autocast_enabled("cpu")
           and all(linear.weight.device.type == "cpu" and linear.weight.dtype == dtype for linear in linears))
    if cpu and KERNELS and all(kernels.fits(linear.weight, rows) for linear in linears):
        last_path = "rows_linear"
        with forwards(linears, _KERNEL_FORWARDS, torch.ops.nanoflant5_cpu.rows_linear):
            yield
        return
    if not (cpu and (packing or panels is not None) and PACKING and rows in PACK_ROWS):
        last_path = "F.linear"
        yield
        return
    chosen = {linear: choose_packer(linear.weight, rows) for linear in linears}
    if not packing:  # the caller's panel copies only
        chosen = {linear: "panels" if choice == "panels" else None for linear, choice in chosen.items()}
    last_path = "+".join(sorted({str(c or "F.linear") for c in chosen.values()}))
    linears = [linear for linear in linears if chosen[linear] is not None]
    keep = keep and sum(linear.weight.nbytes for linear in linears) * 1.4 <= KEEP_BYTES  # (copies: ~1.35x)
    packed = []  # keys of this block's copies
    try:
        for linear in linears:
            w = linear.weight
            key = (w.data_ptr(), w.shape)
            if packing:
                copy = pack(linear, chosen[linear], rows, keep)
            elif panels.get(linear, (None,))[0] is w:  # the caller's copy, made for this weight
                copy = panels[linear][1]
            else:
                copy = pack_panels(w)
                panels[linear] = w, copy
            _PACKED[key] = copy, rows, chosen[linear]
            packed.append(key)
        with forwards(linears, _FORWARDS, torch.ops.nanoflant5.packed_linear):
            yield
    finally:
        for key in packed:
            _PACKED.pop(key, None)


@contextmanager
def fast_layers(model: T5, compile: bool = False):
    """Inside the block, the layer norms and gated-GELU activations run kernels.rms_norm and kernels.gated_gelu
    (fused_layers): eager float32 decoding on CPU (a compiled step fuses them itself). A layer norm is one operator
    call where torch's rms_norm on CPU makes ~20 (2.2 against 9 us for one row of flan-t5-small; a decoding step has
    3 per layer); the activation one pass where gelu and mul make two (32 rows of flan-t5-base: 18 against 62 us)."""
    w = model.decoder.final_norm.weight
    if compile or not KERNELS or w.dtype != torch.float32 or w.device.type != "cpu" or not kernels.available():
        yield
        return
    with fused_layers(model):
        yield


@contextmanager
def fast_attention(model: T5, compile: bool = False):
    """Inside the block, the decoder's self- and cross-attention run kernels.decode_attention: eager float32 or
    bfloat16 on CPU (a compiled step fuses attention itself). torch's SDPA spends most of a decoding step's call (one
    query a row) on per-(row, head) set-up: flan-t5-base, 32 rows, 64 keys, 12 heads: 591 against 382 us (both
    memory-bound there), flan-t5-small 8 rows 52 against 29 us; in bfloat16 ~2 ms a call on AMD EPYC (Zen 4); and
    beam search's gather of each row's history is no copy."""
    if compile or not KERNELS or model.shared.weight.device.type != "cpu" or not kernels.available():
        yield
        return
    blocks = model.decoder.blocks
    try:
        for block in blocks:
            block.attn.attend_cache = partial(_attend_cache, block.attn)
            block.cross.attend = partial(_attend, block.cross)
        yield
    finally:
        for block in blocks:
            block.attn.__dict__.pop("attend_cache", None)
            block.cross.__dict__.pop("attend", None)


def _kernel_shapes(head_size: int, queries: int) -> bool:
    """Whether kernels.decode_attention takes heads of this size (a multiple of 16, up to 128) with this many queries
    a row (a few: up to 16)."""
    return not head_size % 16 and head_size <= 128 and queries <= 16


def _kernel_takes(q, k) -> bool:
    """Whether kernels.decode_attention takes these queries (B, H, M, D) and keys (its checks, and a few queries)."""
    return (q.dtype == k.dtype and q.dtype in (torch.float32, torch.bfloat16) and q.device.type == "cpu"
            and _kernel_shapes(q.shape[3], q.shape[2]) and q.stride(3) == 1 and k.stride(3) == 1)


def _attend_cache(attn, q, kv, bias, index=None):
    k, v = kv.permute(2, 1, 3, 0, 4)  # 2 x (B, H, S, D), strided views
    if attn.training or bias is None or bias.dtype != q.dtype or not _kernel_takes(q, k):
        return type(attn).attend_cache(attn, q, kv, bias, index)
    # KVCache.index holds flat (position, row) slots: position s's are s * rows + the row
    rows = None if index is None else index.remainder(kv.shape[1])
    return torch.ops.nanoflant5_cpu.decode_attention(q, k, v, bias, rows)


def _attend(cross, q, k, v, mask):
    if cross.training or mask is None or mask.dtype != q.dtype or not _kernel_takes(q, k):
        return type(cross).attend(cross, q, k, v, mask)
    return torch.ops.nanoflant5_cpu.decode_attention(q, k, v, mask, None)


BLOCKS = True  # tests switch it off to compare fast_blocks with the block's own forward


class BlockPlan(NamedTuple):
    """What kernels.decoder_block takes of a decoder block besides the step's tensors."""
    norms: list
    linears: list  # weights (rows_linear; int8 layers' for INT8_KINDS) or packed copies (PACKED_KINDS)
    scales: list  # the int8 weights' scales; the weight, for MKL's packed GEMM; else empty
    kinds: list  # which: 0 rows_linear, PACKED_KINDS, INT8_KINDS
    outs: list  # each linear's output size
    eps: float
    act: str  # the feed-forward's activation (model.ACT_FNS), or "gated_gelu": kernels.gated_gelu
    gated: bool
    rows: int  # a step's rows


@contextmanager
def fast_blocks(model: T5, rows: int, compile: bool = False):
    """Inside the block (entered inside fast_linears, fast_layers and fast_attention), each decoder block's decoding
    step is one call of kernels.decoder_block, which runs the block's forward on the same kernels (the output is the
    same to the bit) without its ~60 Python-level module and operator calls: eager float32 activations on CPU, where
    every linear of the decoder runs rows_linear or a packed GEMM (nanoflant5's panel_linear, oneDNN's, MKL's: the
    one choose_packer measured fastest on this CPU), or, for quantize.py's modes, int8_linear, w8a16_linear or
    w8a8_linear, and no hooks are registered (a compiled step has no such calls).
    flan-t5-small greedy b1: 5.1 -> ~3.9 ms a step (see docs/performance.md)."""
    blocks = model.decoder.blocks
    c = model.config
    plans = None
    if (BLOCKS and not compile and KERNELS and model.shared.weight.device.type == "cpu" and kernels.available()
            and c.activation in ("relu", "gelu", "gelu_new", "silu") and _kernel_shapes(c.d_kv, 1)
            and not (_global_forward_hooks or _global_forward_pre_hooks)):
        plans = [block_plan(block, rows, c.activation) for block in blocks]
    if plans is None or None in plans:
        if not compile:
            _BLOCKS_TAKEN.discard(model)
        yield
        return
    _BLOCKS_TAKEN.add(model)
    try:
        for block, plan in zip(blocks, plans):
            block.forward = partial(_fast_block, block, plan)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


_NO_SCALE = torch.empty(0)
INT8_KINDS = {"int8_linear": 2, "w8a8_linear": 3, "w8a16_linear": 4,  # decoder_block's kinds of int8 layers
              "w8a8_float_linear": 7}
PACKED_KINDS = {"panels": 1, "onednn": 5, "mkl": 6}  # and of packed copies (PACKERS)


def block_plan(block, rows: int, act: str) -> BlockPlan | None:
    """The block's BlockPlan for `rows` rows a step, or None: a linear or norm not on nanoflant5's kernels here, or
    a hook on one of its modules."""
    norms = [block.attn_norm, block.cross_norm, block.ffn_norm]
    linears = [block.attn.qkv, block.attn.o, block.cross.q, block.cross.o, block.ffn.wi, block.ffn.wo]
    if any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()):
        return None
    if any(getattr(norm.__dict__.get("forward"), "func", None) is not _fused_norm or norm.weight.dtype != torch.float32
           for norm in norms):
        return None
    if getattr(block.ffn.__dict__.get("activation"), "func", None) is _fused_activation:
        act = "gated_gelu"  # (fused_layers: kernels.gated_gelu)
    elif "activation" in block.ffn.__dict__:
        return None
    taken = []  # (tensor, scale, kind)
    for linear in linears:
        forward = linear.__dict__.get("forward")
        if type(linear) in (Int8Linear, W8A8Linear):  # as their forward takes the kernels for float32 x on CPU
            kernel = linear.kernel(rows)
            if forward is not None or linear.scale.dtype != torch.float32 or linear.q.shape[1] % 16 or not kernel:
                return None
            taken.append((linear.q, linear.scale, INT8_KINDS[kernel]))
            continue
        w = linear.weight
        packed = _PACKED.get((w.data_ptr(), w.shape), (None, 0, None))
        if forward is not None and forward is _KERNEL_FORWARDS.get(linear) and w.dtype == torch.float32:
            taken.append((w, _NO_SCALE, 0))
        elif (forward is not None and forward is _FORWARDS.get(linear) and packed[1] == rows
              and packed[2] in PACKED_KINDS):
            taken.append((packed[0], w if packed[2] == "mkl" else _NO_SCALE, PACKED_KINDS[packed[2]]))
        else:
            return None
    tensors, scales, kinds = zip(*taken)
    return BlockPlan([n.weight for n in norms], list(tensors), list(scales), list(kinds),
                     [linear.out_features for linear in linears], block.attn_norm.eps, act, block.ffn.gated, rows)


def _fast_block(block, plan: BlockPlan, x, bias, memory, cross_mask, cache=None, pos=0, index=None):
    positions = pos if torch.is_tensor(pos) else None  # (continuous batching: rows at their own positions)
    if (block.training or cache is None or torch.is_tensor(memory) or x.shape != (plan.rows, 1, x.shape[2])
            or (positions is not None and (index is not None or positions.device.type != "cpu"))
            or x.dtype != torch.float32 or bias.dtype != torch.float32 or cross_mask is None
            or cross_mask.dtype != torch.float32
            or not _kernel_shapes(memory[0].shape[3], x.shape[0] // memory[0].shape[0])):  # (copies: queries a row)
        return type(block).forward(block, x, bias, memory, cross_mask, cache, pos, index)
    rows = None if index is None else index[:pos + 1].remainder(x.shape[0])
    return torch.ops.nanoflant5_cpu.decoder_block(x, plan.norms, plan.linears, plan.scales, plan.kinds, plan.outs,
                                                  plan.eps, plan.act, plan.gated, cache,
                                                  0 if positions is not None else pos, positions, bias, rows,
                                                  memory[0], memory[1], cross_mask)


@contextmanager
def fused_layers(model: T5):
    """Inside the block, every layer norm and gated-GELU activation (FLAN-T5's feed-forward) runs kernels.rms_norm /
    kernels.gated_gelu: one operator call forward and one backward, where torch makes several (training: ~7% of a
    LoRA step of flan-t5-small, see kernels.py; encoding: see `encode`). For float32 inputs on CPU; others (bfloat16
    under autocast) take the model's own path, call by call. Nested blocks leave the outer one's layers alone."""
    if not KERNELS or model.shared.weight.device.type != "cpu" or not kernels.available():
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, RMSNorm) and "forward" not in m.__dict__]
    gelu = model.config.gated and model.config.activation == "gelu_new"
    ffns = [m for m in model.modules() if isinstance(m, FeedForward) and "activation" not in m.__dict__] if gelu else []
    try:
        for norm in norms:
            norm.forward = partial(_fused_norm, norm)
        for ffn in ffns:
            ffn.activation = partial(_fused_activation, ffn)
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
        for ffn in ffns:
            ffn.__dict__.pop("activation", None)


ENCODE_TOKENS = 1024  # see encode
ENCODE_PACK_TOKENS = 256  # and from how many tokens the encoder's linears may take a packed GEMM (encoder_gemm)
_ENCODER_GEMM: dict = {}  # dtype -> "mkl", "onednn" or None (F.linear), measured once (encoder_gemm)


def encoder_gemm(dtype) -> str | None:
    """Which GEMM the encoder's linears run for encoder-sized inputs of `dtype` (float32): F.linear (None: MKL's
    sgemm, which packs both operands at every call) or one on a copy of the weight packed ahead (PACKERS' "mkl" or
    "onednn"), measured once per process ((1024, 1024) by (1024, 1024), the candidates taking turns, best of 3 after a
    warm-up), the fastest packed one taken where it is 3% faster than F.linear. MKL keeps to its AVX2 code on AMD
    CPUs, where oneDNN's uses AVX-512: with MKL held to AVX2 on this Xeon (kernels.AS_CPU["zen4"]) oneDNN's ran
    flan-t5's encoder products (1024 tokens) 1.5-1.7x faster, packing each weight 0.2-0.7 ms. On this Xeon MKL's
    packed GEMM measured 5-11% faster than F.linear (the same products, bit for bit), oneDNN's the same."""
    if dtype not in _ENCODER_GEMM:
        _ENCODER_GEMM[dtype] = None
        packers = {name: PACKERS[name] for name in ("mkl", "onednn")
                   if name in PACKERS and dtype in PACKERS[name].dtypes and PACKERS[name].ready()}
        if packers:
            gen = torch.Generator().manual_seed(0)
            x, w = (torch.randn(1024, 1024, generator=gen).to(dtype) for _ in range(2))
            packed = {name: p.pack(w, 1024) for name, p in packers.items()}
            best = best_times({None: lambda: F.linear(x, w),
                               **{name: lambda name=name: packers[name].run(x, packed[name], w, 1024)
                                  for name in packers}}, 3)
            fastest = min(packers, key=best.get)
            if best[fastest] * 1.03 < best[None]:
                _ENCODER_GEMM[dtype] = fastest
    return _ENCODER_GEMM[dtype]


@contextmanager
def encoder_linears(model: T5, tokens: int, part: int):
    """Inside the block, the encoder's linear layers run the packed GEMM that encoder_gemm measured faster than
    F.linear, on packed copies, for a call of `tokens` tokens in parts of `part` tokens (speed.encode), from
    ENCODE_PACK_TOKENS tokens (packing costs about as much as ~30 tokens' products: 0.2-0.7 ms a weight for oneDNN,
    0.5-4 for MKL). MKL's copy serves one row count only (ENCODE_TOKENS; others run its plain sgemm): it is taken for
    calls of at least two parts of exactly that many tokens. The copies stay with the layers for the next call (up to
    KEEP_BYTES), used only while the weights have the fingerprints they had when packed, as fast_linears' kept copies
    (checking costs a quarter of packing): the serving engine encodes every batch it admits."""
    linears = [m for block in model.encoder.blocks for m in (block.attn.qkv, block.attn.o, block.ffn.wi, block.ffn.wo)]
    choice = None
    if (tokens >= ENCODE_PACK_TOKENS and PACKING
            and not any(type(m) is not nn.Linear or "forward" in m.__dict__ or m._forward_hooks
                        or m._forward_pre_hooks for m in linears)):
        choice = encoder_gemm(linears[0].weight.dtype)
    if choice is None or (choice == "mkl" and (part != ENCODE_TOKENS or tokens < 2 * ENCODE_TOKENS)):
        yield
        return
    packer = PACKERS[choice]
    keep = sum(m.weight.nbytes for m in linears) * 1.4 <= KEEP_BYTES  # (copies: ~1.35x)
    try:
        for m in linears:
            m.forward = partial(packer.run, packed=pack(m, choice, ENCODE_TOKENS, keep), w=m.weight,
                                rows=ENCODE_TOKENS)
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


class EncoderBias(NamedTuple):
    """The encoder's attention bias as kernels.full_attention takes it: the relative position bias as one row a head,
    relative (H, 2S - 1), row t of head h's (S, S) bias being relative[h, S - 1 - t:2S - 1 - t] (a function of the
    distance only), and the padding as an additive key mask (B, S) (padding_mask's), or None."""
    relative: torch.Tensor
    key_mask: torch.Tensor | None


@contextmanager
def encoder_attention(model: T5):
    """Inside the block, the encoder's self-attention runs kernels.full_attention (float32 on CPU, inference: eval
    mode, no autograd, no autocast; heads of a multiple of 64), given the bias as an EncoderBias instead of the
    (B, H, S, S) tensor that SDPA reads from memory at every layer (see kernels.py). Encoders of 8 x 512 tokens:
    flan-t5-small 689 -> 638 ms, flan-t5-base 2783 -> 2678; of 64 tokens the same as SDPA (+-2%)."""
    encoder = model.encoder
    attns = [block.attn for block in encoder.blocks]
    if (not KERNELS or encoder.training or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
            or model.shared.weight.dtype != torch.float32
            or model.shared.weight.device.type != "cpu" or model.config.d_kv % 64 or not kernels.available()
            or any("attend" in attn.__dict__ for attn in attns) or "attention_bias" in encoder.__dict__):
        yield
        return
    try:
        encoder.attention_bias = partial(_encoder_bias, encoder)
        for attn in attns:
            attn.attend = partial(_attend_full, attn)
        yield
    finally:
        encoder.__dict__.pop("attention_bias", None)
        for attn in attns:
            attn.__dict__.pop("attend", None)


def _encoder_bias(encoder, S: int, attention_mask, x):
    if use_flex(encoder, x) or x.dtype != torch.float32:
        return Encoder.attention_bias(encoder, S, attention_mask, x)
    rb = encoder.relative_bias
    distance = torch.arange(1 - S, S, device=x.device)  # key_pos - query_pos
    buckets = relative_position_bucket(distance, rb.bidirectional, rb.num_buckets, rb.max_distance)
    key_mask = None if attention_mask is None else padding_mask(attention_mask, x.dtype)[:, 0, 0]
    return EncoderBias(rb.embedding(buckets).t().contiguous(), key_mask)  # (H, 2S - 1), (B, S)


def _attend_full(attn, q, k, v, bias):
    if isinstance(bias, EncoderBias):
        return torch.ops.nanoflant5_cpu.full_attention(q, k, v, bias.relative, bias.key_mask)
    return type(attn).attend(attn, q, k, v, bias)


def encode(model: T5, input_ids, attention_mask=None):
    """model.encode on its fastest path, for inference (generate, stream, the engine, evaluation). On CPU, the layer
    norms and activations run fused kernels (fused_layers), and a batch of more than 2 x ENCODE_TOKENS tokens goes
    through the encoder in parts of whole rows, about ENCODE_TOKENS tokens each, so that a layer's activations stay
    in cache: flan-t5-small, 8 x 512 tokens, 832 ms in one part, 759 in parts of 2 rows (788 in parts of 1); w8a8
    504 -> 411 ms. Not for bfloat16 (271 -> 304 ms: oneDNN's bfloat16 GEMMs prefer the whole batch). A row's result
    never depends on the other rows (padding_mask), so the parts give the rows of one call, to rounding. The linears
    take a packed GEMM where encoder_gemm measures one faster than F.linear (encoder_linears), the self-attention
    kernels.full_attention (encoder_attention)."""
    B, S = input_ids.shape
    rows = max(1, ENCODE_TOKENS // S)
    float32_cpu = (input_ids.device.type == "cpu" and model.shared.weight.dtype == torch.float32
                   and not torch.is_grad_enabled())
    whole = not float32_cpu or B * S <= 2 * ENCODE_TOKENS
    with (fused_layers(model), encoder_linears(model, B * S if float32_cpu else 0, B * S if whole else rows * S),
          encoder_attention(model)):
        if whole:
            return model.encode(input_ids, attention_mask)
        return torch.cat([model.encode(input_ids[i:i + rows], None if attention_mask is None else
                                       attention_mask[i:i + rows]) for i in range(0, B, rows)])


def cross_entropy_sum(logits, labels):
    """F.cross_entropy(logits (..., V), labels, ignore_index=-100, reduction="sum"); float32 on CPU through
    kernels.token_losses, which reads the logits once forward and writes their gradient in one pass backward, where
    torch writes log_softmax's output, zero-fills the gradient and reads both back (flan-t5-small's output layer at
    256 tokens: 4.5 against 13.5 ms a step)."""
    if KERNELS and logits.dtype == torch.float32 and logits.device.type == "cpu" and kernels.available():
        losses, _ = torch.ops.nanoflant5_cpu.token_losses(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                          -100)
        return losses.sum()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


def _fused_norm(norm: RMSNorm, x):
    if x.dtype == norm.weight.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.nanoflant5_cpu.rms_norm(x, norm.weight, norm.eps)
    return RMSNorm.forward(norm, x)


def _fused_activation(ffn: FeedForward, h):
    if h.dtype == torch.float32 and h.device.type == "cpu":
        return torch.ops.nanoflant5_cpu.gated_gelu(h)
    return FeedForward.activation(ffn, h)


@contextmanager
def forwards(layers, cache: weakref.WeakKeyDictionary, op):
    """Inside the block, each layer's forward is op(x, weight=its weight) (linear layers; the layer norms): for each
    layer and op the same object every call, so a compiled step's guards still hold."""
    try:
        for layer in layers:
            forward = cache.get(layer)
            if forward is None or forward.keywords["weight"] is not layer.weight:
                forward = cache[layer] = partial(op, weight=layer.weight)
            layer.forward = forward
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's forward


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> (packer, rows, fingerprint, copy)


def pack(linear: nn.Linear, packer: str, rows: int, keep: bool):
    """The linear layer's weight packed by `packer` for `rows` rows: its kept copy if that is still valid (see
    fast_linears)."""
    w = linear.weight
    if not keep or not fingerprintable(w):
        return PACKERS[packer].pack(w, rows)
    marks = fingerprint(w, random_probe(w.shape[1], w.dtype))
    kept = _KEPT.get(linear)
    if kept is None or kept[:2] != (packer, rows) or not same(marks, kept[2]):
        _KEPT.pop(linear, None)  # the stale copy goes before the new one is made
        kept = _KEPT[linear] = packer, rows, marks, PACKERS[packer].pack(w, rows)
    return kept[3]


# The packed linear as an operator of its own, which torch.compile calls as it is (it cannot trace packed weights).
# The packed copies are looked up by the weight's address and shape while fast_linears has them.
_PACKED: dict[tuple, tuple[torch.Tensor, int, str]] = {}  # -> (packed copy, rows, packer)
_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> its packed forward
_KERNEL_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> its rows_linear forward


def _packed_linear(x, weight):
    packed, rows, packer = _PACKED.get((weight.data_ptr(), weight.shape), (None, 0, None))
    if packed is None or x.numel() != rows * x.shape[-1] or x.dtype != weight.dtype:
        return F.linear(x, weight)
    return PACKERS[packer].run(x, packed, weight, rows)


if not hasattr(torch.ops.nanoflant5, "packed_linear"):  # once per process (importlib.reload runs this again)
    _lib = torch.library.Library("nanoflant5", "DEF")
    _lib.define("packed_linear(Tensor x, Tensor weight) -> Tensor")
    _lib.impl("packed_linear", lambda x, weight: _packed_linear(x, weight), "CPU")  # the current definition
    torch.library.register_fake("nanoflant5::packed_linear",
                                lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_lib)


# Greedy decoding's output layer through an int8 screen (OutputScreen). On CPU the output layer is ~40% of the bytes a
# flan-t5-small step reads; its int8 copy is a quarter of that.
SCREEN = hasattr(torch, "_int_mm")  # tests switch it off to compare with the full output layer
SCREEN_MIN_STEPS = 16  # the first call makes the int8 copy (~0.2 s for flan-t5-small): not for short generations
SCREEN_MAX = 0.25  # more candidate tokens than this fraction of the vocabulary: the full output layer is cheaper
OUTLIERS = 8  # channels of the output layer's input that the screen multiplies in float32 (OutputScreen.bounds)
_SCREENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm_head -> its OutputScreen


def output_screen(model: T5, g: GenerationConfig, rows: int | None):
    """The OutputScreen of the model's output layer for greedy decoding (no beams, no sampling) on CPU in float32 or
    float64 (16 or more steps; a plain bias-free nn.Linear without hooks), else None. It is made on first use and kept
    while the weights keep their fingerprint. rows: per step (OutputScreen.use_rows; None: the caller calls it step by
    step)."""
    lm_head = model.lm_head
    if type(lm_head) is not nn.Linear:
        return None
    w = lm_head.weight
    if (not SCREEN or g.num_beams > 1 or g.do_sample or g.new_tokens < SCREEN_MIN_STEPS
            or type(lm_head) is not nn.Linear or lm_head.bias is not None
            or lm_head._forward_hooks or lm_head._forward_pre_hooks or "forward" in lm_head.__dict__
            or _global_forward_hooks or _global_forward_pre_hooks or w.device.type != "cpu"
            or w.dtype not in (torch.float32, torch.float64) or not fingerprintable(w)
            or torch.is_autocast_enabled("cpu")):
        return None
    screen = _SCREENS.get(lm_head)
    if screen is None or screen.q_t.shape != w.shape[::-1] or not screen.fingerprint_matches(w):
        screen = _SCREENS[lm_head] = OutputScreen(w)
    screen.weight = w
    if not screen.usable or (rows is not None and not screen.use_rows(rows)):
        return None
    return screen


def row_norms(w):
    """Each row's Euclidean norm, in float64, 2048 rows at a time: a float64 copy of a whole output layer (128 MB for
    flan-t5-small's) was half of building its OutputScreen, page faults included."""
    return torch.cat([torch.linalg.vector_norm(part, dim=1, dtype=torch.float64) for part in w.split(2048)])


def fingerprint(w, probe):
    """Each row's sum of its bytes read as 64-bit integers (wrapping: any change to one element changes it) and its
    product with a fixed random vector (a permutation within the row changes that). How a kept OutputScreen is
    checked against the weights (~3 ms for flan-t5-small's): version counters would not do, as inference tensors
    have none and fused optimizers do not bump them."""
    w = w.detach()
    return w.view(torch.int64).sum(1), w @ probe


def fingerprintable(w) -> bool:
    """Whether fingerprint() can read w's rows as 8-byte words."""
    size = w.element_size()
    return w.is_contiguous() and not (w.shape[1] * size) % 8 and not (w.storage_offset() * size) % 8


def same(marks, other) -> bool:
    return all(torch.equal(a, b) for a, b in zip(marks, other))


_PROBES: dict = {}


def random_probe(n: int, dtype):
    """The fixed random vector of n entries that fingerprints use."""
    if (n, dtype) not in _PROBES:
        _PROBES[n, dtype] = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _PROBES[n, dtype]


class OutputScreen:
    """argmax(process(x @ W.T)) for greedy decoding, where W is the output layer's weight (vocab, K) and `process`
    applies transformers' greedy logits processors, each of which masks tokens or maps every score through a
    nondecreasing function (repetition penalty, sequence bias). The result is the full output layer's token, but W is
    read as int8:

    W_i = s_i q_i + e_i (int8 q_i, per-token scale s_i) and x = x_hat + e_x, where x_hat is r q_x (int8 q_x, per-row
    scale r) but in the few channels with the largest entries, where it keeps x in float32. The exact integer product
    q_x . q_i (kernels.amx_rows, int8_rows or torch._int_mm) plus those channels' products give approx_i = s_i x_hat .
    q_i, and by Cauchy-Schwarz
        |x . W_i - approx_i| = |x . e_i + s_i e_x . q_i| <= ||x|| ||e_i|| + ||e_x|| ||s_i q_i||,
    plus floating-point rounding (at most K * 2^-22 + 1e-6 of ||x|| ||W_i|| here, in any summation order; Higham,
    "Accuracy and Stability of Numerical Algorithms", ch. 3). With that bound b_i, every processed score lies in
    [f(approx_i - b_i), f(approx_i + b_i)], so the best token is among those whose upper end reaches the largest lower
    end: only they get logits from W in full precision (~10-20 of flan-t5's 32128 tokens per row, measured). Non-finite
    inputs, or too many candidates, take the full output layer.

    bounds() gives approx_i -+ b_i with tensor operations of fixed shapes, so the compiled decoding step computes them
    in its own graph; argmax() takes it from there."""

    def __init__(self, weight):
        w = weight.detach()
        self.weight = weight
        self.probe = random_probe(w.shape[1], w.dtype)
        self.fingerprint = fingerprint(w, self.probe)
        amax = w.abs().amax(1)
        self.usable = bool(torch.isfinite(amax).all())
        self.scale = normal_or_one((amax / 127).float())  # s_i, (vocab,)
        q = torch.round(w / self.scale[:, None].to(w.dtype)).clamp_(-127, 127)
        e = torch.addcmul(w, self.scale[:, None].to(w.dtype), q, value=-1)  # e_i, up to rounding (bounded below)
        u = 2.0 ** -24
        w_norm, e_norm = row_norms(w), row_norms(e)
        e_norm = (e_norm + u * w_norm) * (1 + 3 * u)
        # per token: ||e_i|| and ||W_i|| + ||e_i|| (>= ||s_i q_i||), rounded up to float32
        norms = (torch.stack([e_norm, w_norm + e_norm]) * (1 + 2.0 ** -20)).float()
        self.norms = torch.cat([norms, torch.full_like(norms[:1], 2.0 ** -120)])  # (3, vocab), see bounds
        # the most by which ||x|| can grow in an intermediate: ||W_i|| + ||e_i|| (approx, b), 127 sqrt(K) (x_hat . q_i);
        # a tensor, so that a compiled step does not specialize on its value
        self.growth = torch.tensor(max(float(self.norms[1].max()), 127 * w.shape[1] ** 0.5), dtype=torch.float64)
        self.q = q.to(torch.int8)  # (vocab, K)
        self.q_t = self.q.t()  # (K, vocab): the layout _int_mm reads fastest for one row
        self.q_rows = self.q_t.contiguous()  # the same, row by row: the outlying entries' rows are read from it
        self.rounding = w.shape[1] * 2.0 ** -22 + 1e-6
        self.kernel = None  # what bounds() multiplies with: "amx_rows", "int8_rows" (kernels.py), None: torch._int_mm
        self.packed = None  # q in amx_rows' layout, where the CPU has AMX
        if w.shape[1] % 64 == 0 and kernels.available() and kernels.AMX:
            self.packed = torch.ops.nanoflant5_cpu.amx_pack(self.q)

    def use_rows(self, rows: int) -> bool:
        """Multiply `rows` rows a step: with kernels.amx_rows where the CPU has AMX (flan-t5-small's screen, weights
        read from memory: 1 row as fast as int8_rows, 8 rows 0.4 ms against 0.9, 32 rows 0.6-0.7 against _int_mm's
        2.4-2.7), else kernels.int8_rows where it is built and takes them, else torch._int_mm. -> whether that
        product is exact here: where it is not (torch._int_mm on a CPU without VNNI, past int8_rows' 8 rows), the
        caller does without the screen (it would compute bounds only to fall back to the full layer)."""
        self.kernel = None
        if KERNELS and self.q.shape[1] <= 65536 and kernels.available():  # (wider: int32 sums could overflow)
            if self.packed is not None:
                self.kernel = "amx_rows"
            elif rows in kernels.INT8_ROWS and kernels.INT8:
                self.kernel = "int8_rows"
        return self.kernel is not None or int_mm_exact(rows, *self.q_t.shape)

    def product(self, q_x):
        """q_x (M, K) int8 times q's transpose, exactly: (M, vocab) int32."""
        if self.kernel == "amx_rows":
            return torch.ops.nanoflant5_cpu.amx_rows(q_x, self.packed, self.q.shape[0])
        if self.kernel == "int8_rows":
            return torch.ops.nanoflant5_cpu.int8_rows(q_x, self.q)
        return torch._int_mm(q_x, self.q_t)

    def fingerprint_matches(self, weight) -> bool:
        return same(fingerprint(weight, self.probe), self.fingerprint)

    def argmax(self, bounds, process):
        """The greedy tokens (M,) from bounds(x) for the output layer's inputs x (M, K). Uses the bounds up: their
        tensors are processed in place and reused."""
        x = bounds[0]
        candidates = self.candidates(bounds, process)
        if candidates is None:
            return argmax(process(F.linear(x, self.weight).float()))
        logits = bounds[2].fill_(float("-inf"))  # (M, vocab): the upper ends' tensor, done with
        logits[:, candidates] = F.linear(x, self.weight.index_select(0, candidates)).float()
        # the first best candidate is the first best token, unless a row's every token is masked (then token 0)
        best, i = process(logits)[:, candidates].max(1)
        return torch.where(best > float("-inf"), candidates[i], 0)

    def candidates(self, bounds, process):
        """The tokens (ascending) that may be some row's greedy choice, or None: take the full output layer. Processes
        the bounds' tensors in place."""
        x, lower, upper, ok = bounds
        if not (self.kernel is not None or int_mm_exact(*x.shape, self.q_t.shape[1])) or not bool(ok):
            return None
        # each row's largest lower end, clamped to finite (the float32 minimum for a row where every token is masked:
        # that row then adds no candidates, and gets token 0 from the -inf logits as from the full layer)
        f32 = torch.finfo(torch.float32)
        lower = process(lower).amax(1, keepdim=True).clamp_(f32.min, f32.max)
        # tokens whose upper end reaches it in some row (for several rows: upper - lower >= 0 exactly when upper >=
        # lower, as float subtraction of distinct finite numbers never rounds to 0, and lower is finite, so no
        # inf - inf; amax over rows is ~4x faster than any() of a compare)
        upper = process(upper)
        reach = upper[0] >= lower[0] if len(upper) == 1 else upper.sub_(lower).amax(0) >= 0
        candidates = reach.nonzero().squeeze(1)
        if candidates.numel() > SCREEN_MAX * upper.shape[1] or not candidates.numel():  # (empty: NaN somewhere)
            return None
        return candidates

    def bounds(self, x):
        """(x, approx - b, approx + b, ok) for the output layer's inputs x (M, K): every token's approximate logit
        approx (M, vocab) minus and plus a bound b on its distance from the logit in float, where ok (a bool tensor)
        is true; where it is false, the full output layer must run. Tensor operations of fixed shapes only, so that
        the compiled decoding step computes them in its own graph."""
        # The OUTLIERS channels with the largest entries (T5's hidden states have a few outlying channels) are
        # multiplied in float32 with q, so that they do not set the int8 scale of the others.
        out = x.abs().amax(0).topk(min(OUTLIERS, x.shape[1])).indices
        x_out = x[:, out].float()  # (M, OUTLIERS)
        rest = x.index_fill(1, out, 0)
        r = normal_or_one((rest.abs().amax(1, keepdim=True) / 127).float())  # (M, 1)
        q_x = torch.round(rest / r.to(x.dtype)).clamp_(-127, 127)
        # x_hat = what the approximation multiplies: r q_x, and the outlying entries rounded to float32
        x_hat = (r.double() * q_x.double()).index_copy(1, out, x_out.double())
        e_x = torch.linalg.vector_norm(x.double() - x_hat, dim=1)
        a = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) + e_x  # >= ||x_hat|| and ||x||
        # one check for all: a non-finite entry of x makes a NaN or infinite, and beyond this bound the integer
        # product times r, or approx +- b, could overflow float32
        ok = a.max() * self.growth < 2.0 ** 125
        # (M, 3) @ (3, vocab): the bound b, a little above the rounding of the sums that use it, plus 2^-120
        # (rounding in float32's subnormal range is absolute, at most 2^-150 an operation)
        c = 1 + 1e-5
        coef = torch.stack([a * c, (e_x + self.rounding * a) * c, torch.ones_like(a)], 1).float()  # (M, 3)
        q_x = q_x.to(torch.int8)
        product = self.product(q_x)
        rows = self.q_rows.index_select(0, out)  # (OUTLIERS, vocab)
        if KERNELS and not torch.compiler.is_compiling() and kernels.available():  # what follows, in one pass
            lower, upper = torch.ops.nanoflant5_cpu.screen_bounds(product, r, x_out, rows, self.scale, coef, self.norms)
            return x, lower, upper, ok
        b = coef @ self.norms
        approx = product * r  # (M, vocab), / s_i
        if torch.compiler.is_compiling():  # term by term: the compiled step adds them all in one pass
            for j in range(len(rows)):
                approx = approx + x_out[:, j, None] * rows[j]
        else:
            approx += x_out @ rows.float()
        approx = approx * self.scale
        return x, approx - b, approx + b, ok


def normal_or_one(scale):
    """Scales that are normal float32 numbers, 1 in place of others (0 or subnormal: the int8 part is then 0, and the
    whole value counts as error), so that products with them round relatively."""
    return torch.where(scale >= torch.finfo(torch.float32).tiny, scale, 1.0)


_INT_MM_EXACT: dict[tuple[int, int, int], bool] = {}


def int_mm_exact(rows: int, k: int, n: int) -> bool:
    """Whether torch._int_mm sums int8 products exactly here for (rows, k) x (k, n) inputs, extremes included (a
    kernel that adds pairs of products in saturating int16 would not). Checked once per shape."""
    if (rows, k, n) not in _INT_MM_EXACT:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
        block = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=gen)
        a[0], a[-1, ::2], block[:16], block[16:32] = 127, -127, 127, -127
        reps = -(-n // 64)
        exact = (a.double() @ block.double().t()).repeat(1, reps)[:, :n]  # exact: |sums| < 2^53
        b = block.repeat(reps, 1)[:n]  # (n, k): the block over and over
        _INT_MM_EXACT[rows, k, n] = torch.equal(torch._int_mm(a, b.t()).double(), exact)
    return _INT_MM_EXACT[rows, k, n]




# argmax and top_k over a vocabulary-sized last dimension, by blocks of CHUNK entries: on CPU, torch's argmax and
# topk scan it element by element, while amax is vectorized. Elsewhere (and for other lengths) torch's own.
CHUNK = 128


def argmax(scores):
    """scores.argmax(-1) for 2-D scores, exactly (the first maximum of each row, NaN counting as the maximum): the
    first block holding the row's maximum, then the first maximum within it. ~5x faster than argmax on CPU for
    flan-t5's vocabulary."""
    N, n = scores.shape
    if n % CHUNK or scores.device.type != "cpu":
        return scores.argmax(-1)
    blocks = scores.reshape(N, n // CHUNK, CHUNK)
    block = blocks.amax(-1).argmax(-1, keepdim=True)  # (N, 1)
    within = blocks.gather(1, block[..., None].expand(-1, -1, CHUNK)).squeeze(1).argmax(-1)
    return block.squeeze(1) * CHUNK + within


def top_k(scores, k: int):
    """scores.topk(k) for 2-D scores: the k largest entries lie in the k blocks with the largest maxima (any other
    block's entries are each matched or outdone by k block maxima), so only those k blocks are searched. The same
    values as topk; equal entries may come in another order. ~7x faster than topk on CPU for beam search's
    (batch, beams * vocabulary) scores."""
    N, n = scores.shape
    if n % CHUNK or n // CHUNK < k or scores.device.type != "cpu":
        return scores.topk(k)
    blocks = scores.reshape(N, n // CHUNK, CHUNK)
    best = blocks.amax(-1).topk(k).indices  # (N, k)
    values, i = blocks.gather(1, best[..., None].expand(-1, -1, CHUNK)).view(N, k * CHUNK).topk(k)
    return values, best.gather(1, i // CHUNK) * CHUNK + i % CHUNK

