import pytest
import torch

from helpers import RecordedLaunches
from plugins.oracle import sparse_attention as sparse_attention_oracle


def _case(b, s, h, d, t, k, valid, seed=0):
    """q [b, s, h, d], kv [b, t, d] (bf16, on the GPU), sink [h], idx [b, s, k] with `valid` rows each
    (distinct, random), the rest -1 in random places."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(torch.bfloat16)
    kv = torch.randn(b, t, d, generator=g).to(torch.bfloat16)
    sink = torch.randn(h, generator=g)
    idx = torch.full((b, s, k), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(s):
            slots = torch.randperm(k, generator=g)[:valid]
            idx[i, j, slots] = torch.randperm(t, generator=g)[:valid]
    return q.cuda(), kv.cuda(), sink.cuda(), idx.cuda()


def _rotations(b, s, rope, seed=5):
    """Rotations [b, s, rope/2, 2] (cos, sin) at random angles, on the GPU."""
    angles = torch.rand(b, s, rope // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return torch.stack([angles.cos(), angles.sin()], -1).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, h, d, t, k, valid", [
    pytest.param(1, 1, 64, 512, 2176, 640, 600, id="flash-ratio4"),
    pytest.param(1, 1, 64, 512, 160, 160, 131, id="flash-ratio128"),
    pytest.param(1, 1, 64, 512, 2176, 640, 3, id="window-not-full"),
    pytest.param(1, 1, 64, 512, 2176, 640, 1, id="one-row"),
    pytest.param(3, 1, 4, 128, 60, 77, 50, id="tiny-3seq-odd-k"),
    pytest.param(2, 2, 16, 256, 300, 129, 100, id="d256-2tok"),
    pytest.param(1, 1, 128, 512, 4000, 640, 640, id="pro-128heads-all-valid"),
    pytest.param(1, 2, 20, 128, 90, 33, 33, id="20heads-split-of-one"),
    pytest.param(1, 1, 48, 512, 2176, 640, 600, id="48heads-over-two-ctas-a-split"),
    pytest.param(1, 1, 64, 512, 4000, 2176, 2000, id="flash-2176-rows-one-cta-a-split"),
])
def test_sparse_attention_decode_matches_oracle(b, s, h, d, t, k, valid):
    from plugins.sparse_attention import sparse_attention_decode
    q, kv, sink, idx = _case(b, s, h, d, t, k, valid)
    scale = d ** -0.5
    got = sparse_attention_decode(q, kv, sink, idx, scale)
    expect = sparse_attention_oracle(q, kv, sink, idx, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, 2), expect.double().flatten(0, 2), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(got.float(), expect.float(), rtol=0.02, atol=0.02 * expect.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("b, rotate", [(1, False), (2, True)], ids=["plain", "inverse-rope"])
def test_sparse_attention_decode_captures_in_a_cuda_graph(b, rotate):
    from plugins.sparse_attention import make_workspace, sparse_attention_decode
    q, kv, sink, idx = _case(b, 1, 64, 512, 2176, 640, 300)
    rot = _rotations(b, 1, 64) if rotate else None
    out = torch.empty_like(q)
    ws = make_workspace(b, 64, 512, 640, "cuda")
    expect = sparse_attention_decode(q, kv, sink, idx, 0.05, rot=rot)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_attention_decode(q, kv, sink, idx, 0.05, out=out, workspace=ws, rot=rot)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)


@pytest.mark.gpu
def test_sparse_attention_op_runs_the_kernel_for_bf16_decode():
    """dsv4::sparse_attention on CUDA bf16 decode shapes is the kernel (the same bits)."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins.sparse_attention import sparse_attention_decode
    q, kv, sink, idx = _case(2, 1, 8, 128, 90, 70, 60)
    assert torch.equal(torch.ops.dsv4.sparse_attention(q, kv, sink, idx, 0.1),
                       sparse_attention_decode(q, kv, sink, idx, 0.1))


