"""MXFP4 routed experts for decode on the GPU, reached through a table of expert pointers.

Oracle: `builder.reference.moe.MoE.expert` summed over a token's experts in ascending id order (the
official loop), without the shared expert. Experts live in an expert bank: each expert contiguous,
[w1 | w3 | w2 | s1 | s3 | s2] (see csrc/moe_experts.cu); the table holds one pointer per expert, to
device memory or to pinned host memory, so experts move without rebuilding anything.
"""
from __future__ import annotations

import ctypes

import torch

from .fp8_linear import _sm_count, act_quant
from .loader import INT, PTR, kernels


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


def make_workspace(tokens: int, topk: int, d: int, f: int, device) -> dict[str, torch.Tensor]:
    pairs = tokens * topk
    u8, f32, bf16 = torch.uint8, torch.float32, torch.bfloat16
    return {"xc": torch.empty(tokens, d, dtype=u8, device=device),
            "xs": torch.empty(tokens, d // 128, dtype=f32, device=device),
            "gu": torch.empty(pairs, 2, f, dtype=bf16, device=device),
            "hc": torch.empty(pairs, f, dtype=u8, device=device),
            "hs": torch.empty(pairs, f // 128, dtype=f32, device=device),
            "o": torch.empty(pairs, d, dtype=bf16, device=device)}


def moe_experts_decode(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor,
                       f: int, limit: float, out: torch.Tensor | None = None,
                       workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, D] bf16, experts [T, k] int32, route_w [T, k] float32, table [E] int64 -> y [T, D] float32."""
    t, d = x.shape
    k = experts.size(1)
    pairs = t * k
    assert x.dtype == torch.bfloat16 and experts.dtype == torch.int32 and route_w.dtype == torch.float32
    assert table.dtype == torch.int64 and d % 256 == 0 and f % 128 == 0
    ws = make_workspace(t, k, d, f, x.device) if workspace is None else workspace
    out = torch.empty(t, d, dtype=torch.float32, device=x.device) if out is None else out
    lib = kernels()
    resident = 8 * _sm_count(x.device)

    def warps(n: int) -> int:
        return min(resident, (n * 32 + 255) // 256)

    act_quant(x, ws["xc"], ws["xs"])
    lib.launch("dsv4_moe_gate_up", warps(pairs * 2 * (f // 8)), 256,
               [(ws["xc"], PTR), (ws["xs"], PTR), (experts, PTR), (table, PTR), (ws["gu"], PTR),
                (pairs, INT), (k, INT), (d, INT), (f, INT)])
    lib.launch("dsv4_moe_swiglu_quant", (pairs * (f // 128) * 32 + 255) // 256, 256,
               [(ws["gu"], PTR), (route_w, PTR), (ws["hc"], PTR), (ws["hs"], PTR), (pairs, INT), (f, INT),
                (limit, ctypes.c_float)])
    lib.launch("dsv4_moe_down", warps(pairs * ((d + 7) // 8)), 256,
               [(ws["hc"], PTR), (ws["hs"], PTR), (experts, PTR), (table, PTR), (ws["o"], PTR),
                (pairs, INT), (d, INT), (f, INT)])
    lib.launch("dsv4_moe_sum", (t * d + 255) // 256, 256,
               [(ws["o"], PTR), (experts, PTR), (out, PTR), (t, INT), (k, INT), (d, INT)])
    return out
