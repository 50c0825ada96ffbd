"""The indexer's block picks for decode rows on the GPU (csrc/indexer.cu): a scores launch over the visible
blocks and a top-k launch. Oracle: `plugins.oracle.indexer_picks`.
"""
from __future__ import annotations

import torch

from .loader import INT, PTR, kernels

HEADS, DIM, KEYS_PER_CTA, MAX_K = 64, 128, 64, 2048     # csrc/indexer.cu
MAX_ROWS = 16                                           # decode batches
MAX_BLOCKS = 1 << 16                                    # a pick is sorted as 16 bits of score, 16 of block


def supports(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    """q [B, S, 64, 128] and weights bf16 on a GPU over keys [B, T, 128], at most 16 query rows, T <= 65536,
    k <= 2048."""
    return (q.is_cuda and q.dtype == weights.dtype == keys.dtype == torch.bfloat16 and q.dim() == 4
            and q.shape[2:] == (HEADS, DIM) and keys.size(-1) == DIM and 1 <= q.size(0) * q.size(1) <= MAX_ROWS
            and keys.size(1) <= MAX_BLOCKS and 1 <= k <= MAX_K)


def indexer_picks(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, count: torch.Tensor,
                  k: int) -> torch.Tensor:
    """q [B, S, 64, 128], weights [B, S, 64], keys [B, T, 128] bf16, count [B, S] int64 -> picks [B, S, k]
    int64 (-1 = none). All contiguous."""
    assert supports(q, weights, keys, k) and q.is_contiguous() and keys.is_contiguous() and weights.is_contiguous()
    b, s = q.shape[:2]
    t = keys.size(1)
    scores = torch.empty(b * s, t, dtype=torch.int16, device=q.device)     # bf16 bits
    picks = torch.empty(b, s, k, dtype=torch.int64, device=q.device)
    lib = kernels()
    lib.launch("dsv4_indexer_scores", (-(-t // KEYS_PER_CTA), b * s), 256,
               [(q, PTR), (weights, PTR), (keys, PTR), (count, PTR), (scores, PTR), (t, INT), (s, INT)])
    lib.launch("dsv4_indexer_topk", b * s, 512, [(scores, PTR), (count, PTR), (picks, PTR), (t, INT), (k, INT)])
    return picks
