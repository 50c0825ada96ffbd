import pytest
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.oracle import rms_norm, swiglu


def _stacked(rows, width, device, seed=0):
    """A stacked product's rows [rows, 1, width] bf16 with a spread of magnitudes, some past the clamps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, 1, width, generator=g) * torch.rand(rows, 1, 1, generator=g) * 16
    return y.to(torch.bfloat16).to(device)


def test_row_ops_are_the_oracles_on_the_cpu():
    y = _stacked(3, 96, "cpu")
    weight = torch.rand(40) + 0.5
    assert torch.equal(torch.ops.dsv4.rms_norm_rows(y[..., :40], weight, 1e-6), rms_norm(y[..., :40], weight, 1e-6))
    expect = swiglu(y[..., :40], y[..., 48:88], 10.0).to(y.dtype)
    assert torch.equal(torch.ops.dsv4.swiglu_rows(y, 40, 48, 10.0), expect)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, width, k", [pytest.param(1, 1536, 1024, id="q-latent-of-stacked-wq_a-wkv"),
                                            pytest.param(16, 1536, 1024, id="16-rows"),
                                            pytest.param(2, 300, 200, id="odd")])
def test_rms_norm_rows_kernel_matches_oracle(rows, width, k):
    """The norm of a stacked product's slice (rows a stride apart) against the oracle: float32 sums in another
    order, so within a bf16 step."""
    from plugins.rows import supports_norm
    y = _stacked(rows, width, "cuda", seed=rows)
    weight = (torch.rand(k) + 0.5).cuda()
    assert supports_norm(y[..., :k], weight)
    got, expect = torch.ops.dsv4.rms_norm_rows(y[..., :k], weight, 1e-6).float(), rms_norm(y[..., :k], weight, 1e-6).float()
    assert got.shape == expect.shape
    assert torch.allclose(got, expect, rtol=2 ** -7, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, size, up, limit", [pytest.param(1, 2048, 2048, 10.0, id="flash-shared-expert"),
                                                   pytest.param(16, 2048, 2048, 10.0, id="16-rows"),
                                                   pytest.param(3, 200, 256, 0.0, id="odd-no-clamp")])
def test_swiglu_rows_kernel_matches_oracle(rows, size, up, limit):
    from plugins.rows import supports_swiglu
    y = _stacked(rows, up + size, "cuda", seed=rows + 1)
    assert supports_swiglu(y, size, up)
    got = torch.ops.dsv4.swiglu_rows(y, size, up, limit).float()
    expect = swiglu(y[..., :size], y[..., up:up + size], limit).to(y.dtype).float()
    assert torch.allclose(got, expect, rtol=2 ** -7, atol=1e-5)


@pytest.mark.gpu
def test_row_kernels_capture_in_a_cuda_graph():
    y, weight = _stacked(2, 4096, "cuda"), (torch.rand(1024) + 0.5).cuda()
    torch.ops.dsv4.rms_norm_rows(y[..., :1024], weight, 1e-6)                   # loads the kernels before capture
    torch.ops.dsv4.swiglu_rows(y, 2048, 2048, 10.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed = torch.ops.dsv4.rms_norm_rows(y[..., :1024], weight, 1e-6)
        h = torch.ops.dsv4.swiglu_rows(y, 2048, 2048, 10.0)
    y.copy_(_stacked(2, 4096, "cuda", seed=9))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(normed, torch.ops.dsv4.rms_norm_rows(y[..., :1024], weight, 1e-6))
    assert torch.equal(h, torch.ops.dsv4.swiglu_rows(y, 2048, 2048, 10.0))


def _fp8_weight(n, k, device, seed=0):
    from plugins.formats import fp8_weight_quant
    w, s = fp8_weight_quant(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5)
    return w.to(device), s.to(device)


def test_gemvs_after_a_row_transform_are_the_transform_then_the_linear_on_the_cpu():
    from plugins.ops import fp8_linear_after_swiglu
    y, weight = _stacked(3, 512, "cpu"), torch.rand(256) + 0.5
    w, s = _fp8_weight(64, 256, "cpu")
    assert torch.equal(torch.ops.dsv4.fp8_linear_normed(y[..., :256], weight, 1e-6, w, s),
                       torch.ops.dsv4.fp8_linear(torch.ops.dsv4.rms_norm_rows(y[..., :256], weight, 1e-6), w, s))
    assert torch.equal(fp8_linear_after_swiglu(y, 128, 256, 10.0, w[:, :128].contiguous(), s[:, :1].contiguous()),
                       torch.ops.dsv4.fp8_linear(torch.ops.dsv4.swiglu_rows(y, 128, 256, 10.0),
                                                 w[:, :128].contiguous(), s[:, :1].contiguous()))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 12], ids=lambda r: f"{r}rows")   # 12: past the prologue builds
def test_gemv_prologues_give_the_bits_of_the_row_kernel_then_the_gemv(rows):
    """The query latent's norm before wq_b (a slice of the stacked wq_a | wkv product, rows a stride apart) and
    the shared expert's SwiGLU before w2, each inside the GEMV's launch: the same bits as the row kernel's
    output fed to the GEMV (one source for the transform, rows.cuh), eager and replayed from a graph."""
    from plugins.ops import fp8_linear_after_swiglu
    latent, norm = _stacked(rows, 1536, "cuda", seed=rows), (torch.rand(1024) + 0.5).cuda()
    wq, sq = _fp8_weight(32768, 1024, "cuda", seed=1)
    stacked = _stacked(rows, 4096, "cuda", seed=rows + 5)
    w2, s2 = _fp8_weight(4096, 2048, "cuda", seed=2)

    def fused():
        return (torch.ops.dsv4.fp8_linear_normed(latent[..., :1024], norm, 1e-6, wq, sq),
                fp8_linear_after_swiglu(stacked, 2048, 2048, 10.0, w2, s2))

    def apart():
        return (torch.ops.dsv4.fp8_linear(torch.ops.dsv4.rms_norm_rows(latent[..., :1024], norm, 1e-6), wq, sq),
                torch.ops.dsv4.fp8_linear(torch.ops.dsv4.swiglu_rows(stacked, 2048, 2048, 10.0), w2, s2))
    for got, expect in zip(fused(), apart()):
        assert torch.equal(got, expect)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fused()
    latent.copy_(_stacked(rows, 1536, "cuda", seed=rows + 20))
    stacked.copy_(_stacked(rows, 4096, "cuda", seed=rows + 21))
    graph.replay()
    for got, expect in zip(outs, apart()):
        assert torch.equal(got, expect)
