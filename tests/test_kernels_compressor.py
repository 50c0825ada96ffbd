import pytest
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.oracle import compressor_chunk as compressor_chunk_oracle
from plugins.oracle import compressor_step as compressor_step_oracle


def _layer(b, dim, ratio, cache_rows, first_row, max_len=512, seed=0, device="cuda"):
    """A compressor's inputs for b sequences: APE [r, C], norm weight, a RoPE table [max_len, 32, 2], empty
    states (kv 0, score -inf, as `new_caches`) and a bf16 cache of random rows."""
    g = torch.Generator().manual_seed(seed)
    coff = 2 if ratio == 4 else 1
    c = coff * dim
    angles = torch.rand(max_len, 32, generator=g) * 6.3
    layer = {"ape": torch.randn(ratio, c, generator=g), "norm": 1 + 0.1 * torch.randn(dim, generator=g),
             "rot": torch.stack([angles.cos(), angles.sin()], -1),
             "kv_state": torch.zeros(b, coff * ratio, c), "score_state": torch.full((b, coff * ratio, c), float("-inf")),
             "cache": torch.randn(b, cache_rows, dim, generator=g).to(torch.bfloat16)}
    return {k: v.to(device) for k, v in layer.items()}, g


def _step(step, layer, proj, pos, first_row, ratio, rotate):
    step(proj, layer["ape"], pos, layer["kv_state"], layer["score_state"], layer["cache"], first_row, layer["norm"],
         layer["rot"], ratio, rotate, 1e-6, 64, 64)


def _check_rows(mine, theirs, before, written, rotate):
    """The rows `written` [B, rows] agree to the FP8/FP4 step a float32 summation order can flip (cosine,
    and most elements equal); every other row of the cache is as it was."""
    assert written.any()
    assert torch.equal(mine[~written], before[~written])
    got, expect = mine[written].float(), theirs[written].float()
    cos = torch.nn.functional.cosine_similarity(got, expect, dim=-1)
    assert cos.min() >= (0.999 if rotate else 0.9999), cos.min()
    assert (got == expect).float().mean() >= 0.97


