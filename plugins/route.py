"""The MoE gate of a decode step on the GPU (csrc/route.cu), one launch after the gate's product: scores,
the experts (the biased top-k, or a hash layer's table row) and normalised weights. Oracles:
`plugins.oracle.route_from_logits`; for hash layers `router_scores` and `route_weights` at tid2eid[ids].
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, kernels

SLOTS, MAX_K, MAX_ROWS = (8, 16, 32), 16, 16          # csrc/route.cu: experts per lane builds; rows: decode batches
MAX_EXPERTS = 32 * SLOTS[-1]
NULL = 0                                              # the kernel's absent pointer (bias, or tid2eid and ids)


def kernel_fits(logits: torch.Tensor, k: int, scoring_func: str) -> bool:
    """Whether the kernel serves these logits [N, E]: V4's sqrt-softplus scores, float32 on a GPU."""
    return (logits.is_cuda and logits.dtype == torch.float32 and scoring_func == "sqrtsoftplus"
            and logits.dim() == 2 and 1 <= logits.size(0) <= MAX_ROWS and k <= min(MAX_K, logits.size(1))
            and logits.size(1) <= MAX_EXPERTS)


def route_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, scale: float,
               experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] float32, bias [E] float32 -> (weights [N, k] float32, experts [N, k] int32: `experts`
    if given, contiguous)."""
    return _route(logits, bias.float().contiguous(), NULL, NULL, k, scale, experts)


def route_hash(logits: torch.Tensor, tid2eid: torch.Tensor, ids: torch.Tensor, k: int, scale: float,
               experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A hash layer's gate: logits [N, E] float32, tid2eid [V, k] int32, token ids [N] int64 -> (weights [N, k]
    float32, experts [N, k] int32 = tid2eid[ids]: `experts` if given, contiguous)."""
    assert tid2eid.dtype == torch.int32 and tid2eid.dim() == 2 and tid2eid.size(1) == k
    assert ids.dtype == torch.int64 and ids.shape == (logits.size(0),)
    return _route(logits, NULL, tid2eid.contiguous(), ids.contiguous(), k, scale, experts)


def _route(logits, bias, tid2eid, ids, k, scale, experts):
    """The launch of either routing: tensors or NULL for bias, tid2eid and ids (see csrc/route.cu)."""
    n, e = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    if experts is None:
        experts = torch.empty(n, k, dtype=torch.int32, device=logits.device)
    assert experts.shape == (n, k) and experts.dtype == torch.int32 and experts.is_contiguous()
    slots = next(s for s in SLOTS if 32 * s >= e)           # the smallest build that holds the row
    kernels().launch(f"dsv4_route_topk_s{slots}", n, 32, [(logits, PTR), (bias, PTR), (tid2eid, PTR), (ids, PTR),
                                                          (weights, PTR), (experts, PTR), (e, INT), (k, INT),
                                                          (scale, FLOAT)])
    return weights, experts
