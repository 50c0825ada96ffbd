"""FP8 block-scaled linear for decode (1-16 rows) on the GPU: act_quant + fp8_gemv kernels.

Oracle: `builder.reference.ops.quantised_matmul(x, fp8_weight_dequant(w, s))` (DeepSeek's act_quant +
fp8_gemm). Pass `out` and `workspace` to launch without allocating (CUDA-graph capture).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .loader import INT, PTR, kernels

ROW_BUCKETS = (1, 2, 4, 8, 16)
MAX_ROWS = ROW_BUCKETS[-1]


@lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_linear_decode(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None,
                      workspace: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 16), w [N, K] float8_e4m3fn, w_scale [ceil(N/128), K/128] E8M0 -> [M, N] bf16."""
    m, k = x.shape
    n = w.size(0)
    assert x.dtype == torch.bfloat16 and w.dtype == torch.float8_e4m3fn and m <= MAX_ROWS
    assert k % 128 == 0 and w.size(1) == k and x.is_contiguous() and w.is_contiguous()
    assert w_scale.shape == ((n + 127) // 128, k // 128)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device) if out is None else out
    workspace = torch.empty_like(x) if workspace is None else workspace
    lib = kernels()
    warps = m * (k // 128)
    lib.launch("dsv4_act_quant_fp8", (warps * 32 + 255) // 256, 256, [(x, PTR), (workspace, PTR), (m, INT), (k, INT)])
    bucket = next(b for b in ROW_BUCKETS if b >= m)
    wpr = 1 << max(0, min(3, (k // 1024).bit_length() - 1))   # warps per row (1, 2, 4, 8): split K on wide rows
    rows_per_block = 8 // wpr
    groups = (n + rows_per_block - 1) // rows_per_block
    lib.launch(f"dsv4_fp8_gemv_m{bucket}", min(groups, 8 * _sm_count(x.device)), 256,
               [(workspace, PTR), (w, PTR), (w_scale, PTR), (out, PTR), (m, INT), (n, INT), (k, INT), (wpr, INT)])
    return out
