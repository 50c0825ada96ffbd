"""The dsv4 custom ops: CPU implementations against the oracles, and tracing through torch.export."""
import pytest
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from helpers import random_experts
from plugins.formats import fp8_weight_dequant, fp8_weight_quant, mxfp4_dequant
from plugins.moe_experts import pack_expert
from plugins.oracle import quantised_matmul, sparse_attention

D, F, E = 256, 128, 8


def _bank(seed=0):
    raw = random_experts(E, D, F, seed)
    packed = [pack_expert(*r) for r in raw]
    table = torch.tensor([p.data_ptr() for p in packed], dtype=torch.int64)
    return raw, packed, table


def test_fp8_linear_op_is_the_oracle():
    w, s = fp8_weight_quant(torch.randn(384, 256) / 16)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    y = torch.ops.dsv4.fp8_linear(x, w, s)
    assert y.shape == (2, 3, 384) and y.dtype == torch.bfloat16
    assert torch.equal(y, quantised_matmul(x, fp8_weight_dequant(w, s)))


def test_bf16_weights_take_the_same_products_and_sums():
    """A weight dequantised to bf16 (exact for FP8 values) goes through bf16_gemm: the float32 result the
    float32 weight gives, to the bit, on the CPU (on a GPU, the same products summed on tensor cores)."""
    w, s = fp8_weight_quant(torch.randn(96, 384, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 21, 384, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    as_bf16 = fp8_weight_dequant(w, s, dtype=torch.bfloat16)
    assert torch.equal(as_bf16.float(), fp8_weight_dequant(w, s))
    got = quantised_matmul(x, as_bf16)
    assert got.shape == (2, 21, 96) and got.dtype == torch.bfloat16
    assert torch.equal(got, quantised_matmul(x, fp8_weight_dequant(w, s)))


def test_wide_linear_op_widens_a_bf16_weight_on_the_cpu():
    """The op equals the float32 product over the widened weight (and float64 for a float32 model)."""
    w = torch.randn(96, 256).to(torch.bfloat16)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 256, dtype=dtype)
        y = torch.ops.dsv4.wide_linear(x, w)
        assert y.shape == (2, 3, 96) and y.dtype == dtype
        assert torch.equal(y, x @ w.to(dtype).T)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)                 # activations: widened to float32 first
    y = torch.ops.dsv4.wide_linear(x, w)
    assert y.dtype == torch.float32 and torch.equal(y, x.float() @ w.float().T)


def test_grouped_fp8_linear_op_is_the_bf16_grouped_einsum():
    """wo_a as DeepSeek applies it: dequantised to bf16 (exact), a grouped einsum of bf16 activations."""
    from plugins.grouped_linear import wo_a_as_bf16
    from plugins.oracle import einsum
    w, s = fp8_weight_quant(torch.randn(4 * 128, 256) / 16)
    x = torch.randn(2, 1, 4, 256).to(torch.bfloat16)
    y = torch.ops.dsv4.grouped_fp8_linear(x, w, s.view(torch.uint8))
    deq = fp8_weight_dequant(w, s)
    assert torch.equal(deq.to(torch.bfloat16).float(), deq)               # the bf16 weight is exact
    assert y.shape == (2, 1, 4, 128) and y.dtype == torch.bfloat16
    assert torch.equal(y, einsum("bsgd,grd->bsgr", x, deq.to(torch.bfloat16).view(4, 128, 256)))
    bf16 = wo_a_as_bf16({"attn.wo_a.weight": w, "attn.wo_a.scale": s.view(torch.uint8), "z": x}, torch.bfloat16)
    assert list(bf16) == ["attn.wo_a", "z"] and torch.equal(bf16["attn.wo_a"], deq.to(torch.bfloat16))


