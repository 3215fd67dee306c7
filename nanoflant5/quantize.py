"""int8 modes, low-precision and labelled as such: their tokens are not those of float32, only close to them (the
bench measures how close). `T5.from_pretrained(..., quantize=MODE)`, `--quantize MODE` in the CLI.

Both keep every linear layer of both stacks and the output layer as int8 weights with one float32 scale per output
channel (symmetric, round to nearest: W ~ s q, s = max|W_row| / 127), a quarter of float32's bytes; norms,
attention, the embedding and the residual stream stay float32.

- "int8", weight-only: decoding reads each weight once a step, so on CPU a step of a few rows is about as fast as its
  weights stream from memory: for up to FLOAT_ROWS rows, kernels.int8_linear reads the int8 weights and widens them
  to float32 in registers, x staying float32 (flan-t5-small's decoder and output layer, 1 row: 1.55 ms a step against
  5.5 ms for float32). Past that, float32 arithmetic, not memory, sets the speed, so each row of x is taken to 16 bits
  (kernels.w8a16_linear: two int8 digits, within max |x_row| / 64516 of x, ~250x finer than the weights' rounding)
  and multiplied in int8 arithmetic, summed exactly: flan-t5-base's decoder linears at 32 rows 0.9 ms a layer
  against 2.8 for int8_linear, its encoder (8 x 512 tokens) 1.7 s against 3.3 s with the weight widened to float32.
  The logits move by ~1/120-1/140 of what the weights' rounding moves them (flan-t5-small, -base, random weights): a
  row's tokens can depend on whether it was decoded alone or in a batch of 5 or more. Where torch._int_mm does not
  sum exactly (int_mm_exact), int8_linear up to KERNEL_ROWS rows, F.linear with the weight widened past them.
- "w8a8", weights and activations: each row of a linear layer's input is quantized to int8 too, with its own scale
  (max |x_row| / 127, round to nearest even), and the product is summed exactly in int32 (kernels.w8a8_linear over
  torch._int_mm, oneDNN's AMX or VNNI kernels; up to 8 rows kernels.int8_rows' loops), then scaled: int8 arithmetic
  at every row count, which pays for batched decoding and the encoder. CTranslate2's "int8" on CPU does the same. A
  row's result depends on that row only, as in float32. Where torch._int_mm does not sum exactly (CPUs without VNNI:
  oneDNN adds pairs of products in int16), past 8 rows kernels.w8a8_float_linear: the same sums in float32
  arithmetic, where they are whole numbers below 2^24 (exact), for inputs up to FLOAT_SUM_K wide; else
  w8a8_reference's float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

MODES = ("int8", "w8a8")
FLOAT_ROWS = 4  # rows up to which weight-only int8 multiplies float32 x (measured: w8a16_linear faster from 5 rows)
KERNEL_ROWS = 64  # and int8_linear's rows where w8a16_linear cannot run (faster than float32's GEMM up to ~32)
FLOAT_SUM_K = 8320  # the widest input w8a8_float_linear takes (kernels.cpp's FLOAT_SUM_K on AVX2, half AVX-512's)


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (out, in) and float32 per-output scales."""

    mode = "int8"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1) / 127
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero row stays zero
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def dequantized(self, dtype=torch.float32):
        return (self.q.to(dtype) * self.scale[:, None].to(dtype))

    def kernel_takes(self, x) -> bool:
        """Whether nanoflant5's CPU kernels (kernels.py) take x: float32 on CPU, float32 scales, the kernels built."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and self.scale.dtype == torch.float32
                and kernels.available())

    def kernel(self, rows: int) -> str | None:
        """Which kernel (torch.ops.nanoflant5_cpu) multiplies `rows` rows of x that kernel_takes, or None."""
        if rows > FLOAT_ROWS and int_mm_exact(self.in_features):
            return "w8a16_linear"
        return "int8_linear" if rows <= KERNEL_ROWS and self.in_features % 16 == 0 else None

    def forward(self, x):
        kernel = self.kernel(x.numel() // x.shape[-1]) if self.kernel_takes(x) else None
        if kernel is not None:
            return getattr(torch.ops.nanoflant5_cpu, kernel)(x, self.q, self.scale)
        return self.without_kernel(x)

    def without_kernel(self, x):
        """The product where no kernel takes x: F.linear with the weight widened to x's dtype."""
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class W8A8Linear(Int8Linear):
    """Int8Linear's weight, times each row of x quantized to int8 on the fly (see the module's docstring)."""

    mode = "w8a8"

    def kernel(self, rows: int) -> str | None:
        # (up to 8 rows the kernel sums with kernels.int8_rows' loops, exact where they are built: AVX2 CPUs too)
        few = rows in kernels.INT8_ROWS and kernels.INT8 and self.in_features <= 65536
        if few or int_mm_exact(self.in_features):
            return "w8a8_linear"
        return "w8a8_float_linear" if self.in_features % 16 == 0 and self.in_features <= FLOAT_SUM_K else None

    def without_kernel(self, x):
        return w8a8_reference(x, self.q, self.scale)


