"""Named model configs: the embedded `tiny` test model and DeepSeek V4 Flash / Pro sizes.

`flash` and `pro` are the shapes of the official releases (HF config.json field names); a
synthetic checkpoint at Flash size may keep only the first N layers.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, parse_config

_DATA = Path(__file__).parent / "data"
# The official Hugging Face config.json files of the releases, as published.
FLASH: dict[str, Any] = json.loads((_DATA / "dsv4-flash-config.json").read_text())
PRO: dict[str, Any] = json.loads((_DATA / "dsv4-pro-config.json").read_text())

# Small enough for CPU tests, yet with every layer kind: hash-routed ratio 0 and ratio 4, ratio 128,
# a score-routed ratio-4 layer with an indexer that really selects, and an MTP block.
TINY: dict[str, Any] = {
    **FLASH, "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 5, "num_nextn_predict_layers": 1,
    "num_attention_heads": 4, "head_dim": 128, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2,
    "sliding_window": 16, "n_routed_experts": 16, "num_experts_per_tok": 6, "moe_intermediate_size": 128,
    "index_n_heads": 16, "index_head_dim": 128, "index_topk": 8, "max_position_embeddings": 4096,
    "compress_ratios": [0, 0, 4, 128, 4, 0],
}

PRESETS = {"tiny": TINY, "flash": FLASH, "pro": PRO}


def preset_json(name: str, layers: int | None = None) -> dict[str, Any]:
    """The HF config dict of a named preset, optionally cut to its first `layers` layers (+ MTP)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(PRESETS)}")
    raw = copy.deepcopy(PRESETS[name])
    if layers is not None:
        n = raw["num_hidden_layers"]
        if not 1 <= layers <= n:
            raise ConfigError(f"--layers must be between 1 and {n} for '{name}', got {layers}")
        ratios = raw["compress_ratios"]
        raw["compress_ratios"] = ratios[:layers] + ratios[n:]
        raw["num_hidden_layers"] = layers
    return raw


def preset(name: str, layers: int | None = None) -> ModelConfig:
    return parse_config(preset_json(name, layers))
