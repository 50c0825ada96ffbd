import shutil
import time
from pathlib import Path

import pytest
import torch

from builder.presets import preset_json
from builder.synth import write_synthetic


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded tiny model, synthesised once per test session."""
    return write_synthetic(preset_json("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def built(tiny_dir, tmp_path_factory):
    """recipes/tiny.toml built once per test session: (artifact folder, build seconds, build summary)."""
    from builder.build import build
    from builder.recipe import load_recipe
    out = tmp_path_factory.mktemp("art") / "tiny"
    t0 = time.time()
    summary = build(load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"), tiny_dir, out)
    return out, time.time() - t0, summary


@pytest.fixture(scope="session")
def fat_binary(tmp_path_factory):
    """The kernels' fat binary, built once per test session (nvcc only: no GPU needed)."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    from plugins.build import build
    return build(tmp_path_factory.mktemp("fatbin") / "k.fatbin")
