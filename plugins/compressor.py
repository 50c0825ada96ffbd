"""KV cache rows on the GPU (csrc/compressor.cu): the compressor's decode step in one launch (the token into
the partial-block states and, where it completes a block, the block's cache row; oracle
`plugins.oracle.compressor_step`), the compressor fed a prefill chunk in two (`compressor_chunk`; oracle
`plugins.oracle.compressor_chunk`), and the attention's query heads (norm and RoPE; oracle
`plugins.oracle.q_heads`) in one, with a decode step's window row in the same launch (`q_heads_kv_row`;
oracle `plugins.oracle.kv_row`).
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, kernels

DIMS, ROPE, FP8_BLOCK, MAX_ROWS = (128, 512), 64, 64, 16     # csrc/compressor.cu; rows: decode batches


def _fits(proj: torch.Tensor, cache: torch.Tensor, ratio: int, rope_dim: int, fp8_block: int) -> bool:
    """Products [..., 2C] float32 on a GPU for a bf16 cache of 128 or 512 channels, the kernel's RoPE and FP8
    block, ratio 4 (with overlap) or more."""
    dim = cache.size(-1)
    return (proj.is_cuda and proj.dtype == torch.float32 and cache.dtype == torch.bfloat16 and dim in DIMS
            and proj.size(-1) == 2 * dim * (2 if ratio == 4 else 1) and ratio >= 4 and rope_dim == ROPE
            and fp8_block == FP8_BLOCK)


def supports(proj: torch.Tensor, cache: torch.Tensor, ratio: int, rope_dim: int, fp8_block: int) -> bool:
    """proj [B, 2C] as `_fits`, at most 16 sequences."""
    return proj.dim() == 2 and 1 <= proj.size(0) <= MAX_ROWS and _fits(proj, cache, ratio, rope_dim, fp8_block)


def compressor_step(proj: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, kv_state: torch.Tensor,
                    score_state: torch.Tensor, cache: torch.Tensor, first_row: int, norm: torch.Tensor,
                    rot: torch.Tensor, ratio: int, rotate: bool, eps: float) -> None:
    """As the oracle (RoPE 64, FP8 block 64); every tensor contiguous, float32 but the bf16 cache and the
    int64 positions. Mutates kv_state, score_state and cache."""
    assert all(t.is_contiguous() for t in (proj, ape, pos, kv_state, score_state, cache, norm, rot))
    assert pos.dtype == torch.int64 and kv_state.dtype == score_state.dtype == norm.dtype == rot.dtype == torch.float32
    dim = cache.size(-1)
    kernels().launch("dsv4_compressor_step", proj.size(0), dim,
                     [(proj, PTR), (ape, PTR), (pos, PTR), (kv_state, PTR), (score_state, PTR), (norm, PTR),
                      (rot, PTR), (cache, PTR), (dim, INT), (ratio, INT), (cache.size(1), INT), (first_row, INT),
                      (int(rotate), INT), (dim ** -0.5, FLOAT), (eps, FLOAT)])


def supports_chunk(proj: torch.Tensor, cache: torch.Tensor, ratio: int, rope_dim: int, fp8_block: int) -> bool:
    """proj [B, T, 2C] as `_fits`, at least one sequence and token."""
    return (proj.dim() == 3 and proj.size(0) >= 1 and proj.size(1) >= 1
            and _fits(proj, cache, ratio, rope_dim, fp8_block))


def compressor_chunk(proj: torch.Tensor, ape: torch.Tensor, start: torch.Tensor, n: torch.Tensor,
                     kv_state: torch.Tensor, score_state: torch.Tensor, cache: torch.Tensor, first_row: int,
                     norm: torch.Tensor, rot: torch.Tensor, ratio: int, rotate: bool, eps: float) -> None:
    """As the oracle (RoPE 64, FP8 block 64); every tensor contiguous, float32 but the bf16 cache and the
    int64 start and n. Mutates kv_state, score_state and cache: the rows first (they read the old states),
    then the states."""
    assert all(t.is_contiguous() for t in (proj, ape, start, n, kv_state, score_state, cache, norm, rot))
    assert start.dtype == n.dtype == torch.int64
    assert kv_state.dtype == score_state.dtype == norm.dtype == rot.dtype == torch.float32
    b, chunk, dim = proj.size(0), proj.size(1), cache.size(-1)
    common = [(proj, PTR), (chunk, INT), (ape, PTR), (start, PTR), (n, PTR), (kv_state, PTR), (score_state, PTR)]
    kernels().launch("dsv4_compressor_chunk_rows", (b, (ratio + chunk - 1) // ratio), dim,
                     common + [(norm, PTR), (rot, PTR), (cache, PTR), (dim, INT), (ratio, INT), (cache.size(1), INT),
                               (first_row, INT), (int(rotate), INT), (dim ** -0.5, FLOAT), (eps, FLOAT)])
    kernels().launch("dsv4_compressor_chunk_state", (b, ratio), dim, common + [(dim, INT), (ratio, INT)])


def rot_fits(q: torch.Tensor, rot: torch.Tensor, rope_dim: int, pos: torch.Tensor | None) -> bool:
    """Whether rot serves the query rows q [B, S, ...] as the kernels read it: rot [B, S, rope_dim/2, 2] at the
    rows' positions, or with pos [B, S] the layer's table [max_len, rope_dim/2, 2] (`rot_row` in common.cuh)."""
    if pos is not None:
        return rot.dim() == 3 and rot.shape[1:] == (rope_dim // 2, 2) and pos.shape == q.shape[:2]
    return rot.shape == (*q.shape[:2], rope_dim // 2, 2)


def supports_q_heads(q: torch.Tensor, rot: torch.Tensor, rope_dim: int, pos: torch.Tensor | None = None) -> bool:
    """q [B, S, heads, hd] bf16 on a GPU with hd a multiple of 32 up to 512, rot as `rot_fits`, RoPE 64."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and q.dim() == 4 and q.size(-1) % 32 == 0
            and ROPE <= q.size(-1) <= DIMS[-1] and rope_dim == ROPE and rot_fits(q, rot, rope_dim, pos))