def test_moe_routed_reads_experts_through_the_table():
    raw, packed, table = _bank()
    x = torch.randn(3, D).to(torch.bfloat16)
    experts = torch.tensor([[0, 5, 2], [5, 1, 7], [3, 2, 6]], dtype=torch.int32)
    weights = torch.rand(3, 3)
    y = torch.ops.dsv4.moe_routed(x, experts, weights, table, F, 10.0)
    expect = torch.zeros(3, D)
    for t in range(3):
        for j in sorted(range(3), key=lambda j: int(experts[t, j])):
            w1, s1, w3, s3, w2, s2 = raw[int(experts[t, j])]
            xe = x[t:t + 1]
            g = quantised_matmul(xe, mxfp4_dequant(w1, s1)).float().clamp(max=10)
            u = quantised_matmul(xe, mxfp4_dequant(w3, s3)).float().clamp(-10, 10)
            h = (weights[t, j] * torch.nn.functional.silu(g) * u).to(torch.bfloat16)
            expect[t] += quantised_matmul(h, mxfp4_dequant(w2, s2))[0].float()
    assert torch.equal(y, expect)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w, s = fp8_weight_quant(torch.randn(D, D) / 16)
        self.register_buffer("w", w)
        self.register_buffer("s", s)

    def forward(self, x, experts, weights, table, kv, sink, idx):
        h = torch.ops.dsv4.fp8_linear(x, self.w, self.s)
        y = torch.ops.dsv4.moe_routed(h, experts, weights, table, F, 10.0).to(h.dtype)
        q = y.view(1, x.size(0), 2, D // 2)
        return torch.ops.dsv4.sparse_attention(q, kv, sink, idx, 0.1)


def test_layer_through_custom_ops_exports():
    raw, packed, table = _bank(1)
    args = (torch.randn(4, D).to(torch.bfloat16), torch.randint(0, E, (4, 2), dtype=torch.int32), torch.rand(4, 2),
            table, torch.randn(1, 10, D // 2).to(torch.bfloat16), torch.zeros(2),
            torch.tensor([[[0, 3, -1], [1, 2, 9], [4, -1, -1], [5, 6, 7]]]))
    model = _Tiny()
    exported = torch.export.export(model, args)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"dsv4.fp8_linear.default", "dsv4.moe_routed.default", "dsv4.sparse_attention.default"} <= ops
    assert torch.equal(exported.module()(*args), model(*args))
    assert torch.equal(model(*args), sparse_attention(
        torch.ops.dsv4.moe_routed(torch.ops.dsv4.fp8_linear(args[0], model.w, model.s), *args[1:4], F, 10.0)
        .to(torch.bfloat16).view(1, 4, 2, D // 2), args[4], args[5], args[6], 0.1))


@pytest.mark.slow
def test_layer_through_custom_ops_runs_from_an_aoti_package(tmp_path):
    """AOTInductor compiles a program that calls the dsv4 ops; the loaded package matches eager."""
    raw, packed, table = _bank(2)
    args = (torch.randn(4, D).to(torch.bfloat16), torch.randint(0, E, (4, 2), dtype=torch.int32), torch.rand(4, 2),
            table, torch.randn(1, 10, D // 2).to(torch.bfloat16), torch.zeros(2),
            torch.tensor([[[0, 3, -1], [1, 2, 9], [4, -1, -1], [5, 6, 7]]]))
    model = _Tiny()
    path = torch._inductor.aoti_compile_and_package(torch.export.export(model, args),
                                                    package_path=str(tmp_path / "tiny.pt2"))
    assert torch.equal(torch._inductor.aoti_load_package(path)(*args), model(*args))


def test_decode_rows_are_the_written_ring_slots_then_the_picked_or_complete_blocks():
    from plugins.oracle import decode_rows
    pos = torch.tensor([[2], [9]])
    assert decode_rows(pos, None, 4, 0, 4).tolist() == [[[0, 1, 2, -1]], [[0, 1, 2, 3]]]
    # ratio 128 in a cache of 4 ring rows and 3 compressed rows: (pos + 1) // 128 complete blocks
    pos = torch.tensor([[126], [127], [300]])
    assert decode_rows(pos, None, 4, 128, 7)[:, 0, 4:].tolist() == [[-1, -1, -1], [4, -1, -1], [4, 5, -1]]
    picked = torch.tensor([[[2, -1, 0]]])
    assert decode_rows(torch.tensor([[1]]), picked, 4, 4, 9).tolist() == [[[0, 1, -1, -1, 6, -1, 4]]]


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_decode_attention_op_is_the_oracles_steps_on_the_cpu(ratio):
    from plugins.oracle import decode_rows, with_rope
    g = torch.Generator().manual_seed(3)
    window, t = 8, 20
    q, kv = torch.randn(2, 1, 4, 128, generator=g), torch.randn(2, t, 128, generator=g)
    sink, pos = torch.randn(4, generator=g), torch.tensor([[5], [600]])
    picked = torch.randint(-1, t - window, (2, 1, 5), generator=g) if ratio == 4 else None
    angles = torch.rand(700, 32, generator=g)
    table = torch.stack([angles.cos(), angles.sin()], -1)
    got = torch.ops.dsv4.decode_attention(q, kv, sink, picked, pos, window, ratio, 0.1, table)
    idx = decode_rows(pos, picked, window, ratio, t)
    assert torch.equal(got, with_rope(sparse_attention(q, kv, sink, idx, 0.1), table[pos], 64, inverse=True))


def _moe_with_shared_case(g: torch.Generator):
    """Three tokens' MoE inputs in `moe_with_shared`'s argument order, and the bank tensors to keep alive. Six
    distinct experts: an expert with several rows goes through a CPU GEMM whose sums can depend on the
    memory alignment of its gathered rows (MKL), which would make two runs of the oracle differ."""
    from plugins.formats import fp8_weight_quant
    raw, packed, table = _bank(1)
    x = torch.randn(3, D, generator=g).to(torch.bfloat16)
    experts = torch.randperm(E, generator=g)[:6].view(3, 2).to(torch.int32)
    weights = torch.rand(3, 2, generator=g)
    w13, s13 = fp8_weight_quant(torch.randn(2 * F, D, generator=g) / 16)
    w2, s2 = fp8_weight_quant(torch.randn(D, F, generator=g) / 16)
    return (x, experts, weights, table, F, 10.0, w13, s13, w2, s2, F), (raw, packed)


def test_moe_with_shared_op_is_the_routed_op_and_the_shared_experts_ops_on_the_cpu():
    from plugins.oracle import swiglu_stacked
    args, _keep = _moe_with_shared_case(torch.Generator().manual_seed(5))
    x, experts, weights, table, _, _, w13, s13, w2, s2, _ = args
    routed, shared = torch.ops.dsv4.moe_with_shared(*args)
    assert torch.equal(routed, torch.ops.dsv4.moe_routed(x, experts, weights, table, F, 10.0))
    h = swiglu_stacked(torch.ops.dsv4.fp8_linear(x, w13, s13), F, F, 10.0)
    assert torch.equal(shared, torch.ops.dsv4.fp8_linear(h, w2, s2))


def test_moe_hc_post_op_is_the_moe_then_the_hc_post_on_the_cpu():
    from plugins.oracle import hc_post
    g = torch.Generator().manual_seed(6)
    args, _keep = _moe_with_shared_case(g)
    res = torch.randn(3, 4, D, generator=g).to(torch.bfloat16)
    post, comb = torch.rand(3, 4, generator=g) * 2, torch.rand(3, 4, 4, generator=g)
    got = torch.ops.dsv4.moe_hc_post(*args, res, post, comb)
    routed, shared = torch.ops.dsv4.moe_with_shared(*args)
    f = (routed + shared.float()).to(torch.bfloat16)
    assert torch.equal(got, hc_post(f[:, None], res[:, None], post[:, None], comb[:, None])[:, 0])


def _gate_case(g: torch.Generator, hashed: bool):
    """A gate over the bank's E experts for `_moe_with_shared_case`'s tokens, top 2: (gate weight, bias or
    None, tid2eid or None, token ids)."""
    gate = (torch.randn(E, D, generator=g) / D ** 0.5).to(torch.bfloat16)
    if hashed:
        tid2eid = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(50)]).to(torch.int32)
        return gate, None, tid2eid, torch.tensor([3, 17, 3])
    return gate, torch.randn(E, generator=g) * 0.1, None, torch.tensor([3, 17, 3])


@pytest.mark.parametrize("hashed", [False, True], ids=["score-routed", "hash-routed"])
def test_moe_gate_hc_post_op_is_the_gate_the_route_then_moe_hc_post_on_the_cpu(hashed):
    g = torch.Generator().manual_seed(7)
    args, _keep = _moe_with_shared_case(g)
    x, _, _, table, *rest = args
    gate, bias, tid2eid, ids = _gate_case(g, hashed)
    res = torch.randn(3, 4, D, generator=g).to(torch.bfloat16)
    post, comb = torch.rand(3, 4, generator=g) * 2, torch.rand(3, 4, 4, generator=g)
    experts = torch.zeros(3, 2, dtype=torch.int32)
    got = torch.ops.dsv4.moe_gate_hc_post(x, gate, bias, tid2eid, ids, 2, "sqrtsoftplus", 1.5, experts, table,
                                          *rest, res, post, comb)
    logits = torch.ops.dsv4.wide_linear(x, gate)
    expect_experts = torch.zeros(3, 2, dtype=torch.int32)
    if hashed:
        weights = torch.ops.dsv4.route_hash(logits, tid2eid, ids, 2, "sqrtsoftplus", 1.5, expect_experts)
    else:
        weights = torch.ops.dsv4.route_topk(logits, bias, 2, "sqrtsoftplus", 1.5, expect_experts)
    assert torch.equal(experts, expect_experts)
    assert torch.equal(got, torch.ops.dsv4.moe_hc_post(x, expect_experts, weights, table, *rest, res, post, comb))
