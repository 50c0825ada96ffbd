import pytest
import torch

from plugins.oracle import hc_pre_parts


def _case(rows, d, seed=0, device="cuda"):
    """Streams x [rows, 1, 4, d] bf16 and hc weights of DeepSeek's scale (fn ~ 1e-2, base ~ 1, scale ~ 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 4, d, generator=g).to(torch.bfloat16)
    fn = torch.randn(24, 4 * d, generator=g) * 1e-2
    scale = torch.rand(3, generator=g) + 0.25
    base = torch.randn(24, generator=g)
    return x.to(device), fn.to(device), scale.to(device), base.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [pytest.param(1, 4096, id="flash-1row"), pytest.param(3, 256, id="tiny-3rows"),
                                     pytest.param(1, 7168, id="pro-1row"), pytest.param(16, 4096, id="flash-16rows")])
def test_hc_pre_decode_matches_oracle(rows, d):
    from plugins.hc_pre import hc_pre_decode
    x, fn, scale, base = _case(rows, d)
    y, post, comb = hc_pre_decode(x, fn, scale, base, 1e-6, 1e-6, 20)
    ey, epost, ecomb = hc_pre_parts(x, fn, scale, base, 1e-6, 1e-6, 20)
    assert y.dtype == torch.bfloat16 and y.shape == ey.shape and post.shape == epost.shape
    assert torch.allclose(post, epost, rtol=1e-4, atol=1e-5) and torch.allclose(comb, ecomb, rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(y.double().flatten(0, 1), ey.double().flatten(0, 1), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(y.float(), ey.float(), rtol=0.02, atol=0.02 * ey.abs().max().item())


@pytest.mark.gpu
def test_hc_pre_decode_captures_in_a_cuda_graph_and_the_op_dispatches_to_it():
    import plugins.ops  # noqa: F401
    from plugins.hc_pre import hc_pre_decode, make_workspace
    x, fn, scale, base = _case(2, 4096)
    expect = hc_pre_decode(x, fn, scale, base, 1e-6, 1e-6, 20)
    out = tuple(torch.empty_like(t) for t in expect)
    ws = make_workspace(2, 4096, "cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hc_pre_decode(x, fn, scale, base, 1e-6, 1e-6, 20, out=out, workspace=ws)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, expect))
    via_op = torch.ops.dsv4.hc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    assert all(torch.equal(a, b) for a, b in zip(via_op, expect))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [pytest.param(1, 4096, id="flash-1row"), pytest.param(3, 256, id="tiny-3rows"),
                                     pytest.param(1, 7168, id="pro-1row"), pytest.param(16, 4096, id="flash-16rows")])
def test_hc_pre_with_the_norm_matches_oracle(rows, d):
    """The layer's RMSNorm inside the finish launch (one CTA): hc_pre's y then the norm, against the oracle's
    two steps; post and comb as without the norm."""
    import plugins.ops  # noqa: F401
    from plugins.oracle import rms_norm
    x, fn, scale, base = _case(rows, d, seed=1)
    weight = 1 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(2)).cuda()
    got, post, comb = torch.ops.dsv4.hc_pre_norm(x, fn, scale, base, weight, 1e-6, 1e-6, 20)
    ey, epost, ecomb = hc_pre_parts(x, fn, scale, base, 1e-6, 1e-6, 20)
    expect = rms_norm(ey, weight, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == expect.shape
    assert torch.allclose(post, epost, rtol=1e-4, atol=1e-5) and torch.allclose(comb, ecomb, rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, 1), expect.double().flatten(0, 1), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(got.float(), expect.float(), rtol=0.02, atol=0.02 * expect.abs().max().item())


def test_hc_pre_norm_op_is_the_oracle_on_the_cpu():
    import plugins.ops  # noqa: F401
    from plugins.oracle import rms_norm
    x, fn, scale, base = _case(2, 64, device="cpu")
    weight = torch.rand(64) + 0.5
    got = torch.ops.dsv4.hc_pre_norm(x, fn, scale, base, weight, 1e-6, 1e-6, 20)
    y, post, comb = hc_pre_parts(x, fn, scale, base, 1e-6, 1e-6, 20)
    assert all(torch.equal(a, b) for a, b in zip(got, (rms_norm(y, weight, 1e-6), post, comb)))


def _post_inputs(rows, d, device, seed=3):
    """The attention's output f [rows, 1, d] bf16 and an hc_pre's post [rows, 1, 4] and comb [rows, 1, 4, 4]."""
    x, fn, scale, base = _case(rows, d, seed=seed, device="cpu")
    _, post, comb = hc_pre_parts(x, fn, scale, base, 1e-6, 1e-6, 20)
    f = torch.randn(rows, 1, d, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    return f.to(device), post.to(device), comb.to(device)


def test_hc_post_pre_norm_op_is_the_post_then_the_pre_on_the_cpu():
    import plugins.ops  # noqa: F401
    from plugins.oracle import hc_post
    res, fn, scale, base = _case(2, 64, device="cpu")
    f, post, comb = _post_inputs(2, 64, "cpu")
    weight = torch.rand(64) + 0.5
    got = torch.ops.dsv4.hc_post_pre_norm(f, res, post, comb, fn, scale, base, weight, 1e-6, 1e-6, 20)
    h = hc_post(f, res, post, comb)
    expect = (h, *torch.ops.dsv4.hc_pre_norm(h, fn, scale, base, weight, 1e-6, 1e-6, 20))
    assert all(torch.equal(a, b) for a, b in zip(got, expect))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [pytest.param(1, 4096, id="flash-1row"), pytest.param(3, 256, id="tiny-3rows"),
                                     pytest.param(16, 4096, id="flash-16rows")])
def test_hc_post_inside_the_mix_launch_matches_the_oracle_and_captures(rows, d):
    """The new streams as the oracle's hc_post (products and sums rounded one by one: at most one bf16 step
    apart, almost all equal), and the FFN's hc_pre of them the same bits as `hc_pre_norm` of those streams;
    then from a replayed graph on new inputs."""
    import plugins.ops  # noqa: F401
    from plugins.oracle import hc_post
    res, fn, scale, base = _case(rows, d)
    f, post, comb = _post_inputs(rows, d, "cuda")
    weight = (torch.rand(d) + 0.5).cuda()

    def check(got):
        h = got[0]
        expect = hc_post(f, res, post, comb)
        step = (expect.float().abs() * 2 ** -7).clamp(min=1e-30)
        assert ((h.float() - expect.float()).abs() <= step).all() and (h == expect).float().mean() > 0.99
        pre = torch.ops.dsv4.hc_pre_norm(h, fn, scale, base, weight, 1e-6, 1e-6, 20)
        assert all(torch.equal(a, b) for a, b in zip(got[1:], pre))

    check(torch.ops.dsv4.hc_post_pre_norm(f, res, post, comb, fn, scale, base, weight, 1e-6, 1e-6, 20))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.dsv4.hc_post_pre_norm(f, res, post, comb, fn, scale, base, weight, 1e-6, 1e-6, 20)
    res.copy_(_case(rows, d, seed=7)[0])
    f.copy_(_post_inputs(rows, d, "cuda", seed=8)[0])
    graph.replay()
    check(got)


def _head_case(rows, d, device, seed=7):
    """Streams [rows, 1, 4, d] bf16 and the model's hc_head weights (fn [4, 4d], scale [1], base [4])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 4, d, generator=g).to(torch.bfloat16)
    fn, scale = torch.randn(4, 4 * d, generator=g) * 1e-2, torch.rand(1, generator=g) + 0.25
    base = torch.randn(4, generator=g)
    return x.to(device), fn.to(device), scale.to(device), base.to(device)


