"""Unit tests of the reference model's building blocks against hand-computed values: the bugs that
do not show in logits (a transposed comb matrix, the sink in the numerator, bias in route weights)."""
import math

import pytest
import torch

from builder.presets import preset
from builder.reference.attention import block_indices, window_indices
from builder.reference.moe import route
from builder.reference.rope import rope_table
from plugins.oracle import hc_post, sinkhorn_split, sparse_attention, swiglu


def test_sinkhorn_comb_is_doubly_stochastic_and_pre_post_ranges():
    torch.manual_seed(0)
    mix = torch.randn(3, 24)
    pre, post, comb = sinkhorn_split(mix, torch.tensor([1.0, 1.0, 1.0]), torch.zeros(24), 4, 20, 1e-6)
    assert torch.allclose(comb.sum(-1), torch.ones(3, 4), atol=1e-3)
    assert torch.allclose(comb.sum(-2), torch.ones(3, 4), atol=1e-5)
    assert ((pre > 0) & (pre < 1 + 1e-5)).all() and ((post > 0) & (post < 2)).all()
    # with base 0 and scale 0 everything is uniform
    pre, post, comb = sinkhorn_split(mix, torch.zeros(3), torch.zeros(24), 4, 20, 1e-6)
    assert torch.allclose(pre, torch.full((3, 4), 0.5 + 1e-6)) and torch.allclose(post, torch.ones(3, 4))
    assert torch.allclose(comb, torch.full((3, 4, 4), 0.25), atol=1e-6)


def test_hc_post_uses_comb_rows_as_inputs():
    # out_k = post_k * f + sum_j comb[j, k] * res_j; a non-symmetric comb catches a transpose
    f = torch.tensor([[[1.0, 0.0]]])                                  # [b=1, s=1, d=2]
    res = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])                   # streams j=0: e0, j=1: e1
    post = torch.tensor([[[0.0, 0.0]]])
    comb = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])                  # only stream 0 -> output 1
    out = hc_post(f, res, post, comb)
    assert out[0, 0].tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_sparse_attention_sink_only_in_denominator():
    q = torch.tensor([[[[1.0, 0.0]]]])                                 # [b, s, h=1, d=2]
    kv = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])           # row 2 is never picked
    idx = torch.tensor([[[0, 1, -1]]])
    sink = torch.tensor([0.5])
    o = sparse_attention(q, kv, sink, idx, scale=1.0)
    e0, e1, es = math.exp(2.0), math.exp(0.0), math.exp(0.5)
    expect = torch.tensor([2.0 * e0, 3.0 * e1]) / (e0 + e1 + es)
    assert torch.allclose(o[0, 0, 0], expect, atol=1e-6)


def test_window_and_block_visibility():
    w = window_indices(4, 6, 0, "cpu")
    assert w.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert window_indices(4, 1, 2, "cpu").tolist() == [[0, 1, 2, -1]]
    assert window_indices(4, 1, 9, "cpu").tolist() == [[0, 1, 2, 3]]
    b = block_indices(4, 9, 0, 9, "cpu")
    assert b[2].tolist() == [-1, -1] and b[3].tolist() == [9, -1] and b[8].tolist() == [9, 10]
    assert block_indices(128, 1, 255, 16, "cpu").tolist() == [[16, 17]]


def test_yarn_frequencies_follow_the_documented_ramp():
    cfg = preset("flash")
    rot = rope_table(cfg, True, 2, "cpu")
    freqs = torch.atan2(rot[1, :, 1], rot[1, :, 0])                     # angle at position 1 = frequency
    base, dim = 160000.0, 64
    corr = lambda r: dim * math.log(65536 / (2 * math.pi * r)) / (2 * math.log(base))  # noqa: E731
    low, high = math.floor(corr(32)), math.ceil(corr(1))
    for i in (0, low, (low + high) // 2, high, 31):
        f = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        assert freqs[i].item() == pytest.approx(f / 16 * ramp + f * (1 - ramp), rel=1e-5)
    plain = rope_table(cfg, False, 2, "cpu")[1]
    plain = torch.atan2(plain[:, 1], plain[:, 0])
    assert plain[5].item() == pytest.approx(10000.0 ** (-10 / 64), rel=1e-6)


def test_route_bias_chooses_but_does_not_weigh():
    cfg = preset("tiny")                      # sqrtsoftplus, 6 of 16, scale 1.5
    x = torch.ones(1, cfg.hidden_size)
    gate = torch.zeros(cfg.n_routed_experts, cfg.hidden_size)
    gate[:, 0] = torch.arange(cfg.n_routed_experts, dtype=torch.float32) * 0.1   # expert e scores 0.1 e
    bias = torch.zeros(cfg.n_routed_experts)
    bias[:6] = 100.0                                                           # bias picks experts 0..5
    weights, experts = route(cfg, x, gate, bias, None, torch.tensor([0]))
    assert sorted(experts[0].tolist()) == [0, 1, 2, 3, 4, 5]
    s = torch.nn.functional.softplus(torch.arange(6) * 0.1).sqrt()
    expect = s / s.sum() * 1.5
    got = weights[0][experts[0].argsort()]
    assert torch.allclose(got.float(), expect, atol=1e-6)
    table = torch.tensor([[7, 8, 9, 10, 11, 12]])
    _, hashed = route(cfg, x, gate, None, table, torch.tensor([0]))
    assert hashed[0].tolist() == [7, 8, 9, 10, 11, 12]


def test_swiglu_clamps():
    gate = torch.tensor([20.0, -3.0])
    up = torch.tensor([20.0, -20.0])
    out = swiglu(gate, up, 10.0)
    assert out[0].item() == pytest.approx(10.0 / (1 + math.exp(-10.0)) * 10.0)
    assert out[1].item() == pytest.approx(-3.0 / (1 + math.exp(3.0)) * -10.0)
