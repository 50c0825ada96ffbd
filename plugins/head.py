"""The vocabulary head of a decode step: float32 logits from float32 hidden rows, and the greedy pick of them.

DeepSeek's head is a float32 parameter loaded from bf16 weights. On a GPU the runtime keeps it in bf16
(exact) and `csrc/head_gemv.cu` accumulates in float32: half the bytes of the step's largest read, the
same products, another summation order. Elsewhere it is a float32 `linear`.
"""
from __future__ import annotations

import torch

from .loader import INT, PTR, kernels

MAX_ROWS = 4                      # csrc/head_gemv.cu MAX_B
UNROLL = 4                        # csrc/head_gemv.cu: 16-byte loads per lane a round (the next in flight)


def kernel_fits(rows: int, hidden: int, device: torch.device) -> bool:
    """Whether the bf16 head kernel serves `rows` decode rows of width `hidden` on `device`."""
    return device.type == "cuda" and rows <= MAX_ROWS and hidden % 256 == 0


def head_logits(y: torch.Tensor, weight: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """y [B, D] float32 (or float64), weight [V, D] bf16 (kernel; see `kernel_fits`) or y's dtype -> [B, V];
    or y bf16 with a bf16 weight: the same float32 product, y widened (exactly) by the kernel as it loads
    the rows. `split`: warps per weight row (tests; by default `k_split`'s)."""
    if weight.dtype == y.dtype and y.dtype != torch.bfloat16:
        return torch.nn.functional.linear(y, weight)
    b, d = y.shape
    assert weight.dtype == torch.bfloat16 and y.dtype in (torch.float32, torch.bfloat16)
    assert kernel_fits(b, d, y.device) and weight.is_contiguous() and weight.size(1) == d
    y = y.contiguous()
    if y.data_ptr() % 16:                        # the kernels load rows 8 and 16 bytes at a time
        y = y.clone()
    v = weight.size(0)
    out = torch.empty(b, v, dtype=torch.float32, device=y.device)
    lib, shared = kernels(), b * d * 4
    name = "dsv4_head_gemv" if y.dtype == torch.float32 else "dsv4_head_gemv_bf16_rows"
    resident = lib.resident(name, 256, shared)
    split = k_split(v, d // 256, resident * 8) if split is None else split
    assert split in (1, 2, 4, 8) and (d // 256) % split == 0
    grid = min(-(-v * split // 8), resident)
    lib.launch(name, grid, 256,
               [(y, PTR), (weight, PTR), (out, PTR), (b, INT), (v, INT), (d, INT), (split, INT)], shared)
    return out


def k_split(rows: int, chunks: int, resident_warps: int) -> int:
    """Warps per weight row (1, 2, 4 or 8; each a K slice of `chunks` / split 256-element chunks): doubled
    while the rows leave resident warps idle and each slice keeps a full round of loads (UNROLL chunks)."""
    split = 1
    while split < 8 and rows * split < resident_warps and chunks % (2 * split) == 0 and chunks // (2 * split) >= UNROLL:
        split *= 2
    return split


PICK_THREADS, PICK_PER_THREAD = 256, 4   # csrc/head_gemv.cu dsv4_argmax_rows: values per thread in one pass


class GreedyPick:
    """argmax over the last axis of logits [B, V] -> int64 [B], as torch.argmax (the first of equal maxima; NaN
    above every number); for float32 logits on a GPU one launch of csrc/head_gemv.cu's dsv4_argmax_rows, whose
    partial maxima and arrival counters are allocated here once, so calls never allocate (graph capture)
    and the counters, which the kernel sets back to zero, start at zero."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, torch.device(device)
        self.ctas = max(1, min(1024, -(-vocab // (PICK_THREADS * PICK_PER_THREAD))))
        if self.device.type == "cuda":
            self.partial = torch.empty(rows, self.ctas, dtype=torch.int64, device=self.device)
            self.counter = torch.zeros(rows, dtype=torch.int32, device=self.device)

    def __call__(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if logits.device.type != "cuda" or logits.dtype != torch.float32:
            return logits.argmax(-1)
        assert logits.shape == (self.rows, self.vocab) and logits.is_contiguous()
        out = torch.empty(self.rows, dtype=torch.int64, device=logits.device) if out is None else out
        kernels().launch("dsv4_argmax_rows", (self.ctas, self.rows), PICK_THREADS,
                         [(logits, PTR), (self.vocab, INT), (self.partial, PTR), (self.counter, PTR), (out, PTR)])
        return out
