"""The wgmma prefill MoE (csrc/moe_wgmma.cu) examined on an H200, not a test:
    python bench/wgmma_diag.py [cases] [h_check] [profile] [crossover]
cases: per-token cosine against the oracle and the grouped kernels; h_check: gate_up alone, pair by pair;
profile: device time per launch at 4096 Flash tokens; crossover: grouped against wgmma over chunk sizes
(plugins/moe_experts.py wgmma_pays comes from it)."""
import sys
import torch
sys.path.insert(0, "tests")
from helpers import random_experts  # noqa: E402
from plugins.formats import mxfp4_dequant, mxfp4_quant  # noqa: E402
from plugins.ops import moe_routed_oracle  # noqa: E402
from plugins.moe_experts import moe_experts_prefill, moe_experts_prefill_wgmma, pack_expert  # noqa: E402
from kernels import random_flash_bank, random_routing  # noqa: E402  (bench/kernels.py, beside this script)


def case(tokens, d, f, k, tiny, all_on_0, seed=3):
    n_exp = 12
    bank = random_experts(n_exp, d, f)
    if tiny is not None:
        g = torch.Generator().manual_seed(5)
        w = torch.randn(f, d, generator=g) / d ** 0.5
        w[::7, 32:64] *= 2.0 ** tiny
        bank[0] = (*mxfp4_quant(w), *bank[0][2:])
    stores = [pack_expert(*e).cuda() for e in bank]
    table = torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device="cuda")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    if all_on_0:
        experts[:, 0] = torch.where(experts[:, 1:].eq(0).any(1), experts[:, 0], 0)
    weights = (torch.rand(tokens, k, generator=g) + 0.1)
    experts, weights = experts.cuda(), weights.cuda()
    got = moe_experts_prefill_wgmma(x, experts, weights, table, f, limit=10.0)
    dq = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    expect = moe_routed_oracle(x, experts, weights, dq.__getitem__, 10.0)
    grouped = moe_experts_prefill(x, experts, weights, table, f, limit=10.0)
    cw = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    cg = torch.nn.functional.cosine_similarity(grouped.double(), expect.double(), dim=-1)
    worst = int(cw.argmin())
    diff = (got - expect)[worst].abs()
    print(f"tokens={tokens} d={d} f={f} tiny={tiny} all_on_0={all_on_0}: wgmma cos min {cw.min():.6f} "
          f"(row {worst}, experts {experts[worst].tolist()}), grouped cos min {cg.min():.6f}; "
          f"worst row |diff| max {diff.max():.4g} at cols {diff.topk(4).indices.tolist()}, |expect| max "
          f"{expect[worst].abs().max():.4g}; rows below 0.9999: {(cw < 0.9999).nonzero().flatten().tolist()[:20]}")


def cases():
    for args in [(64, 1024, 512, 6, -12, True), (64, 1024, 512, 6, None, True), (64, 1024, 512, 6, -6, True),
                 (64, 1024, 512, 6, -12, False), (64, 1024, 512, 6, -9, True), (300, 4096, 2048, 6, -12, True)]:
        case(*args)


def profile(tokens=4096, n_experts=256, d=4096, f=2048, k=6):
    """Per-kernel device time of one call of each variant at the benchmark's size."""
    bank, table = random_flash_bank(n_experts, d, f)
    x, experts, w = random_routing(tokens, n_experts, d, k)
    for _ in range(3):
        moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))




def h_check(tokens=64, d=1024, f=512, k=6):
    """gate_up alone: the wgmma kernel's h against the oracle's, pair by pair (where the cosine gap starts)."""
    from plugins.moe_experts import group_pairs, wgmma_gate_up
    from plugins.oracle import quantised_matmul, swiglu
    n_exp = 12
    bank = random_experts(n_exp, d, f)
    stores = [pack_expert(*e).cuda() for e in bank]
    table = torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device="cuda")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32).cuda()
    weights = (torch.rand(tokens, k, generator=g) + 0.1).cuda()
    h = wgmma_gate_up(x, experts, weights, table, f, 10.0, group_pairs(experts, n_exp, 128)[:4])
    dq = [tuple(mxfp4_dequant(*e[i:i + 2]).cuda() for i in (0, 2, 4)) for e in bank]
    worst = []
    for p in range(tokens * k):
        t, s = divmod(p, k)
        w1, w3, _ = dq[int(experts[t, s])]
        ref = (weights[t, s] * swiglu(quantised_matmul(x[t:t + 1], w1), quantised_matmul(x[t:t + 1], w3), 10.0))
        ref = ref.to(torch.bfloat16).float().flatten()
        got = h[p].float()
        rel = ((got - ref).abs() / ref.abs().clamp(min=1e-3)).max().item()
        cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=0).item()
        worst.append((cos, rel, p, t, s, int(experts[t, s])))
    worst.sort()
    print("h: worst pairs (cos, max rel, pair, token, slot, expert):", [tuple(round(v, 6) if isinstance(v, float)
                                                                              else v for v in w) for w in worst[:6]])


def crossover(sizes=(256, 384, 512, 1024, 2048, 4096), n_experts=256, d=4096, f=2048, k=6):
    """Grouped mma.sync kernels against the wgmma ones over prefill chunk sizes (where to switch)."""
    import time
    bank, table = random_flash_bank(n_experts, d, f)
    for tokens in sizes:
        x, experts, w = random_routing(tokens, n_experts, d, k)
        out = {}
        for name, fn in [("grouped", lambda: moe_experts_prefill(x, experts, w, table, f, 10.0)),
                         ("wgmma", lambda: moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0))]:
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            out[name] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
        print(f"tokens {tokens}: ms {out}")


if __name__ == "__main__":
    what = sys.argv[1:] or ["cases", "profile"]
    for name in what:
        globals()[name]()
