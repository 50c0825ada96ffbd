"""FP8 block-scaled linear for decode (1-16 rows) on the GPU: act_quant + fp8_gemv kernels.

Oracle: `plugins.oracle.quantised_matmul(x, fp8_weight_dequant(w, s))` (DeepSeek's act_quant +
fp8_gemm). Pass `out` and `workspace` to launch without allocating (CUDA-graph capture).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .loader import INT, PTR, kernels

MAX_ROWS = 16
# The fused kernel quantises the activation rows in every CTA: cheap while rows x K/128 is small; beyond
# it one act_quant launch writes the codes once for all CTAs.
FUSE_LIMIT_BLOCKS = 128
ROW_PAD = 64                      # csrc/fp8_linear.cu ROW_PAD


MAX_STAGES, MAX_WARPS = 4, 8      # csrc/fp8_linear.cu
STAGE_KB_BLOCKS = 8               # a stage holds up to 8 rows x 1 KB of K


@lru_cache(maxsize=8)
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, dynamic shared memory a CTA may opt into, less the kernel's static barriers)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, optin - 1024


def gemv_plan(m: int, n: int, k: int, fused: bool, sms: int, shared_limit: int) -> dict:
    """How the GEMV splits the work (see csrc/fp8_linear.cu): warps per CTA (fewer when there are few row
    groups, so that every multiprocessor streams), the K chunk of a stage and the stages per warp that
    fit in shared memory, the shared-memory layout. Pure arithmetic, so it is tested without a GPU."""
    groups = -(-n // 8)
    ring_at = -(-(m * (k + ROW_PAD) + m * (k // 128) * 4) // 128) * 128 if fused else 0
    most = MAX_WARPS
    while most > 1 and -(-groups // most) < sms:
        most //= 2
    # the largest warps per CTA, then the longest K chunk, that leave every warp two stages or more
    chunks = [d for d in range(min(k // 128, STAGE_KB_BLOCKS), 0, -1) if (k // 128) % d == 0]
    for warps in [most >> i for i in range(most.bit_length())]:
        for blocks in chunks:
            stage = 8 * (blocks * 128 + ROW_PAD)
            stages = min(MAX_STAGES, (shared_limit - ring_at) // (warps * stage))
            if stages >= 2:
                break
        if stages >= 2:
            break
    if stages < 1:
        raise ValueError(f"fp8 GEMV of {m} x {k} does not fit {shared_limit} bytes of shared memory")
    return {"warps": warps, "kc": blocks * 128, "stages": stages, "ring_at": ring_at,
            "shared": ring_at + warps * stages * stage, "ctas": -(-groups // warps)}


def fp8_linear_decode(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None,
                      workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 16), w [N, K] float8_e4m3fn, w_scale [ceil(N/128), K/128] E8M0 -> [M, N] bf16.

    `workspace` = (codes uint8 [M, K], scales float32 [M, K/128]) from `make_workspace`; only the
    unfused path (many rows x long K) uses it.
    """
    m, k = x.shape
    n = w.size(0)
    assert x.dtype == torch.bfloat16 and w.dtype == torch.float8_e4m3fn and m <= MAX_ROWS
    assert k % 128 == 0 and w.size(1) == k and x.is_contiguous() and w.is_contiguous()
    assert w.data_ptr() % 16 == 0, "bulk copies need 16-byte aligned weights"
    assert w_scale.shape == ((n + 127) // 128, k // 128)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device) if out is None else out
    fused = m * (k // 128) <= FUSE_LIMIT_BLOCKS
    if fused:
        codes, scales = x, x                                  # unused by the fused kernel
    else:
        codes, scales = make_workspace(m, k, x.device) if workspace is None else workspace
        act_quant(x, codes, scales)
    plan = gemv_plan(m, n, k, fused, *_device_limits(x.device))
    lib = kernels()
    name = f"dsv4_fp8_gemv{'_fused' if fused else ''}_m{8 if m <= 8 else 16}"
    block = 32 * plan["warps"]
    grid = min(plan["ctas"], lib.resident(name, block, plan["shared"]))
    lib.launch(name, grid, block,
               [(x, PTR), (codes, PTR), (scales, PTR), (w, PTR), (w_scale, PTR), (out, PTR), (m, INT), (n, INT),
                (k, INT), (plan["kc"], INT), (plan["stages"], INT), (plan["ring_at"], INT)], plan["shared"])
    return out


def act_quant(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """DeepSeek's FP8 act_quant of x [M, K] bf16 into e4m3 codes [M, K] (uint8) and scales [M, K/128]."""
    m, k = x.shape
    warps = m * (k // 128)
    kernels().launch("dsv4_act_quant_fp8", (warps * 32 + 255) // 256, 256,
                     [(x, PTR), (codes, PTR), (scales, PTR), (m, INT), (k, INT)])


def make_workspace(m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(m, k, dtype=torch.uint8, device=device),
            torch.empty(m, k // 128, dtype=torch.float32, device=device))
