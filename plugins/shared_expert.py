"""The shared expert of 1-2 decode rows in one launch (csrc/shared_expert.cu): the stacked w1 | w3 FP8 product,
the clamped SwiGLU, w2's FP8 product, with the two-launch form's numerics (`fp8_linear` then
`fp8_linear_after_swiglu`) but for the order of the float32 sums over K.

Oracle: plugins.oracle's quantised_matmul over the dequantised weights, as `dsv4::fp8_linear` on CPU.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .loader import FLOAT, INT, PTR, device_index, kernels

# Whether `dsv4::moe_with_shared` and its kin run the shared expert in one launch where it fits: off until
# measured on the H200 (written in session 51). A switch for tests and benchmarks.
ONE_LAUNCH = False
WARPS, CLUSTER, JOB_BYTES, ROW_PAD, MAX_ROWS = 8, 8, 16 * 128, 64, 2   # csrc/shared_expert.cu
STAGE_CHOICES = (12, 4)                 # the kernels' ring depths (dsv4_shared_expert_s12, _s4), deepest first


def shared_bytes(stages: int, rows: int, d: int) -> int:
    """Dynamic shared memory of a launch: the ring, x's f16 codes and scales, phase 1's warp sums."""
    return WARPS * stages * JOB_BYTES + 2 * rows * (d + ROW_PAD) + 4 * rows * (d // 128) + 4 * WARPS * 2 * 4 * 32


def stages_for(rows: int, d: int) -> int | None:
    """The deepest ring the GPU's shared memory holds (None: neither)."""
    per_block = kernels().shared_memory()[1]
    return next((s for s in STAGE_CHOICES if shared_bytes(s, rows, d) <= per_block), None)


def fits(x: torch.Tensor, inter: int, up: int, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the one-launch kernel serves: a GPU with thread-block clusters (sm_90+), bf16 rows (at most 2),
    D a multiple of 1024, the intermediate size and w3's first row multiples of 128."""
    if not (ONE_LAUNCH and x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and 1 <= x.size(0) <= MAX_ROWS
            and x.is_contiguous()):
        return False
    d = x.size(1)
    return (torch.cuda.get_device_capability(x.device)[0] >= 9 and d % 1024 == 0 and inter % 128 == 0
            and up % 128 == 0 and w13.shape == (up + inter, d) and w2.shape == (d, inter)
            and stages_for(x.size(0), d) is not None)


@lru_cache(maxsize=None)
def _workspace(index: int, rows: int, d: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partials [F / 128, rows, D] and the 8 arrival counters, allocated once per shape (calls then
    never allocate, so CUDA graphs capture them; the decode programs run uncaptured first). The counters start
    at zero and the kernel sets each back to zero."""
    device = torch.device("cuda", index)
    return (torch.empty(f // 128, rows, d, dtype=torch.float32, device=device),
            torch.zeros(CLUSTER, dtype=torch.int32, device=device))


def shared_expert_decode(x: torch.Tensor, inter: int, up: int, limit: float, w13: torch.Tensor, s13: torch.Tensor,
                         w2: torch.Tensor, s2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, D] bf16 (`fits`) -> y [rows, D] bf16: w2 . swiglu(w1 . x, w3 . x), w1 rows [0, inter) and w3 rows
    [up, up + inter) of w13, scales as E8M0 bytes (any one-byte dtype)."""
    rows, d = x.shape
    stages = stages_for(rows, d)
    partial, counter = _workspace(device_index(x.device), rows, d, inter)
    out = torch.empty(rows, d, dtype=torch.bfloat16, device=x.device) if out is None else out
    assert x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous() and out.is_contiguous()
    kernels().launch(f"dsv4_shared_expert_s{stages}", inter // 128 * CLUSTER, 32 * WARPS,
                     [(x, PTR), (w13, PTR), (s13.contiguous(), PTR), (w2, PTR), (s2.contiguous(), PTR), (out, PTR),
                      (partial, PTR), (counter, PTR), (rows, INT), (d, INT), (inter, INT), (up, INT),
                      (float(limit), FLOAT)],
                     shared_bytes(stages, rows, d), cluster=CLUSTER)
    return out
