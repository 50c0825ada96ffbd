from pathlib import Path

import pytest
import torch

from builder.presets import preset
from builder.recipe import RecipeError, load_recipe, parse_recipe
from runtime.errors import UserError
from runtime.manifest import Machine

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_parse_and_fit(path):
    r = load_recipe(path)
    model = "tiny" if r.source == "tiny" else "pro" if "pro" in r.name else "flash"
    r.check_fits(preset(model))


def test_flash_gb10_keeps_about_a_quarter_of_experts_off_device():
    r = load_recipe(RECIPES / "dsv4-flash-gb10.toml")
    cfg = preset("flash")
    off = 1 - r.expert_slots / (cfg.num_hidden_layers * cfg.n_routed_experts)
    assert 0.2 < off < 0.4 and r.gpu_archs == ("sm_121a",)


def test_the_gb10_recipes_differ_only_in_backend_and_prefill_programs():
    aoti, trt = (load_recipe(RECIPES / f"dsv4-flash-gb10{s}.toml") for s in ("", "-tensorrt"))
    assert (aoti.backend, trt.backend) == ("aoti", "tensorrt") and aoti.prefill_buckets and not trt.prefill_buckets
    same = ("source", "device", "gpu_archs", "dtype", "decode_batch_buckets", "prefill_chunk", "max_context",
            "memory_budget_gib", "expert_slots")
    assert [getattr(aoti, k) for k in same] == [getattr(trt, k) for k in same]


def test_an_aoti_gpu_build_is_refused_on_a_gpu_its_recipe_does_not_target(monkeypatch):
    """AOTInductor compiles for the GPU it builds on: an sm_121a recipe built on an H200 would load on a GB10
    and fail there in its first program."""
    import builder.build as stages
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stages.Machine, "this", staticmethod(lambda: Machine("sm_90")))
    with pytest.raises(UserError, match="this GPU is sm_90, the recipe targets sm_121a"):
        stages._check_device(load_recipe(RECIPES / "dsv4-flash-gb10.toml"))
    assert stages._check_device(load_recipe(RECIPES / "dsv4-flash-h200.toml")) == {}


GOOD = {"model": {"source": "tiny"}, "build": {"backend": "aoti", "device": "cpu"},
        "runtime": {"max_context": 64, "memory_budget_gib": 1}}


@pytest.mark.parametrize("change, key", [
    ({"build": {"backend": "onnx", "device": "cpu"}}, "build.backend"),
    ({"build": {"backend": "aoti", "device": "cpu", "speed": 3}}, "build.speed"),
    ({"runtime": {"max_context": "long", "memory_budget_gib": 1}}, "runtime.max_context"),
    ({"runtime": {"memory_budget_gib": 1}}, "runtime.max_context"),
    ({"runtime": {"max_context": 64, "memory_budget_gib": 1, "decode_batch_buckets": [0]}},
     "runtime.decode_batch_buckets"),
    ({"runtime": {"max_context": 64, "memory_budget_gib": 1, "prefill_buckets": [256]}},
     "runtime.prefill_buckets"),                                      # not below prefill_chunk (256)
    ({"build": {"backend": "tensorrt", "device": "cpu"}}, "build.device"),
    ({"build": {"backend": "aoti", "device": "cuda"}}, "build.gpu_archs"),
    ({"extras": {}}, "[extras]"),
    ({"runtime": {"max_context": 64, "memory_budget_gib": 1, "draft_tokens": 2}}, "runtime.draft_tokens"),
], ids=["backend", "unknown-key", "type", "missing", "buckets", "prefill-buckets", "trt-on-cpu", "no-arch",
        "section", "draft-tokens"])
def test_bad_recipes_name_the_key(change, key):
    with pytest.raises(RecipeError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe({**GOOD, **change}, "t")


def test_prefill_buckets_are_sorted_once():
    r = parse_recipe({**GOOD, "runtime": {**GOOD["runtime"], "prefill_buckets": [128, 16, 128]}}, "r")
    assert r.prefill_buckets == (16, 128) and parse_recipe(GOOD, "r").prefill_buckets == ()


def test_budget_too_small_is_refused():
    r = parse_recipe({**GOOD, "runtime": {"max_context": 64, "memory_budget_gib": 100, "expert_slots": 11000}}, "t")
    with pytest.raises(RecipeError, match="memory_budget_gib"):
        r.check_fits(preset("flash"))


def test_drafts_add_the_mtp_prefill_sizes():
    """draft_tokens 1 (the default): the MTP block gets 2-token and window-sized prefill programs (the main
    layers' verification has a program of its own, builder/programs/verify.py); 0: none."""
    from builder.build import _drafts, _prefill_sizes
    from builder.presets import preset
    cfg = preset("tiny")
    r = parse_recipe({**GOOD, "runtime": {**GOOD["runtime"], "prefill_buckets": [8]}}, "r")
    assert r.draft_tokens == 1 and _drafts(r, cfg) and _prefill_sizes(r, cfg) == ((8,), (2, cfg.sliding_window))
    off = parse_recipe({**GOOD, "runtime": {**GOOD["runtime"], "prefill_buckets": [8], "draft_tokens": 0}}, "r")
    assert not _drafts(off, cfg) and _prefill_sizes(off, cfg) == ((8,), ())
