"""MXFP4 routed experts for decode on the GPU, reached through a table of expert pointers.

Oracle: `builder.reference.moe.MoE.expert` summed over a token's experts in ascending id order (the
official loop), without the shared expert. Experts live in an expert bank: each expert contiguous,
[w1 | w3 | w2 | s1 | s3 | s2] (see csrc/moe_experts.cu); the table holds one pointer per expert, to
device memory or to pinned host memory, so experts move without rebuilding anything.
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, balanced_grid, kernels


def expert_nbytes(d: int, f: int) -> int:
    return 3 * f * d // 2 + 3 * f * d // 32


def _parts(d: int, f: int) -> list[tuple[str, tuple[int, int], torch.dtype]]:
    """The bank layout of one expert, in order: name, shape, dtype."""
    return [("w1", (f, d // 2), torch.int8), ("w3", (f, d // 2), torch.int8), ("w2", (d, f // 2), torch.int8),
            ("s1", (f, d // 32), torch.float8_e8m0fnu), ("s3", (f, d // 32), torch.float8_e8m0fnu),
            ("s2", (d, f // 32), torch.float8_e8m0fnu)]


def pack_expert(w1, s1, w3, s3, w2, s2) -> torch.Tensor:
    """Checkpoint tensors of one expert (int8 packed MXFP4, E8M0 scales) -> its bank bytes (uint8)."""
    named = {"w1": w1, "w3": w3, "w2": w2, "s1": s1, "s3": s3, "s2": s2}
    d, f = w1.size(1) * 2, w1.size(0)
    return torch.cat([named[name].contiguous().view(torch.uint8).flatten() for name, _, _ in _parts(d, f)])


def unpack_expert(blob: torch.Tensor, d: int, f: int) -> tuple[torch.Tensor, ...]:
    """Bank bytes of one expert -> views (w1, s1, w3, s3, w2, s2), `pack_expert`'s inverse."""
    views, at = {}, 0
    for name, shape, dtype in _parts(d, f):
        n = shape[0] * shape[1]
        views[name] = blob[at:at + n].view(dtype).view(shape)
        at += n
    return tuple(views[k] for k in ("w1", "s1", "w3", "s3", "w2", "s2"))


MAX_TOPK = 16                     # csrc/moe_experts.cu MAX_TOPK
PARTS = 4                         # csrc/moe_experts.cu PARTS
RING_BYTES = 8 * 4 * (16 * 8 * 16 + 16 * 8)   # csrc/moe_experts.cu RING_BYTES: 8 warps x 4 stages


def make_workspace(tokens: int, topk: int, d: int, f: int, device) -> dict[str, torch.Tensor]:
    """h: each (token, expert) pair's bf16 SwiGLU output, handed from the gate_up kernel to the down kernel."""
    return {"h": torch.empty(tokens * topk, f, dtype=torch.bfloat16, device=device)}


def moe_experts_decode(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor,
                       f: int, limit: float, out: torch.Tensor | None = None,
                       workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, D] bf16, experts [T, k] int32, route_w [T, k] float32, table [E] int64 -> y [T, D] float32."""
    t, d = x.shape
    k = experts.size(1)
    assert x.dtype == torch.bfloat16 and experts.dtype == torch.int32 and route_w.dtype == torch.float32
    assert table.dtype == torch.int64 and d % 256 == 0 and f % 128 == 0 and 1 <= k <= MAX_TOPK
    assert x.is_contiguous() and experts.is_contiguous() and route_w.is_contiguous()
    ws = make_workspace(t, k, d, f, x.device) if workspace is None else workspace
    out = torch.empty(t, d, dtype=torch.float32, device=x.device) if out is None else out
    lib = kernels()
    # The grids' y is the token; x is a persistent grid over that token's items, sized to fill the GPU.
    shared_up = RING_BYTES + d + d // 128 * 4
    items_up = k * (f // 16)
    grid_up = balanced_grid(items_up * t, lib.resident("dsv4_moe_gate_up", 256, shared_up))
    lib.launch("dsv4_moe_gate_up", (max(1, -(-grid_up // t)), t), 256,
               [(x, PTR), (experts, PTR), (route_w, PTR), (table, PTR), (ws["h"], PTR), (k, INT), (d, INT),
                (f, INT), (limit, FLOAT)], shared_up)
    shared_down = RING_BYTES + k * f + k * (f // 128) * 4 + k * PARTS * 16 * 4
    items_down = d // 16
    grid_down = balanced_grid(items_down * t, lib.resident("dsv4_moe_down", 256, shared_down))
    lib.launch("dsv4_moe_down", (max(1, -(-grid_down // t)), t), 256,
               [(ws["h"], PTR), (experts, PTR), (table, PTR), (out, PTR), (k, INT), (d, INT), (f, INT)],
               shared_down)
    return out
