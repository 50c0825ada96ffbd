import pytest
import torch

from helpers import H200_SHARED, RecordedLaunches, random_experts, routed_chunk, split_table
from plugins.formats import mxfp4_dequant
from plugins.ops import moe_routed_oracle


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, d, f, k, same", [(1, 4096, 2048, 6, False), (3, 256, 128, 6, False),
                                                (4, 512, 256, 6, True), (16, 1024, 384, 6, False),
                                                (5, 768, 640, 3, False), (1, 256, 128, 1, False),
                                                (2, 512, 256, 10, False), (8, 4096, 2048, 6, False)],
                         ids=["flash-1tok", "tiny-3tok", "all-on-one-expert", "16tok", "odd-sizes-k3", "k1", "k10",
                              "flash-8tok"])
@pytest.mark.parametrize("wgmma", [False, True], ids=["mma", "wgmma"])
def test_moe_decode_matches_oracle_with_host_experts(tokens, d, f, k, same, wgmma):
    from plugins.moe_experts import decode_wgmma_fits, moe_experts_decode
    if wgmma and not decode_wgmma_fits(torch.empty(0, device="cuda"), k, d, f):
        pytest.skip("the wgmma decode kernels need an sm_90 GPU")
    n_exp = 12
    bank = random_experts(n_exp, d, f)
    table, _stores = split_table(bank)           # even experts on the device, odd ones in pinned host memory
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
    if same:
        experts = torch.tensor([[5, 0, 1, 2, 3, 4][:k]] * tokens, dtype=torch.int32)
    else:
        experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, k, generator=g) + 0.1
    experts, weights = experts.cuda(), weights.cuda()
    got = moe_experts_decode(x, experts, weights, table, f, limit=10.0, wgmma=wgmma)
    dequantised = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    expect = moe_routed_oracle(x, experts, weights, dequantised.__getitem__, 10.0)
    cos = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(got, expect, rtol=0.02, atol=0.02 * expect.abs().max().item())


