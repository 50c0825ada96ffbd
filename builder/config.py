"""DeepSeek V4 model config: Hugging Face `config.json` parsed once into one frozen dataclass.

Field names are the real HF keys; `rope_scaling` is flattened into `rope_*` fields. Every
other part of the project receives a `ModelConfig`; nothing re-reads the JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import UserError, read_json


class ConfigError(UserError, ValueError):
    """A config that cannot describe a DeepSeek V4 model; the message names the field."""


FP8_BLOCK = 128      # FP8 weight blocks (out x in) and FP8 activation blocks
MXFP4_BLOCK = 32     # MXFP4 scale block along K, and the indexer's FP4 activation block
KV_FP8_BLOCK = 64    # FP8 round-trip block of the non-rope KV dims


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    sliding_window: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    num_hash_layers: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    rope_original_max_position: int
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    swiglu_limit: float = 0.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    expert_dtype: str = "fp4"

    # ---- derived sizes, named once ----
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_mix(self) -> int:
        """Rows of hc_*_fn: hc pre weights, hc post weights and the hc x hc comb matrix."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def n_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (MTP layers continue the numbering)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def to_json(self) -> dict[str, Any]:
        """The HF-style dict this config was parsed from (round-trips through `parse_config`)."""
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        d["rope_scaling"] = {
            "type": "yarn", "factor": d.pop("rope_factor"),
            "original_max_position_embeddings": d.pop("rope_original_max_position"),
            "beta_fast": d.pop("rope_beta_fast"), "beta_slow": d.pop("rope_beta_slow"),
        }
        d["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        d["torch_dtype"] = "bfloat16"
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


# Fields that are not plain top-level keys of config.json (parsed by hand below).
_NOT_TOP_LEVEL = ("compress_ratios", "expert_dtype", "rope_factor", "rope_original_max_position",
                  "rope_beta_fast", "rope_beta_slow")


def _get(raw: dict, key: str, kind: type, default: Any = dataclasses.MISSING, where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in raw or raw[key] is None:
        if default is dataclasses.MISSING:
            raise ConfigError(f"config field '{name}' is missing")
        return default
    value = raw[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{name}' must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}' must be a string, got {value!r}")
        return value
    raise AssertionError(kind)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate an HF config dict and build the one `ModelConfig`. Errors name the field."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    if "text_config" in raw and "hidden_size" not in raw:
        raise ConfigError("config has 'text_config': multimodal DeepSeek configs are not supported")
    kinds = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in _NOT_TOP_LEVEL:
            continue
        kind = {"int": int, "float": float, "bool": bool, "str": str}[kinds[f.name]]
        values[f.name] = _get(raw, f.name, kind, f.default)

    ratios = raw.get("compress_ratios")
    if ratios is None:
        raise ConfigError("config field 'compress_ratios' is missing")
    if not isinstance(ratios, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ratios):
        raise ConfigError(f"config field 'compress_ratios' must be a list of integers, got {ratios!r}")
    values["compress_ratios"] = tuple(ratios)

    scaling = raw.get("rope_scaling")
    if not isinstance(scaling, dict):
        raise ConfigError("config field 'rope_scaling' is missing (DeepSeek V4 uses YaRN)")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type' must be 'yarn', got {kind!r}")
    values["rope_factor"] = _get(scaling, "factor", float, where="rope_scaling.")
    values["rope_original_max_position"] = _get(
        scaling, "original_max_position_embeddings", int, where="rope_scaling.")
    values["rope_beta_fast"] = _get(scaling, "beta_fast", float, 32.0, where="rope_scaling.")
    values["rope_beta_slow"] = _get(scaling, "beta_slow", float, 1.0, where="rope_scaling.")

    values["expert_dtype"] = _expert_dtype(raw)
    if "num_nextn_predict_layers" not in raw:
        values["num_nextn_predict_layers"] = max(len(ratios) - values["num_hidden_layers"], 0)
    cfg = ModelConfig(**values)
    _validate(cfg)
    return cfg


def _expert_dtype(raw: dict) -> str:
    quant = raw.get("quantization_config")
    if quant is None:
        raise ConfigError("config field 'quantization_config' is missing (expected the FP8/MXFP4 release)")
    if not isinstance(quant, dict):
        raise ConfigError("config field 'quantization_config' must be an object")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config field 'quantization_config.quant_method' must be 'fp8', got {method!r}")
    block = quant.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if list(block) != [FP8_BLOCK, FP8_BLOCK]:
        raise ConfigError(f"config field 'quantization_config.weight_block_size' must be [128, 128], got {block!r}")
    scale_fmt = quant.get("scale_fmt", "ue8m0")
    if scale_fmt != "ue8m0":
        raise ConfigError(f"config field 'quantization_config.scale_fmt' must be 'ue8m0', got {scale_fmt!r}")
    expert = raw.get("expert_dtype", quant.get("expert_dtype", "fp4"))
    if expert != "fp4":
        raise ConfigError(f"config field 'expert_dtype' must be 'fp4' (MXFP4 experts), got {expert!r}")
    return expert


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config field '{field}' = {getattr(c, field)!r}: {why}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "qk_rope_head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window",
                 "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "index_n_heads",
                 "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters"):
        need(getattr(c, name) > 0, name, "must be positive")
    need(c.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek V4 attention has one shared KV head")
    need(c.n_shared_experts == 1, "n_shared_experts", "exactly one shared expert is supported")
    need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok", "exceeds n_routed_experts")
    need(0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers", "must be within num_hidden_layers")
    need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotated in pairs)")
    need(c.qk_rope_head_dim < c.head_dim, "qk_rope_head_dim", "must be smaller than head_dim")
    need(c.nope_head_dim % 64 == 0, "head_dim", "head_dim - qk_rope_head_dim must be a multiple of 64 (FP8 KV blocks)")
    need(c.qk_rope_head_dim <= c.index_head_dim, "index_head_dim", "must hold the rope dims")
    need(c.index_head_dim & (c.index_head_dim - 1) == 0 and c.index_head_dim % MXFP4_BLOCK == 0,
         "index_head_dim", "must be a power of two and a multiple of 32 (Hadamard, FP4 blocks)")
    for name in ("hidden_size", "q_lora_rank", "moe_intermediate_size"):
        need(getattr(c, name) % FP8_BLOCK == 0, name, "must be a multiple of 128 (FP8 activation blocks)")
    need((c.num_attention_heads * c.head_dim) % c.o_groups == 0, "o_groups", "must divide heads x head_dim")
    need(c.num_attention_heads % c.o_groups == 0, "o_groups", "must divide num_attention_heads")
    need((c.o_groups * c.o_lora_rank) % FP8_BLOCK == 0, "o_lora_rank",
         "o_groups x o_lora_rank must be a multiple of 128")
    need(c.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func",
         "must be sqrtsoftplus, sigmoid or softmax")
    need(c.rope_factor >= 1, "rope_factor", "YaRN factor must be >= 1")
    need(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(len(c.compress_ratios) == c.n_layers_total, "compress_ratios",
         f"needs one entry per layer incl. MTP ({c.n_layers_total}), has {len(c.compress_ratios)}")
    for i, r in enumerate(c.compress_ratios):
        if r != 0 and r < 2:
            raise ConfigError(f"config field 'compress_ratios[{i}]' = {r}: must be 0 or >= 2")
    for i in range(c.num_hidden_layers, c.n_layers_total):
        if c.compress_ratios[i] != 0:
            raise ConfigError(f"config field 'compress_ratios[{i}]' = {c.compress_ratios[i]}: MTP layers use ratio 0")


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return parse_config(read_json(path, ConfigError, f"no config file at {path}"))