def _table(rows, rope, seed=5):
    """A RoPE table [rows, rope/2, 2] (cos, sin) at random angles, on the GPU."""
    angles = torch.rand(rows, rope // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return torch.stack([angles.cos(), angles.sin()], -1).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("b, h, d, window, ratio, t, picks, positions", [
    pytest.param(1, 64, 512, 128, 4, 2176, 512, [1500], id="flash-ratio4"),
    pytest.param(1, 64, 512, 128, 128, 160, 0, [3000], id="flash-ratio128"),
    pytest.param(1, 64, 512, 128, 0, 128, 0, [700], id="flash-ratio0"),
    pytest.param(1, 64, 512, 128, 4, 2176, 512, [5], id="window-not-full-ratio4"),
    pytest.param(3, 4, 128, 8, 128, 40, 0, [0, 255, 4000], id="tiny-3seq-ratio128"),
    pytest.param(2, 16, 256, 16, 4, 100, 21, [3, 300], id="d256-2seq-ratio4-odd-picks"),
])
def test_decode_attention_op_is_the_kernel_over_the_rows_it_names_then_the_inverse_rope(b, h, d, window, ratio, t,
                                                                                       picks, positions):
    """dsv4::decode_attention builds the decode step's rows itself (oracle `decode_rows`: ring slots up to
    pos, the picked or complete blocks) and reads the RoPE table at each position: the same bits as the
    kernel over the oracle's row list, then the oracle's inverse RoPE at the gathered rows; and, graph
    captured, the same again after pos and picks change."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins.oracle import decode_rows, with_rope
    from plugins.sparse_attention import sparse_attention_decode
    q, kv, sink, _ = _case(b, 1, h, d, t, 1, 1, seed=6)
    g = torch.Generator().manual_seed(7)
    pos = torch.tensor(positions, dtype=torch.int64)[:, None].cuda()
    picked = None
    if ratio == 4:
        picked = torch.randint(-1, max(1, (t - window)), (b, 1, picks), generator=g).cuda()
    table = _table(4096, 64)

    def expect():
        idx = decode_rows(pos, picked, window, ratio, t)
        plain = sparse_attention_decode(q, kv, sink, idx, d ** -0.5)
        return with_rope(plain, table[pos], 64, inverse=True)
    got = torch.ops.dsv4.decode_attention(q, kv, sink, picked, pos, window, ratio, d ** -0.5, table)
    assert torch.equal(got, expect())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv4.decode_attention(q, kv, sink, picked, pos, window, ratio, d ** -0.5, table)
    pos.add_(1)
    if picked is not None:
        picked.copy_(torch.randint(-1, max(1, (t - window)), (b, 1, picks), generator=g).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect())


@pytest.mark.parametrize("ratio, t, rows", [(4, 2176, 640), (128, 160, 160), (0, 128, 128)],
                         ids=["flash-ratio4", "flash-ratio128", "flash-ratio0"])
def test_decode_launches_pass_each_kernel_its_declared_arguments(monkeypatch, ratio, t, rows):
    """Decode's launch pair passes as many arguments as the kernels declare (plugins/csrc), each where the
    kernel reads it."""
    from plugins import sparse_attention
    lib = RecordedLaunches()
    monkeypatch.setattr(sparse_attention, "kernels", lambda: lib)
    monkeypatch.setattr(sparse_attention, "fits", lambda q, kv, k: True)
    monkeypatch.setattr(sparse_attention, "sm_count", lambda index: 132)
    monkeypatch.setattr(sparse_attention, "device_index", lambda device: 0)
    q, kv, sink = torch.zeros(1, 1, 64, 512), torch.zeros(1, t, 512), torch.zeros(64)
    picked = torch.zeros(1, 1, 512, dtype=torch.int64) if ratio == 4 else None
    pos, table, out = torch.zeros(1, 1, dtype=torch.int64), torch.zeros(4096, 32, 2), torch.zeros(1, 1, 64, 512)
    sparse_attention.sparse_attention_decode(q, kv, sink, picked, 0.05, out=out, rot=table, pos=pos, window=128,
                                             ratio=ratio)
    splits = rows // 32
    split, combine = lib.launches
    assert split.name == "dsv4_sparse_attention_split_d4" and combine.name == "dsv4_sparse_attention_combine"
    given = split.given()
    assert split.grid[0] == splits
    assert combine.given()["splits"] == splits and combine.given()["rot"] is table
    assert given["pos"] is pos and given["K"] == rows and given["ratio"] == ratio


@pytest.mark.parametrize("splits, queries, warps, sms, expect", [
    pytest.param(20, 1, 4, 132, 2, id="flash-640-rows"),
    pytest.param(4, 1, 4, 132, 2, id="flash-window"),
    pytest.param(68, 1, 4, 132, 4, id="flash-2176-rows-past-one-wave"),
    pytest.param(20, 16, 4, 132, 4, id="16-queries-past-one-wave"),
    pytest.param(20, 1, 8, 132, 2, id="pro-128-heads"),
    pytest.param(3, 2, 1, 132, 1, id="one-warp"),
    pytest.param(10, 76, 4, 132, 4, id="prefill-chunk"),
])
def test_split_launches_spread_their_heads_over_ctas_within_one_wave(splits, queries, warps, sms, expect):
    """The split launch's warps per CTA: DECODE_WARPS_PER_CTA where the CTAs then fit one wave of the GPU,
    else all of a split's warps in one CTA (prefill chunks: many queries)."""
    from plugins import sparse_attention as kernel
    assert kernel.DECODE_WARPS_PER_CTA == 2
    assert kernel.warps_per_cta(splits, queries, warps, sms) == expect


