"""Synthetic checkpoints: what `routing_skew` does to the routing a benchmark's expert cache sees."""
import torch

from builder.checkpoint import Checkpoint
from builder.config import parse_config
from builder.presets import preset_json
from builder.reference.moe import route
from builder.synth import write_synthetic


def _top_quarter_share(experts: torch.Tensor, n: int) -> float:
    """Share of all routes that go to the quarter of experts used most."""
    counts = torch.bincount(experts.flatten().long(), minlength=n).float()
    return float(counts.sort(descending=True)[0][:n // 4].sum() / counts.sum())


def _shares(ckpt, cfg) -> tuple[float, float]:
    """(hash layer 0's tid2eid over the vocabulary, the first gate-routed layer over random inputs)."""
    ck = Checkpoint(ckpt)
    hash_share = _top_quarter_share(ck.get("layers.0.ffn.gate.tid2eid"), cfg.n_routed_experts)
    layer = cfg.num_hash_layers
    x = torch.randn(4000, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True))        # as after the ffn norm
    _, experts = route(cfg, x, ck.get(f"layers.{layer}.ffn.gate.weight"), ck.get(f"layers.{layer}.ffn.gate.bias"),
                       None, torch.zeros(len(x), dtype=torch.long))
    return hash_share, _top_quarter_share(experts, cfg.n_routed_experts)


def test_routing_skew_makes_a_few_experts_hot(tiny_dir, tmp_path):
    cfg = parse_config(preset_json("tiny"))
    plain = _shares(tiny_dir, cfg)
    skewed = _shares(write_synthetic(preset_json("tiny"), tmp_path / "skewed", seed=0, routing_skew=0.3), cfg)
    print(f"top-quarter share of routes (hash, gate): plain {plain}, skewed {skewed}")
    for p, s in zip(plain, skewed):
        assert p < 0.4 < s                  # a quarter of the experts take a quarter of the routes when uniform
