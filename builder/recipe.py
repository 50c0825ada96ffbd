"""Build recipes: one TOML per model x target, parsed once into a validated frozen dataclass.

    [model]    source = "tiny" (the embedded synthetic model) or a checkpoint folder
    [build]    backend = "eager" | "aoti" | "tensorrt" | "tensorrt-rtx"; device = "cpu" | "cuda";
               gpu_archs = ["sm_90a", ...]; dtype = "bfloat16" (default) | "float32"
    [runtime]  decode_batch_buckets, prefill_chunk, prefill_buckets, max_context, memory_budget_gib,
               expert_slots, draft_tokens

Unknown keys and bad values are errors that name the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import UserError

from .config import ModelConfig
from .sizes import GIB, model_sizes

BACKENDS = ("eager", "aoti", "tensorrt", "tensorrt-rtx")
DEVICES = ("cpu", "cuda")
GPU_ARCHS = ("sm_90a", "sm_100a", "sm_120a", "sm_121a")


class RecipeError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str                       # "tiny" or a checkpoint folder (relative to the recipe file)
    backend: str
    device: str
    gpu_archs: tuple[str, ...]
    dtype: str                        # activation dtype: bfloat16 (DeepSeek's numerics) or float32
    decode_batch_buckets: tuple[int, ...]
    prefill_chunk: int
    # smaller prefill programs for a prompt's last (or only) chunk: a short prompt goes through the
    # smallest that holds it instead of being padded to a whole `prefill_chunk` (aoti builds: the only
    # backend with prefill programs)
    prefill_buckets: tuple[int, ...]
    max_context: int
    memory_budget_gib: float
    expert_slots: int                 # routed experts kept on the device; 0 = every expert resident
    # tokens the MTP block drafts per decode step for the model to verify (0: none; DeepSeek V4 has one MTP
    # block, which drafts one): aoti builds then add the programs of speculative decoding (runtime/speculative.py)
    draft_tokens: int = 1

    def check_fits(self, cfg: ModelConfig) -> None:
        """The budget must hold every non-expert weight plus the expert slots."""
        s = model_sizes(cfg)
        n_experts = cfg.num_hidden_layers * cfg.n_routed_experts
        if self.expert_slots > n_experts:
            raise RecipeError(f"recipe key 'runtime.expert_slots' = {self.expert_slots}: "
                              f"the model has only {n_experts} routed experts")
        slots = self.expert_slots or n_experts
        dense = s.checkpoint_bytes - n_experts * s.expert_bytes
        need = dense + slots * s.expert_bytes
        if need > self.memory_budget_gib * GIB:
            raise RecipeError(f"recipe key 'runtime.memory_budget_gib' = {self.memory_budget_gib:g}: weights need "
                              f"{need / GIB:.1f} GiB with {slots} expert slots")


_SCHEMA: dict[str, dict[str, type]] = {
    "model": {"source": str},
    "build": {"backend": str, "device": str, "gpu_archs": list, "dtype": str},
    "runtime": {"decode_batch_buckets": list, "prefill_chunk": int, "prefill_buckets": list, "max_context": int,
                "memory_budget_gib": float, "expert_slots": int, "draft_tokens": int},
}
_DEFAULTS: dict[str, Any] = {"gpu_archs": [], "dtype": "bfloat16", "decode_batch_buckets": [1], "prefill_chunk": 256,
                             "prefill_buckets": [], "expert_slots": 0, "draft_tokens": 1}


def parse_recipe(raw: dict[str, Any], name: str) -> Recipe:
    values: dict[str, Any] = {}
    for section in raw:
        if section not in _SCHEMA:
            raise RecipeError(f"recipe {name}: unknown section [{section}] (known: {', '.join(_SCHEMA)})")
    for section, keys in _SCHEMA.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"recipe {name}: '{section}' must be a table")
        for key in table:
            if key not in keys:
                raise RecipeError(f"recipe {name}: unknown key '{section}.{key}'")
        for key, kind in keys.items():
            if key not in table:
                if key not in _DEFAULTS:
                    raise RecipeError(f"recipe {name}: key '{section}.{key}' is missing")
                values[key] = _DEFAULTS[key]
                continue
            value = table[key]
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise RecipeError(f"recipe {name}: key '{section}.{key}' must be a {kind.__name__}, got {value!r}")
            values[key] = value

    def bad(key: str, why: str) -> RecipeError:
        return RecipeError(f"recipe {name}: key '{key}' = {values[key.split('.')[1]]!r}: {why}")

    if values["backend"] not in BACKENDS:
        raise bad("build.backend", f"choose one of {', '.join(BACKENDS)}")
    if values["device"] not in DEVICES:
        raise bad("build.device", f"choose one of {', '.join(DEVICES)}")
    if values["dtype"] not in ("bfloat16", "float32"):
        raise bad("build.dtype", "choose bfloat16 (DeepSeek's numerics) or float32")
    if any(a not in GPU_ARCHS for a in values["gpu_archs"]):
        raise bad("build.gpu_archs", f"each must be one of {', '.join(GPU_ARCHS)}")
    if values["backend"].startswith("tensorrt") and values["device"] != "cuda":
        raise bad("build.device", "TensorRT backends build for cuda")
    if values["device"] == "cuda" and not values["gpu_archs"]:
        raise bad("build.gpu_archs", "a cuda build needs at least one target architecture")
    def ints_in(xs: list, low: int, high: float) -> bool:       # TOML booleans are not sizes
        return all(isinstance(x, int) and not isinstance(x, bool) and low <= x <= high for x in xs)

    buckets = values["decode_batch_buckets"]
    if not buckets or not ints_in(buckets, 1, float("inf")):
        raise bad("runtime.decode_batch_buckets", "must be a non-empty list of positive integers")
    for key in ("prefill_chunk", "max_context"):
        if values[key] < 1:
            raise bad(f"runtime.{key}", "must be positive")
    sizes = values["prefill_buckets"]
    if not ints_in(sizes, 1, values["prefill_chunk"] - 1):
        raise bad("runtime.prefill_buckets", f"each must be an integer from 1 to prefill_chunk - 1 "
                                             f"({values['prefill_chunk'] - 1})")
    if values["memory_budget_gib"] <= 0:
        raise bad("runtime.memory_budget_gib", "must be positive")
    if values["expert_slots"] < 0:
        raise bad("runtime.expert_slots", "must be >= 0 (0 keeps every expert resident)")
    if values["draft_tokens"] not in (0, 1):
        raise bad("runtime.draft_tokens", "must be 0 (no drafts) or 1 (the MTP block drafts one token a step)")
    values["gpu_archs"] = tuple(values["gpu_archs"])
    values["decode_batch_buckets"] = tuple(sorted(set(buckets)))
    values["prefill_buckets"] = tuple(sorted(set(sizes)))
    return Recipe(name=name, **values)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None
    recipe = parse_recipe(raw, path.stem)
    if recipe.source != "tiny" and not Path(recipe.source).is_absolute():
        recipe = Recipe(**{**recipe.__dict__, "source": str((path.parent / recipe.source).resolve())})
    return recipe