def supports_kv_row(q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, fp8_block: int) -> bool:
    """Whether `q_heads_kv_row` can write the window row too: one token per sequence (q [B, 1, heads, hd]), kv
    [B, hd] bf16 rows (unit stride along hd) for a contiguous bf16 cache [B, rows, hd] of 128 or 512 channels,
    the kernel's FP8 block."""
    return (kv.is_cuda and kv.dtype == cache.dtype == torch.bfloat16 and kv.dim() == 2 and kv.stride(1) == 1
            and q.size(1) == 1 and kv.size(0) == q.size(0) <= MAX_ROWS and kv.size(1) == cache.size(-1) == q.size(-1)
            and kv.size(1) in DIMS and cache.is_contiguous() and fp8_block == FP8_BLOCK)


def q_heads(q: torch.Tensor, rot: torch.Tensor, eps: float, pos: torch.Tensor | None = None,
            row: tuple | None = None) -> torch.Tensor:
    """As the oracle (RoPE 64); q contiguous bf16, rot contiguous float32 (with pos [B, S] int64 contiguous,
    the whole table, read at each row's position) -> a new [B, S, heads, hd] bf16. With `row` (kv, norm, cache,
    window: `q_heads_kv_row`) the same launch writes each sequence's window row."""
    assert q.is_contiguous() and rot.is_contiguous() and rot.dtype == torch.float32
    assert pos is None or (pos.is_contiguous() and pos.dtype == torch.int64)
    out = torch.empty_like(q)
    kv, norm, cache, window = row or (0, 0, None, 0)
    kernels().launch("dsv4_q_heads", (q.size(0) * q.size(1), q.size(2) + (row is not None)), q.size(3),
                     [(q, PTR), (rot, PTR), (out, PTR), (q.size(2), INT), (q.size(3), INT), (eps, FLOAT),
                      (0 if pos is None else pos, PTR), (kv, PTR), (0 if row is None else kv.stride(0), INT),
                      (norm, PTR), (0 if cache is None else cache, PTR), (0 if cache is None else cache.size(1), INT),
                      (window, INT)])
    return out


def q_heads_kv_row(q: torch.Tensor, kv: torch.Tensor, norm: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor,
                   cache: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """`q_heads` of q [B, 1, heads, hd] at pos [B] and, in the same launch, each sequence's new window row from
    kv [B, hd] (any row stride: a stacked product's slice) as `plugins.oracle.kv_row` (RMSNorm with the float32
    `norm`, RoPE, FP8 round-trip; mutates cache) -> the new query heads."""
    assert norm.is_contiguous() and norm.dtype == torch.float32
    return q_heads(q, rot, eps, pos, (kv, norm, cache, window))
