"""The indexer on the GPU for decode rows: its queries' RoPE, Hadamard and FP4 round-trip in one launch
(`index_query`, csrc/compressor.cu: the keys' row tail; oracle `plugins.oracle.index_query`), and its block
picks, a scores launch over the visible blocks and a top-k launch (csrc/indexer.cu; oracle
`plugins.oracle.indexer_picks`).
"""
from __future__ import annotations

import torch

from .compressor import rot_fits
from .loader import FLOAT, INT, PTR, kernels

HEADS, DIM, SCORE_WARPS, MAX_K = 64, 128, 8, 2048     # csrc/indexer.cu
SCORE_CTAS = 256        # dsv4_indexer_scores' most CTAs: one batch of 8 keys per warp covers 16384 blocks
MAX_ROWS = 16                                           # decode batches
MAX_BLOCKS = 1 << 16                                    # a pick is sorted as 16 bits of score, 16 of block


def supports(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    """q [B, S, 64, 128] bf16 with the raw head weights [B, S, 64] float32 on a GPU over bf16 keys [B, T, 128], at
    most 16 query rows, T <= 65536, k <= 2048."""
    return (q.is_cuda and q.dtype == keys.dtype == torch.bfloat16 and weights.dtype == torch.float32
            and q.dim() == 4 and q.shape[2:] == (HEADS, DIM) and keys.size(-1) == DIM
            and 1 <= q.size(0) * q.size(1) <= MAX_ROWS and keys.size(1) <= MAX_BLOCKS and 1 <= k <= MAX_K)


def indexer_picks(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, k: int,
                  ratio: int, weight_scale: float) -> torch.Tensor:
    """q [B, S, 64, 128] bf16, the raw head weights [B, S, 64] float32 (the kernel rounds them to bf16 and scales
    them by weight_scale, as the program did), keys [B, T, 128] bf16, the queries' positions pos [B, S] int64
    (blocks t < (pos + 1) // ratio visible) -> picks [B, S, k] int64 (-1 = none). All contiguous."""
    assert supports(q, weights, keys, k) and q.is_contiguous() and keys.is_contiguous() and weights.is_contiguous()
    b, s = q.shape[:2]
    t = keys.size(1)
    scores = torch.empty(b * s, t, dtype=torch.int16, device=q.device)     # bf16 bits
    picks = torch.empty(b, s, k, dtype=torch.int64, device=q.device)
    lib = kernels()
    lib.launch("dsv4_indexer_scores", (min(-(-t // SCORE_WARPS), SCORE_CTAS), b * s), 32 * SCORE_WARPS,
               [(q, PTR), (weights, PTR), (weight_scale, FLOAT), (keys, PTR), (pos, PTR), (ratio, INT), (scores, PTR),
                (t, INT), (s, INT)])
    lib.launch("dsv4_indexer_topk", b * s, 512, [(scores, PTR), (pos, PTR), (ratio, INT), (picks, PTR), (t, INT),
                                                (k, INT)])
    return picks


def supports_query(q: torch.Tensor, rot: torch.Tensor, rope_dim: int, pos: torch.Tensor | None = None) -> bool:
    """q [B, S, heads, 128] bf16 on a GPU, rot as `plugins.compressor.rot_fits`, RoPE 64, at most 16 query
    rows."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and q.dim() == 4 and q.size(-1) == DIM and rope_dim == 64
            and rot_fits(q, rot, rope_dim, pos) and 1 <= q.size(0) * q.size(1) <= MAX_ROWS)


def index_query(q: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, S, heads, 128] bf16 contiguous, rot [B, S, 32, 2] float32 contiguous (with pos [B, S] int64
    contiguous, the whole table, read at each query's position) -> the queries [B, S, heads, 128] bf16 after
    RoPE, Hadamard and the FP4 round-trip."""
    assert q.is_contiguous() and rot.is_contiguous() and rot.dtype == torch.float32
    assert pos is None or (pos.is_contiguous() and pos.dtype == torch.int64)
    out = torch.empty_like(q)
    kernels().launch("dsv4_index_query", (q.size(0) * q.size(1), q.size(2)), DIM,
                     [(q, PTR), (rot, PTR), (out, PTR), (q.size(2), INT), (DIM ** -0.5, FLOAT),
                      (0 if pos is None else pos, PTR)])
    return out
