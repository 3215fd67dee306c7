"""Small CPU kernels (kernels.cpp) for decoding a few rows at a time, built with the C++ compiler on first use.

Decoding 1-4 rows reads every weight once per step, so a step is as fast as the weights stream from memory. MKL's
matrix-vector product streams them at ~26 GB/s on this project's 2-core machine, and its packed GEMM at 4 rows at
~20 GB/s; reading each weight row once, four rows side by side, with software prefetch 12 KB ahead (Intel's
optimization manual, "software prefetch"), rows_linear streams at ~28 GB/s for 1 row and ~23 GB/s for 4
(flan-t5-small's decoder and output layer, 154 MB: 5.5 vs 5.85-6.0 ms at 1 row, 6.6-6.7 vs 7.5-7.7 ms packed at 4;
flan-t5-base at 4 rows: 18.6 vs 27 ms).
Each output is the sum of 16 strided partial sums (a fixed order), so results differ from MKL's in the last bits, as
MKL's own kernels do from one another. bfloat16 weights (the bfloat16 mode) are widened to float32 in registers,
summed in float32 and the result rounded to bfloat16 once, as oneDNN's GEMM does, reading half float32's bytes.

panel_linear takes 5-64 rows (speed.fast_linears, where it measures fastest: choose_packer): the weights packed
ahead in panels of 64 output columns (speed.pack_panels), 6 rows x 64 columns of sums in registers, and the panel's
next weights fetched while the current ones are multiplied, so that memory and arithmetic overlap. flan-t5-base's
decoder linears, weights streamed from memory (ms; MKL's packed GEMM in brackets): 8 rows 24 (30), 16 rows 27 (37),
32 rows 35 (46), 64 rows 56 (60). With one weight in cache MKL's is 5-8% faster: the difference is the overlap.

decode_attention is a decoding step's attention (one query a row, or beam search's few): one pass over each row's
keys, its heads side by side as the cache holds them, a softmax, one pass over its values; beam search's gather of
each row's history is read through the cache's index instead of copied. torch's SDPA spends most of such a call on
per-(row, head) set-up.

full_attention is the encoder's self-attention (every query over every key) with the relative position bias read as
one row a head (it depends on the distance only) and the padding as a key mask, the scores and the values' products on
panel_linear's register blocks: flan-t5-small, 2 rows x 512 tokens, ~3.5 ms a layer against SDPA's ~4.1 (~4.9 inside
the encoder, where SDPA reads the (B, H, S, S) bias from memory); the encoder of 8 x 512 tokens 1.04-1.08x faster.

decoder_block is a decoder block's whole decoding step (layer norms, linears, the cache write, both attentions, the
feed-forward, residuals) on the kernels above (or oneDNN's and MKL's packed GEMMs, through torch's dispatcher, where
they measure fastest), in one call: the block's forward makes ~60 Python-level module and
operator calls a step, ~1.5 ms of a 5 ms flan-t5-small step at one row (speed.fast_blocks).

int8_linear is the same loop for weight-only int8 layers (quantize.py): the int8 weights are widened to float32 in
registers and multiplied with up to 4 rows of x at a time, the weight block staying in L1 between chunks of rows.
flan-t5-small's decoder and output layer (38 MB as int8): 1.55 ms at 1 row (float32 rows_linear: 5.5), 1.9 at 4, 3.6
at 8, 8.3 at 16, 14.8 at 32 (MKL's packed float32 GEMM: 13.9), 29 at 64 (19.4): past ~32 rows it is compute-bound.

rms_norm and gated_gelu (with their gradients: torch.library.register_autograd) are FLAN-T5's layer norm and
gated-GELU activation in one call each, forward and backward, where torch makes several (~24 for rms_norm on CPU;
gelu, mul, and in the backward gelu_backward, two muls and a cat): speed.fused_layers, for training and the encoder.
A LoRA training step of flan-t5-small (batch 8 x 128 + 32 tokens, q, v) took 685 instead of 740 ms with both (each
~28 ms of it). The activation is computed as x sigmoid(2u) with a polynomial exp (Cephes'), within torch's own
float32 error (tests). token_losses is the training loss (speed.cross_entropy_sum) read once forward, its gradient
written in one pass; seeded_dropout is LoRA's dropout (lora.dropout) with the mask a function of a seed.

int8_rows is the same loop for greedy decoding's int8 screen of the output layer (speed.OutputScreen): int8 times
int8 summed exactly in int32, with AVX-512 VNNI (flan-t5-small's 16 MB screen right after the decoder's weights:
~0.55 ms against torch._int_mm's ~0.74 at 1 row, ~0.57 against ~1.0 at 4), or AVX2's vpmaddwd where the CPU has no
VNNI (there oneDNN's int8 GEMM is not exact, so the screen takes 1-8 rows only).
w8a8_float_linear is w8a8 where torch._int_mm is not exact (CPUs without VNNI), past int8_rows' 8 rows: the int8
products and their sums in float32, where they are whole numbers below 2^24, so exact (int8_linear's loops; past 64
rows torch's float32 GEMM over 1024 columns at a time).
amx_rows does the same on Intel's AMX tiles (built where the CPU has AMX, used where Linux grants this process the
tiles), the weight packed ahead in the tiles' layout (amx_pack): the 16 MB screen read from memory takes 0.40-0.60 ms at
1 row (int8_rows the same), 0.39-0.43 at 8 (0.89-0.93), 0.61-0.70 at 32 (torch._int_mm, whose oneDNN GEMM packs the weight at every
call: 2.7).

Without a C++ compiler (or with NANOFLANT5_KERNELS=0) nothing is built, one warning says so, and decoding uses
torch's kernels."""

