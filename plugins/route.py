"""The score-routed MoE gate of a decode step on the GPU (csrc/route.cu): scores, biased top-k and
normalised weights in one launch. Oracle: `plugins.oracle.route_from_logits`.
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, kernels

SLOTS, MAX_K, MAX_ROWS = (8, 16, 32), 16, 16          # csrc/route.cu: experts per lane builds; rows: decode batches
MAX_EXPERTS = 32 * SLOTS[-1]


def kernel_fits(logits: torch.Tensor, k: int, scoring_func: str) -> bool:
    """Whether the kernel serves these logits [N, E]: V4's sqrt-softplus scores, float32 on a GPU."""
    return (logits.is_cuda and logits.dtype == torch.float32 and scoring_func == "sqrtsoftplus"
            and logits.dim() == 2 and 1 <= logits.size(0) <= MAX_ROWS and k <= min(MAX_K, logits.size(1))
            and logits.size(1) <= MAX_EXPERTS)


def route_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, scale: float,
               experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] float32, bias [E] float32 -> (weights [N, k] float32, experts [N, k] int32: `experts`
    if given, contiguous)."""
    n, e = logits.shape
    logits, bias = logits.contiguous(), bias.float().contiguous()
    weights = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    if experts is None:
        experts = torch.empty(n, k, dtype=torch.int32, device=logits.device)
    assert experts.shape == (n, k) and experts.dtype == torch.int32 and experts.is_contiguous()
    slots = next(s for s in SLOTS if 32 * s >= e)           # the smallest build that holds the row
    kernels().launch(f"dsv4_route_topk_s{slots}", n, 32, [(logits, PTR), (bias, PTR), (weights, PTR),
                                                          (experts, PTR), (e, INT), (k, INT), (scale, FLOAT)])
    return weights, experts
