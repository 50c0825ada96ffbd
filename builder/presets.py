"""Named model configs: the embedded `tiny` test model and DeepSeek V4 Flash / Pro sizes.

`flash` and `pro` are the shapes of the official releases (HF config.json field names); a
synthetic checkpoint at Flash size may keep only the first N layers.
"""
from __future__ import annotations

import copy
from typing import Any

from .config import ConfigError, ModelConfig, parse_config

_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

FLASH: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_nextn_predict_layers": 1,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8, "sliding_window": 128,
    "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
    "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "norm_topk_prob": True,
    "num_hash_layers": 3, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "rope_theta": 10000, "compress_rope_theta": 160000, "rope_scaling": _YARN,
    "max_position_embeddings": 1048576,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "quantization_config": _QUANT, "torch_dtype": "bfloat16",
}

PRO: dict[str, Any] = {
    **FLASH, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "q_lora_rank": 1536, "o_lora_rank": 1024, "o_groups": 16, "n_routed_experts": 384,
    "moe_intermediate_size": 3072, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}

# Small enough for CPU tests, yet with every layer kind: hash-routed ratio 0 and ratio 4, ratio 128,
# a score-routed ratio-4 layer with an indexer that really selects, and an MTP block.
TINY: dict[str, Any] = {
    **FLASH, "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 5, "num_nextn_predict_layers": 1,
    "num_attention_heads": 4, "head_dim": 128, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2,
    "sliding_window": 16, "n_routed_experts": 16, "num_experts_per_tok": 6, "moe_intermediate_size": 128,
    "index_n_heads": 4, "index_head_dim": 128, "index_topk": 8, "max_position_embeddings": 4096,
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