@pytest.mark.gpu
def test_moe_decode_captures_in_a_cuda_graph_and_is_deterministic():
    from plugins.moe_experts import make_workspace, moe_experts_decode, pack_expert
    d, f, k, tokens = 512, 256, 6, 2
    table_of = [pack_expert(*e).cuda() for e in random_experts(10, d, f)]
    table = torch.tensor([t.data_ptr() for t in table_of], dtype=torch.int64, device="cuda")
    x = torch.randn(tokens, d, device="cuda").to(torch.bfloat16)
    experts = torch.tensor([[0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4]], dtype=torch.int32, device="cuda")
    weights = torch.rand(tokens, k, device="cuda")
    out, ws = torch.empty(tokens, d, device="cuda"), make_workspace(tokens, k, d, f, "cuda")
    moe_experts_decode(x, experts, weights, table, f, 10.0, out, ws)   # warm-up: loads the module
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_experts_decode(x, experts, weights, table, f, 10.0, out, ws)
    x.copy_(torch.randn(tokens, d, device="cuda").to(torch.bfloat16))
    experts.copy_(torch.tensor([[3, 1, 4, 0, 5, 9], [2, 6, 5, 3, 8, 7]], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expect = moe_experts_decode(x, experts, weights, table, f, 10.0)
    assert torch.equal(out, expect)
    assert torch.equal(moe_experts_decode(x, experts, weights, table, f, 10.0), expect)


def test_group_pairs_cuts_each_experts_run_into_groups():
    from plugins.moe_experts import group_pairs
    g = torch.Generator().manual_seed(2)
    experts = torch.stack([torch.randperm(10, generator=g)[:6] for _ in range(37)]).to(torch.int32)
    experts[:20, 0] = 7                                   # a hot expert: several full groups
    pairs, g_expert, g_start, g_count, n_groups = group_pairs(experts, 10, 8)
    real = int(n_groups)
    assert n_groups.shape == (1,) and g_expert.numel() == (37 * 6 + 10 * 7) // 8 > real  # sized without a sync
    assert (g_count[real:] == 0).all() and g_expert.max() < 10 and g_start.max() <= 37 * 6  # the empty slots
    g_expert, g_start, g_count = g_expert[:real], g_start[:real], g_count[:real]
    flat = experts.flatten()
    assert sorted(pairs.tolist()) == list(range(37 * 6))
    assert torch.equal(flat[pairs.long()], flat.sort(stable=True).values)
    assert g_count.max() <= 8 and g_count.min() >= 1 and int(g_count.sum()) == 37 * 6
    for e, s, c in zip(g_expert.tolist(), g_start.tolist(), g_count.tolist()):
        assert set(flat[pairs[s:s + c].long()].tolist()) == {e}
    assert (g_start[1:] == g_start[:-1] + g_count[:-1]).all()   # the groups tile the sorted pairs
    for e in range(10):                                   # an expert's groups within one pair of each other
        sizes = g_count[g_expert == e]
        assert sizes.max() - sizes.min() <= 1 and len(sizes) == -(-int((flat == e).sum()) // 8)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, d, f, k, hot", [(40, 512, 256, 6, False), (64, 4096, 2048, 6, True),
                                                  (23, 768, 640, 3, False)],
                         ids=["40tok", "flash-64tok-hot", "odd-sizes-k3"])
def test_moe_prefill_groups_equal_the_decode_kernels(tokens, d, f, k, hot):
    """Tokens grouped by expert give the mma.sync decode kernels' bits, and both the oracle's values."""
    from plugins.moe_experts import moe_experts_decode, moe_experts_prefill
    n_exp = 12
    bank = random_experts(n_exp, d, f)
    table, _stores = split_table(bank)
    x, experts, weights = routed_chunk(tokens, d, n_exp, k, hot_expert=4 if hot else None)
    got = moe_experts_prefill(x, experts, weights, table, f, limit=10.0)
    assert torch.equal(got, moe_experts_decode(x, experts, weights, table, f, limit=10.0, wgmma=False))
    dequantised = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    expect = moe_routed_oracle(x, experts, weights, dequantised.__getitem__, 10.0)
    cos = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    assert cos.min() >= 0.9999, cos


def _moe_with_shared_case(g: torch.Generator, experts: list[list[int]], device: str, d: int = 1024, f: int = 512):
    """`dsv4::moe_with_shared`'s arguments for one token per row of `experts` (ids below 10) over a bank of 10
    random experts (d x f) and a random FP8 shared expert, on `device`; and the bank's tensors to keep alive."""
    from plugins.formats import fp8_weight_quant
    from plugins.moe_experts import pack_expert
    stores = [pack_expert(*e).to(device) for e in random_experts(10, d, f)]
    table = torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device=device)
    w13, s13 = (t.to(device) for t in fp8_weight_quant(torch.randn(2 * f, d, generator=g) / d ** 0.5))
    w2, s2 = (t.to(device) for t in fp8_weight_quant(torch.randn(d, f, generator=g) / f ** 0.5))
    x = torch.randn(len(experts), d, generator=g).to(torch.bfloat16).to(device)
    ids = torch.tensor(experts, dtype=torch.int32, device=device)
    weights = torch.rand(*ids.shape, generator=g).to(device)
    return (x, ids, weights, table, f, 10.0, w13, s13, w2, s2, f), stores


