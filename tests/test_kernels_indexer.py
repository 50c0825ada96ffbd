import pytest
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.oracle import indexer_picks as indexer_picks_oracle


RATIO = 4
SCALE = 128 ** -0.5 * 64 ** -0.5                 # the indexer's head-weight scale (Flash and Pro)


def _case(b, s, t, counts, exact, seed=0, heads=64, dim=128):
    """q [b, s, heads, dim], keys [b, t, dim] (bf16), the raw head weights [b, s, heads] (float32) and their
    scale, and positions pos [b, s] with counts[i] blocks visible ((pos + 1) // RATIO). `exact`: small integers
    and power-of-two weights at scale 1, so every sum is exact in any order and ties are many (the kernel must
    then give the oracle's picks bit for bit); else normal values at the indexer's scale."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        q = torch.randint(-2, 3, (b, s, heads, dim), generator=g).float()
        keys = torch.randint(-2, 3, (b, t, dim), generator=g).float()
        weights = 2.0 ** torch.randint(-3, 2, (b, s, heads), generator=g).float()
        weights *= torch.where(torch.rand(b, s, heads, generator=g) < 0.2, -1.0, 1.0)
        scale = 1.0
    else:
        q, keys = torch.randn(b, s, heads, dim, generator=g), torch.randn(b, t, dim, generator=g)
        weights, scale = torch.randn(b, s, heads, generator=g) * 10, SCALE
    pos = torch.tensor(counts, dtype=torch.int64).view(b, s) * RATIO - 1 + torch.randint(0, RATIO, (b, s), generator=g)
    return [x.to(torch.bfloat16).cuda() for x in (q, keys)] + [weights.cuda(), scale, pos.cuda()]


def test_indexer_op_is_the_oracle_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    weights, pos = torch.randn(2, 1, 4, generator=g), torch.tensor([[5 * RATIO - 1], [20 * RATIO + 2]])
    got = torch.ops.dsv4.indexer_picks(q, weights, keys, pos, 8, RATIO, SCALE)
    assert torch.equal(got, indexer_picks_oracle(q, weights, keys, pos, 8, RATIO, SCALE))
    assert (got[0, 0, 5:] == -1).all() and (got[0, 0, :5] >= 0).all() and (got[0, 0, :5] < 5).all()


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, t, counts, k", [
    pytest.param(1, 1, 1024, [150], 512, id="flash-fewer-blocks-than-k"),
    pytest.param(1, 1, 4096, [3001], 512, id="flash-more-blocks-than-k"),
    pytest.param(1, 1, 1024, [0], 512, id="no-block-yet"),
    pytest.param(3, 1, 2048, [1, 777, 2048], 512, id="3seq-each-its-count"),
    pytest.param(2, 2, 600, [600, 599, 64, 65], 300, id="2x2-queries-odd-k"),
    pytest.param(1, 1, 16384, [16384], 1024, id="pro-k-64k-context"),
])
@pytest.mark.parametrize("exact", [pytest.param(True, id="exact-ties"), pytest.param(False, id="normal")])
def test_indexer_kernel_matches_oracle(b, s, t, counts, k, exact):
    from plugins.indexer import indexer_picks, supports
    q, keys, weights, scale, pos = _case(b, s, t, counts, exact)
    assert supports(q, weights, keys, k)
    got = indexer_picks(q, weights, keys, pos, k, RATIO, scale)
    expect = indexer_picks_oracle(q, weights, keys, pos, k, RATIO, scale)     # torch on the GPU
    assert got.shape == expect.shape == (b, s, k) and got.dtype == torch.int64
    assert torch.equal(got < 0, expect < 0)                          # as many picks, then -1
    assert ((got >= 0).sum(-1).cpu() == torch.tensor(counts).view(b, s).clamp(max=k)).all()
    if exact:                                                        # every sum exact: the same picks, in order
        assert torch.equal(got, expect)
        return
    # Float32 sums in another order may move a score by one bf16 ulp: where the picks differ, the scores at
    # them (the oracle's) must be within an ulp of each other, and the kernel's must still descend.
    w = weights.to(torch.bfloat16) * scale
    score = torch.einsum("bshd,btd->bsht", q.float(), keys.float()).bfloat16().relu() * w[..., None]
    score = score.float().sum(2)
    for i in range(b):
        for j in range(s):
            mine, theirs = got[i, j][got[i, j] >= 0], expect[i, j][expect[i, j] >= 0]
            a, e = score[i, j, mine], score[i, j, theirs]
            if not len(e):
                continue
            ulp = e.abs().max() * 2 ** -7 + 1e-6
            assert (a - e).abs().max() <= 2 * ulp
            assert (a[1:] <= a[:-1] + 2 * ulp).all()
            assert len(set(mine.tolist()) ^ set(theirs.tolist())) <= max(2, len(e) // 50)


@pytest.mark.gpu
def test_indexer_kernel_captures_in_a_cuda_graph():
    from plugins.indexer import indexer_picks
    q, keys, weights, scale, pos = _case(1, 1, 1024, [300], exact=True)
    indexer_picks(q, weights, keys, pos, 512, RATIO, scale)          # loads the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.dsv4.indexer_picks(q, weights, keys, pos, 512, RATIO, scale)
    fresh = _case(1, 1, 1024, [301], exact=True, seed=1)
    for buf, new in zip((q, keys, weights, pos), (fresh[0], fresh[1], fresh[2], fresh[4])):
        buf.copy_(new)
    graph.replay()
    assert torch.equal(got, indexer_picks_oracle(q, weights, keys, pos, 512, RATIO, scale))


def _queries(b, s, heads, device, seed=0):
    """The wq_b product's queries [b, s, heads, 128] (bf16), a RoPE table [64, 32, 2] at random angles and
    the queries' positions [b, s] in it."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s, heads, 128, generator=g) * 3).to(torch.bfloat16)
    angles = torch.rand(64, 32, generator=g) * 6.3
    pos = torch.randint(0, 64, (b, s), generator=g)
    return q.to(device), torch.stack([angles.cos(), angles.sin()], -1).to(device), pos.to(device)