from __future__ import annotations

import hashlib
import os
import platform
import warnings

import torch

ROWS = range(1, 5)  # the row counts rows_linear takes
INT8_ROWS = range(1, 9)  # and int8_rows
INT8 = False  # whether int8_rows is loaded (built for a CPU with AVX-512 VNNI or AVX2): set by available()
AMX = False  # whether amx_rows is loaded (built for a CPU with AMX) and the OS lets this process use AMX: likewise
BF16_PANELS = False  # whether bf16_panel_linear is loaded (built for a CPU with AVX512-BF16): likewise
_BUILT: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels are loaded: built on the first call (~10 s; cached by torch in ~/.cache/torch_extensions),
    after which torch.ops.nanoflant5_cpu.rows_linear exists (and int8_rows, where INT8)."""
    global INT8, AMX, BF16_PANELS
    if "ok" not in _BUILT:
        _BUILT["ok"] = _build()
        INT8 = _BUILT["ok"] and hasattr(torch.ops.nanoflant5_cpu, "int8_rows")
        BF16_PANELS = _BUILT["ok"] and hasattr(torch.ops.nanoflant5_cpu, "bf16_panel_linear")
        AMX = _BUILT["ok"] and hasattr(torch.ops.nanoflant5_cpu, "amx_rows") and torch.ops.nanoflant5_cpu.amx_ready()
    return _BUILT["ok"]


def _build() -> bool:
    if os.environ.get("NANOFLANT5_KERNELS", "1") == "0":
        return False
    if hasattr(torch.ops.nanoflant5_cpu, "rows_linear"):  # loaded already (importlib.reload)
        return True
    try:
        from torch.utils import cpp_extension
        native = [f"-march={march()}"] if platform.machine().lower() in ("x86_64", "amd64") else []
        source = os.path.join(os.path.dirname(__file__), "kernels.cpp")
        cpp_extension.load(name=f"nanoflant5_kernels_{cpu_tag()}", sources=[source],
                           extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *native],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, an unsupported platform: torch's kernels
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"nanoflant5's CPU kernel did not build, decoding with torch's: {type(e).__name__}: {first_line}")
        return False
    torch.library.register_fake("nanoflant5_cpu::rows_linear",  # shapes, for torch.compile
                                lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]))
    for name in ("int8_linear", "w8a8_linear", "w8a16_linear", "w8a8_float_linear"):
        torch.library.register_fake(f"nanoflant5_cpu::{name}",
                                    lambda x, weight, scale: x.new_empty(*x.shape[:-1], weight.shape[0]))
    torch.library.register_fake("nanoflant5_cpu::full_attention",  # (B, T, H, D) in memory, as (B, H, T, D)
                                lambda q, k, v, bias, key_mask: q.new_empty(q.shape[0], q.shape[2], q.shape[1],
                                                                            q.shape[3]).transpose(1, 2))
    torch.library.register_fake("nanoflant5_cpu::rms_norm", lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("nanoflant5_cpu::gated_gelu",
                                lambda h: h.new_empty(*h.shape[:-1], h.shape[-1] // 2))
    torch.library.register_fake("nanoflant5_cpu::token_losses",
                                lambda logits, labels, ignore: (logits.new_empty(labels.shape),) * 2)
    torch.library.register_fake("nanoflant5_cpu::seeded_dropout", lambda x, dropped, seed: torch.empty_like(x))
    torch.library.register_autograd("nanoflant5_cpu::rms_norm", _rms_norm_backward,
                                    setup_context=_save_norm_inputs)
    torch.library.register_autograd("nanoflant5_cpu::seeded_dropout", _seeded_dropout_backward,
                                    setup_context=_save_seed)
    torch.library.register_autograd("nanoflant5_cpu::token_losses", _token_losses_backward,
                                    setup_context=_save_token_losses)
    torch.library.register_autograd("nanoflant5_cpu::gated_gelu", _gated_gelu_backward,
                                    setup_context=_save_gated_input)
    if hasattr(torch.ops.nanoflant5_cpu, "int8_rows"):
        torch.library.register_fake("nanoflant5_cpu::int8_rows",
                                    lambda x, weight: x.new_empty(x.shape[0], weight.shape[0], dtype=torch.int32))
    if hasattr(torch.ops.nanoflant5_cpu, "amx_rows"):
        torch.library.register_fake("nanoflant5_cpu::amx_rows",
                                    lambda x, packed, N: x.new_empty(x.shape[0], N, dtype=torch.int32))
    if hasattr(torch.ops.nanoflant5_cpu, "bf16_panel_linear"):
        torch.library.register_fake("nanoflant5_cpu::bf16_panel_linear",
                                    lambda x, packed, N: x.new_empty(*x.shape[:-1], N))
    return True


def _save_norm_inputs(ctx, inputs, output):
    x, weight, ctx.eps = inputs
    ctx.save_for_backward(x, weight)


def _save_gated_input(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rms_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.nanoflant5_cpu.rms_norm_backward(grad, x, weight, ctx.eps, ctx.needs_input_grad[1])
    return dx, dw if ctx.needs_input_grad[1] else None, None


def _gated_gelu_backward(ctx, grad):
    return torch.ops.nanoflant5_cpu.gated_gelu_backward(grad, *ctx.saved_tensors)


def _save_seed(ctx, inputs, output):
    ctx.dropped, ctx.seed = inputs[1:]


def _seeded_dropout_backward(ctx, grad):  # the same mask, regenerated from the seed
    return torch.ops.nanoflant5_cpu.seeded_dropout(grad, ctx.dropped, ctx.seed), None, None


def _save_token_losses(ctx, inputs, output):
    logits, labels, ctx.ignore = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _token_losses_backward(ctx, grad, _):
    logits, labels, lse = ctx.saved_tensors
    return torch.ops.nanoflant5_cpu.token_losses_backward(grad, logits, labels, lse, ctx.ignore), None, None


def march() -> str:
    """What the kernels are built for: the CPU at hand (-march=native), or the target that torch.compile's C++ is
    built for where TORCHINDUCTOR_CPP_MARCH names one (AS_CPU)."""
    return os.environ.get("TORCHINDUCTOR_CPP_MARCH") or "native"


# Environments in which this CPU runs as another would, every library limited alike: torch's own kernels, its GEMMs
# (MKL, oneDNN), torch.compile's C++ and nanoflant5's kernels (march), CTranslate2. Set before the process starts
# (tests/test_kernels.py, benchmarks/bench.py --as-cpu). "avx2": AVX2 and FMA only, as AMD Zen 2/3 and Intel's client
# CPUs (Zen 3's instructions); "zen4": AMD Zen 4's instructions (AVX-512 with VNNI and BF16, no AMX: Cooper Lake's,
# as GCC 12 has no znver4), MKL held to the AVX2 code it runs on AMD, and CTranslate2 on oneDNN instead of MKL, as
# it runs there (not AMD's caches and memory).
AS_CPU = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "TORCHINDUCTOR_CPP_MARCH": "znver3", "CT2_FORCE_CPU_ISA": "AVX2"},
          "zen4": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "TORCHINDUCTOR_CPP_MARCH": "cooperlake",
                   "CT2_USE_MKL": "0"}}


def cpu_tag() -> str:
    """A short hash of this CPU's model and features and of march(): builds are kept apart per CPU and target, so a
    home directory shared between machines never loads one built for instructions this CPU lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        info = platform.processor() + platform.machine()
    info += march()
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def fits(weight, rows: int) -> bool:
    """Whether rows_linear takes this weight for `rows` rows (float32 or bfloat16 on CPU, contiguous, a multiple of
    16 columns)."""
    return (rows in ROWS and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % 16 == 0 and available())
