"""Weight-only int8: `T5.from_pretrained(..., quantize="int8")`, `--quantize int8` in the CLI. A low-precision mode,
labelled as such: its tokens are not those of float32, only close to them (the bench measures how close).

Every linear layer of both stacks and the output layer keeps its weight as int8 with one float32 scale per output
channel (symmetric, round to nearest: W ~ s q, s = max|W_row| / 127), a quarter of float32's bytes. Activations,
norms, attention and the embedding stay float32. Decoding reads each weight once a step, so on CPU a step is about
as fast as its weights stream from memory: kernels.int8_linear reads the int8 weights and widens them to float32 in
registers (flan-t5-small's decoder and output layer, 1 row: 1.55 ms a step against 5.5 ms for float32). For more rows
than a decoding step has (the encoder, training-sized batches) the weight is widened to float32 for one F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

MODES = ("int8",)
KERNEL_ROWS = 64  # rows up to which int8_linear multiplies (measured: faster than float32's packed GEMM up to ~32)


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (out, in) and float32 per-output scales."""

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

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if (x.dtype == torch.float32 and x.device.type == "cpu" and rows <= KERNEL_ROWS and self.q.shape[1] % 16 == 0
                and self.scale.dtype == torch.float32 and kernels.available()):
            return torch.ops.nanoflant5_cpu.int8_linear(x, self.q, self.scale)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)}")


def quantize(model, mode: str):
    """Replace the model's linear layers (attention, feed-forward, output layer) by int8 ones, in place. The
    embedding stays as it is (a tied output layer gets its own int8 copy). Returns the model."""
    check_mode(mode)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: int8 takes bias-free linear layers")
                setattr(module, child_name, Int8Linear(child.weight))
    return model