@pytest.mark.parametrize("b, k, least, most", [
    pytest.param(1, 640, 64, 256, id="flash-640-rows"),           # 64 a pair kept the H200 busy (session 26)
    pytest.param(1, 128 + (1 << 20) // 128, 1, 8, id="flash-ratio128-at-1M"),
    pytest.param(4, 640, 16, 64, id="4-sequences"),
    pytest.param(1, 1 << 24, 1, 1, id="one-query-past-the-budget"),
])
def test_prefill_group_keeps_the_workspace_in_its_budget(b, k, least, most):
    """A prefill chunk of 256 Flash queries (64 heads x 512) over k indices: its launch pairs take between
    `least` and `most` queries a sequence, and their workspace stays within PREFILL_WORKSPACE_BYTES unless a
    single query needs more."""
    from plugins import sparse_attention as kernel
    group = kernel.prefill_group(b, 256, 64, 512, k)
    assert least <= group <= most
    ws = kernel.make_workspace(b * group, 64, 512, k, "meta", kernel.PREFILL_ROWS)
    used = sum(t.numel() * t.element_size() for t in ws.values())
    assert used <= kernel.PREFILL_WORKSPACE_BYTES or group == 1


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, h, d, t, k, valid", [
    pytest.param(1, 40, 64, 512, 2176, 640, 600, id="flash-ratio4-40-queries"),
    pytest.param(2, 33, 16, 256, 300, 129, 100, id="d256-2seq-33-queries"),
    pytest.param(1, 64, 4, 128, 60, 77, 3, id="tiny-64-queries-few-rows"),
])
@pytest.mark.parametrize("group", [None, 14], ids=["group-by-workspace", "groups-of-14"])
def test_sparse_attention_prefill_chunk_matches_oracle(b, s, h, d, t, k, valid, group, monkeypatch):
    """A prefill chunk through the decode kernels, `prefill_group` queries per launch pair (its default
    workspace, or one that holds 14 queries a sequence: groups cut mid-chunk, a short last group): the
    oracle's bounds; the op takes that path."""
    import plugins.ops  # noqa: F401  (registers the ops)
    from plugins import sparse_attention as kernel
    if group is not None:
        per_query = kernel.workspace_bytes(b, h, d, k, kernel.PREFILL_ROWS)   # a query per sequence
        monkeypatch.setattr(kernel, "PREFILL_WORKSPACE_BYTES", group * per_query)
        assert kernel.prefill_group(b, s, h, d, k) == group
    q, kv, sink, idx = _case(b, s, h, d, t, k, valid, seed=4)
    scale = d ** -0.5
    got = kernel.sparse_attention_chunked(q, kv, sink, idx, scale)
    expect = sparse_attention_oracle(q, kv, sink, idx, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, 2), expect.double().flatten(0, 2), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(got.float(), expect.float(), rtol=0.02, atol=0.02 * expect.abs().max().item())
    assert torch.equal(torch.ops.dsv4.sparse_attention(q, kv, sink, idx, scale), got)
