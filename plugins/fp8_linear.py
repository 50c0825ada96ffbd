"""FP8 block-scaled linear for decode (1-16 rows) on the GPU: act_quant + fp8_gemv kernels.

Oracle: `plugins.oracle.quantised_matmul(x, fp8_weight_dequant(w, s))` (DeepSeek's act_quant +
fp8_gemm). Pass `out` and `workspace` to launch without allocating (CUDA-graph capture).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch

from .formats import e8m0_to_float, fp8_weight_dequant
from .loader import FLOAT, INT, PTR, balanced_grid, device_index, kernels, on_sm90, sm_count
from .oracle import quantised_matmul
from .rows import rms_norm_rows, swiglu_rows

log = logging.getLogger(__name__)

MAX_ROWS = 16
# The fused kernel quantises the activation rows in every CTA: cheap while rows x K/128 is small; beyond
# it one act_quant launch writes the codes once for all CTAs.
FUSE_LIMIT_BLOCKS = 128
ROW_PAD = 64                      # csrc/fp8_linear.cu ROW_PAD
# The weight ring: per step 8 warps x 4 KiB of weights plus two 4-byte scale words each (csrc/fp8_linear.cu)
STAGE_BYTES = 8 * (4096 + 8)
MAX_STAGES = 6
# Whether plain decode GEMVs on sm_90 run csrc/fp8_gemv_wgmma.cu (the weights as warpgroup-MMA's A straight
# from shared memory, no per-byte work). Correct on the H200 but slower than the f16 GEMV (session 33,
# bench/results/gemv-wgmma-s33-h200.txt): off until bench/read_ceiling.py --wgmma-gemv shows it faster and
# `dsv4 forced` on Flash-8 judges its FP8 accumulation.
WGMMA_GEMV = False
GW_ROWS = 64                              # csrc/fp8_gemv_wgmma.cu: weight rows per item
GW_RING_BYTES = 8 * 8832                   # csrc/fp8_gemv_wgmma.cu: GW_STAGES x GW_STAGE
# The K split: the fewest cluster ranks per item that give the GPU about two CTAs per SM (so each SM streams
# through two rings), where K's blocks divide among them; up to 8, the portable cluster size.
GW_CTAS_PER_SM = 1.9
# The GEMV's static shared memory (csrc/fp8_linear.cu: the norm prologue's scratch). Until session 29 the K
# slices' sums took 4 KB (8 KB at 16 rows) there, which left wo_b two ring stages where it now gets three;
# a benchmark may set 4096 to plan as then (bench/profile_decode.py).
SHARED_STATIC_BYTES = 32


def ring_stages(shared_memory: tuple[int, int], fixed: int) -> int:
    """Depth of the GEMV's weight ring (csrc/fp8_linear.cu): as deep as two CTAs per SM allow (at least 2
    steps), else as one CTA per SM allows (GPUs with little shared memory, e.g. sm_120). Two CTAs win on
    the H200 even when that leaves one step in flight (`bench/results/gemv-ring-sweep-h200.json`: wo_b,
    whose 8192-wide activation takes 17 KB, 11.8 us at 2 CTAs x 2 steps, 12.1-13.1 us at one CTA x 3-6; since
    session 29 it gets 3 steps at 2 CTAs). `fixed`: the CTA's other shared bytes."""
    per_sm, per_block = shared_memory
    for ctas, least in ((2, 2), (1, 2)):
        room = min(per_sm // ctas - 1024, per_block) - fixed   # the driver keeps 1 KiB per CTA
        stages = min(MAX_STAGES, room // STAGE_BYTES)
        if stages >= least:
            return stages
    raise RuntimeError(f"FP8 GEMV: {per_block} bytes of shared memory per CTA cannot hold its weight ring")


@lru_cache(maxsize=64)                    # called on every launch: plain decode pays Python per call
def gemv_plan(m: int, k: int, shared_memory: tuple[int, int], staged: bool = False) -> tuple[bool, int, int] | None:
    """(fused, ring depth, dynamic shared bytes) of a GEMV over m rows of width k. Fused: each CTA quantises
    the rows into shared memory itself, while m * k / 128 is small and they leave room for a ring of 2
    steps; else one act_quant launch writes the codes for all CTAs (e.g. 4 rows of 4096 on sm_120).
    `staged`: the fused form with a prologue (its bf16 rows staged in shared memory too), or None where it
    does not fit."""
    static = SHARED_STATIC_BYTES
    if m * (k // 128) <= FUSE_LIMIT_BLOCKS:
        act = 2 * m * (k + ROW_PAD) + m * (k // 128) * 4          # room for f16 codes (csrc/fp8_linear.cu)
        act += (2 * m * k + 16) if staged else 0                  # the prologue's rows, 16-byte aligned
        try:
            stages = ring_stages(shared_memory, act + static)
            return True, stages, stages * STAGE_BYTES + act
        except RuntimeError:
            pass
    if staged:
        return None
    stages = ring_stages(shared_memory, static)
    return False, stages, stages * STAGE_BYTES


def fp8_linear_decode(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None,
                      workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 16), w [N, K] float8_e4m3fn, w_scale [ceil(N/128), K/128] E8M0 -> [M, N] bf16.

    `workspace` = (codes uint8 [M, K], scales float32 [M, K/128]) from `make_workspace`; only the
    unfused path (many rows x long K) uses it.
    """
    m, k = x.shape
    assert x.is_contiguous()
    if WGMMA_GEMV and on_sm90(x):
        return fp8_linear_decode_wgmma(x, w, w_scale, out)
    lib = kernels()
    fused, stages, shared = gemv_plan(m, k, lib.shared_memory())
    if fused:
        codes, scales = x, x                                  # unused by the fused kernel
    else:
        codes, scales = make_workspace(m, k, x.device) if workspace is None else workspace
        act_quant(x, codes, scales)
    name = f"dsv4_fp8_gemv{'_fused' if fused else ''}_m{8 if m <= 8 else 16}"
    return gemv_launch(name, x, codes, scales, w, w_scale, out, m, k, stages, shared)


def wgmma_gemv_parts(n: int, k: int, sms: int) -> int:
    """Cluster ranks sharing each item's K in csrc/fp8_gemv_wgmma.cu (GW_CTAS_PER_SM)."""
    items, blocks = -(-n // GW_ROWS), k // 128
    fits = [p for p in (1, 2, 4, 8) if blocks % p == 0]
    return next((p for p in fits if items * p >= GW_CTAS_PER_SM * sms), fits[-1])


def fp8_linear_decode_wgmma(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear_decode on csrc/fp8_gemv_wgmma.cu (sm_90 only): x [M, K] bf16 contiguous, M <= 16; a cluster
    of CTAs per 64 weight rows, splitting K."""
    m, k = x.shape
    n = w.size(0)
    assert x.is_contiguous()
    _check_gemv(x, w, w_scale, m, k)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device) if out is None else out
    parts = wgmma_gemv_parts(n, k, sm_count(device_index(x.device)))
    tokens = 8 if m <= 8 else 16
    shared = GW_RING_BYTES + tokens * (k // parts) + (m + 1) * (k // parts // 128) * 4
    kernels().launch(f"dsv4_fp8_gemv_wgmma_m{tokens}", -(-n // GW_ROWS) * parts, 128,
                     [(x, PTR), (w, PTR), (w_scale, PTR), (out, PTR), (m, INT), (n, INT), (k, INT)], shared,
                     cluster=parts)
    return out


# Prologues of the fused GEMV (csrc/fp8_linear.cu Prologue): its input rows go through the transform first,
# in the same launch, where the GEMV is the transform's only reader.
PROLOGUE_ROWS = 8                         # the m8 builds
NORM_PROLOGUE_K = 2048                    # csrc/fp8_linear.cu NORM_PER_THREAD x 256


def fp8_linear_decode_normed(x: torch.Tensor, norm: torch.Tensor, eps: float, w: torch.Tensor,
                             w_scale: torch.Tensor) -> torch.Tensor:
    """fp8_linear_decode(rms_norm_rows(x, norm, eps), w, w_scale) in one launch where it fits (x [M, K] bf16
    rows with unit stride along K, e.g. a stacked product's slice; norm [K] float32 contiguous); the same bits."""
    return _after_prologue("norm", x, x.size(1), (norm, x.stride(0), 0, eps), x.size(1) <= NORM_PROLOGUE_K,
                           lambda: rms_norm_rows(x, norm, eps), w, w_scale)


def fp8_linear_decode_swiglu(y: torch.Tensor, size: int, up: int, limit: float, w: torch.Tensor,
                             w_scale: torch.Tensor) -> torch.Tensor:
    """fp8_linear_decode(swiglu_rows(y, size, up, limit), w, w_scale) in one launch where it fits (y [M, W]
    bf16 rows with unit stride holding gate [0, size) and up [up, up + size)); the same bits."""
    return _after_prologue("swiglu", y, size, (None, y.stride(0), up, limit), True,
                           lambda: swiglu_rows(y, size, up, limit), w, w_scale)


def _after_prologue(kind: str, rows: torch.Tensor, k: int, prologue: tuple, fits: bool, apart, w: torch.Tensor,
                    w_scale: torch.Tensor) -> torch.Tensor:
    """The GEMV over the rows after prologue `kind` (csrc/fp8_linear.cu Prologue) in its launch where the fused
    form has room for it, else `apart()` (the transform's own kernel) and then the GEMV."""
    m = rows.size(0)
    plan = gemv_plan(m, k, kernels().shared_memory(), staged=True) \
        if fits and m <= PROLOGUE_ROWS and rows.stride(-1) == 1 else None
    if plan is None:
        return fp8_linear_decode(apart(), w, w_scale)
    _, stages, shared = plan
    return gemv_launch(f"dsv4_fp8_gemv_fused_{kind}_m8", rows, rows, rows, w, w_scale, None, m, k, stages,
                       shared, prologue)


# An item's fixed cost (its CTA barrier, sums and epilogue, its warps' pipeline refilling), in weight bytes
# streamed by one SM in that time: fitted to the H200's sweep of the split (bench/gemv_split_sweep.py,
# bench/results/gemv-split-sweep-h200.json), where it ranks every Flash shape's splits as measured.
ITEM_COST_BYTES = 48 << 10
WARP_K_BLOCKS = 8                         # the tie-break: 128-K blocks per warp and item


def split_for(n: int, k: int, resident: int, sms: int) -> tuple[int, int]:
    """(wpr, items) of a GEMV over n x k weights on a GPU holding `resident` CTAs over `sms` SMs: `wpr` warps
    of a CTA share a row group's K, and an item is the CTA's 8 / wpr row groups of 16 over all of K
    (csrc/fp8_linear.cu). The split streams the fewest bytes through the busiest SM, items' fixed costs
    counted: one item per CTA where the row groups fill the GPU (wq_b: 0.80 of the copy bandwidth against
    0.75 with K halved), K split where they do not (the shared expert's w1 | w3: 0.56 with 4 warps per
    row group, 0.48 with 8). Ties go to the split whose warps each stream about 1024 of K (4 ring steps:
    wo_a 0.76 so, 0.66 with twice that), then to fewer warps per row group."""
    groups = (n + 15) // 16                   # row groups of 16 (csrc/fp8_linear.cu)
    blocks = k // 128

    def busiest_sm_bytes(wpr: int) -> int:
        items = -(-groups // (8 // wpr))
        grid = balanced_grid(items, resident)
        per_cta = -(-items // grid)
        ctas = -(-grid // sms)                # CTAs on the busiest SM
        return ctas * per_cta * (16 * (8 // wpr) * k) + per_cta * ITEM_COST_BYTES
    wpr = min((p for p in (1, 2, 4, 8) if blocks % p == 0),
              key=lambda p: (busiest_sm_bytes(p), abs(blocks // p - WARP_K_BLOCKS), p))
    return wpr, -(-groups // (8 // wpr))


@lru_cache(maxsize=256)                   # called on every launch
def gemv_split(n: int, k: int, name: str, shared: int, device: int | None = None) -> tuple[int, int, int]:
    """`split_for` of GEMV kernel `name` (with `shared` bytes of dynamic shared memory) on the current GPU,
    and its resident CTAs."""
    resident = kernels().resident(name, 256, shared)
    sms = sm_count(torch.cuda.current_device() if device is None else device)
    return (*split_for(n, k, resident, sms), resident)


def _check_gemv(x, w, w_scale, m: int, k: int) -> None:
    """The decode GEMVs' contract on their inputs (internal: the programs build them)."""
    n = w.size(0)
    assert x.dtype == torch.bfloat16 and w.dtype == torch.float8_e4m3fn and m <= MAX_ROWS
    assert k % 128 == 0 and w.size(1) == k and w.is_contiguous()
    assert w_scale.shape == ((n + 127) // 128, k // 128)


def gemv_launch(name: str, x, codes, scales, w, w_scale, out, m: int, k: int, stages: int, shared: int,
                prologue: tuple = (None, 0, 0, 0.0), max_ctas: int | None = None) -> torch.Tensor:
    """Launch GEMV kernel `name` (csrc/fp8_linear.cu) over m rows of width k; `prologue` = (its float32
    weight, the rows' stride, up (kGrouped: rows per group), eps or limit), for the prologue builds;
    `max_ctas` caps the grid (tests)."""
    n = w.size(0)
    _check_gemv(x, w, w_scale, m, k)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device) if out is None else out
    wpr, items, resident = gemv_split(n, k, name, shared, x.device.index)
    grid = balanced_grid(items, min(resident, max_ctas or resident))
    pro_w, ld, up, param = prologue
    kernels().launch(name, grid, 256,
                     [(x, PTR), (codes, PTR), (scales, PTR), (w, PTR), (w_scale, PTR), (out, PTR), (m, INT),
                      (n, INT), (k, INT), (wpr, INT), (items, INT), (stages, INT),
                      (pro_w if pro_w is not None else 0, PTR), (ld, INT), (up, INT), (param, FLOAT)], shared)
    return out


# Whether torch and cuBLAS run block-scaled FP8 GEMMs here (None: not tried yet; CUDA 12.9+ on sm_90+)
_block_scaled: bool | None = None


def fp8_linear_prefill(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 (many rows) -> [M, N] bf16 on FP8 tensor cores: the act_quant kernel, then cuBLAS's
    block-scaled FP8 GEMM (torch._scaled_mm with DeepSeek's 1x128 activation and 128x128 weight scales,
    float32 sums): DeepSeek's act_quant + fp8_gemm, with no dequantised copy of the weight. Where block
    scaling is missing (torch or CUDA too old; logged once), the weight dequantised to bf16 (exact) and one
    GEMM with float32 sums: the same products. Allocates (prefill runs outside CUDA graphs)."""
    global _block_scaled
    m, k = x.shape
    n = w.size(0)
    if _block_scaled is not False and n % 128 == 0:
        codes, scales = make_workspace(m, k, x.device)
        act_quant(x, codes, scales)
        blocks = k // 128
        padded = torch.zeros(n // 128, -(-blocks // 4) * 4, dtype=torch.float32, device=x.device)
        padded[:, :blocks] = e8m0_to_float(w_scale)
        try:
            # scale_b [K/128, N/128] with its columns 16-byte aligned: a view of the padded rows (its size must
            # stay K/128: the padded size itself was refused for K = 256, measured on the H200)
            y = torch._scaled_mm(codes.view(torch.float8_e4m3fn), w.t(),
                                 scale_a=scales.t().contiguous().t(),   # [M, K/128], outer dimension major
                                 scale_b=padded[:, :blocks].t(), out_dtype=torch.bfloat16)
            _block_scaled = True
            return y
        except RuntimeError as e:
            if _block_scaled:
                raise
            log.warning("block-scaled FP8 GEMM unavailable (%s); prefill linears use bf16 GEMMs", e)
            _block_scaled = False
    return quantised_matmul(x, fp8_weight_dequant(w, w_scale, dtype=torch.bfloat16))


def act_quant(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mma_slots: bool = False) -> None:
    """DeepSeek's FP8 act_quant of x [M, K] bf16 into e4m3 codes [M, K] (uint8) and scales [M, K/128];
    `mma_slots`: each 128-K block's 4-byte words in the order the prefill MoE kernels read them
    (csrc/moe_wgmma.cu)."""
    m, k = x.shape
    warps = m * (k // 128)
    kernels().launch("dsv4_act_quant_fp8", (warps * 32 + 255) // 256, 256,
                     [(x, PTR), (codes, PTR), (scales, PTR), (m, INT), (k, INT), (int(mma_slots), INT)])


def make_workspace(m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(m, k, dtype=torch.uint8, device=device),
            torch.empty(m, k // 128, dtype=torch.float32, device=device))
