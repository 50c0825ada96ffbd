"""MXFP4 routed experts for decode on the GPU, reached through a table of expert pointers.

Oracle: `builder.reference.moe.MoE.expert` summed over a token's experts in ascending id order (the
official loop), without the shared expert. Experts live in an expert bank: each expert contiguous,
[w1 | w3 | w2 | s1 | s3 | s2] (see csrc/moe_experts.cu); the table holds one pointer per expert, to
device memory or to pinned host memory, so experts move without rebuilding anything.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from .fp8_linear import act_quant
from .fp8_linear import make_workspace as act_workspace
from .loader import FLOAT, INT, PTR, balanced_grid, device_index, kernels, on_sm90, sm_count


def expert_nbytes(d: int, f: int) -> int:
    return 3 * f * d // 2 + 3 * f * d // 32


def bank_parts(d: int, f: int) -> list[tuple[str, tuple[int, int], torch.dtype]]:
    """The bank layout of one expert, in order: name, shape, dtype."""
    return [("w1", (f, d // 2), torch.int8), ("w3", (f, d // 2), torch.int8), ("w2", (d, f // 2), torch.int8),
            ("s1", (f, d // 32), torch.float8_e8m0fnu), ("s3", (f, d // 32), torch.float8_e8m0fnu),
            ("s2", (d, f // 32), torch.float8_e8m0fnu)]


def pack_expert(w1, s1, w3, s3, w2, s2) -> torch.Tensor:
    """Checkpoint tensors of one expert (int8 packed MXFP4, E8M0 scales) -> its bank bytes (uint8)."""
    named = {"w1": w1, "w3": w3, "w2": w2, "s1": s1, "s3": s3, "s2": s2}
    d, f = w1.size(1) * 2, w1.size(0)
    return torch.cat([named[name].contiguous().view(torch.uint8).flatten() for name, _, _ in bank_parts(d, f)])


def unpack_expert(blob: torch.Tensor, d: int, f: int) -> tuple[torch.Tensor, ...]:
    """Bank bytes of one expert -> views (w1, s1, w3, s3, w2, s2), `pack_expert`'s inverse."""
    views, at = {}, 0
    for name, shape, dtype in bank_parts(d, f):
        n = shape[0] * shape[1]
        views[name] = blob[at:at + n].view(dtype).view(shape)
        at += n
    return tuple(views[k] for k in ("w1", "s1", "w3", "s3", "w2", "s2"))


MAX_TOPK = 16                     # csrc/moe_experts.cu MAX_TOPK
PARTS = 4                         # csrc/moe_experts.cu PARTS
RING_BYTES = 8 * 4 * (16 * 8 * 16 + 16 * 8)   # csrc/moe_experts.cu RING_BYTES: 8 warps x 4 stages


def make_workspace(tokens: int, topk: int, d: int, f: int, device, wgmma: bool = True) -> dict[str, torch.Tensor]:
    """h: each (token, expert) pair's bf16 SwiGLU output, handed from the gate_up kernel to the down kernel;
    with `wgmma` (both paths' scratch, as a TensorRT workspace is laid out) ypart: each pair's output, from
    the wgmma down kernel to the sum over pairs."""
    ws = {"h": torch.empty(tokens * topk, f, dtype=torch.bfloat16, device=device)}
    if wgmma:
        ws["ypart"] = torch.empty(tokens * topk, d, dtype=torch.float32, device=device)
    return ws


