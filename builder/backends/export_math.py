"""Export-time stand-ins for the few oracle functions whose torch form has no ONNX/TensorRT equivalent.

Each computes the same values as the function it replaces, in standard ops both onnxruntime and
TensorRT import (the onnxruntime check runs the stand-ins, so any difference would show there):
  - pow2_ceil: exponent bits (bitcast, shifts) -> log2/floor/pow plus one correction each way
    (TensorRT has no BitCast and no BitShift, and no uint32);
  - round_to_e2m1: the code's sign bit and nibble masks as arithmetic (no bitwise ops);
  - dsv4::hc_pre, dsv4::route_topk, dsv4::route_hash, dsv4::indexer_picks and dsv4::compressor_step (decode
    programs): their math written out, as prefill programs have it (no plugin);
  - top_k (the indexer's picks): torch.topk, since aten.sort has no ONNX export; ONNX TopK breaks ties
    by the lower index (its spec), as oracle.top_k's stable sort does;
  - sinkhorn_split: the same iterations with a fusion barrier (a BitCast round trip, two dsv4 plugin
    copies) every few: TensorRT fuses the whole unrolled loop into one Myelin region whose compile
    time triples per iteration (measured with TensorRT-RTX 1.7: 2 iterations 0.3 s, 5 iterations 6 s,
    20 never finished in 10 minutes at 12 GB); a plugin node splits the region. In a captured decode
    graph each barrier is one tiny copy kernel.
They are swapped in only while a program is traced for ONNX (`onnx_friendly`), never at run time.
"""
from __future__ import annotations

import contextlib

import torch

from plugins import formats, oracle

_MIN_NORMAL = 2.0 ** -126


def pow2_ceil_float(x: torch.Tensor) -> torch.Tensor:
    """formats.pow2_ceil without bits: 2^ceil(log2(x)) for positive float32 x. Below the smallest normal
    the bit version gives 2^-126, so x is raised to it first (also keeps flush-to-zero GPUs exact)."""
    x = x.float().clamp(min=_MIN_NORMAL)
    p = torch.pow(2.0, torch.floor(torch.log2(x)))                 # within a factor 2 of the answer
    p = torch.where(p < x, p * 2, p)
    return torch.where(p * 0.5 >= x, p * 0.5, p)


def round_to_e2m1_arith(x: torch.Tensor) -> torch.Tensor:
    """formats.round_to_e2m1 with the same midpoints and ties, the sign applied without bit masks."""
    mag = x.abs().clamp(max=formats.FP4_MAX)
    idx = torch.zeros_like(mag, dtype=torch.int32)
    for mid, up in zip(formats._E2M1_MIDPOINTS, formats._E2M1_TIE_UP):
        idx += (mag > mid).to(torch.int32)
        if up:
            idx += (mag == mid).to(torch.int32)
    value = torch.tensor(formats.E2M1_VALUES, dtype=torch.float32, device=x.device)[idx.long()]
    return torch.where((x < 0) & (idx > 0), -value, value)


def top_k_onnx(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """oracle.top_k as ONNX TopK (values, indices; ties to the lower index)."""
    return torch.topk(score, k, dim=-1)


_BARRIER_EVERY = 3         # iterations per Myelin region: small enough to compile in seconds
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def fusion_barrier(x: torch.Tensor) -> torch.Tensor:
    """x unchanged, through two bit casts that export as dsv4 BitCast plugin nodes."""
    return x.view(_SAME_SIZE_INT[x.dtype]).view(x.dtype)


def sinkhorn_split_barriers(mix, scale, base, hc: int, iters: int, eps: float):
    """oracle.sinkhorn_split's math in matrix form (a few ONNX nodes per iteration, where the oracle's
    per-element form suits Inductor), equal up to summation order, a fusion barrier every few iterations."""
    pre = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mix[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for i in range(iters - 1):
        if i % _BARRIER_EVERY == _BARRIER_EVERY - 1:
            comb = fusion_barrier(comb)
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


@contextlib.contextmanager
def onnx_friendly():
    """While tracing a program for ONNX: the stand-ins above."""
    from builder.programs import decode
    saved = (formats.pow2_ceil, formats.round_to_e2m1, oracle.sinkhorn_split, decode.HC_PRE_OP_ROWS,
             decode.WIDE_LINEAR_OP, decode.ROUTE_OP_ROWS, decode.INDEXER_OP_ROWS, decode.COMPRESSOR_OP_ROWS,
             oracle.top_k)
    formats.pow2_ceil, formats.round_to_e2m1, oracle.top_k = pow2_ceil_float, round_to_e2m1_arith, top_k_onnx
    oracle.sinkhorn_split, decode.HC_PRE_OP_ROWS, decode.WIDE_LINEAR_OP = sinkhorn_split_barriers, 0, False
    decode.ROUTE_OP_ROWS = decode.INDEXER_OP_ROWS = decode.COMPRESSOR_OP_ROWS = 0
    try:
        yield
    finally:
        (formats.pow2_ceil, formats.round_to_e2m1, oracle.sinkhorn_split, decode.HC_PRE_OP_ROWS,
         decode.WIDE_LINEAR_OP, decode.ROUTE_OP_ROWS, decode.INDEXER_OP_ROWS, decode.COMPRESSOR_OP_ROWS,
         oracle.top_k) = saved