@pytest.mark.gpu
def test_shared_expert_beside_the_routed_ones_gives_the_same_bits_and_captures(monkeypatch):
    """dsv4::moe_with_shared with the shared expert on a second stream (plugins/streams.py): the same two
    outputs as in turn, eagerly and replayed from a CUDA graph holding the fork and the join."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins import moe_experts
    g = torch.Generator().manual_seed(4)
    experts = [[0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4]]
    args, _stores = _moe_with_shared_case(g, experts, "cuda")
    x, tokens, d = args[0], *args[0].shape
    monkeypatch.setattr(moe_experts, "SHARED_BESIDE_ROUTED", False)
    in_turn = torch.ops.dsv4.moe_with_shared(*args)
    monkeypatch.setattr(moe_experts, "SHARED_BESIDE_ROUTED", True)
    beside = torch.ops.dsv4.moe_with_shared(*args)
    assert all(torch.equal(a, b) for a, b in zip(beside, in_turn))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv4.moe_with_shared(*args)
    x.copy_(torch.randn(tokens, d, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(moe_experts, "SHARED_BESIDE_ROUTED", False)
    assert all(torch.equal(a, b) for a, b in zip(out, torch.ops.dsv4.moe_with_shared(*args)))


@pytest.mark.gpu
@pytest.mark.parametrize("wgmma", [False, True], ids=["mma-sync", "wgmma"])
def test_moe_hc_post_sums_and_posts_in_one_launch_as_the_ops_in_turn(monkeypatch, wgmma):
    """dsv4::moe_hc_post on the kernels (the pairs, the shared output and the layer's last hc_post in one
    launch) against moe_with_shared then the oracle's hc_post: the FFN output the same bits, the post's
    products and sums rounded one by one (at most one bf16 step apart, almost all equal); then from a
    replayed graph with the shared expert beside the routed ones."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins import moe_experts
    from plugins.oracle import hc_post
    if wgmma and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma decode kernels are sm_90 only")
    monkeypatch.setattr(moe_experts.WGMMA, "decode", wgmma)
    g = torch.Generator().manual_seed(4)
    moe_args, _stores = _moe_with_shared_case(g, [[0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4], [3] * 6], "cuda")
    x, tokens, d = moe_args[0], *moe_args[0].shape
    res = torch.randn(tokens, 4, d, generator=g).to(torch.bfloat16).cuda()
    post, comb = (torch.rand(tokens, 4, generator=g) * 2).cuda(), torch.rand(tokens, 4, 4, generator=g).cuda()
    args = (*moe_args, res, post, comb)

    def check(got):
        routed, shared = torch.ops.dsv4.moe_with_shared(*args[:11])
        ffn = (routed + shared.float()).to(torch.bfloat16)
        expect = hc_post(ffn[:, None], res[:, None], post[:, None], comb[:, None])[:, 0]
        step = (expect.float().abs() * 2 ** -7).clamp(min=1e-30)
        assert ((got.float() - expect.float()).abs() <= step).all() and (got == expect).float().mean() > 0.99

    check(torch.ops.dsv4.moe_hc_post(*args))
    monkeypatch.setattr(moe_experts, "SHARED_BESIDE_ROUTED", True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv4.moe_hc_post(*args)
    x.copy_(torch.randn(tokens, d, device="cuda").to(torch.bfloat16))
    res.copy_(torch.randn(tokens, 4, d, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    check(out)


@pytest.mark.gpu
@pytest.mark.parametrize("hashed", [False, True], ids=["score-routed", "hash-routed"])
def test_shared_expert_before_the_gate_gives_the_same_bits_and_captures(monkeypatch, hashed):
    """dsv4::moe_gate_hc_post with the shared expert started before the gate's product (a second stream) and
    after the routing: the same experts and streams, eagerly and replayed from a CUDA graph."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins import moe_experts
    g = torch.Generator().manual_seed(5)
    moe_args, _stores = _moe_with_shared_case(g, [[0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4]], "cuda")
    x, _, _, table, *rest = moe_args
    tokens, d = x.shape
    gate = (torch.randn(10, d, generator=g) / d ** 0.5).to(torch.bfloat16).cuda()
    bias, tid2eid = (torch.randn(10, generator=g) * 0.1).cuda(), None
    if hashed:
        tid2eid = torch.stack([torch.randperm(10, generator=g)[:6] for _ in range(20)]).to(torch.int32).cuda()
        bias = None
    ids = torch.tensor([3, 11], device="cuda")
    res = torch.randn(tokens, 4, d, generator=g).to(torch.bfloat16).cuda()
    post, comb = (torch.rand(tokens, 4, generator=g) * 2).cuda(), torch.rand(tokens, 4, 4, generator=g).cuda()
    experts = torch.zeros(tokens, 6, dtype=torch.int32, device="cuda")

    def run():
        return torch.ops.dsv4.moe_gate_hc_post(x, gate, bias, tid2eid, ids, 6, "sqrtsoftplus", 1.5, experts, table,
                                               *rest, res, post, comb)
    monkeypatch.setattr(moe_experts, "SHARED_BEFORE_GATE", False)
    after, after_experts = run(), experts.clone()
    monkeypatch.setattr(moe_experts, "SHARED_BEFORE_GATE", True)
    experts.zero_()
    assert torch.equal(run(), after) and torch.equal(experts, after_experts)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn(tokens, d, device="cuda").to(torch.bfloat16))
    experts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed, replayed_experts = out.clone(), experts.clone()
    monkeypatch.setattr(moe_experts, "SHARED_BEFORE_GATE", False)
    assert torch.equal(replayed, run()) and torch.equal(replayed_experts, experts)




@pytest.mark.parametrize("ctas, most", [
    pytest.param(384, 3, id="flash-1tok-384-ctas"),
    pytest.param(100, 1, id="fewer-ctas-than-sms"),
])
def test_spread_shared_lets_no_sm_take_more_than_its_even_share(ctas, most):
    """The wgmma down kernel's 51 KB (four fitted an H200 SM) raised so that an SM holds ceil(ctas / 132)."""
    from plugins.moe_experts import spread_shared
    padded = spread_shared(51_328, ctas, 132, H200_SHARED)
    assert H200_SHARED[0] // (padded + 1024 + 128) == most      # + the driver's 1 KiB, the kernel's static bytes


def test_spread_shared_leaves_a_grid_that_cannot_crowd_an_sm():
    from plugins.moe_experts import spread_shared
    assert spread_shared(51_328, 768, 132, H200_SHARED) == 51_328   # six an SM would not fit anyway
    assert spread_shared(200_000, 384, 132, H200_SHARED) == 200_000


class _H200Occupancy(RecordedLaunches):
    """The two questions `_down_launch` asks of the kernel image, answered as an H200 would for the wgmma down
    kernel (128 threads of 71 registers: shared memory alone limits it); launches are recorded."""
    def resident(self, name, block, shared):
        return min(H200_SHARED[0] // (shared + 1024 + 128), 7) * 132


@pytest.mark.parametrize("tokens, most_items, regions", [(1, 1, 1), (2, 2, 2), (16, 16, 2)],
                         ids=["1tok", "2tok", "16tok"])
def test_down_launch_gives_the_items_in_a_ctas_hand_a_tile_region_each(tokens, most_items, regions):
    """The down kernel's shared memory holds a B tile region for each item in a CTA's hand (two at most), and
    the grid is one wave at that size (Flash: 6 experts x 64 items of 64 rows of D per token, F 2048)."""
    from plugins.moe_experts import RING_BYTES, _down_launch
    items, per_region = 6 * 64, 2048 // 32 * 256 + 2048 // 128 * 4
    lib = _H200Occupancy()
    grid, shared = _down_launch(lib, items, tokens, 2048, 132)
    assert -(-items // grid) == most_items
    assert shared >= RING_BYTES // 2 + regions * per_region
    assert grid * tokens <= lib.resident("", 128, shared)           # one wave: every CTA resident at once


@pytest.mark.parametrize("tokens", [1, 2])
def test_wgmma_decode_launches_pass_each_kernel_its_declared_arguments(monkeypatch, tokens):
    """The wgmma decode kernels' launches pass as many arguments as the kernels declare (plugins/csrc), the
    experts where they stand: a launch with too few or too many is not refused by the driver, it reads garbage."""
    from plugins import moe_experts
    monkeypatch.setattr(moe_experts, "sm_count", lambda index: 132)
    monkeypatch.setattr(moe_experts, "device_index", lambda device: 0)
    k, d, f = 6, 4096, 2048
    x, experts, route_w = torch.zeros(tokens, d), torch.zeros(tokens, k, dtype=torch.int32), torch.zeros(tokens, k)
    lib = _H200Occupancy()
    ws = {"h": torch.zeros(tokens * k, f), "ypart": torch.zeros(tokens * k, d)}
    moe_experts._decode_wgmma(lib, x, experts, route_w, torch.zeros(256, dtype=torch.int64), f, 10.0, None, ws)
    assert [launch.name for launch in lib.launches] == ["dsv4_moe_gate_up_decode_wgmma", "dsv4_moe_down_decode_wgmma"]
    for launch in lib.launches:
        given = launch.given()
        assert given["experts"] is experts and given["topk"] == k and launch.grid[1] == tokens


def test_grouped_prefill_launches_pass_each_kernel_its_declared_arguments(monkeypatch):
    """The grouped prefill kernels' launches (csrc/moe_experts.cu) pass as many arguments as the kernels
    declare, the group count by its address (the kernels read it on the device: nothing waits for the host),
    and grids bounded by the most groups the chunk could have."""
    from plugins import moe_experts
    lib = _H200Occupancy()
    monkeypatch.setattr(moe_experts, "kernels", lambda: lib)
    t, k, d, f, n_exp = 40, 6, 512, 256, 12
    experts = torch.stack([torch.randperm(n_exp)[:k] for _ in range(t)]).to(torch.int32)
    moe_experts.moe_experts_prefill(torch.zeros(t, d, dtype=torch.bfloat16), experts, torch.zeros(t, k),
                                    torch.zeros(n_exp, dtype=torch.int64), f, 10.0)
    names = [launch.name for launch in lib.launches]
    assert names == ["dsv4_moe_gate_up_grouped", "dsv4_moe_down_grouped", "dsv4_moe_sum_pairs"]
    slots = (t * k + n_exp * 7) // 8
    for launch, blocks in zip(lib.launches, (f // 16, d // 32)):
        given = launch.given()
        assert given["n_groups"].shape == (1,) and given["g_count"].numel() == slots
        assert int(given["n_groups"]) == int((given["g_count"] > 0).sum())
        assert launch.grid <= slots * blocks
