import pytest
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.oracle import route_from_logits, route_weights, router_scores


# (rows, experts, k) of the kernel tests: Flash's gate at 1 and 16 rows, Pro's, odd sizes, the widest build
GATE_SHAPES = [pytest.param(1, 256, 6, id="flash-1row"), pytest.param(16, 256, 6, id="flash-16rows"),
               pytest.param(2, 384, 6, id="pro-2rows"), pytest.param(5, 72, 3, id="odd-72-k3"),
               pytest.param(1, 1024, 16, id="widest")]


def _case(rows, experts, seed=0):
    """Gate logits [rows, E] float32 of a trained gate's spread, and a bias of DeepSeek's size (~1e-2)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, experts, generator=g) * 3
    bias = torch.randn(experts, generator=g) * 1e-2
    return logits, bias


def test_route_op_is_the_oracle_on_the_cpu():
    logits, bias = _case(3, 256)
    experts = torch.full((3, 6), -1, dtype=torch.int32)
    weights = torch.ops.dsv4.route_topk(logits, bias, 6, "sqrtsoftplus", 1.5, experts)   # experts written in place
    expect_w, expect_e = route_from_logits(logits, bias, 6, "sqrtsoftplus", 1.5)
    assert experts.dtype == torch.int32 and torch.equal(experts.long(), expect_e) and torch.equal(weights, expect_w)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, experts, k", GATE_SHAPES)
def test_route_kernel_matches_oracle(rows, experts, k):
    from plugins.route import kernel_fits, route_topk
    logits, bias = (t.cuda() for t in _case(rows, experts))
    assert kernel_fits(logits, k, "sqrtsoftplus")
    weights, picked = route_topk(logits, bias, k, 1.5)
    expect_w, expect_e = route_from_logits(logits, bias, k, "sqrtsoftplus", 1.5)    # torch on the GPU
    assert torch.equal(picked.long(), expect_e)                  # the same experts, in the same order
    assert torch.allclose(weights, expect_w, rtol=1e-6, atol=0)  # the normalising sum's order may differ


@pytest.mark.gpu
def test_route_kernel_captures_in_a_cuda_graph():
    from plugins.route import route_topk
    logits, bias = (t.cuda() for t in _case(1, 256))
    route_topk(logits, bias, 6, 1.5)                              # loads the kernel before capture
    picked = torch.full((1, 6), -1, dtype=torch.int32, device="cuda")      # a program's cache of its experts
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.dsv4.route_topk(logits, bias, 6, "sqrtsoftplus", 1.5, picked)
    fresh, _ = _case(1, 256, seed=1)
    logits.copy_(fresh.cuda())
    graph.replay()
    expect = route_topk(logits, bias, 6, 1.5)
    assert torch.equal(picked, expect[1]) and torch.equal(got, expect[0])


def _hash_case(rows, experts, k, vocab=64, seed=0):
    """A hash layer's gate: logits as `_case`, a table tid2eid [vocab, k] int32 of distinct experts per token
    (not sorted: the weights follow the table's order) and token ids [rows] int64."""
    logits, _ = _case(rows, experts, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tid2eid = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(vocab)]).int()
    return logits, tid2eid, torch.randint(0, vocab, (rows,), generator=g)


def _hash_oracle(logits, tid2eid, ids, k, scale):
    experts = tid2eid[ids]
    return route_weights(router_scores(logits, "sqrtsoftplus"), experts, "sqrtsoftplus", scale), experts


def test_route_hash_op_is_the_oracle_on_the_cpu():
    logits, tid2eid, ids = _hash_case(3, 256, 6)
    experts = torch.full((3, 6), -1, dtype=torch.int32)
    weights = torch.ops.dsv4.route_hash(logits, tid2eid, ids, 6, "sqrtsoftplus", 1.5, experts)   # written in place
    expect_w, expect_e = _hash_oracle(logits, tid2eid, ids, 6, 1.5)
    assert experts.dtype == torch.int32 and torch.equal(experts, expect_e) and torch.equal(weights, expect_w)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, experts, k", GATE_SHAPES)
def test_route_hash_kernel_matches_oracle(rows, experts, k):
    from plugins.route import kernel_fits, route_hash
    logits, tid2eid, ids = (t.cuda() for t in _hash_case(rows, experts, k))
    assert kernel_fits(logits, k, "sqrtsoftplus")
    weights, picked = route_hash(logits, tid2eid, ids, k, 1.5)
    expect_w, expect_e = _hash_oracle(logits, tid2eid, ids, k, 1.5)    # torch on the GPU
    assert torch.equal(picked, expect_e)                          # the table's experts, in its order
    assert torch.allclose(weights, expect_w, rtol=1e-6, atol=0)   # the normalising sum's order may differ


@pytest.mark.gpu
def test_route_hash_op_writes_the_experts_in_place():
    logits, tid2eid, ids = (t.cuda() for t in _hash_case(4, 256, 6))
    experts = torch.full((4, 6), -1, dtype=torch.int32, device="cuda")   # a program's cache of its experts
    weights = torch.ops.dsv4.route_hash(logits, tid2eid, ids, 6, "sqrtsoftplus", 1.5, experts)
    expect_w, expect_e = _hash_oracle(logits, tid2eid, ids, 6, 1.5)
    assert torch.equal(experts, expect_e) and torch.allclose(weights, expect_w, rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_route_hash_kernel_captures_in_a_cuda_graph():
    from plugins.route import route_hash
    logits, tid2eid, ids = (t.cuda() for t in _hash_case(2, 256, 6))
    route_hash(logits, tid2eid, ids, 6, 1.5)                      # loads the kernel before capture
    picked = torch.full((2, 6), -1, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.dsv4.route_hash(logits, tid2eid, ids, 6, "sqrtsoftplus", 1.5, picked)
    fresh_logits, _, fresh_ids = _hash_case(2, 256, 6, seed=5)    # the next step: other tokens, other logits
    assert not torch.equal(fresh_ids, ids.cpu())
    logits.copy_(fresh_logits.cuda())
    ids.copy_(fresh_ids.cuda())
    graph.replay()
    expect = route_hash(logits, tid2eid, ids, 6, 1.5)
    assert torch.equal(picked, expect[1]) and torch.equal(got, expect[0])


@pytest.mark.gpu
@pytest.mark.parametrize("finite", [0, 2, 256], ids=["all-nan", "two-finite", "no-nan"])
def test_route_kernel_names_only_experts_in_range_whatever_the_logits(finite):
    """NaN logits (a layer that overflowed) must not make the router name an expert past the table: the MoE
    would read the expert table out of bounds and fault the step (seen when a benchmark fed the gate
    uninitialised memory, session 29). Where finite scores remain, they are picked as the oracle picks them."""
    from plugins.route import route_topk
    logits, bias = (t.cuda() for t in _case(1, 256))
    logits[0, finite:] = float("nan")
    weights, picked = route_topk(logits, bias, 6, 1.5)
    assert ((picked >= 0) & (picked < 256)).all(), picked
    if finite >= 6:
        expect_w, expect_e = route_from_logits(logits, bias, 6, "sqrtsoftplus", 1.5)
        assert torch.equal(picked.long(), expect_e)
    else:
        assert set(picked[0, :finite].tolist()) == set(range(finite))    # the finite ones first
