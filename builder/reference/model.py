"""The reference DeepSeek V4 model: plain torch, faithful to DeepSeek's official inference code.

It is the ground truth for layer programs, kernels and backends. Usage:

    model = ReferenceModel(Checkpoint(path), device="cpu")
    model.reset(batch=1)
    logits = model.forward(prompt_ids, start=0)          # prefill, logits of the last position
    logits = model.forward(next_id[:, None], start=n)   # one decode step at position n

Weights are read through the checkpoint's memory maps; routed experts are read when used.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from plugins.oracle import FP8Linear, hc_head, hc_post, hc_pre, rms_norm, wide, wide_dtype

from ..config import ModelConfig
from .attention import Attention
from .moe import MoE
from .rope import rope_table

Weights = Callable[[str], torch.Tensor]


class Block:
    """One transformer layer: attention and MoE, each wrapped in hyper-connections."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, act: torch.dtype,
                 rot: torch.Tensor):
        self.cfg = cfg
        self.attn_norm = w(f"{prefix}attn_norm.weight")
        self.ffn_norm = w(f"{prefix}ffn_norm.weight")
        self.hc = {k: [w(f"{prefix}hc_{k}_{part}") for part in ("fn", "scale", "base")]
                   for k in ("attn", "ffn")}
        self.attn = Attention(cfg, w, prefix, layer, act, rot)
        self.moe = MoE(cfg, w, prefix, layer, act)

    def __call__(self, x: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
        # x: [b, s, hc, d] hidden streams
        eps = self.cfg.rms_norm_eps
        y, post, comb = hc_pre(x, *self.hc["attn"], self.cfg)
        x = hc_post(self.attn(rms_norm(y, self.attn_norm, eps), start), x, post, comb)
        y, post, comb = hc_pre(x, *self.hc["ffn"], self.cfg)
        return hc_post(self.moe(rms_norm(y, self.ffn_norm, eps), ids), x, post, comb)


class Head:
    """hc streams -> float32 logits: hc collapse, RMSNorm, the vocabulary projection in float32."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, weight: torch.Tensor):
        self.cfg, self.weight = cfg, weight
        self.fn, self.scale, self.base = (w(f"{prefix}hc_head_{p}") for p in ("fn", "scale", "base"))
        self.norm = w(f"{prefix}norm.weight")

    def __call__(self, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        y = rms_norm(hc_head(x, self.fn, self.scale, self.base, self.cfg), self.norm, self.cfg.rms_norm_eps)
        return F.linear(wide(y if all_positions else y[:, -1]), self.weight)


class MTPBlock(Block):
    """Multi-token prediction block: embeds the next token and the main model's last streams,
    runs one more layer and drafts the token after next with its own hc head and norm."""

    def __init__(self, cfg: ModelConfig, w: Weights, j: int, act: torch.dtype, rot: torch.Tensor,
                 embed: torch.Tensor, head_weight: torch.Tensor):
        prefix = f"mtp.{j}."
        super().__init__(cfg, w, prefix, cfg.num_hidden_layers + j, act, rot)
        self.embed = embed
        self.e_proj = FP8Linear(w(f"{prefix}e_proj.weight"), w(f"{prefix}e_proj.scale"), act)
        self.h_proj = FP8Linear(w(f"{prefix}h_proj.weight"), w(f"{prefix}h_proj.scale"), act)
        self.enorm = w(f"{prefix}enorm.weight")
        self.hnorm = w(f"{prefix}hnorm.weight")
        self.head = Head(cfg, w, prefix, head_weight)

    def draft(self, h: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        e = rms_norm(F.embedding(ids, self.embed), self.enorm, eps)
        x = self.e_proj(e)[:, :, None] + self.h_proj(rms_norm(h, self.hnorm, eps))
        return self.head(super().__call__(x, start, ids))


class ReferenceModel:
    def __init__(self, source: Callable[[str], torch.Tensor] | object, config: ModelConfig | None = None,
                 device: str | torch.device = "cpu", act: torch.dtype = torch.bfloat16, max_len: int = 4096):
        """`source` is a `Checkpoint` (or any name -> tensor function); `act` the activation dtype
        (bfloat16: the official numerics); `max_len` bounds the context the caches hold."""
        cfg = config or source.config
        get = source.get if hasattr(source, "get") else source
        self.cfg, self.act, self.device, self.max_len = cfg, act, torch.device(device), max_len

        working = wide_dtype(act)

        def w(name: str) -> torch.Tensor:
            """A tensor on the device; bf16/f32 ones (norms, hc, compressors, head, ...) become float32
            parameters as in the official code (float64 for a float64 model)."""
            t = get(name).to(self.device)
            return t.to(working) if t.dtype in (torch.bfloat16, torch.float32) else t

        self.embed = w("embed.weight").to(act)
        head_weight = w("head.weight")
        self.head = Head(cfg, w, "", head_weight)
        rot = {c: rope_table(cfg, c, max_len, str(self.device)) for c in (False, True)}
        self.layers = [Block(cfg, w, f"layers.{i}.", i, act, rot[cfg.ratio(i) > 0])
                       for i in range(cfg.num_hidden_layers)]
        self.mtp = [MTPBlock(cfg, w, j, act, rot[False], self.embed, head_weight)
                    for j in range(cfg.num_nextn_predict_layers)]
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Empty every cache (window rings, compressed rows, compressor states) for a new sequence."""
        for block in self.layers + self.mtp:
            block.attn.reset(batch, self.max_len, self.device)

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids [b, s] at positions start.. -> last hidden streams [b, s, hc, d]. Prefill needs start 0."""
        if ids.dim() != 2:
            raise ValueError("ids must be [batch, seq]")
        s = ids.size(1)
        if start > 0 and s != 1:
            raise ValueError("after the prefill, tokens are fed one at a time (as the official code)")
        if start + s > self.max_len:
            raise ValueError(f"position {start + s} exceeds the context of {self.max_len} tokens")
        ids = ids.to(self.device)
        h = F.embedding(ids, self.embed)[:, :, None].repeat(1, 1, self.cfg.hc_mult, 1)
        for block in self.layers:
            h = block(h, start, ids)
        return h

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int = 0, all_positions: bool = False) -> torch.Tensor:
        """float32 logits of the last position [b, vocab] (or of every position [b, s, vocab])."""
        return self.head(self.hidden(ids, start), all_positions)