def _head_oracle(x, fn, scale, base, weight):
    from types import SimpleNamespace

    from plugins.oracle import hc_head, rms_norm
    return rms_norm(hc_head(x, fn, scale, base, SimpleNamespace(rms_norm_eps=1e-6, hc_eps=1e-6)), weight, 1e-6)


def test_the_head_in_hc_pre_form_is_hc_head_then_the_norm_on_the_cpu():
    """runtime.artifact's decode head input: hc_pre_norm over head_as_hc_pre's padded weights (the zero rows
    change no mix; no Sinkhorn iterations) gives the model's rms_norm(hc_head(x))."""
    import plugins.ops  # noqa: F401
    from plugins.hc_pre import head_as_hc_pre
    x, fn, scale, base = _head_case(2, 64, "cpu")
    weight = torch.rand(64) + 0.5
    got = torch.ops.dsv4.hc_pre_norm(x, *head_as_hc_pre(fn, scale, base), weight, 1e-6, 1e-6, 0)[0]
    expect = _head_oracle(x, fn, scale, base, weight)
    assert torch.allclose(got.float(), expect.float(), rtol=2 ** -7, atol=1e-6)
    assert (got == expect).float().mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [pytest.param(1, 4096, id="flash-1row"), pytest.param(3, 256, id="tiny-3rows")])
def test_the_head_in_hc_pre_form_runs_on_the_kernels(rows, d):
    """The same on the hc_pre kernels (the decode step's head input on a GPU), against the oracle's steps."""
    import plugins.ops  # noqa: F401
    from plugins.hc_pre import head_as_hc_pre
    x, fn, scale, base = _head_case(rows, d, "cuda")
    weight = 1 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(2)).cuda()
    got = torch.ops.dsv4.hc_pre_norm(x, *head_as_hc_pre(fn, scale, base), weight, 1e-6, 1e-6, 0)[0]
    expect = _head_oracle(x, fn, scale, base, weight)
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, 1), expect.double().flatten(0, 1), dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.allclose(got.float(), expect.float(), rtol=0.02, atol=0.02 * expect.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [pytest.param(1, 4096, id="flash-1row"), pytest.param(3, 256, id="tiny-3rows"),
                                     pytest.param(16, 4096, id="flash-16rows")])
def test_comb_finished_beside_gives_the_same_bits_and_captures(rows, d, monkeypatch):
    """plugins.hc_pre.SINKHORN_BESIDE: the finish writes comb's logits and a launch on the second stream
    runs the Sinkhorn iterations, joined by comb's reader (here hc_post_pre_norm, then join_pending for the
    FFN's comb): the same bits as the finish's own iterations, from plain launches and from a replayed graph
    (a fork the capture joins), with the side stream's work joined at the end."""
    import plugins.ops  # noqa: F401
    from plugins import hc_pre, streams
    x, fn, scale, base = _case(rows, d, seed=3)
    f, _, _ = _post_inputs(rows, d, "cuda")
    weight = (torch.rand(d) + 0.5).cuda()

    def layer(beside: bool):
        x_, post, comb = torch.ops.dsv4.hc_pre_norm(x, fn, scale, base, weight, 1e-6, 1e-6, 20, comb_beside=beside)
        out = torch.ops.dsv4.hc_post_pre_norm(f, x, post, comb, fn, scale, base, weight, 1e-6, 1e-6, 20,
                                              comb_beside=beside)
        streams.join_pending(x.device)
        return (x_, post, comb, *out)

    expect = layer(False)
    monkeypatch.setattr(hc_pre, "SINKHORN_BESIDE", True)
    got = layer(True)
    assert not streams._PENDING
    assert all(torch.equal(a, b) for a, b in zip(got, expect))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(True)
    for t in captured:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, expect))
