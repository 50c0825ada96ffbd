import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.reference.model import ReferenceModel

PROMPT = 300      # wraps the 16-token window many times, completes two ratio-128 blocks, indexer selects


def _ids(n, seed=1):
    return torch.randint(0, 900, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model32(tiny_dir):
    """float32 activations (accumulated in float64, see `wide_dtype`): prefill and decode round alike."""
    return ReferenceModel(Checkpoint(tiny_dir), act=torch.float32, max_len=PROMPT + 8)


def test_decode_matches_prefill_at_every_position(model32):
    """Step-by-step decode equals one-shot prefill of the same tokens, position by position (fp32)."""
    ids = _ids(PROMPT)
    model32.reset()
    full = model32.forward(ids, 0, all_positions=True)[0]
    model32.reset()
    steps = [model32.forward(ids[:, :1], 0)[0]]
    for p in range(1, PROMPT):
        steps.append(model32.forward(ids[:, p:p + 1], p)[0])
    dec = torch.stack(steps)
    cos = torch.nn.functional.cosine_similarity(full, dec, dim=-1)
    assert torch.equal(full.argmax(-1), dec.argmax(-1))
    assert cos.min() >= 0.9999, f"worst position {int(cos.argmin())}: {float(cos.min())}"


def test_prefill_then_decode_matches_longer_prefill(model32):
    ids = _ids(140, seed=3)
    model32.reset()
    full = model32.forward(ids, 0, all_positions=True)[0]
    model32.reset()
    model32.forward(ids[:, :130], 0)
    for p in range(130, 140):
        out = model32.forward(ids[:, p:p + 1], p)[0]
        assert torch.nn.functional.cosine_similarity(out, full[p], dim=0) >= 0.9999


def test_bf16_official_numerics_run_and_differ_from_fp32_only_slightly(tiny_dir, model32):
    ids = _ids(40, seed=5)
    bf = ReferenceModel(Checkpoint(tiny_dir), act=torch.bfloat16, max_len=64)
    a = bf.forward(ids, 0)
    model32.reset()
    b = model32.forward(ids, 0)
    assert a.dtype == torch.float32 and a.shape == (1, 1024)
    assert torch.nn.functional.cosine_similarity(a.double(), b, dim=-1).item() > 0.99


def test_mtp_block_drafts_from_the_last_streams(model32):
    ids = _ids(20, seed=7)
    model32.reset()
    h = model32.hidden(ids, 0)
    logits = model32.mtp[0].draft(h, 0, ids)
    assert logits.shape == (1, 1024) and torch.isfinite(logits).all()


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_dir):
    ids = _ids(64, seed=9)
    ck = Checkpoint(tiny_dir)
    cpu = ReferenceModel(ck, act=torch.float32, max_len=80).forward(ids, 0)
    gpu = ReferenceModel(ck, device="cuda", act=torch.float32, max_len=80).forward(ids, 0).cpu()
    assert torch.nn.functional.cosine_similarity(cpu, gpu, dim=-1).item() > 0.9999
    bf = ReferenceModel(ck, device="cuda", act=torch.bfloat16, max_len=80)
    out = [bf.forward(ids, 0)]
    out.append(bf.forward(torch.tensor([[5]]), 64))
    assert all(torch.isfinite(o).all() for o in out)
