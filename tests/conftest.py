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
