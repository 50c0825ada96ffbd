"""Kernel benchmarks at DeepSeek V4 Flash sizes with random weights (H200).

Decode kernels are memory bound: the figure is bytes the kernel must read / time, divided by the
device copy bandwidth measured in the same run; also the speedup over the eager torch oracle.
Each weight is cycled through enough copies to overflow L2, so every launch reads from HBM; kernel
launches are replayed from a CUDA graph, so host launch cost is not counted (the runtime replays graphs).

    python bench/kernels.py [--json bench/results/kernels-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from plugins.formats import fp8_weight_dequant  # noqa: E402
from plugins.fp8_linear import (fp8_linear_decode, fp8_linear_decode_normed, fp8_linear_decode_swiglu,  # noqa: E402
                                 make_workspace)
from plugins.grouped_linear import grouped_fp8_gemv  # noqa: E402
from plugins.moe_experts import expert_nbytes, moe_experts_decode, moe_experts_prefill  # noqa: E402
from plugins.moe_experts import moe_experts_prefill_wgmma, wgmma_fits, wgmma_group  # noqa: E402
from plugins.moe_experts import make_workspace as moe_make_workspace  # noqa: E402
from plugins.oracle import quantised_matmul  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

L2_DEFEAT_BYTES = 512 << 20   # 10x the H200's L2
# The Flash FP8 projections the decode GEMV serves, (N, K). wq_a + wkv and the shared w1 + w3 run stacked in the
# programs (builder/programs/decode.py FUSED_FP8); their parts are kept for comparison with earlier results.
FLASH_FP8_SHAPES = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wq_a_wkv": (1536, 4096),
                    "wo_b": (4096, 8192), "shared_w1": (2048, 4096), "shared_w13": (4096, 4096),
                    "shared_w2": (4096, 2048), "indexer_wq_b": (8192, 1024)}


def time_ms(fn, iters: int = 50) -> float:
    """Median over `iters` launches, each timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


# A graph holds at least this many calls (whole multiples of `launches`). A replay timed alone between two
# events holds a cost of its own beside its calls, which a decode step's graph of hundreds of launches
# shares out: at 10 calls a graph (the MoE's rotation of experts) the MoE took 41.6-41.8 us a call, at 20-60
# 37.1-37.9, four replays of the 10 back to back 37.4-37.6 (H100, session 59,
# bench/results/graph-calls-s59-h100/); the GEMVs (16-64 calls) moved 1-3%. A switch (bench/graph_overhead.py).
MIN_GRAPH_CALLS = 40


