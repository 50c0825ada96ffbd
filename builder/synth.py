"""Synthetic checkpoints in exactly the official layout: names, dtypes, MXFP4/FP8 packing, shards,
index, config.json and a tokenizer.json, with random but realistically scaled weights.

Shards are written one layer at a time (never the whole model in memory) into a temporary folder
that replaces the output only once everything is written.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from plugins.formats import E2M1_VALUES, fp8_weight_quant

from .checkpoint import INDEX_FILE
from .config import MXFP4_BLOCK, ModelConfig, parse_config
from .layout import TensorSpec, checkpoint_specs, layer_of
from .tokenizer_train import train_tokenizer

_E2M1_RMS = math.sqrt(sum(v * v for v in E2M1_VALUES) / len(E2M1_VALUES))


def _mxfp4(spec: TensorSpec, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random E2M1 codes with per-block E8M0 scales near 1/sqrt(fan_in) (+-1 octave)."""
    out, half = spec.shape
    packed = torch.randint(0, 256, (out, half), generator=g, device=g.device, dtype=torch.int32).to(torch.uint8).view(torch.int8)
    target = round(math.log2(1.0 / (math.sqrt(spec.fan_in) * _E2M1_RMS)))
    jitter = torch.randint(-1, 2, (out, spec.fan_in // MXFP4_BLOCK), generator=g, device=g.device)
    scale = (127 + target + jitter).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed, scale


def _dense(spec: TensorSpec, g: torch.Generator, hc: int) -> torch.Tensor:
    """A float32 value for a non-packed tensor, scaled by its role."""
    name, shape = spec.name, spec.shape
    randn = lambda *s: torch.randn(*s, generator=g, device=g.device)  # noqa: E731
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * randn(*shape)
    if name == "embed.weight":
        return 0.5 * randn(*shape)
    if name.endswith("_fn"):                          # hyper-connection mixes of order 1
        return randn(*shape) / math.sqrt(shape[1])
    if name.endswith("_scale") and "hc_" in name:
        return 0.5 + 0.5 * torch.rand(*shape, generator=g, device=g.device)
    if name.endswith("_base"):
        base = 0.5 * randn(*shape)
        if shape[0] > hc:
            # Residual-dominated streams, as in a trained model: each sub-layer adds a modest update
            # (post = 2*sigmoid(~-2) ~ 0.25) and the comb matrix mostly keeps each stream in place.
            base[hc:2 * hc] -= 2.0
            base[2 * hc:] += 2.0 * torch.eye(hc, device=g.device).flatten()
        return base
    if name.endswith("attn_sink"):
        return randn(*shape)
    if name.endswith(".ape"):
        return 0.5 * randn(*shape)
    if name.endswith("gate.bias"):
        return 0.1 * randn(*shape)
    if spec.fan_in:
        return randn(*shape) / math.sqrt(spec.fan_in)
    raise AssertionError(f"no initialiser for {name}")


def _expert_bias(cfg: ModelConfig, g: torch.Generator, skew: float) -> torch.Tensor:
    """[experts] float32: -skew * ln(1 + rank) for a random ranking of a layer's experts. Added to the
    router's choice, it makes a few experts hot, as routing over one sequence of a trained model is (random
    weights alone route near uniformly, which no expert cache can beat)."""
    rank = torch.randperm(cfg.n_routed_experts, generator=g, device=g.device).float()
    return -skew * torch.log1p(rank)


def _tensors(cfg: ModelConfig, specs: list[TensorSpec], g: torch.Generator,
             routing_skew: float = 0.0) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.kind in ("fp8_scale", "mxfp4_scale"):
            continue                                  # written with their weight
        base = spec.name.removesuffix(".weight")
        if spec.kind == "fp8":
            out[spec.name], out[f"{base}.scale"] = fp8_weight_quant(_dense(spec, g, cfg.hc_mult))
        elif spec.kind == "mxfp4":
            out[spec.name], out[f"{base}.scale"] = _mxfp4(spec, g)
        elif spec.kind == "i64":                      # hash routing: distinct experts per token id
            if routing_skew > 0:                      # chosen as a router would, from random scores + the skew
                scores = torch.randn(cfg.vocab_size, cfg.n_routed_experts, generator=g, device=g.device)
                chooser = torch.nn.functional.softplus(scores).sqrt() + _expert_bias(cfg, g, routing_skew)
                out[spec.name] = chooser.topk(cfg.num_experts_per_tok, dim=-1)[1].contiguous()
                continue
            order = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g, device=g.device).argsort(-1)
            out[spec.name] = order[:, :cfg.num_experts_per_tok].contiguous()
        else:
            value = _dense(spec, g, cfg.hc_mult)
            if routing_skew > 0 and spec.name.endswith("gate.bias"):
                value = value + _expert_bias(cfg, g, routing_skew)
            out[spec.name] = value.to(torch.bfloat16 if spec.dtype == "BF16" else torch.float32)
    return {name: t.cpu() for name, t in out.items()}


def write_synthetic(config_json: dict[str, Any], out: str | Path, seed: int = 0,
                    tokenizer_vocab: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None, device: str = "cpu",
                    routing_skew: float = 0.0) -> Path:
    """Write a synthetic checkpoint for `config_json` (HF config dict) into folder `out`. The weights are
    drawn on `device` (a GPU draws Flash-size layers many times faster); a seed gives the same weights on
    the same kind of device only, as torch's CPU and CUDA generators differ. `routing_skew` > 0 makes some
    routed experts hot in every layer (`_expert_bias`); 0 leaves routing near uniform."""
    if routing_skew < 0:
        raise ValueError(f"routing_skew must be >= 0, got {routing_skew}")
    cfg = parse_config(config_json)
    out = Path(out)
    groups: dict[str, list[TensorSpec]] = {}
    for spec in checkpoint_specs(cfg):
        groups.setdefault(layer_of(spec.name), []).append(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        g = torch.Generator(device).manual_seed(seed)
        weight_map, total = {}, 0
        n = len(groups)
        for i, specs in enumerate(groups.values()):
            shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = _tensors(cfg, specs, g, routing_skew)
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({name: shard for name in tensors})
            if progress:
                progress("writing shards", i + 1, n)
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        vocab = min(cfg.vocab_size, tokenizer_vocab or cfg.vocab_size, 8192)
        train_tokenizer(vocab).save(str(tmp / "tokenizer.json"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
