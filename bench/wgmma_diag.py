"""Where the wgmma prefill MoE departs from the oracle (a diagnostic for csrc/moe_wgmma.cu, not a test)."""
import sys
import torch
sys.path.insert(0, "tests")
from helpers import random_experts  # noqa: E402
from plugins.formats import mxfp4_dequant, mxfp4_quant  # noqa: E402
from plugins.ops import moe_routed_oracle  # noqa: E402
from plugins.moe_experts import moe_experts_prefill, moe_experts_prefill_wgmma, pack_expert  # noqa: E402


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


torch.manual_seed(0)
for args in [(64, 1024, 512, 6, -12, True), (64, 1024, 512, 6, None, True), (64, 1024, 512, 6, -6, True),
             (64, 1024, 512, 6, -12, False), (64, 1024, 512, 6, -9, True), (300, 4096, 2048, 6, -12, True)]:
    case(*args)


def profile(tokens=4096, n_experts=256, d=4096, f=2048, k=6):
    """Per-kernel device time of one call of each variant at the benchmark's size."""
    from plugins.moe_experts import expert_nbytes
    bank = torch.randint(0, 256, (n_experts, expert_nbytes(d, f)), device="cuda", dtype=torch.int32).to(torch.uint8)
    bank[:, 3 * f * d // 2:] = 118
    table = torch.tensor([bank[i].data_ptr() for i in range(n_experts)], dtype=torch.int64, device="cuda")
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)]).to(torch.int32).cuda()
    x = torch.randn(tokens, d, device="cuda").to(torch.bfloat16)
    w = torch.full((tokens, k), 0.25, device="cuda")
    for wg in (1, 2):
        for _ in range(3):
            moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0, warpgroups=wg)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0, warpgroups=wg)
            torch.cuda.synchronize()
        print(f"warpgroups={wg}")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))


profile()
