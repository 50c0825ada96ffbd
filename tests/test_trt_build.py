"""`dsv4 build` with backend tensorrt-rtx on a machine without a GPU: the tiny model's every layer program
kind exported to ONNX and built into an sm_121 engine by TensorRT-RTX (in child processes), the manifest
naming each layer's engine and I/O; a rebuild reuses everything; a failing engine build is one message."""
import json
from pathlib import Path

import pytest

from builder.build import build
from builder.programs import decode
from builder.recipe import load_recipe
from runtime import trt_support
from runtime.errors import UserError

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-rtx.toml"
pytest.importorskip("onnx")
if "tensorrt-rtx" not in trt_support.available_backends():
    pytest.skip("TensorRT-RTX is not installed (pip install -e '.[test]')", allow_module_level=True)


@pytest.fixture(scope="module")
def rtx_built(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtx") / "tiny-rtx"
    return out, build(load_recipe(RECIPE), tiny_dir, out)


@pytest.mark.slow
def test_every_layer_program_has_an_sm121_engine(rtx_built, tiny_dir):
    from builder.checkpoint import Checkpoint
    out, _ = rtx_built
    cfg = Checkpoint(tiny_dir).config
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "tensorrt-rtx" and m["gpu_archs"] == ["sm_121a"]
    assert m["versions"]["tensorrt-rtx"].startswith("1.7")
    kinds = {decode.program_kind(cfg, e["layer"]) for e in m["layers"]}
    assert len(kinds) == 5 and len(m["layers"]) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    files = {f["path"]: f["bytes"] for f in m["files"]}
    for entry in m["layers"]:
        engine = entry["engine"]
        assert engine["file"] == f"engines/{entry['kind']}.engine" and files[engine["file"]] > 100_000
        assert entry["programs"] == {"1": engine["file"]} and engine["profiles"] == {"1": 0}
        names_in = [n for n, _, _ in engine["inputs"]]
        names_out = [n for n, _, _ in engine["outputs"]]
        assert names_in[:4] == ["h", "pos", "ids", "table"] and names_out[0] == "out"
        assert {f"cache_{c}" for c in entry["caches"]} <= set(names_in)
        assert names_out[1:] == [f"new_cache_{c}" for c in sorted(entry["caches"])]
        assert {n: d for n, _, d in engine["inputs"]}["h"] == "bfloat16"
    assert sorted(p for p in files if p.startswith("engines/")) == sorted(f"engines/{k}.engine" for k in kinds)


@pytest.mark.slow
def test_engine_inputs_are_what_the_runtime_binds(rtx_built):
    """Every engine input is one of the tensors the decode chain hands a layer (its weights file, the shared
    weights of an MTP block, its caches), with that tensor's shape and dtype."""
    from safetensors import safe_open

    from runtime.trt_executor import bindings
    out, _ = rtx_built
    m = json.loads((out / "manifest.json").read_text())
    for entry in m["layers"]:
        with safe_open(out / entry["weights"], "pt") as f:
            weights = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            shapes = {k: (list(s.get_shape()), s.get_dtype()) for k, s in weights.items()}
        with safe_open(out / "dense.safetensors", "pt") as f:
            shapes |= {k: (list(f.get_slice(k).get_shape()), "shared") for k in entry["shared_weights"]}
        caches = {k: ([-1, *shape[1:]], dtype) for k, (shape, dtype, _) in entry["caches"].items()}
        given = bindings("h", "pos", "ids", "table", caches, shapes)
        engine_inputs = {n: (shape, dtype) for n, shape, dtype in entry["engine"]["inputs"]}
        assert set(engine_inputs) == set(given), entry["kind"]
        for name, (shape, dtype) in engine_inputs.items():
            if name.startswith(("cache_", "w_")):
                want_shape, want_dtype = given[name]
                assert shape == want_shape, name
                short = {"BF16": "bfloat16", "F32": "float32", "F8_E4M3": "float8_e4m3fn", "U8": "float8_e4m3fn",
                         "I32": "int32", "F64": "float64"}.get(want_dtype, want_dtype)
                assert want_dtype == "shared" or dtype == short, (name, dtype, want_dtype)


@pytest.mark.slow
def test_rebuild_reuses_onnx_and_engines(rtx_built, tiny_dir):
    out, _ = rtx_built
    summary = build(load_recipe(RECIPE), tiny_dir, out)
    assert summary.made == [] and any(p.startswith("engines/") for p in summary.reused)


def test_failed_engine_build_is_one_message(tmp_path):
    from builder.backends import trt_program
    bad = tmp_path / "layer-x.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match=r"^tensorrt-rtx engine for layer-x: TensorRT could not parse layer-x.onnx"):
        trt_program.build_engine("tensorrt-rtx", ("sm_121a",), (1,), bad, tmp_path / "x.engine",
                                 tmp_path / "timing.cache")
    assert not (tmp_path / "x.engine").exists()


def test_full_tensorrt_needs_the_target_gpu(tiny_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = replace(load_recipe(RECIPE), backend="tensorrt")
    with pytest.raises(UserError, match="backend 'tensorrt' builds engines on the GPU they target"):
        build(recipe, tiny_dir, tmp_path / "out")


def test_tensorrt_builds_need_bfloat16(tiny_dir, tmp_path):
    from dataclasses import replace
    with pytest.raises(UserError, match="backend 'tensorrt-rtx' builds bfloat16 programs"):
        build(replace(load_recipe(RECIPE), dtype="float32"), tiny_dir, tmp_path / "out")


@pytest.mark.slow
def test_running_an_rtx_artifact_without_its_gpu_is_one_message(rtx_built, tmp_path):
    import subprocess
    import sys
    out, _ = rtx_built
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "run", str(out), "--prompt", "Hello", "--max-new", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sm_121a" in r.stderr and "no CUDA GPU" in r.stderr