@dataclasses.dataclass
class WgmmaPaths:
    """Whether `dsv4::moe_routed` takes the sm_90 warpgroup-MMA kernels where they fit: for decode
    (csrc/moe_decode_wgmma.cu, faster than the mma.sync kernels, whose FP8 MMA Hopper emulates) and for prefill
    chunks with at least 6 pairs per expert (csrc/moe_wgmma.cu; since session 24's form faster than the
    grouped kernels from 256 Flash tokens, 6 pairs per expert: bench/results/wgmma-crossover-s24-h200.txt).
    Their FP8 MMAs add in less than float32, so they are not the mma.sync kernels' bits: each is on only once
    it passed both model-level checks on the H200, the tiny bf16 artifact against the reference
    (tests/test_artifact_gpu.py; for session 24's prefill kernel, the kernel on that model's own MoE inputs,
    below) and the Flash-8 artifact against the mma.sync kernels, within their own prefill-vs-decode noise
    (bench/wgmma_gate.py). Decode passed both in session 12. Prefill: session 10's
    kernel failed the tiny artifact's argmax line in sessions 11 and 12, passed it in sessions 14 to 23 and
    the Flash-8 gate in sessions 12 and 16 (on from session 16 to 23). Session 24's kernel (the weights as the
    MMA's register operand) passed every kernel test but failed the tiny artifact's cosine line in its one
    run (0.9709 against 0.99; the reference's own decode against prefill 0.9938 there, 0.969 on CPU), a size
    that bf16-unit noise in the prefill MoE's output alone reaches on that model (bench/tiny_moe_noise.py: 1
    run in 12 on the test's prompt, 1-3 in 4 on each of three random ones), so that line cannot judge it; the
    kernel is judged on the tiny model's own MoE inputs instead (tests/test_kernels_moe_wgmma.py; passed in
    sessions 25 and 26). Flash-8 gate: failed session 25's worst-step rule by 0.0022 at the step where the
    default's own noise was worst; passed the three-prompt rule twice in session 26 (256- and 1024-token
    chunks: bench/results/wgmma-gate-flash8-*s26-h200.*), prefilling 1024 tokens 1.53x as fast. On since
    session 26. A switch for tests and benchmarks."""
    decode: bool = True
    prefill: bool = True
    prefill_min_pairs_per_expert: int = 6     # where wgmma beats the grouped kernels (0: any chunk it fits)
    # Up to this many pairs per expert on average, the prefill kernels of groups of at most 64 pairs at two
    # CTAs an SM (`wgmma_group`); above it, of at most 128 at one. Session 45 on the H200 at Flash size
    # (bench/results/kernels-moe-prefill-groups-s45-h200.json): 64-pair groups 20% faster up to 2560 tokens
    # (60 pairs an expert: 2.96-2.99 ms against 3.30-3.43), 128-pair ones from 3072 (72: 3.69-3.82 against
    # 4.05-4.14; 4096: 4.26-4.36 against 4.58-4.63).
    prefill_small_groups_up_to: float = 64.0


WGMMA = WgmmaPaths()
# Whether `dsv4::moe_with_shared` runs the shared expert on a second stream beside the routed experts
# (plugins/streams.py). Written in session 16; on since session 18, whose Flash-8 profile took the step from
# 1.710 to 1.685 ms with it (medians of 5 runs of 50 steps; bench/results/profile-decode-flash8-h200.json);
# the same bits (tests/test_kernels_moe.py). A switch for benchmarks.
SHARED_BESIDE_ROUTED = True
# Whether `dsv4::moe_gate_hc_post` starts the shared expert on the second stream before the gate's product
# (session 21), so that it overlaps the gate and the router too; off: after them, as `moe_hc_post`. On since
# session 22: a Flash-8 decode step of 1.424 ms against 1.446 with it after the gate and 1.493 in line
# (bench/results/profile-decode-flash8-shared-placement-h200.json); the same bits (tests/test_kernels_moe.py).
SHARED_BEFORE_GATE = True
DECODE_WGMMA_MAX_TOPK = 16        # csrc/moe_decode_wgmma.cu (fp4_ring.cuh MAX_TOPK): a token's experts' table


def decode_wgmma_fits(x: torch.Tensor, topk: int, d: int, f: int) -> bool:
    """Whether csrc/moe_decode_wgmma.cu can serve this decode call: an sm_90 GPU, at most 16 experts per
    token, rows in whole items (32 rows of F, 64 of D)."""
    return on_sm90(x) and topk <= DECODE_WGMMA_MAX_TOPK and d % 64 == 0 and f % 64 == 0


