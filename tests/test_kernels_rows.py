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
