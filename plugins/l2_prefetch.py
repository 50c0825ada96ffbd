"""Weights pulled into L2 ahead of the GEMV that reads them (csrc/l2_prefetch.cu): a hint, launched while
the decode step's short latency-bound kernels leave the memory idle. It writes nothing and nothing waits
for the lines to land; a prefetch that arrives late only costs its bandwidth.
"""
from __future__ import annotations

import functools

import torch

from .loader import PTR, U64, kernels

BULK_CHUNK = 64 * 1024                    # csrc/l2_prefetch.cu kBulkChunk
LINES_THREADS, LINES_PER_THREAD = 256, 8
# Whether `dsv4::l2_prefetch` prefetches (read at run time: one artifact is measured both ways,
# bench/profile_decode.py); off until measured in the step.
ENABLED = False
# The share of L2 that one `dsv4::l2_prefetch` may fill: what it prefetches last would otherwise evict
# what it prefetched first.
L2_SHARE = 0.75


def l2_prefetch(t: torch.Tensor, lines: bool = False, nbytes: int | None = None) -> None:
    """Prefetch the first `nbytes` (default: all) of the contiguous CUDA tensor t into L2: TMA bulk
    prefetches on sm_90+, one per 64 KiB (`lines`: one prefetch.global.L2::evict_last per 128-byte line)."""
    assert t.is_cuda and t.is_contiguous()
    nbytes = t.numel() * t.element_size() if nbytes is None else nbytes
    if lines:
        grid = max(1, -(-nbytes // (128 * LINES_THREADS * LINES_PER_THREAD)))
        kernels().launch("dsv4_l2_prefetch_lines", grid, LINES_THREADS, [(t, PTR), (nbytes, U64)])
    else:
        chunks = -(-nbytes // BULK_CHUNK)
        kernels().launch("dsv4_l2_prefetch", max(1, -(-chunks // 32)), 32, [(t, PTR), (nbytes, U64)])


@functools.cache
def l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def prefetch_in_order(weights: list[torch.Tensor]) -> None:
    """Prefetch `weights` (contiguous, on one GPU) in order, up to L2_SHARE of that GPU's L2 in all."""
    if not weights:
        return
    room = int(L2_SHARE * l2_bytes(weights[0].device.index or 0))
    for t in weights:
        nbytes = min(room, t.numel() * t.element_size()) // 16 * 16
        if nbytes <= 0:
            break
        l2_prefetch(t, nbytes=nbytes)
        room -= nbytes