MIN_SCALE = 256 * torch.finfo(torch.float32).tiny  # (kernels.cpp's: s / 254 stays a normal float32)


def quantize_rows(x):
    """x ~ s q per row: q = x / s rounded to nearest even (int8 range), s = max |x_row| / 127, or 1 where that is
    below MIN_SCALE (a row of zeros, or of values under ~4e-34: its q is 0)."""
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s >= MIN_SCALE, s, 1.0)
    return torch.round(x / s), s


def w8a8_reference(x, q, scale):
    """What kernels.w8a8_linear computes, step by step in torch (the int8 products summed exactly in float64)."""
    xq, s = quantize_rows(x.float())
    return ((xq.double() @ q.double().t()).float() * s * scale).to(x.dtype)


def w8a16_reference(x, q, scale):
    """What kernels.w8a16_linear computes, step by step in torch: each row of x as two int8 digits, x ~ s1 q1 + s2 q2
    (q1 as w8a8's, then what it leaves, x - s1 q1 rounded once, in steps of s2 = s1 / 254), their products summed
    exactly, then (float(q1 . w) s1 + float(q2 . w) s2) scale, the sum rounded once (the kernel: one fma; here in
    float64, then to float32: the same result but in a rare double rounding, not seen in the tests)."""
    x = x.float()
    q1, s1 = quantize_rows(x)
    s2 = s1 / 254
    q2 = torch.round((x.double() - q1.double() * s1.double()).float() / s2)
    a1, a2 = ((d.double() @ q.double().t()).float() for d in (q1, q2))
    return ((a1.double() * s1.double() + (a2 * s2).double()).float() * scale).to(x.dtype)


_EXACT: dict[int, bool] = {}


def int_mm_exact(k: int) -> bool:
    """Whether torch._int_mm sums exactly here for inputs k wide, at the row counts decoding and encoding use (a
    kernel adding pairs of products in saturating int16 would not): else w8a8 takes w8a8_reference, and int8 keeps
    x in float32. Checked once per width (quantize() does it, so that a compiled step never traces the check)."""
    if k not in _EXACT:
        from .speed import int_mm_exact as exact

        _EXACT[k] = all(exact(rows, k, 64) for rows in (1, 4, 32, 512))
    return _EXACT[k]


def check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)}")


def quantize(model, mode: str):
    """Replace the model's linear layers (attention, feed-forward, output layer) by int8 ones of the mode, in place.
    The embedding stays as it is (a tied output layer gets its own int8 copy). Returns the model."""
    check_mode(mode)
    layer = {cls.mode: cls for cls in (Int8Linear, W8A8Linear)}[mode]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: int8 takes bias-free linear layers")
                setattr(module, child_name, layer(child.weight))
    if hasattr(torch, "_int_mm"):
        for k in {m.in_features for m in model.modules() if isinstance(m, Int8Linear) and m.q.device.type == "cpu"}:
            int_mm_exact(k)
    return model
