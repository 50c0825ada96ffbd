"""Attention of one DeepSeek V4 layer: sliding window + compressed rows (+ indexer on ratio-4 layers).

Caches follow the official layout: `kv` holds the window ring (row p % window) followed by one
compressed row per `ratio` tokens. Prefill starts at position 0; decode feeds one token at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from plugins.formats import fp8_weight_dequant
from plugins.oracle import (
    FP8Linear,
    einsum,
    fp4_roundtrip,
    fp8_kv_roundtrip,
    hadamard,
    linear,
    rms_norm,
    softmax_scale,
    sparse_attention,
    top_k,
    wide,
    with_rope,
)

from ..config import KV_FP8_BLOCK, ModelConfig

Weights = Callable[[str], torch.Tensor]


class Compressor:
    """Gated pooling of `ratio` consecutive tokens into one row (ratio 4: overlapping with the
    previous block's first half of channels, 2*ratio tokens in all). Computed in float32."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, ratio: int, dim: int, rotate: bool,
                 rot: torch.Tensor):
        self.cfg, self.ratio, self.dim, self.rotate, self.rot = cfg, ratio, dim, rotate, rot
        self.overlap = ratio == 4
        self.wkv, self.wgate, self.ape, self.norm = (
            w(f"{prefix}.{n}") for n in ("wkv.weight", "wgate.weight", "ape", "norm.weight"))

    def reset(self, batch: int, device) -> None:
        coff = 2 if self.overlap else 1
        shape = (batch, coff * self.ratio, coff * self.dim)
        # Partial-block state: with overlap, rows [:ratio] are the previous block, [ratio:] the current.
        self.kv_state = torch.zeros(shape, device=device, dtype=self.wkv.dtype)
        self.score_state = torch.full(shape, float("-inf"), device=device, dtype=self.wkv.dtype)

    def _overlap(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """[b, n, r, 2d] -> [b, n, 2r, d]: block i's own second half of channels after the first
        half of block i-1's (block 0 gets `fill`)."""
        b, n, r, _ = t.shape
        d = self.dim
        out = t.new_full((b, n, 2 * r, d), fill)
        out[:, :, r:] = t[..., d:]
        out[:, 1:, :r] = t[:, :-1, :, :d]
        return out

    def __call__(self, x: torch.Tensor, start: int, cache: torch.Tensor) -> torch.Tensor | None:
        """Feed x [b, s, dim_model]; write completed rows into `cache` [b, blocks, d]; return them."""
        b, s, _ = x.shape
        r, d, dtype = self.ratio, self.dim, x.dtype
        xf = wide(x)
        kv, score = xf @ self.wkv.T, xf @ self.wgate.T
        if start == 0:
            cutoff = s - s % r
            off = r if self.overlap else 0
            if self.overlap and cutoff >= r:
                self.kv_state[:b, :r] = kv[:, cutoff - r:cutoff]
                self.score_state[:b, :r] = score[:, cutoff - r:cutoff] + self.ape
            if s % r:
                self.kv_state[:b, off:off + s % r] = kv[:, cutoff:]
                self.score_state[:b, off:off + s % r] = score[:, cutoff:] + self.ape[:s % r]
            if cutoff == 0:
                return None
            kv = kv[:, :cutoff].unflatten(1, (-1, r))
            score = score[:, :cutoff].unflatten(1, (-1, r)) + self.ape
            if self.overlap:
                kv, score = self._overlap(kv, 0.0), self._overlap(score, float("-inf"))
            rows = (kv * score.softmax(dim=2)).sum(dim=2)
            positions = torch.arange(0, cutoff, r)
        else:
            slot = start % r
            score = score + self.ape[slot]
            if self.overlap:
                self.kv_state[:b, r + slot] = kv.squeeze(1)
                self.score_state[:b, r + slot] = score.squeeze(1)
            else:
                self.kv_state[:b, slot] = kv.squeeze(1)
                self.score_state[:b, slot] = score.squeeze(1)
            if (start + 1) % r:
                return None
            if self.overlap:
                kv_all = torch.cat([self.kv_state[:b, :r, :d], self.kv_state[:b, r:, d:]], dim=1)
                sc_all = torch.cat([self.score_state[:b, :r, :d], self.score_state[:b, r:, d:]], dim=1)
                rows = (kv_all * sc_all.softmax(dim=1)).sum(dim=1, keepdim=True)
                self.kv_state[:b, :r] = self.kv_state[:b, r:]
                self.score_state[:b, :r] = self.score_state[:b, r:]
            else:
                rows = (self.kv_state[:b] * self.score_state[:b].softmax(dim=1)).sum(dim=1, keepdim=True)
            positions = torch.tensor([start + 1 - r])
        rows = rms_norm(rows.to(dtype), self.norm, self.cfg.rms_norm_eps)
        rows = with_rope(rows, self.rot[positions.to(self.rot.device)], self.cfg.qk_rope_head_dim)
        if self.rotate:      # indexer keys: Hadamard, then FP4 simulation
            rows = fp4_roundtrip(hadamard(rows))
        else:
            rows = fp8_kv_roundtrip(rows, self.cfg.qk_rope_head_dim, KV_FP8_BLOCK)
        first = 0 if start == 0 else start // r
        cache[:b, first:first + rows.size(1)] = rows
        return rows


class Indexer:
    """Chooses, per query, the top-k compressed rows of a ratio-4 layer (FP4-simulated scores)."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, rot: torch.Tensor, act: torch.dtype):
        self.cfg, self.rot = cfg, rot
        self.wq_b = FP8Linear(w(f"{prefix}.wq_b.weight"), w(f"{prefix}.wq_b.scale"), act)
        self.weights_proj = w(f"{prefix}.weights_proj.weight").to(act)
        self.compressor = Compressor(cfg, w, f"{prefix}.compressor", 4, cfg.index_head_dim, True, rot)

    def reset(self, batch: int, max_len: int, device, act: torch.dtype) -> None:
        self.compressor.reset(batch, device)
        self.keys = torch.zeros(batch, max_len // 4, self.cfg.index_head_dim, dtype=act, device=device)

    def __call__(self, x: torch.Tensor, qr: torch.Tensor, start: int, offset: int) -> torch.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        end = start + s
        q = self.wq_b(qr).unflatten(-1, (c.index_n_heads, c.index_head_dim))
        q = fp4_roundtrip(hadamard(with_rope(q, self.rot[start:end], c.qk_rope_head_dim)))
        self.compressor(x, start, self.keys)
        weights = linear(x, self.weights_proj) * (softmax_scale(c.index_head_dim) * c.index_n_heads ** -0.5)
        score = einsum("bshd,btd->bsht", q, self.keys[:b, :end // 4])                # activation dtype
        score = wide(score.relu() * weights[..., None]).sum(dim=2).to(x.dtype)        # [b, s, t]
        k = min(c.index_topk, end // 4)
        if start == 0:
            visible = torch.arange(end // 4, device=x.device) < (torch.arange(1, s + 1, device=x.device) // 4)[:, None]
            score = score + torch.where(visible, 0.0, float("-inf")).to(score.dtype)
            idx = top_k(score, k)[1]
            limit = (torch.arange(1, s + 1, device=x.device) // 4)[None, :, None]
            return torch.where(idx >= limit, -1, idx + offset)
        return top_k(score, k)[1] + offset


def window_indices(window: int, s: int, start: int, device) -> torch.Tensor:
    """[s, k] cache rows of the sliding window visible to each query (-1 = none)."""
    if start == 0:
        q = torch.arange(s, device=device)[:, None]
        rows = (q - window + 1).clamp(min=0) + torch.arange(min(s, window), device=device)
        return torch.where(rows > q, -1, rows)
    if start >= window - 1:
        return torch.arange(window, device=device)[None]
    return F.pad(torch.arange(start + 1, device=device), (0, window - start - 1), value=-1)[None]


def block_indices(ratio: int, s: int, start: int, offset: int, device) -> torch.Tensor:
    """[s, k] compressed rows visible to each query on a layer without indexer (all complete blocks)."""
    if start == 0:
        rows = torch.arange(s // ratio, device=device).repeat(s, 1)
        hidden = rows >= (torch.arange(1, s + 1, device=device) // ratio)[:, None]
        return torch.where(hidden, -1, rows + offset)
    return (torch.arange((start + 1) // ratio, device=device) + offset)[None]


class Attention:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, act: torch.dtype,
                 rot: torch.Tensor):
        """`rot` is the layer's RoPE table; its length bounds the context."""
        self.cfg, self.act = cfg, act
        self.ratio = cfg.ratio(layer)
        a = f"{prefix}attn."
        fp8 = lambda n: FP8Linear(w(f"{a}{n}.weight"), w(f"{a}{n}.scale"), act)  # noqa: E731
        self.wq_a, self.wq_b, self.wkv, self.wo_b = fp8("wq_a"), fp8("wq_b"), fp8("wkv"), fp8("wo_b")
        self.q_norm = w(f"{a}q_norm.weight")
        self.kv_norm = w(f"{a}kv_norm.weight")
        # As DeepSeek's convert.py: wo_a is dequantised to bf16 once and applied as a plain grouped einsum.
        wo_a = fp8_weight_dequant(w(f"{a}wo_a.weight"), w(f"{a}wo_a.scale")).to(torch.bfloat16)
        self.wo_a = wo_a.to(act).view(cfg.o_groups, cfg.o_lora_rank, -1)
        self.sink = w(f"{a}attn_sink")
        self.rot = rot
        self.compressor = self.indexer = None
        if self.ratio:
            self.compressor = Compressor(cfg, w, f"{a}compressor", self.ratio, cfg.head_dim, False, rot)
        if self.ratio == 4:
            self.indexer = Indexer(cfg, w, f"{a}indexer", rot, act)

    def reset(self, batch: int, max_len: int, device) -> None:
        c = self.cfg
        rows = c.sliding_window + (max_len // self.ratio if self.ratio else 0)
        self.kv = torch.zeros(batch, rows, c.head_dim, dtype=self.act, device=device)
        if self.compressor:
            self.compressor.reset(batch, device)
        if self.indexer:
            self.indexer.reset(batch, max_len, device, self.act)

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        win, rd = c.sliding_window, c.qk_rope_head_dim
        rot = self.rot[start:start + s]
        qr = rms_norm(self.wq_a(x), self.q_norm, c.rms_norm_eps)
        q = self.wq_b(qr).unflatten(-1, (c.num_attention_heads, c.head_dim))
        q = q * torch.rsqrt(wide(q.square()).mean(-1, keepdim=True).to(q.dtype) + c.rms_norm_eps)  # per head
        q = with_rope(q, rot, rd)
        kv = with_rope(rms_norm(self.wkv(x), self.kv_norm, c.rms_norm_eps), rot, rd)
        kv = fp8_kv_roundtrip(kv, rd, KV_FP8_BLOCK)

        idx = window_indices(win, s, start, x.device)
        if self.ratio:
            offset = s if start == 0 else win
            if self.indexer is not None:
                picked = self.indexer(x, qr, start, offset)
            else:
                picked = block_indices(self.ratio, s, start, offset, x.device)[None].expand(b, -1, -1)
            idx = torch.cat([idx[None].expand(b, -1, -1), picked], dim=-1)
        else:
            idx = idx[None].expand(b, -1, -1)

        compressed = self.kv[:, win:]
        if start == 0:
            last = kv[:, -win:]
            pos = torch.arange(s - last.size(1), s, device=x.device) % win
            self.kv[:b, pos] = last
            rows = kv
            if self.ratio:
                new = self.compressor(x, start, compressed)
                if new is not None:
                    rows = torch.cat([kv, new], dim=1)
            o = sparse_attention(q, rows, self.sink, idx, softmax_scale(c.head_dim))
        else:
            self.kv[:b, start % win] = kv.squeeze(1)
            if self.ratio:
                self.compressor(x, start, compressed)
            o = sparse_attention(q, self.kv[:b], self.sink, idx, softmax_scale(c.head_dim))
        o = with_rope(o, rot, rd, inverse=True)
        o = einsum("bsgd,grd->bsgr", o.view(b, s, c.o_groups, -1), self.wo_a)
        return self.wo_b(o.flatten(2))