def test_index_query_op_is_the_oracle_on_the_cpu():
    from plugins.oracle import index_query
    q, table, pos = _queries(2, 1, 4, "cpu")
    assert torch.equal(torch.ops.dsv4.index_query(q, table, pos, 64), index_query(q, table[pos], 64))


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, heads", [pytest.param(1, 1, 64, id="flash-1row"),
                                         pytest.param(3, 1, 64, id="flash-3seq"),
                                         pytest.param(2, 1, 16, id="tiny-16-heads")])
def test_index_query_kernel_matches_oracle(b, s, heads):
    """RoPE (the table read at each position), Hadamard and FP4 round-trip in one launch against the oracle:
    within the FP4 step a float32 summation order can flip (the Hadamard's sums), most elements equal; the
    same bits as the kernel given the gathered rows."""
    from plugins.indexer import index_query as kernel
    from plugins.indexer import supports_query
    from plugins.oracle import index_query
    q, table, pos = _queries(b, s, heads, "cuda", seed=b)
    assert supports_query(q, table, 64, pos)
    got, expect = torch.ops.dsv4.index_query(q, table, pos, 64), index_query(q, table[pos], 64)
    assert torch.equal(got, kernel(q, table[pos].contiguous()))
    got, expect = got.float(), expect.float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 2), expect.flatten(0, 2), dim=-1)
    assert cos.min() >= 0.999, cos.min()
    assert (got == expect).float().mean() >= 0.97


@pytest.mark.gpu
def test_index_query_kernel_captures_in_a_cuda_graph():
    q, table, pos = _queries(1, 1, 64, "cuda")
    torch.ops.dsv4.index_query(q, table, pos, 64)                           # loads the kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv4.index_query(q, table, pos, 64)
    fresh, _, fresh_pos = _queries(1, 1, 64, "cuda", seed=5)
    q.copy_(fresh)
    pos.copy_(fresh_pos)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ops.dsv4.index_query(fresh, table, fresh_pos, 64))