def moe_experts_decode(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor,
                       f: int, limit: float, out: torch.Tensor | None = None,
                       workspace: dict[str, torch.Tensor] | None = None, wgmma: bool | None = None,
                       summed: bool = True):
    """x [T, D] bf16, experts [T, k] int32, route_w [T, k] float32, table [E] int64 -> y [T, D] float32.
    `wgmma`: the warpgroup-MMA kernels (sm_90) or the mma.sync ones; by default as WGMMA.decode, where they fit.
    `summed` False: (the pairs' outputs [T * k, D] and k, or y and 0 where the kernels sum them themselves),
    for a launch that adds them with more (`sum_pairs_post`). On the wgmma kernels x is read before the wait
    for the launch before (programmatic dependent launch), so it must not come from the launch right before
    this call; in the model the router, which reads x, always runs in between."""
    t, d = x.shape
    k = experts.size(1)
    assert x.dtype == torch.bfloat16 and experts.dtype == torch.int32 and route_w.dtype == torch.float32
    assert table.dtype == torch.int64 and d % 256 == 0 and f % 128 == 0 and 1 <= k <= MAX_TOPK
    assert x.is_contiguous() and experts.is_contiguous() and route_w.is_contiguous()
    use_wgmma = False
    if WGMMA.decode if wgmma is None else wgmma:   # (asked for explicitly, they must fit)
        use_wgmma = decode_wgmma_fits(x, k, d, f)
        assert use_wgmma or wgmma is None, "the wgmma decode kernels need sm_90, topk <= 16, whole items"
    ws = make_workspace(t, k, d, f, x.device, use_wgmma) if workspace is None else workspace
    out = torch.empty(t, d, dtype=torch.float32, device=x.device) if out is None else out
    lib = kernels()
    if use_wgmma:
        return _decode_wgmma(lib, x, experts, route_w, table, f, limit, out if summed else None, ws)
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
    return out if summed else (out, 0)


