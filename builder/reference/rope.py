"""RoPE tables of a layer: YaRN on `compress_rope_theta` for compressed-attention layers, plain
`rope_theta` for pure sliding-window layers, as DeepSeek's `precompute_freqs_cis`."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..config import ModelConfig


def yarn_correction_range(cfg: ModelConfig, base: float, dim: int) -> tuple[int, int]:
    """YaRN's [low, high] ramp over rotary pair indices, as DeepSeek's reference computes it."""
    def corr(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = math.floor(corr(cfg.rope_beta_fast))
    high = math.ceil(corr(cfg.rope_beta_slow))
    return max(low, 0), min(high, dim - 1)


@lru_cache(maxsize=8)
def rope_table(cfg: ModelConfig, compressed: bool, length: int, device: str) -> torch.Tensor:
    """float32 [length, rope_dim/2, 2] rotations as (cos, sin) pairs: the real and imaginary parts of
    DeepSeek's complex64 `freqs_cis`. Compressed-attention layers use YaRN on `compress_rope_theta`; pure
    sliding-window layers use `rope_theta` without YaRN."""
    dim = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if compressed:
        low, high = yarn_correction_range(cfg, base, dim)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(length), freqs)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(device)