@pytest.mark.gpu
@pytest.mark.parametrize("b, dim, ratio, rotate, first_row, starts, steps", [
    pytest.param(1, 512, 4, False, 128, [0], 13, id="flash-ratio4-from-0"),
    pytest.param(3, 512, 4, False, 128, [5, 0, 1022], 9, id="flash-ratio4-3seq"),
    pytest.param(2, 512, 128, False, 128, [0, 100], 140, id="flash-ratio128"),
    pytest.param(2, 128, 4, True, 0, [0, 37], 11, id="indexer-keys"),
    pytest.param(1, 128, 4, False, 16, [0], 9, id="tiny-main-128-channels"),
])
def test_compressor_kernel_matches_oracle(b, dim, ratio, rotate, first_row, starts, steps):
    """Tokens fed one step at a time to the kernel and to the oracle (on the GPU), each with its own states
    and cache: the states stay bit for bit the same; the rows written agree to the FP8/FP4 step that a
    float32 summation order can flip, and nothing else of the cache moves."""
    from plugins.compressor import compressor_step, supports
    max_len = 1024 + 16
    mine, g = _layer(b, dim, ratio, first_row + max_len // ratio, first_row, max_len)
    theirs = {k: v.clone() for k, v in mine.items()}
    before = mine["cache"].clone()
    coff = 2 if ratio == 4 else 1
    written = torch.zeros(b, mine["cache"].size(1), dtype=torch.bool, device="cuda")
    for i in range(steps):
        pos = torch.tensor(starts, device="cuda") + i
        proj = torch.cat([torch.randn(b, coff * dim, generator=g), 2 * torch.randn(b, coff * dim, generator=g)], 1)
        proj = proj.cuda()
        assert supports(proj, mine["cache"], ratio, 64, 64)
        _step(lambda *a: compressor_step(*a[:-2]), mine, proj, pos, first_row, ratio, rotate)
        _step(compressor_step_oracle, theirs, proj, pos, first_row, ratio, rotate)
        done = (pos + 1) % ratio == 0
        written[torch.arange(b, device="cuda")[done], first_row + pos[done] // ratio] = True
        assert torch.equal(mine["kv_state"], theirs["kv_state"]) and torch.equal(mine["score_state"], theirs["score_state"])
    _check_rows(mine["cache"], theirs["cache"], before, written, rotate)


@pytest.mark.gpu
def test_compressor_kernel_captures_in_a_cuda_graph():
    from plugins.compressor import compressor_step
    layer, g = _layer(1, 512, 4, 128 + 64, 128)
    proj = torch.randn(1, 2048, generator=g).cuda()
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    compressor_step(proj, layer["ape"], pos, layer["kv_state"], layer["score_state"], layer["cache"], 128,
                    layer["norm"], layer["rot"], 4, False, 1e-6)               # loads the kernel before capture
    oracle = {k: v.clone() for k, v in layer.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(torch.ops.dsv4.compressor_step, layer, proj, pos, 128, 4, False)
    for p in range(1, 8):                                                     # a block completes at 3 and 7
        pos.fill_(p)
        graph.replay()
        _step(compressor_step_oracle, oracle, proj, pos, 128, 4, False)
    torch.cuda.synchronize()
    assert torch.equal(layer["kv_state"], oracle["kv_state"]) and torch.equal(layer["score_state"], oracle["score_state"])
    cos = torch.nn.functional.cosine_similarity(layer["cache"][0, 128:130].float(), oracle["cache"][0, 128:130].float(), -1)
    assert cos.min() >= 0.9999


def test_compressor_op_is_the_oracle_on_the_cpu():
    layer, g = _layer(2, 128, 4, 8, 0, max_len=32, device="cpu")
    oracle = {k: v.clone() for k, v in layer.items()}
    for p in range(6):
        proj = torch.randn(2, 512, generator=g)
        pos = torch.tensor([p, p + 2])
        _step(torch.ops.dsv4.compressor_step, layer, proj, pos, 0, 4, True)
        _step(compressor_step_oracle, oracle, proj, pos, 0, 4, True)
    assert all(torch.equal(layer[k], oracle[k]) for k in ("kv_state", "score_state", "cache"))
    assert not torch.equal(layer["cache"][:, :2], _layer(2, 128, 4, 8, 0, max_len=32, device="cpu")[0]["cache"][:, :2])


def _chunk(feed, layer, proj, start, n, first_row, ratio, rotate):
    feed(proj, layer["ape"], start, n, layer["kv_state"], layer["score_state"], layer["cache"], first_row,
         layer["norm"], layer["rot"], ratio, rotate, 1e-6, 64, 64)


def _chunk_case(b, dim, ratio, first_row, max_len, chunk, seed, device):
    """A compressor's inputs with states of finite random values (stale slots as well as live ones: both
    must move as the oracle moves them) and a chunk's products [b, chunk, 2C]."""
    layer, g = _layer(b, dim, ratio, first_row + max_len // ratio, first_row, max_len, seed, device)
    layer["kv_state"].copy_(torch.randn(layer["kv_state"].shape, generator=g))
    layer["score_state"].copy_(torch.randn(layer["score_state"].shape, generator=g))
    coff = 2 if ratio == 4 else 1
    proj = torch.cat([torch.randn(b, chunk, coff * dim, generator=g), 2 * torch.randn(b, chunk, coff * dim, generator=g)],
                     -1).to(device)
    return layer, proj


@pytest.mark.gpu
@pytest.mark.parametrize("b, dim, ratio, rotate, first_row, starts, ns, chunk", [
    pytest.param(3, 512, 4, False, 128, [0, 5, 1001], [37, 1, 20], 37, id="flash-ratio4-3seq"),
    pytest.param(2, 512, 4, False, 128, [2, 7], [1, 2], 2, id="flash-ratio4-short"),
    pytest.param(2, 512, 128, False, 128, [0, 100], [300, 157], 300, id="flash-ratio128"),
    pytest.param(2, 128, 4, True, 0, [0, 37], [16, 9], 16, id="indexer-keys"),
    pytest.param(1, 128, 4, False, 16, [3], [5], 8, id="tiny-main-128-channels"),
    pytest.param(1, 512, 128, False, 128, [127], [1], 1, id="one-token-completes"),
])
def test_compressor_chunk_kernel_matches_oracle(b, dim, ratio, rotate, first_row, starts, ns, chunk):
    """A prefill chunk fed to the kernels and to the oracle (on the GPU), each with its own states and cache:
    the states end bit for bit the same; the rows of completed blocks agree to the FP8/FP4 step that a
    float32 summation order can flip; nothing else of the cache moves (padding tokens complete nothing)."""
    from plugins.compressor import compressor_chunk, supports_chunk
    max_len = 1024 + 320
    mine, proj = _chunk_case(b, dim, ratio, first_row, max_len, chunk, 1, "cuda")
    theirs = {k: v.clone() for k, v in mine.items()}
    before = mine["cache"].clone()
    start, n = torch.tensor(starts, device="cuda"), torch.tensor(ns, device="cuda")
    assert supports_chunk(proj, mine["cache"], ratio, 64, 64)
    _chunk(lambda *a: compressor_chunk(*a[:-2]), mine, proj, start, n, first_row, ratio, rotate)
    _chunk(compressor_chunk_oracle, theirs, proj, start, n, first_row, ratio, rotate)
    assert torch.equal(mine["kv_state"], theirs["kv_state"]) and torch.equal(mine["score_state"], theirs["score_state"])
    written = torch.zeros(b, mine["cache"].size(1), dtype=torch.bool, device="cuda")
    for i, (s, m) in enumerate(zip(starts, ns)):
        blocks = list(range(s // ratio, (s + m) // ratio))                    # completed by a real token
        written[i, [first_row + k for k in blocks]] = True
    _check_rows(mine["cache"], theirs["cache"], before, written, rotate)


@pytest.mark.gpu
def test_compressor_chunk_kernel_captures_in_a_cuda_graph():
    """Captured once, replayed over consecutive chunks with the start and count changed in place."""
    from plugins.compressor import compressor_chunk
    layer, proj = _chunk_case(1, 512, 4, 128, 512, 16, 2, "cuda")
    start, n = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), 16, device="cuda")
    compressor_chunk(proj, layer["ape"], start, n, layer["kv_state"].clone(), layer["score_state"].clone(),
                     layer["cache"].clone(), 128, layer["norm"], layer["rot"], 4, False, 1e-6)   # loads before capture
    oracle = {k: v.clone() for k, v in layer.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _chunk(torch.ops.dsv4.compressor_chunk, layer, proj, start, n, 128, 4, False)
    for s, m in ((0, 16), (16, 13), (29, 16)):
        start.fill_(s)
        n.fill_(m)
        graph.replay()
        _chunk(compressor_chunk_oracle, oracle, proj, start, n, 128, 4, False)
    torch.cuda.synchronize()
    assert torch.equal(layer["kv_state"], oracle["kv_state"]) and torch.equal(layer["score_state"], oracle["score_state"])
    cos = torch.nn.functional.cosine_similarity(layer["cache"][0, 128:139].float(), oracle["cache"][0, 128:139].float(), -1)
    assert cos.min() >= 0.9999


def test_compressor_chunk_op_is_the_oracle_on_the_cpu():
    layer, proj = _chunk_case(2, 128, 4, 0, 64, 9, 3, "cpu")
    oracle = {k: v.clone() for k, v in layer.items()}
    start, n = torch.tensor([3, 10]), torch.tensor([9, 4])
    _chunk(torch.ops.dsv4.compressor_chunk, layer, proj, start, n, 0, 4, True)
    _chunk(compressor_chunk_oracle, oracle, proj, start, n, 0, 4, True)
    assert all(torch.equal(layer[k], oracle[k]) for k in ("kv_state", "score_state", "cache"))


def test_compressor_chunk_equals_steps_one_token_at_a_time():
    """The chunk oracle against the decode step oracle fed the same real tokens in order: the same states
    and cache, bit for bit (the prefill programs' tests check this through whole layers too)."""
    for ratio, dim, rotate, starts, ns, chunk in ((4, 128, True, [3, 0], [9, 4], 9), (8, 128, False, [5, 16], [11, 3], 11)):
        chunked, proj = _chunk_case(2, dim, ratio, 4, 64, chunk, 4, "cpu")
        stepped = {k: v.clone() for k, v in chunked.items()}
        _chunk(compressor_chunk_oracle, chunked, proj, torch.tensor(starts), torch.tensor(ns), 4, ratio, rotate)
        for b, (s, m) in enumerate(zip(starts, ns)):
            one = {k: v[b:b + 1].clone() if k in ("kv_state", "score_state", "cache") else v for k, v in stepped.items()}
            for i in range(m):
                _step(compressor_step_oracle, one, proj[b:b + 1, i], torch.tensor([s + i]), 4, ratio, rotate)
            for k in ("kv_state", "score_state", "cache"):
                stepped[k][b] = one[k][0]
        assert all(torch.equal(chunked[k], stepped[k]) for k in ("kv_state", "score_state", "cache")), ratio


@pytest.mark.gpu
@pytest.mark.parametrize("b, dim, stride", [pytest.param(1, 512, 1536, id="flash-stacked-slice"),
                                            pytest.param(3, 512, 512, id="flash-3seq"),
                                            pytest.param(2, 128, 384, id="tiny-128")])
def test_window_row_in_the_query_heads_launch_matches_oracle(b, dim, stride):
    """Each sequence's new window row, written by the query heads' launch (`dsv4::q_heads_kv_row`) from a slice
    of the stacked wq_a | wkv product (row stride `stride`): the oracle's row to the FP8 step a float32
    summation order can flip; every other row untouched; the heads the same bits as a launch without the row."""
    from plugins.compressor import q_heads, supports_kv_row, supports_q_heads
    from plugins.oracle import kv_row as kv_row_oracle
    layer, g = _layer(b, dim, 4, 200, 128)
    stacked = torch.randn(b, stride, generator=g).to(torch.bfloat16).cuda()
    kv = stacked[:, stride - dim:]
    q = (torch.randn(b, 1, 4, dim, generator=g) * 3).to(torch.bfloat16).cuda()
    pos = torch.tensor([5, 127, 300][:b], device="cuda")
    assert supports_kv_row(q, kv, layer["cache"], 64) and supports_q_heads(q, layer["rot"], 64, pos[:, None])
    mine, theirs = layer["cache"].clone(), layer["cache"].clone()
    heads = torch.ops.dsv4.q_heads_kv_row(q, kv, layer["norm"], layer["rot"], pos, mine, 128, 1e-6, 64, 64)
    assert torch.equal(heads, q_heads(q, layer["rot"], 1e-6, pos[:, None]))
    kv_row_oracle(kv, layer["norm"], layer["rot"], pos, theirs, 128, 1e-6, 64, 64)
    rows = torch.zeros(b, 200, dtype=torch.bool, device="cuda")
    rows[torch.arange(b, device="cuda"), pos % 128] = True
    assert torch.equal(mine[~rows], layer["cache"][~rows])
    got, expect = mine[rows].float(), theirs[rows].float()
    assert torch.nn.functional.cosine_similarity(got, expect, dim=-1).min() >= 0.9999
    assert (got == expect).float().mean() >= 0.97


def test_q_heads_kv_row_op_is_the_oracles_on_the_cpu():
    from plugins.oracle import kv_row as kv_row_oracle
    from plugins.oracle import q_heads
    layer, g = _layer(2, 128, 4, 40, 16, max_len=64, device="cpu")
    kv = torch.randn(2, 384, generator=g)[:, 256:]
    q = torch.randn(2, 1, 4, 128, generator=g).to(torch.bfloat16)
    pos = torch.tensor([3, 20])
    mine, theirs = layer["cache"].clone(), layer["cache"].clone()
    heads = torch.ops.dsv4.q_heads_kv_row(q, kv, layer["norm"], layer["rot"], pos, mine, 16, 1e-6, 64, 64)
    kv_row_oracle(kv, layer["norm"], layer["rot"], pos, theirs, 16, 1e-6, 64, 64)
    assert torch.equal(mine, theirs) and not torch.equal(mine, layer["cache"])
    assert torch.equal(heads, q_heads(q, layer["rot"][pos[:, None]], 1e-6, 64))


def _query_heads(b, heads, dim, device, seed=0):
    """The wq_b product's query heads [b, 1, heads, dim] (bf16, a spread of magnitudes per head), a RoPE table
    [64, 32, 2] at random angles and the rows' positions [b, 1] in it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, heads, dim, generator=g) * torch.rand(b, 1, heads, 1, generator=g) * 4
    angles = torch.rand(64, 32, generator=g) * 6.3
    pos = torch.randint(0, 64, (b, 1), generator=g)
    return (q.to(torch.bfloat16).to(device), torch.stack([angles.cos(), angles.sin()], -1).to(device),
            pos.to(device))


@pytest.mark.gpu
@pytest.mark.parametrize("b, heads, dim", [pytest.param(1, 64, 512, id="flash"), pytest.param(3, 64, 512, id="flash-3seq"),
                                           pytest.param(2, 4, 128, id="tiny")])
def test_q_heads_kernel_matches_oracle(b, heads, dim):
    """Norm and RoPE (the table read at each position) in one launch against the oracle's bf16 ops: a float32
    sum in another order can move a head's bf16 mean by one step, so each head within cosine 0.9999 and two
    bf16 steps of relative error; the same bits as the kernel given the gathered rows."""
    from plugins.compressor import q_heads as kernel
    from plugins.compressor import supports_q_heads
    from plugins.oracle import q_heads
    q, table, pos = _query_heads(b, heads, dim, "cuda", seed=b)
    assert supports_q_heads(q, table, 64, pos)
    got = kernel(q, table, 1e-6, pos)
    assert torch.equal(got, kernel(q, table[pos].contiguous(), 1e-6))
    got, expect = got.float(), q_heads(q, table[pos], 1e-6, 64).float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 2), expect.flatten(0, 2), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(got, expect, rtol=2 ** -6, atol=1e-3)