def spread_shared(shared: int, ctas: int, sms: int, shared_memory: tuple[int, int]) -> int:
    """Dynamic shared memory for a one-wave grid of `ctas` CTAs of `shared` bytes each, raised (where one CTA
    may have that much) until no SM takes more than its even share, ceil(ctas / sms). The wgmma down kernel's
    CTAs start as gate_up's leave: at 93 registers (session 31) four fitted an SM, the SMs freed first took
    four, and router, gate_up and down in a PDL chain took 34.9 us on the H200 against 33.1 at three an SM
    (bench/results/moe-gate-up-probe-s31-h200.txt). shared_memory: (bytes per SM, the most one CTA may have)."""
    per_sm, per_block = shared_memory
    share = -(-ctas // sms)
    overflow = per_sm // (share + 1) - 1024 + 1   # share + 1 CTAs this big (the driver adds 1 KiB each) do not fit
    return shared if overflow > per_block else max(shared, overflow)


TILE_REGIONS = 2                  # csrc/moe_decode_wgmma.cu: the down kernel's B tile regions, at most


@lru_cache(maxsize=64)                   # asked on every eager decode call
def _down_launch(lib, items: int, t: int, f: int, sms: int) -> tuple[int, int]:
    """(CTAs per token, dynamic shared memory) of the wgmma down kernel for `items` items per token: each item
    in a CTA's hand has its pair's h in a region of its own (the B tile and its scales), up to TILE_REGIONS; the
    shared memory is that of the regions a CTA of the grid that fits uses (one item a CTA at Flash size and one
    token, two from two tokens on)."""
    for regions in range(1, TILE_REGIONS + 1):
        shared = spread_shared(RING_BYTES // 2 + regions * (f // 32 * 256 + f // 128 * 4), items * t, sms,
                               lib.shared_memory())
        grid = -(-balanced_grid(items * t, lib.resident("dsv4_moe_down_decode_wgmma", 128, shared)) // t)
        if -(-items // grid) <= regions:
            break
    return grid, shared


def _decode_wgmma(lib, x, experts, route_w, table, f, limit, out, ws):
    """`moe_experts_decode` on csrc/moe_decode_wgmma.cu: gate_up (a warpgroup per expert and 32 rows of F),
    down (a warpgroup per pair and 64 rows of D, into ws["ypart"]), then the sum over each token's pairs (out
    None: no sum; (ypart, k))."""
    t, d = x.shape
    k = experts.size(1)
    shared_up = RING_BYTES // 2 + d // 32 * 256 + d // 128 * 4
    grid_up = balanced_grid(k * (f // 32) * t, lib.resident("dsv4_moe_gate_up_decode_wgmma", 128, shared_up))
    lib.launch("dsv4_moe_gate_up_decode_wgmma", (max(1, -(-grid_up // t)), t), 128,
               [(x, PTR), (experts, PTR), (route_w, PTR), (table, PTR), (ws["h"], PTR), (k, INT), (d, INT),
                (f, INT), (limit, FLOAT), (table.numel(), INT)], shared_up)
    grid_down, shared_down = _down_launch(lib, k * (d // 64), t, f, sm_count(device_index(x.device)))
    lib.launch("dsv4_moe_down_decode_wgmma", (grid_down, t), 128,
               [(ws["h"], PTR), (experts, PTR), (table, PTR), (ws["ypart"], PTR), (k, INT), (d, INT), (f, INT)],
               shared_down)
    return sum_pairs(ws["ypart"], experts, out) if out is not None else (ws["ypart"], k)


# ------------------------------------------------------------------ prefill: tokens grouped by expert
MAX_GROUP = 8                     # csrc/moe_experts.cu: a group's tokens are the MMA's 8 B columns
PARTIAL_BYTES = 8 * 16 * 8 * 4    # csrc/moe_experts.cu: the grouped kernels' static partial sums


def group_size(shared_memory: tuple[int, int], d: int, f: int) -> int:
    """Tokens per group: 8, or fewer where one CTA's shared memory cannot hold 8 rows of activation codes
    next to the weight ring (sm_120's 99 KiB at Flash size: 6)."""
    room = shared_memory[1] - RING_BYTES - PARTIAL_BYTES
    per_token = max(d + d // 32, f + f // 32)                     # codes and their float32 scales per 128
    group = min(MAX_GROUP, room // per_token)
    if group < 1:
        raise RuntimeError(f"grouped MoE: {shared_memory[1]} bytes of shared memory per CTA hold no token")
    return group


def group_pairs(experts: torch.Tensor, n_experts: int, max_group: int) -> tuple[torch.Tensor, ...]:
    """A chunk's (token, slot) pairs (pair id token * topk + slot) sorted by expert, and cut into groups of
    at most `max_group` pairs of one expert, an expert's groups within one pair of each other in size (130
    pairs in groups of 128: 65 and 65, not 128 and 2): (pairs, group expert, group start in pairs, group
    size, the number of groups [1]), int32. Never synchronises: the group tensors are sized for the most
    groups the chunk could have, those past its own of size 0 (expert n_experts - 1, start at the end of the
    pairs), and the kernels read the count on the device; on a GPU from one kernel (csrc/moe_groups.cu; this
    torch form is its oracle)."""
    flat = experts.flatten()
    pairs = torch.argsort(flat, stable=True).to(torch.int32)
    most = min(flat.numel(), (flat.numel() + n_experts * (max_group - 1)) // max_group)
    if flat.is_cuda:
        assert flat.dtype == torch.int32 and n_experts <= 1024
        table = torch.empty(3 * most + 1, dtype=torch.int32, device=flat.device)
        g_expert, g_start, g_count, n_groups = table[:most], table[most:2 * most], table[2 * most:-1], table[-1:]
        kernels().launch("dsv4_moe_group_table", 1, 1024, [(flat.contiguous(), PTR), (flat.numel(), INT),
                         (n_experts, INT), (max_group, INT), (most, INT)]
                         + [(t, PTR) for t in (g_expert, g_start, g_count, n_groups)])
        return pairs, g_expert, g_start, g_count, n_groups
    flat = flat.long()
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    per_expert = (counts + max_group - 1) // max_group
    ends = torch.cumsum(per_expert, 0)
    slot = torch.arange(most, device=flat.device)
    g_expert = torch.searchsorted(ends, slot, right=True).clamp_(max=n_experts - 1)
    nth = slot - (ends - per_expert)[g_expert]
    count, cut = counts[g_expert], per_expert[g_expert].clamp(min=1)
    first = torch.minimum(nth * count // cut, count)     # the group's first pair within its expert's run
    g_start = (torch.cumsum(counts, 0) - counts)[g_expert] + first
    g_count = (torch.minimum((nth + 1) * count // cut, count) - first).clamp_(min=0)
    return (pairs, g_expert.to(torch.int32), g_start.to(torch.int32), g_count.to(torch.int32),
            ends[-1:].to(torch.int32))


def moe_experts_prefill(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor,
                        f: int, limit: float) -> torch.Tensor:
    """`moe_experts_decode` for a prefill chunk: each routed expert's weights read once per group of up to 8
    of its tokens instead of once per token; the same result, bit for bit. Allocates, never synchronises (the
    kernels take their group count from the group table's kernel), so a CUDA graph can capture it."""
    t, d = x.shape
    k = experts.size(1)
    assert x.dtype == torch.bfloat16 and experts.dtype == torch.int32 and route_w.dtype == torch.float32
    assert table.dtype == torch.int64 and d % 256 == 0 and f % 128 == 0 and 1 <= k <= MAX_TOPK
    assert x.is_contiguous() and route_w.is_contiguous()
    lib = kernels()
    max_group = group_size(lib.shared_memory(), d, f)
    *table_args, n_groups = group_pairs(experts, table.numel(), max_group)
    slots = table_args[1].numel()             # the most groups the chunk could have: the grids' bound
    h = torch.empty(t * k, f, dtype=torch.bfloat16, device=x.device)
    ypart = torch.empty(t * k, d, dtype=torch.float32, device=x.device)
    group_args = [(g, PTR) for g in table_args]
    shared_up = RING_BYTES + max_group * (d + d // 32)
    grid_up = min(slots * (f // 16), lib.resident("dsv4_moe_gate_up_grouped", 256, shared_up))
    lib.launch("dsv4_moe_gate_up_grouped", grid_up, 256,
               [(x, PTR)] + group_args + [(route_w, PTR), (table, PTR), (h, PTR), (n_groups, PTR), (k, INT),
                                          (d, INT), (f, INT), (limit, FLOAT), (max_group, INT)], shared_up)
    shared_down = RING_BYTES + max_group * (f + f // 32)
    grid_down = min(slots * (d // 32), lib.resident("dsv4_moe_down_grouped", 256, shared_down))
    lib.launch("dsv4_moe_down_grouped", grid_down, 256,
               [(h, PTR)] + group_args + [(table, PTR), (ypart, PTR), (n_groups, PTR), (d, INT), (f, INT),
                                          (max_group, INT)], shared_down)
    return sum_pairs(ypart, experts)


def sum_pairs(ypart: torch.Tensor, experts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ypart [T * k, D] (pair-indexed outputs) -> y [T, D]: each token's experts added in ascending expert id
    order, in float32 from zero, as the decode kernel adds them (csrc/moe_experts.cu dsv4_moe_sum_pairs)."""
    t, k = experts.shape
    d = ypart.size(1)
    assert ypart.dtype == torch.float32 and ypart.is_contiguous() and experts.dtype == torch.int32
    assert d % 4 == 0 and k <= MAX_TOPK
    y = torch.empty(t, d, dtype=torch.float32, device=ypart.device) if out is None else out
    kernels().launch("dsv4_moe_sum_pairs", (t, -(-d // 1024)), 256,
                     [(ypart, PTR), (experts.contiguous(), PTR), (y, PTR), (k, INT), (d, INT)])
    return y


def sum_pairs_post(parts: torch.Tensor, experts: torch.Tensor, k: int, shared: torch.Tensor, res: torch.Tensor,
                   post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The decode MoE's end in one launch (csrc/moe_experts.cu dsv4_moe_sum_pairs_post): each token's routed
    sum (`moe_experts_decode(..., summed=False)`'s parts and k) plus the shared expert's output shared [T, D]
    bf16, rounded to bf16, then the hyper-connection post over the streams res [T, 4, D] bf16 with post
    [T, 4] and comb [T, 4, 4] float32 -> the new streams [T, 4, D] bf16. Contiguous inputs."""
    t, d = shared.shape
    assert res.shape == (t, 4, d) and res.dtype == shared.dtype == torch.bfloat16 and d % 4 == 0
    assert post.shape == (t, 4) and comb.shape == (t, 4, 4) and post.dtype == comb.dtype == torch.float32
    assert all(a.is_contiguous() for a in (parts, shared, res, post, comb)) and parts.dtype == torch.float32
    assert k == 0 or (experts.dtype == torch.int32 and experts.shape == (t, k) and k <= MAX_TOPK)
    out = torch.empty_like(res)
    kernels().launch("dsv4_moe_sum_pairs_post", (t, -(-d // 1024)), 256,
                     [(parts, PTR), (experts.contiguous(), PTR), (shared, PTR), (res, PTR), (post, PTR), (comb, PTR),
                      (out, PTR), (k, INT), (d, INT)])
    return out


# ------------------------------------------------------------------ prefill on wgmma (sm_90a)
WGMMA_GROUPS = {128: "", 64: "_g64"}  # csrc/moe_wgmma.cu Shape: most pairs a group (the MMA's columns) -> suffix
WGMMA_THREADS = 256                 # two warpgroups of 64 weight rows each


def wgmma_shared_bytes(group: int) -> int:
    """csrc/moe_wgmma.cu Shape<group>::SHARED_BYTES: the ring's stages (B's group rows of 128 codes, 128 weight
    rows of 64 bytes, both operands' scales; each padded to 1 KiB), and 1 KiB to align the first."""
    stages = 8 if group == 128 else 6
    return stages * (-(-(group * 128 + 128 * 64 + group * 4 + 128 * 4) // 1024) * 1024) + 1024


def wgmma_group(experts: torch.Tensor, n_experts: int) -> int:
    """The prefill kernels' group size for a chunk routed as `experts`: 64 where its experts have at most
    WGMMA.prefill_small_groups_up_to pairs each on average, else 128."""
    return 64 if experts.numel() <= WGMMA.prefill_small_groups_up_to * n_experts else 128


def wgmma_fits(x: torch.Tensor, d: int, f: int) -> bool:
    """Whether csrc/moe_wgmma.cu can serve this chunk: an sm_90 GPU, K and columns in whole tiles."""
    return on_sm90(x) and d % 128 == 0 and f % 128 == 0


def wgmma_pays(x: torch.Tensor, experts: torch.Tensor, n_experts: int, f: int) -> bool:
    """Whether a prefill chunk goes to the wgmma kernels: switched on (WGMMA.prefill), they fit, and the
    chunk has WGMMA.prefill_min_pairs_per_expert pairs per expert on average (6, see WgmmaPaths)."""
    return (WGMMA.prefill and wgmma_fits(x, x.size(1), f)
            and experts.numel() >= WGMMA.prefill_min_pairs_per_expert * n_experts)


def moe_experts_prefill_wgmma(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor,
                              f: int, limit: float, group: int | None = None) -> torch.Tensor:
    """`moe_experts_prefill` on Hopper's warpgroup MMAs: groups of up to `group` (128 or 64; by default
    `wgmma_group`'s) pairs per expert, the weights converted to e4m3 once per group. Close to the decode
    kernels, not bit for bit (another summation, and scales applied per 128 K); the same bits at either group
    size (a pair's products do not depend on its group's other columns). Allocates, never synchronises (the
    group table is padded to the most groups the chunk could have), so a CUDA graph can capture it."""
    t, d = x.shape
    group = group or wgmma_group(experts, table.numel())
    groups = group_pairs(experts, table.numel(), group)[:4]     # the kernels take every slot: no count
    h = wgmma_gate_up(x, experts, route_w, table, f, limit, groups, group)
    h_codes, h_scales = act_workspace(t * experts.size(1), f, x.device)
    act_quant(h, h_codes, h_scales, mma_slots=True)
    ypart = torch.empty(t * experts.size(1), d, dtype=torch.float32, device=x.device)
    kernels().launch("dsv4_moe_down_wgmma" + WGMMA_GROUPS[group], groups[1].numel() * (d // 128), WGMMA_THREADS,
                     [(h_codes, PTR), (h_scales, PTR)] + [(g, PTR) for g in groups]
                     + [(table, PTR), (ypart, PTR), (d, INT), (f, INT)], wgmma_shared_bytes(group))
    return sum_pairs(ypart, experts)


def wgmma_gate_up(x: torch.Tensor, experts: torch.Tensor, route_w: torch.Tensor, table: torch.Tensor, f: int,
                  limit: float, groups: tuple[torch.Tensor, ...], group: int = 128) -> torch.Tensor:
    """The first half of `moe_experts_prefill_wgmma`: h [T * k, F] bf16 (pair-indexed), each pair's
    route_w * silu(gate) * up; `groups` the first four of group_pairs(experts, E, group)."""
    t, d = x.shape
    k = experts.size(1)
    assert wgmma_fits(x, d, f) and x.dtype == torch.bfloat16 and route_w.dtype == torch.float32
    codes, scales = act_workspace(t, d, x.device)
    act_quant(x.contiguous(), codes, scales, mma_slots=True)
    h = torch.empty(t * k, f, dtype=torch.bfloat16, device=x.device)
    kernels().launch("dsv4_moe_gate_up_wgmma" + WGMMA_GROUPS[group], groups[1].numel() * (f // 64), WGMMA_THREADS,
                     [(codes, PTR), (scales, PTR)] + [(g, PTR) for g in groups]
                     + [(route_w.contiguous(), PTR), (table, PTR), (h, PTR), (k, INT), (d, INT), (f, INT),
                        (limit, FLOAT)], wgmma_shared_bytes(group))
    return h
