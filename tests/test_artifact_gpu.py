"""The tiny model built with aoti for CUDA (recipes/tiny-h200.toml) and run from its artifact on the GPU:
against the reference in bfloat16, with and without the captured decode graph, and against eager."""
from pathlib import Path

import pytest
import torch

from builder.build import build
from builder.checkpoint import Checkpoint
from builder.forced import forced_logits
from builder.programs.decode import make_program
from builder.recipe import load_recipe
from builder.reference.model import ReferenceModel
from runtime.artifact import ArtifactModel

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-h200.toml"
PROMPT, FORCED = [5, 17, 99, 300, 12] * 28, [3, 4, 5, 6, 7, 8]        # 140 tokens: a ratio-128 block completes

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-h200"
    build(load_recipe(RECIPE), tiny_dir, out)
    return out


def _cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_cuda_artifact_matches_the_reference(artifact, tiny_dir):
    model = ArtifactModel(artifact, "cuda", graphs=True)
    assert model.graph is not None
    got = forced_logits(model, PROMPT, FORCED)
    ref = forced_logits(ReferenceModel(Checkpoint(tiny_dir), device="cuda", act=torch.bfloat16, max_len=200),
                        PROMPT, FORCED)
    cos = _cosines(got, ref)
    assert cos.min() >= 0.999, cos
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 6 / 7, (got.argmax(-1), ref.argmax(-1))


def test_graph_replay_equals_plain_launches_and_eager(artifact, tiny_dir):
    graphed = forced_logits(ArtifactModel(artifact, "cuda", graphs=True), PROMPT, FORCED)
    plain = forced_logits(ArtifactModel(artifact, "cuda", graphs=False), PROMPT, FORCED)
    assert torch.equal(graphed, plain)
    cfg = Checkpoint(tiny_dir).config
    eager = forced_logits(ArtifactModel(artifact, "cuda", programs=lambda layer: make_program(
        cfg, layer, torch.bfloat16, 1024)), PROMPT, FORCED)
    assert _cosines(graphed, eager).min() >= 0.9999
