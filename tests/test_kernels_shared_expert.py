"""The shared expert in one launch (plugins/shared_expert.py, csrc/shared_expert.cu)."""
import pytest
import torch

from plugins import shared_expert
from plugins.formats import fp8_weight_quant


def _expert(d, f, up, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13, s13 = fp8_weight_quant(torch.randn(up + f, d, generator=g) / d ** 0.5)
    w2, s2 = fp8_weight_quant(torch.randn(d, f, generator=g) / f ** 0.5)
    return w13, s13, w2, s2


class _Kernels:
    def __init__(self, per_block):
        self.per_block = per_block

    def shared_memory(self):
        return (self.per_block + 1024, self.per_block)


@pytest.mark.parametrize("per_block, rows, stages", [(232448, 1, 12), (232448, 2, 12), (101376, 1, 4),
                                                     (101376, 2, 4), (60000, 1, None)],
                         ids=["h200-1row", "h200-2rows", "gb10-1row", "gb10-2rows", "too-small"])
def test_the_ring_is_as_deep_as_the_gpus_shared_memory_holds(monkeypatch, per_block, rows, stages):
    """At Flash size (D 4096) an H100/H200 CTA holds every job of its warps in flight (12 slots), a GB10's
    (99 KB) a ring of 4; a GPU with less runs the two-launch form."""
    monkeypatch.setattr(shared_expert, "kernels", lambda: _Kernels(per_block))
    assert shared_expert.stages_for(rows, 4096) == stages
    if stages is not None:
        assert shared_expert.shared_bytes(stages, rows, 4096) <= per_block
    if stages == 12:                                     # each warp's jobs: w1 and w3 per block of its K, w2's groups
        assert stages >= 2 * (4096 // 128) // shared_expert.WARPS + 4096 // 1024


def test_only_decode_rows_on_a_gpu_take_the_one_launch_kernel(monkeypatch):
    monkeypatch.setattr(shared_expert, "ONE_LAUNCH", True)
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    w13, w2 = torch.empty(4096, 4096), torch.empty(4096, 2048)
    assert not shared_expert.fits(x, 2048, 2048, w13, w2)               # CPU


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d, f, up, limit, stages",
                         [(1, 4096, 2048, 2048, 10.0, None), (2, 4096, 2048, 2048, 10.0, None),
                          (1, 4096, 2048, 2048, 10.0, 4), (2, 2048, 512, 512, 7.0, None), (1, 1024, 256, 384, 0.0, None),
                          (2, 1024, 256, 384, 0.0, 4)],
                         ids=["flash-1row", "flash-2rows", "flash-ring4", "small-2rows", "gap-no-clamp",
                              "gap-ring4-2rows"])
def test_one_launch_shared_expert_matches_the_two_launch_form_and_the_oracle(monkeypatch, rows, d, f, up, limit, stages):
    """Against the two-launch kernels (the same numerics but for the float32 sums' order over K) and the CPU
    oracle; the same bits again, from a CUDA graph and on calls in a row (the arrival counters go back to zero);
    `stages` 4: the GB10's ring, where jobs outnumber the slots."""
    import plugins.ops  # noqa: F401
    from plugins.ops import _shared_expert
    if stages is not None:
        monkeypatch.setattr(shared_expert, "STAGE_CHOICES", (stages,))
    monkeypatch.setattr(shared_expert, "ONE_LAUNCH", True)
    w13, s13, w2, s2 = _expert(d, f, up)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[0, :128] *= 1e-6                                   # a block below the amax floor
    oracle = _shared_expert(x, f, up, limit, w13, s13, w2, s2).float()
    x, w13, s13, w2, s2 = x.cuda(), w13.cuda(), s13.cuda(), w2.cuda(), s2.cuda()
    assert shared_expert.fits(x, f, up, w13, w2)
    got = shared_expert.shared_expert_decode(x, f, up, limit, w13, s13, w2, s2)
    monkeypatch.setattr(shared_expert, "ONE_LAUNCH", False)
    two = _shared_expert(x, f, up, limit, w13, s13, w2, s2)
    monkeypatch.setattr(shared_expert, "ONE_LAUNCH", True)
    assert torch.equal(_shared_expert(x, f, up, limit, w13, s13, w2, s2), got)    # the op's path is this kernel
    assert got.shape == (rows, d) and got.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(got.double().cpu(), oracle.double(), dim=-1)
    assert cos.min() > 0.9999
    assert (got != two).float().mean() < 0.05
    assert torch.allclose(got.float(), two.float(), rtol=2 ** -6, atol=1e-2 * two.float().abs().max())
    for _ in range(2):
        assert torch.equal(shared_expert.shared_expert_decode(x, f, up, limit, w13, s13, w2, s2), got)
    out = torch.empty_like(got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        shared_expert.shared_expert_decode(x, f, up, limit, w13, s13, w2, s2, out)
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got)
