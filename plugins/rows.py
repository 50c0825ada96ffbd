"""Row kernels of the decode step on the GPU (csrc/rows.cu), one launch each, written so that the FP8 GEMV
after them starts streaming its weights while they run: RMSNorm of rows (`rms_norm_rows`; oracle
`plugins.oracle.rms_norm`) and the clamped SwiGLU of a stacked gate | up product (`swiglu_rows`; oracle
`plugins.oracle.swiglu_stacked`).
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, kernels

THREADS, MAX_K = 256, 256 * 32                         # csrc/rows.cu


def as_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] as a [R, K] view with unit stride along K (a stacked product's slice stays a view), or None."""
    if x.dim() < 1 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.size(-1))
    except RuntimeError:                                # leading dims not mergeable into one stride
        return None


def supports_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [..., K] bf16 on a GPU, K <= 8192, rows with unit stride along K, a weight of K values."""
    return x.is_cuda and x.dtype == torch.bfloat16 and 1 <= x.size(-1) <= MAX_K and weight.numel() == x.size(-1) \
        and as_rows(x) is not None


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., K] bf16 (rows may be a stacked product's slices), weight [K] float32 contiguous -> a new
    [..., K] bf16."""
    rows = as_rows(x)
    assert rows is not None and weight.dtype == torch.float32 and weight.is_contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kernels().launch("dsv4_rms_norm_rows", rows.size(0), THREADS,
                     [(rows, PTR), (rows.stride(0), INT), (weight, PTR), (out, PTR), (rows.size(1), INT), (eps, FLOAT)])
    return out


def supports_swiglu(y: torch.Tensor, size: int, up: int) -> bool:
    """y [..., W] bf16 on a GPU holding gate [0, size) and up [up, up + size) in each row."""
    return y.is_cuda and y.dtype == torch.bfloat16 and size <= up and up + size <= y.size(-1) and as_rows(y) is not None


def swiglu_rows(y: torch.Tensor, size: int, up: int, limit: float) -> torch.Tensor:
    """y [..., W] bf16 -> silu(min(gate, limit)) * clamp(up, -limit, limit) as a new [..., size] bf16."""
    rows = as_rows(y)
    assert rows is not None
    out = torch.empty(*y.shape[:-1], size, dtype=y.dtype, device=y.device)
    kernels().launch("dsv4_swiglu_rows", (rows.size(0), -(-size // (THREADS * 4))), THREADS,
                     [(rows, PTR), (rows.stride(0), INT), (up, INT), (size, INT), (limit, FLOAT), (out, PTR)])
    return out
