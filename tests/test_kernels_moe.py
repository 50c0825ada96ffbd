import pytest
import torch

from helpers import random_experts
from plugins.formats import mxfp4_dequant
from plugins.ops import moe_routed_oracle


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, d, f, same", [(1, 4096, 2048, False), (3, 256, 128, False), (4, 512, 256, True)],
                         ids=["flash-1tok", "tiny-3tok", "all-on-one-expert"])
def test_moe_decode_matches_oracle_with_host_experts(tokens, d, f, same):
    from plugins.moe_experts import moe_experts_decode, pack_expert
    n_exp, k = 12, 6
    bank = random_experts(n_exp, d, f)
    packed = [pack_expert(*e) for e in bank]
    # even experts on the device, odd ones in pinned host memory (read over the bus)
    stores = [p.cuda() if i % 2 == 0 else p.pin_memory() for i, p in enumerate(packed)]
    table = torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device="cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
    if same:
        experts = torch.tensor([[5, 0, 1, 2, 3, 4]] * tokens, dtype=torch.int32)
    else:
        experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, k, generator=g) + 0.1
    experts, weights = experts.cuda(), weights.cuda()
    got = moe_experts_decode(x, experts, weights, table, f, limit=10.0)
    dequantised = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    expect = moe_routed_oracle(x, experts, weights, dequantised.__getitem__, 10.0)
    cos = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(got, expect, rtol=0.02, atol=0.02 * expect.abs().max().item())
