"""The vocabulary head of a decode step: float32 logits from float32 hidden rows.

DeepSeek's head is a float32 parameter loaded from bf16 weights. On a GPU the runtime keeps it in bf16
(exact) and `csrc/head_gemv.cu` accumulates in float32: half the bytes of the step's largest read, the
same products, another summation order. Elsewhere it is a float32 `linear`.
"""
from __future__ import annotations

import torch

from .loader import INT, PTR, kernels

MAX_ROWS = 4                      # csrc/head_gemv.cu MAX_B


def kernel_fits(rows: int, hidden: int, device: torch.device) -> bool:
    """Whether the bf16 head kernel serves `rows` decode rows of width `hidden` on `device`."""
    return device.type == "cuda" and rows <= MAX_ROWS and hidden % 256 == 0


def head_logits(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B, D] float32 (or float64), weight [V, D] bf16 (kernel; see `kernel_fits`) or y's dtype -> [B, V]."""
    if weight.dtype == y.dtype:
        return torch.nn.functional.linear(y, weight)
    b, d = y.shape
    assert weight.dtype == torch.bfloat16 and y.dtype == torch.float32 and kernel_fits(b, d, y.device)
    assert weight.is_contiguous() and weight.size(1) == d
    y = y.contiguous()
    v = weight.size(0)
    out = torch.empty(b, v, dtype=torch.float32, device=y.device)
    lib, shared = kernels(), b * d * 4
    grid = min(-(-v // 8), lib.resident("dsv4_head_gemv", 256, shared))
    lib.launch("dsv4_head_gemv", grid, 256, [(y, PTR), (weight, PTR), (out, PTR), (b, INT), (v, INT), (d, INT)],
               shared)
    return out