def graph_calls(launches: int) -> int:
    """The calls a graph of `launches` calls holds: the fewest whole multiples of them that reach MIN_GRAPH_CALLS
    (a bench's calls rotate through weight copies, and each copy keeps its share)."""
    return launches * -(-MIN_GRAPH_CALLS // launches)


def capture_calls(fn, calls: int) -> torch.cuda.CUDAGraph:
    """`calls` calls of `fn` captured in one CUDA graph (after one call outside it, to warm up)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_time_ms(fn, launches: int, replays: int = 20) -> float:
    """Time per call of `fn` with graph_calls(launches) calls captured in one CUDA graph (no host launch
    cost)."""
    return exact_graph_time_ms(fn, graph_calls(launches), replays)


def exact_graph_time_ms(fn, calls: int, replays: int = 20) -> float:
    """The same with exactly `calls` calls a graph, for probes of the harness itself (bench/graph_overhead.py)."""
    return time_ms(capture_calls(fn, calls).replay, iters=replays) / calls


def fp8_bytes(n: int, k: int) -> int:
    """An FP8 weight [n, k] with its E8M0 scales per 128 x 128 block."""
    return n * k + -(-n // 128) * (k // 128)


def random_fp8(n: int, k: int, device: str = "cuda", spread: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight [n, k] (finite e4m3 codes: byte 0xFF, a NaN, is redrawn as 0xFE) with E8M0 block
    scales [ceil(n/128), k/128] of 2^-7, or within 2^+-spread of it block by block."""
    codes = torch.randint(-100, 100, (n, k), device=device, dtype=torch.int8)
    codes[codes == -1] = -2
    scales = torch.randint(120 - spread, 121 + spread, ((n + 127) // 128, k // 128), device=device, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn), scales.view(torch.float8_e8m0fnu)


def bench_fp8_gemv(name: str, n: int, k: int, m: int, bandwidth: float) -> dict:
    copies = max(2, L2_DEFEAT_BYTES // (n * k))
    ws, ss = zip(*(random_fp8(n, k) for _ in range(copies)))
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out, work = torch.empty(m, n, device="cuda", dtype=torch.bfloat16), make_workspace(m, k, "cuda")
    state = {"i": 0}

    def kernel():
        i = state["i"] = (state["i"] + 1) % copies
        fp8_linear_decode(x, ws[i], ss[i], out, work)

    deq = fp8_weight_dequant(ws[0], ss[0])

    def oracle():
        quantised_matmul(x, deq)

    ms = graph_time_ms(kernel, copies)
    ms_oracle = time_ms(oracle, iters=10)
    bytes_read = n * k + ss[0].numel() + x.numel() * 2
    achieved = bytes_read / (ms * 1e-3)
    return {"kernel": "fp8_gemv", "weight": name, "N": n, "K": k, "rows": m, "weight_mb": n * k / 1e6,
            "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9, "fraction_of_copy_bw": achieved / bandwidth,
            "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_copy_in_harness(nbytes: int, bandwidth: float) -> dict:
    """Calibration: a torch device copy of `nbytes` in the same harness as the kernels (rotating buffers
    past L2, one CUDA graph), as (read + write) / time over the copy bandwidth. It shows what one launch
    of that size reaches here at best: the per-launch start and drain cost the kernels also pay."""
    copies = max(2, L2_DEFEAT_BYTES // nbytes)
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(copies)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    state = {"i": 0}

    def kernel():
        state["i"] = (state["i"] + 1) % copies
        dst.copy_(srcs[state["i"]])

    ms = graph_time_ms(kernel, copies)
    achieved = 2 * nbytes / (ms * 1e-3)
    return {"kernel": "torch_copy", "weight": f"{nbytes >> 20} MiB copy (calibration)", "rows": 0,
            "weight_mb": nbytes / 1e6, "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9,
            "fraction_of_copy_bw": achieved / bandwidth}


def random_flash_bank(n_experts: int, d: int = 4096, f: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """n_experts random MXFP4 experts in one device tensor, with sane E8M0 scales (2^-9), and their table."""
    bank = torch.randint(0, 256, (n_experts, expert_nbytes(d, f)), device="cuda", dtype=torch.int32).to(torch.uint8)
    bank[:, 3 * f * d // 2:] = 118
    return bank, torch.tensor([bank[i].data_ptr() for i in range(n_experts)], dtype=torch.int64, device="cuda")


def bench_moe_decode(bandwidth: float, tokens: int = 1, wgmma: bool = False, n_experts: int = 64) -> dict:
    """Flash-size routed experts (D 4096, F 2048, 6 per token) from the device table, L2 defeated by
    rotating through 64 experts (855 MB); on the warpgroup-MMA kernels (sm_90) or the mma.sync ones."""
    d, f, k = 4096, 2048, 6
    nbytes = expert_nbytes(d, f)
    bank, table = random_flash_bank(n_experts, d, f)
    g = torch.Generator().manual_seed(0)
    id_sets = [torch.randperm(n_experts, generator=g)[: tokens * k].view(tokens, k).to(torch.int32).cuda()
               for _ in range(n_experts // k)]
    x = torch.randn(tokens, d, device="cuda").to(torch.bfloat16)
    w = torch.full((tokens, k), 0.25, device="cuda")
    out, ws = torch.empty(tokens, d, device="cuda"), moe_make_workspace(tokens, k, d, f, "cuda")
    state = {"i": 0}

    def kernel():
        state["i"] = (state["i"] + 1) % len(id_sets)
        moe_experts_decode(x, id_sets[state["i"]], w, table, f, 10.0, out, ws, wgmma=wgmma)

    ms = graph_time_ms(kernel, len(id_sets))
    bytes_read = len(set(id_sets[0].flatten().tolist())) * nbytes
    achieved = bytes_read / (ms * 1e-3)
    return {"kernel": "moe_experts_decode" + ("_wgmma" if wgmma else ""), "weight": "6 routed experts",
            "rows": tokens, "weight_mb": bytes_read / 1e6, "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9,
            "fraction_of_copy_bw": achieved / bandwidth}


def bf16_matmul_tflops(n: int = 8192) -> float:
    """A bf16 torch.matmul of two n x n matrices, TFLOP/s: the compute yardstick of prefill kernels."""
    a, b = (torch.randn(n, n, device="cuda").to(torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / (time_ms(lambda: torch.matmul(a, b), iters=20) * 1e-3) / 1e12


def random_routing(tokens: int, n_experts: int, d: int = 4096, k: int = 6):
    """A prefill chunk routed uniformly at random: x [tokens, d] bf16, experts [tokens, k] int32, weights."""
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)]).to(torch.int32).cuda()
    return (torch.randn(tokens, d, device="cuda").to(torch.bfloat16), experts,
            torch.full((tokens, k), 0.25, device="cuda"))


def moe_prefill_tflops(tokens: int, k: int, d: int, f: int, ms: float) -> float:
    """TFLOP/s of a prefill MoE chunk's products (w1, w3 and w2 for each of its tokens' k experts) in `ms`."""
    return tokens * k * 3 * 2 * d * f / (ms * 1e-3) / 1e12


def bench_moe_prefill(matmul_tflops: float, tokens: int = 4096, n_experts: int = 256) -> dict:
    """Flash-size routed experts for a prefill chunk (D 4096, F 2048, 6 of 256 experts per token, routed
    uniformly at random): tokens grouped by expert (moe_experts_prefill, grouping included), in TFLOP/s of
    its products against a bf16 matmul measured in the same run; and against the decode kernels' per-token
    reads."""
    d, f, k = 4096, 2048, 6
    bank, table = random_flash_bank(n_experts, d, f)
    x, experts, w = random_routing(tokens, n_experts, d, k)
    ms = time_ms(lambda: moe_experts_prefill(x, experts, w, table, f, 10.0), iters=10)
    ms_decode = time_ms(lambda: moe_experts_decode(x, experts, w, table, f, 10.0), iters=3)
    tflops = moe_prefill_tflops(tokens, k, d, f, ms)
    row = {"kernel": "moe_experts_prefill", "weight": f"{n_experts} experts, 6 per token", "rows": tokens,
           "time_us": ms * 1e3, "tflops": tflops, "fraction_of_bf16_matmul": tflops / matmul_tflops,
           "speedup_vs_decode_kernels": ms_decode / ms}
    if wgmma_fits(x, d, f):                                   # csrc/moe_wgmma.cu, sm_90 only
        # both kernel sizes, in turn twice (groups of at most 128 pairs at one CTA an SM, 64 at two); the
        # wgmma figures are the size wgmma_group picks for this chunk
        by_group = {128: [], 64: []}
        for _ in range(2):
            for group, times in by_group.items():
                times.append(time_ms(lambda: moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0, group),
                                     iters=10))
        group = wgmma_group(experts, n_experts)
        ms_w = min(by_group[group])
        tflops_w = moe_prefill_tflops(tokens, k, d, f, ms_w)
        row |= {"wgmma_group": group, "wgmma_time_us": ms_w * 1e3, "wgmma_tflops": tflops_w,
                "wgmma_fraction_of_bf16_matmul": tflops_w / matmul_tflops,
                "wgmma_time_us_by_group": {str(g): [1e3 * t for t in ts] for g, ts in by_group.items()}}
    return row


def bench_fp8_prefill(matmul_tflops: float, name: str, n: int, k: int, rows: int = 4096) -> dict:
    """A Flash projection over a prefill chunk through dsv4::fp8_linear (act_quant kernel + block-scaled FP8
    GEMM, or its bf16 fallback): TFLOP/s against a bf16 matmul measured in the same run."""
    import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
    w, s = random_fp8(n, k)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    ms = time_ms(lambda: torch.ops.dsv4.fp8_linear(x, w, s), iters=20)
    tflops = 2 * rows * n * k / (ms * 1e-3) / 1e12
    return {"kernel": "fp8_linear_prefill", "weight": name, "rows": rows, "time_us": ms * 1e3, "tflops": tflops,
            "fraction_of_bf16_matmul": tflops / matmul_tflops}


def bench_bf16_gemv(name: str, v: int, d: int, bandwidth: float, rows: int = 1) -> dict:
    """Float32 rows times a weight kept in bf16, float32 accumulation (plugins/head.py's kernel): the Flash
    vocabulary head, and through `dsv4::wide_linear` the compressors' and the router's products. Against
    the float32 linear over the widened weight (what the official parameter dtype would read). Small
    weights rotate through copies past L2."""
    import plugins.ops  # noqa: F401
    copies = max(1, L2_DEFEAT_BYTES // (v * d * 2))
    ws = [(torch.randn(v, d, device="cuda") * 0.01).to(torch.bfloat16) for _ in range(copies)]
    y = torch.randn(rows, d, device="cuda")
    state = {"i": 0}

    def kernel():
        i = state["i"] = (state["i"] + 1) % copies
        torch.ops.dsv4.wide_linear(y, ws[i])

    w32 = [w.float() for w in ws[:max(1, copies // 2)]]   # half as many: twice the bytes each

    def widened():
        i = state["i"] = (state["i"] + 1) % len(w32)
        torch.nn.functional.linear(y, w32[i])

    ms = graph_time_ms(kernel, max(copies, 4))
    ms_f32 = graph_time_ms(widened, max(len(w32), 4))
    achieved = v * d * 2 / (ms * 1e-3)
    return {"kernel": "bf16_gemv", "weight": f"{name} {v} x {d}", "rows": rows, "weight_mb": v * d * 2 / 1e6,
            "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9, "fraction_of_copy_bw": achieved / bandwidth,
            "speedup_vs_float32_linear": ms_f32 / ms}


def bench_wo_a(bandwidth: float, rows: int = 1) -> dict:
    """DeepSeek's wo_a (8 groups x 1024 x 4096) from its FP8 codes with bf16 activations, against the bf16
    grouped einsum over the dequantised weight that the official model runs (twice the bytes)."""
    g, r, d = 8, 1024, 4096
    copies = max(2, L2_DEFEAT_BYTES // (g * r * d))
    ws = [random_fp8(g * r, d) for _ in range(copies)]
    x = torch.randn(rows, 1, g, d, device="cuda").to(torch.bfloat16)
    out = torch.empty(rows, 1, g, r, device="cuda", dtype=torch.bfloat16)
    state = {"i": 0}

    def kernel():
        i = state["i"] = (state["i"] + 1) % copies
        grouped_fp8_gemv(x, *ws[i], out=out)

    bf16 = [fp8_weight_dequant(*w).to(torch.bfloat16).view(g, r, d) for w in ws[:max(2, copies // 2)]]

    def einsum_bf16():
        i = state["i"] = (state["i"] + 1) % len(bf16)
        torch.einsum("bsgd,grd->bsgr", x, bf16[i])

    ms = graph_time_ms(kernel, copies)
    ms_bf16 = graph_time_ms(einsum_bf16, len(bf16))
    nbytes = g * r * d + ws[0][1].numel()
    achieved = nbytes / (ms * 1e-3)
    return {"kernel": "grouped_fp8_gemv", "weight": "wo_a 8 x 1024 x 4096", "rows": rows, "weight_mb": nbytes / 1e6,
            "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9, "fraction_of_copy_bw": achieved / bandwidth,
            "speedup_vs_bf16_einsum": ms_bf16 / ms}


def bench_sparse_attention(bandwidth: float, k: int = 640, t: int = 2176) -> dict:
    """Decode attention of a Flash ratio-4 layer (64 heads x 512 over 128 window + 512 picked rows of a
    2176-row cache, 8K context): the kernel against the eager oracle, both replayed from a graph. Its
    bytes (the picked rows and q) are small enough to sit in L2, so the time, not bandwidth, is the figure."""
    from plugins.oracle import sparse_attention
    from plugins.sparse_attention import make_workspace, sparse_attention_decode
    h, d = 64, 512
    q = torch.randn(1, 1, h, d, device="cuda").to(torch.bfloat16)
    kv = torch.randn(1, t, d, device="cuda").to(torch.bfloat16)
    sink = torch.randn(h, device="cuda")
    idx = torch.randperm(t, device="cuda")[:k].view(1, 1, k)
    out, ws = torch.empty_like(q), make_workspace(1, h, d, k, "cuda")
    ms = graph_time_ms(lambda: sparse_attention_decode(q, kv, sink, idx, d ** -0.5, out=out, workspace=ws), 8)
    ms_oracle = graph_time_ms(lambda: sparse_attention(q, kv, sink, idx, d ** -0.5), 8)
    nbytes = (k + h) * d * 2
    return {"kernel": "sparse_attention_decode", "weight": f"{k} of {t} rows, 64 heads x 512", "rows": 1,
            "weight_mb": nbytes / 1e6, "time_us": ms * 1e3, "achieved_gbps": nbytes / (ms * 1e-3) / 1e9,
            "fraction_of_copy_bw": nbytes / (ms * 1e-3) / bandwidth, "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_hc_pre(bandwidth: float) -> dict:
    """One Flash hyper-connection pre for 1 token (its float32 mixing weights 24 x 16384 are the bytes):
    the two-launch kernel against the eager oracle, both replayed from a graph."""
    from plugins.hc_pre import hc_pre_decode, make_workspace
    from plugins.oracle import hc_pre_parts
    d = 4096
    x = torch.randn(1, 1, 4, d, device="cuda").to(torch.bfloat16)
    fn = torch.randn(24, 4 * d, device="cuda") * 1e-2
    scale, base = torch.rand(3, device="cuda"), torch.randn(24, device="cuda")
    ws = make_workspace(1, d, "cuda")
    out = (x.new_empty(1, 1, d), torch.empty(1, 1, 4, device="cuda"), torch.empty(1, 1, 4, 4, device="cuda"))
    ms = graph_time_ms(lambda: hc_pre_decode(x, fn, scale, base, 1e-6, 1e-6, 20, out=out, workspace=ws), 8)
    ms_oracle = graph_time_ms(lambda: hc_pre_parts(x, fn, scale, base, 1e-6, 1e-6, 20), 8)
    nbytes = fn.numel() * 4 + x.numel() * 2
    return {"kernel": "hc_pre_decode", "weight": "fn 24 x 16384 float32", "rows": 1, "weight_mb": nbytes / 1e6,
            "time_us": ms * 1e3, "achieved_gbps": nbytes / (ms * 1e-3) / 1e9,
            "fraction_of_copy_bw": nbytes / (ms * 1e-3) / bandwidth, "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_route() -> dict:
    """One Flash router after its product (1 token, 256 experts, top 6): the one-launch kernel against the
    torch ops it replaces (scores, biased top-k, gather, normalisation), both replayed from a graph. Latency,
    not bandwidth: the inputs are 2 KB."""
    from plugins.oracle import route_from_logits
    from plugins.route import route_topk
    logits, bias = torch.randn(1, 256, device="cuda") * 3, torch.randn(256, device="cuda") * 1e-2
    ms = graph_time_ms(lambda: route_topk(logits, bias, 6, 1.5), 8)
    ms_oracle = graph_time_ms(lambda: route_from_logits(logits, bias, 6, "sqrtsoftplus", 1.5), 8)
    return {"kernel": "route_topk", "weight": "logits 1 x 256 float32, top 6", "rows": 1, "time_us": ms * 1e3,
            "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_greedy_pick() -> dict:
    """The decode step's greedy pick over the Flash vocabulary (1 row): `plugins.head.GreedyPick` (one launch)
    against torch.argmax, both replayed from a graph."""
    from plugins.head import GreedyPick
    logits = torch.randn(1, 129280, device="cuda")
    pick, out = GreedyPick(1, 129280, torch.device("cuda")), torch.empty(1, dtype=torch.int64, device="cuda")
    ms = graph_time_ms(lambda: pick(logits, out), 8)
    ms_torch = graph_time_ms(lambda: logits.argmax(-1), 8)
    assert torch.equal(out, logits.argmax(-1))
    return {"kernel": "greedy_pick", "weight": "logits 1 x 129280 float32", "rows": 1, "time_us": ms * 1e3,
            "speedup_vs_torch_argmax": ms_torch / ms}


def bench_decode_layer(bandwidth: float, copies: int = 2, n_experts: int = 64, wgmma: bool = False,
                       beside: bool = False) -> dict:
    """One Flash decode layer's weight-bound kernels back to back for 1 token, captured in one CUDA graph:
    wq_a with wkv (one stacked FP8 GEMV, as the programs run them), wq_b (the query latent's norm in its
    launch), wo_a (grouped, FP8 codes with bf16 activations), wo_b, the shared expert (w1 with w3 stacked,
    then w2 with the SwiGLU in its launch) and 6 routed experts. `copies`
    layers alternate so no layer finds its weights in L2. Figure: the layer's weight bytes / time, over the
    copy bandwidth. `wgmma`: the routed experts on the warpgroup-MMA decode kernels (sm_90). `beside`: the
    shared expert on a second stream beside the routed experts (plugins/streams.py, as
    `dsv4::moe_with_shared` with moe_experts.SHARED_BESIDE_ROUTED)."""
    from plugins.streams import beside as run_beside
    d, f, k = 4096, 2048, 6
    fp8_shapes = {name: FLASH_FP8_SHAPES[name] for name in ("wq_a_wkv", "wq_b", "wo_b")}
    fp8_shapes |= {"w13": FLASH_FP8_SHAPES["shared_w13"], "w2": FLASH_FP8_SHAPES["shared_w2"]}

    layers = [{name: random_fp8(*shape) for name, shape in fp8_shapes.items()} for _ in range(copies)]
    for layer in layers:
        layer["wo_a"] = random_fp8(8 * 1024, 4096)
    nbytes = expert_nbytes(d, f)
    bank, table = random_flash_bank(n_experts, d, f)
    ids = torch.randperm(n_experts, generator=torch.Generator().manual_seed(0))[: copies * k]
    ids = ids.view(copies, 1, k).to(torch.int32).cuda()
    route = torch.full((1, k), 0.25, device="cuda")
    x = torch.randn(1, d, device="cuda").to(torch.bfloat16)
    q_norm = torch.rand(1024, device="cuda") + 0.5
    moe_out, moe_ws = torch.empty(1, d, device="cuda"), moe_make_workspace(1, k, d, f, "cuda")

    def layer_step(i):
        w = layers[i]
        qr = fp8_linear_decode(x, *w["wq_a_wkv"])[:, :1024]        # wq_b normalises its rows as it loads them
        q = fp8_linear_decode_normed(qr, q_norm, 1e-6, *w["wq_b"])
        o = grouped_fp8_gemv(q.view(1, 1, 8, 4096), *w["wo_a"]).reshape(1, 8192)
        fp8_linear_decode(o, *w["wo_b"])
        def shared():                                               # w2 applies the SwiGLU as it loads
            return fp8_linear_decode_swiglu(fp8_linear_decode(x, *w["w13"]), f, f, 10.0, *w["w2"])

        def routed():
            return moe_experts_decode(x, ids[i], route, table, f, 10.0, moe_out, moe_ws, wgmma=wgmma)
        if beside:
            run_beside(routed, shared, x.device)
        else:
            shared(), routed()

    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        layer_step(state["i"])

    ms = graph_time_ms(step, copies * 4)
    layer_bytes = sum(fp8_bytes(n, kk) for n, kk in fp8_shapes.values())
    layer_bytes += fp8_bytes(8 * 1024, 4096) + k * nbytes                   # wo_a: 8 groups of 1024 rows
    achieved = layer_bytes / (ms * 1e-3)
    return {"kernel": "decode_layer" + ("_wgmma_moe" if wgmma else "") + ("_shared_beside" if beside else ""),
            "weight": "wq_a+wkv wq_b wo_a(fp8) wo_b shared(w1+w3, w2) routed(6)", "rows": 1,
            "weight_mb": layer_bytes / 1e6, "time_us": ms * 1e3, "achieved_gbps": achieved / 1e9,
            "fraction_of_copy_bw": achieved / bandwidth}


def bench_indexer(bandwidth: float, blocks: int, capacity: int = 16384, k: int = 512) -> dict:
    """The indexer's picks of one Flash ratio-4 decode step with `blocks` visible of a 64K-context cache
    (16384 blocks): the two-launch kernel against the oracle's eager ops (a bf16 GEMM over every block,
    weighting, sum, mask, a stable sort), both replayed from a graph. The bytes: the visible keys and q."""
    from plugins.indexer import indexer_picks
    from plugins.oracle import indexer_picks as oracle
    q = torch.randn(1, 1, 64, 128, device="cuda").to(torch.bfloat16)
    weights, scale = torch.randn(1, 1, 64, device="cuda") * 10, 128 ** -0.5 * 64 ** -0.5   # raw, as the programs
    keys = torch.randn(1, capacity, 128, device="cuda").to(torch.bfloat16)
    pos = torch.full((1, 1), 4 * blocks - 1, dtype=torch.int64, device="cuda")     # `blocks` visible at ratio 4
    ms = graph_time_ms(lambda: indexer_picks(q, weights, keys, pos, k, 4, scale), 8)
    ms_oracle = graph_time_ms(lambda: oracle(q, weights, keys, pos, k, 4, scale), 8)
    nbytes = (blocks + 64) * 128 * 2
    return {"kernel": "indexer_picks", "weight": f"{blocks} of {capacity} blocks x 128, 64 heads, top {k}",
            "rows": 1, "weight_mb": nbytes / 1e6, "time_us": ms * 1e3, "achieved_gbps": nbytes / (ms * 1e-3) / 1e9,
            "fraction_of_copy_bw": nbytes / (ms * 1e-3) / bandwidth, "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_index_query() -> dict:
    """The indexer's 64 query heads of one decode row (RoPE, Hadamard, FP4): the one-launch kernel replayed
    from a graph, against the oracle's eager ops (the FP4 block scales make host tensors: not capturable)."""
    from plugins.indexer import index_query
    from plugins.oracle import index_query as oracle
    q = torch.randn(1, 1, 64, 128, device="cuda").to(torch.bfloat16)
    rot = torch.randn(1, 1, 32, 2, device="cuda")
    ms = graph_time_ms(lambda: index_query(q, rot), 8)
    ms_oracle = time_ms(lambda: oracle(q, rot, 64))
    return {"kernel": "index_query", "weight": "64 heads x 128", "rows": 1, "time_us": ms * 1e3,
            "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_compressor(ratio: int, dim: int, rotate: bool) -> dict:
    """One Flash compressor decode step that completes a block (the dearer case: pooling, norm, RoPE and the
    round-trip run only then): the one-launch kernel replayed from a graph, against the oracle's eager ops
    launched one by one (they cannot be captured: the FP8 block scale makes a host tensor). Latency: the
    state is at most 256 KB."""
    from plugins.compressor import compressor_step
    from plugins.oracle import compressor_step as oracle
    coff = 2 if ratio == 4 else 1
    c = coff * dim
    proj, ape = torch.randn(1, 2 * c, device="cuda"), torch.randn(ratio, c, device="cuda")
    kv, score = torch.randn(1, coff * ratio, c, device="cuda"), torch.randn(1, coff * ratio, c, device="cuda")
    norm, rot = torch.ones(dim, device="cuda"), torch.randn(4096, 32, 2, device="cuda")
    cache = torch.zeros(1, 128 + 4096 // ratio, dim, dtype=torch.bfloat16, device="cuda")
    pos = torch.full((1,), ratio - 1, dtype=torch.int64, device="cuda")
    args = (proj, ape, pos, kv, score, cache, 128, norm, rot, ratio, rotate, 1e-6)
    ms = graph_time_ms(lambda: compressor_step(*args), 8)
    ms_oracle = time_ms(lambda: oracle(*args, 64, 64))
    return {"kernel": "compressor_step", "weight": f"ratio {ratio}, {dim} channels" + (", indexer keys" if rotate else ""),
            "rows": 1, "time_us": ms * 1e3, "speedup_vs_eager_oracle": ms_oracle / ms}


def bench_compressor_chunk(ratio: int, dim: int, rotate: bool, chunk: int = 256) -> dict:
    """A Flash compressor fed one prefill chunk (the recipes' 256 tokens) from position 2 (so the chunk's
    blocks straddle the state and the chunk): the two-launch kernel pair replayed from a graph, against the
    oracle's eager ops."""
    from plugins.compressor import compressor_chunk
    from plugins.oracle import compressor_chunk as oracle
    coff = 2 if ratio == 4 else 1
    c = coff * dim
    proj, ape = torch.randn(1, chunk, 2 * c, device="cuda"), torch.randn(ratio, c, device="cuda")
    kv, score = torch.randn(1, coff * ratio, c, device="cuda"), torch.randn(1, coff * ratio, c, device="cuda")
    norm, rot = torch.ones(dim, device="cuda"), torch.randn(4096, 32, 2, device="cuda")
    cache = torch.zeros(1, 128 + 4096 // ratio, dim, dtype=torch.bfloat16, device="cuda")
    start = torch.full((1,), 2, dtype=torch.int64, device="cuda")
    n = torch.full((1,), chunk, dtype=torch.int64, device="cuda")
    args = (proj, ape, start, n, kv, score, cache, 128, norm, rot, ratio, rotate, 1e-6)
    ms = graph_time_ms(lambda: compressor_chunk(*args), 8)
    ms_oracle = time_ms(lambda: oracle(*args, 64, 64))
    return {"kernel": "compressor_chunk", "weight": f"ratio {ratio}, {dim} channels" + (", indexer keys" if rotate else ""),
            "rows": chunk, "time_us": ms * 1e3, "speedup_vs_eager_oracle": ms_oracle / ms}


def write_report(path: Path, bandwidth: float, rows: list[dict]) -> None:
    """A kernel benchmark's JSON: the command, GPU and versions, the copy bandwidth measured in the same run
    (bytes/s) and the result rows."""
    write_json(path, run_header() | {"copy_bandwidth_gbps": bandwidth / 1e9, "results": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kernels-h200.json")
    ap.add_argument("--only", choices=["moe_prefill"], help="just the prefill MoE rows (with the bf16 matmul)")
    ap.add_argument("--prefill-tokens", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                    help="--only moe_prefill: the chunk sizes timed")
    args = ap.parse_args()
    bw = copy_bandwidth()
    if args.only == "moe_prefill":
        rows = [{"kernel": "bf16_matmul", "weight": "8192 x 8192 x 8192", "tflops": bf16_matmul_tflops()}]
        rows += [bench_moe_prefill(rows[0]["tflops"], tokens) for tokens in args.prefill_tokens]
        for row in rows:
            print(json.dumps(row))
        write_report(args.json, bw, rows)
        return
    rows = [bench_copy_in_harness(n << 20, bw) for n in (8, 32, 80)]
    for row in rows:
        print(json.dumps(row))
    for m in (1, 4, 16):
        for name, (n, k) in FLASH_FP8_SHAPES.items():
            rows.append(bench_fp8_gemv(name, n, k, m, bw))
            print(json.dumps(rows[-1]))
    on_sm90 = torch.cuda.get_device_capability() == (9, 0)
    for tokens in (1, 2):
        for wgmma in (False, True) if on_sm90 else (False,):
            rows.append(bench_moe_decode(bw, tokens, wgmma))
            print(json.dumps(rows[-1]))
    matmul = bf16_matmul_tflops()
    rows.append({"kernel": "bf16_matmul", "weight": "8192 x 8192 x 8192", "tflops": matmul})
    print(json.dumps(rows[-1]))
    for tokens in (256, 4096):
        rows.append(bench_moe_prefill(matmul, tokens))
        print(json.dumps(rows[-1]))
    for name, n, k in [("wq_b", 32768, 1024), ("wo_b", 4096, 8192), ("shared_w1", 2048, 4096)]:
        rows.append(bench_fp8_prefill(matmul, name, n, k))
        print(json.dumps(rows[-1]))
    for name, v, d in [("head", 129280, 4096), ("compressor_ratio4", 1024, 4096), ("compressor_ratio128", 512, 4096),
                       ("indexer_compressor", 256, 4096), ("gate", 256, 4096)]:
        rows.append(bench_bf16_gemv(name, v, d, bw))
        print(json.dumps(rows[-1]))
    for m in (1, 4):
        rows.append(bench_wo_a(bw, m))
        print(json.dumps(rows[-1]))
    rows.append(bench_sparse_attention(bw))
    print(json.dumps(rows[-1]))
    rows.append(bench_hc_pre(bw))
    print(json.dumps(rows[-1]))
    rows.append(bench_route())
    print(json.dumps(rows[-1]))
    rows.append(bench_greedy_pick())
    print(json.dumps(rows[-1]))
    for ratio, dim, rotate in ((4, 512, False), (128, 512, False), (4, 128, True)):
        rows.append(bench_compressor(ratio, dim, rotate))
        print(json.dumps(rows[-1]))
        rows.append(bench_compressor_chunk(ratio, dim, rotate))
        print(json.dumps(rows[-1]))
    rows.append(bench_index_query())
    print(json.dumps(rows[-1]))
    for blocks in (150, 2048, 16384):
        rows.append(bench_indexer(bw, blocks))
        print(json.dumps(rows[-1]))
    for wgmma, beside in ((False, False), (True, False), (True, True)) if on_sm90 else ((False, False), (False, True)):
        rows.append(bench_decode_layer(bw, wgmma=wgmma, beside=beside))
        print(json.dumps(rows[-1]))
    write_report(args.json, bw, rows)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; wrote {args.json}")


if __name__ == "__main__":
    main()
