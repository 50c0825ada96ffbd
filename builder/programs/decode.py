"""Decode layer program: one transformer layer for one new token per sequence, with static shapes,
built from the `dsv4::` custom ops and the plain-torch oracles, ready for torch.export / AOTInductor.

Contract (B sequences, each at its own position):
    forward(h [B, hc, d], pos [B] int64, ids [B] int64, table [E] int64, caches) -> h' [B, hc, d]
`caches` (see `new_caches`) are mutated in place: the window ring (row p % window), the compressed
rows (one per `ratio` tokens) after it, the compressors' partial-block states and the indexer keys,
in the layout of the reference model, so a prefill there can hand its caches to decode here.
`table` holds one address per routed expert (device or pinned host memory; see plugins/moe_experts).
Everything position dependent is computed from `pos` without branches: a compressed row is written
only where (pos + 1) % ratio == 0, through a mask, so one graph serves every step.
"""
from __future__ import annotations

import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.formats import fp8_weight_dequant
from plugins.oracle import (einsum, fp4_roundtrip, fp8_kv_roundtrip, hadamard, hc_head, hc_post, hc_pre, linear,
                            rms_norm, softmax_scale, swiglu, wide, wide_dtype, with_rope)

from ..config import KV_FP8_BLOCK, ModelConfig
from ..reference.moe import route
from ..reference.rope import rope_table


def new_caches(cfg: ModelConfig, layer: int, batch: int, max_len: int, act: torch.dtype,
               device="cpu") -> dict[str, torch.Tensor]:
    """Zeroed caches of one layer, shaped as the reference model's."""
    ratio, win = cfg.ratio(layer), cfg.sliding_window
    work = wide_dtype(act)
    c = {"kv": torch.zeros(batch, win + (max_len // ratio if ratio else 0), cfg.head_dim, dtype=act, device=device)}

    def state(prefix: str, r: int, dim: int) -> None:
        coff = 2 if r == 4 else 1
        c[f"{prefix}_kv"] = torch.zeros(batch, coff * r, coff * dim, dtype=work, device=device)
        c[f"{prefix}_score"] = torch.full((batch, coff * r, coff * dim), float("-inf"), dtype=work, device=device)
    if ratio:
        state("comp", ratio, cfg.head_dim)
    if ratio == 4:
        state("idx", 4, cfg.index_head_dim)
        c["idx_keys"] = torch.zeros(batch, max_len // 4, cfg.index_head_dim, dtype=act, device=device)
    return c


def _put(cache: torch.Tensor, rows: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """cache[b, rows[b]] = value[b] for every sequence b (only where mask[b], if given)."""
    batch = torch.arange(cache.size(0), device=cache.device)
    if mask is not None:
        value = torch.where(mask[:, None], value, cache[batch, rows])
    cache.index_put_((batch, rows), value.to(cache.dtype))


class _Compressor(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, get, prefix: str, ratio: int, dim: int, rotate: bool, work: torch.dtype):
        super().__init__()
        self.cfg, self.ratio, self.dim, self.rotate = cfg, ratio, dim, rotate
        self.wkv, self.wgate, self.ape, self.norm = (get(f"{prefix}.{n}").to(work) for n in
                                                     ("wkv.weight", "wgate.weight", "ape", "norm.weight"))

    def forward(self, x, pos, rot, kv_state, score_state, cache):
        """x [B, dm]: feed one token per sequence, write the rows completed at `pos` into `cache`."""
        r, d = self.ratio, self.dim
        xf = wide(x)
        kv, score = xf @ self.wkv.T, xf @ self.wgate.T + self.ape[pos % r]
        slot = pos % r + (r if r == 4 else 0)
        _put(kv_state, slot, kv)
        _put(score_state, slot, score)
        if r == 4:          # overlap: the previous block's first half of channels, the current block's second
            kv_all = torch.cat([kv_state[:, :r, :d], kv_state[:, r:, d:]], dim=1)
            sc_all = torch.cat([score_state[:, :r, :d], score_state[:, r:, d:]], dim=1)
        else:
            kv_all, sc_all = kv_state, score_state
        row = (kv_all * sc_all.softmax(dim=1)).sum(dim=1)                      # [B, d]
        emit = (pos + 1) % r == 0
        if r == 4:
            shifted = torch.where(emit[:, None, None], kv_state[:, r:], kv_state[:, :r])
            kv_state[:, :r] = shifted
            score_state[:, :r] = torch.where(emit[:, None, None], score_state[:, r:], score_state[:, :r])
        row = rms_norm(row.to(x.dtype), self.norm, self.cfg.rms_norm_eps)[:, None]
        row = with_rope(row, rot[(pos + 1 - r).clamp(min=0)][:, None], self.cfg.qk_rope_head_dim)
        if self.rotate:
            row = fp4_roundtrip(hadamard(row))
        else:
            row = fp8_kv_roundtrip(row, self.cfg.qk_rope_head_dim, KV_FP8_BLOCK)
        _put(cache, pos // r, row[:, 0], emit)


class DecodeLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, get, layer: int, act: torch.dtype, max_len: int, prefix: str | None = None):
        """`get(name)` returns a checkpoint tensor; `max_len` bounds positions (the RoPE table, caches)."""
        super().__init__()
        self.cfg, self.layer, self.act, self.max_len = cfg, layer, act, max_len
        p = prefix or f"layers.{layer}."
        work = wide_dtype(act)
        f32 = lambda n: get(f"{p}{n}").to(work)  # noqa: E731
        self.ratio = cfg.ratio(layer)
        self.attn_norm, self.ffn_norm = f32("attn_norm.weight"), f32("ffn_norm.weight")
        self.hc = {k: [f32(f"hc_{k}_{part}") for part in ("fn", "scale", "base")] for k in ("attn", "ffn")}
        a = f"{p}attn."
        self.fp8 = {n: (get(f"{a}{n}.weight"), get(f"{a}{n}.scale")) for n in ("wq_a", "wq_b", "wkv", "wo_b")}
        self.q_norm, self.kv_norm = f32("attn.q_norm.weight"), f32("attn.kv_norm.weight")
        self.sink = f32("attn.attn_sink")
        wo_a = fp8_weight_dequant(get(f"{a}wo_a.weight"), get(f"{a}wo_a.scale")).to(torch.bfloat16)
        self.wo_a = wo_a.to(act).view(cfg.o_groups, cfg.o_lora_rank, -1)
        self.rot = rope_table(cfg, self.ratio > 0, max_len, "cpu").clone()   # own copy: export lifts it
        if self.ratio:
            self.compressor = _Compressor(cfg, get, f"{a}compressor", self.ratio, cfg.head_dim, False, work)
        if self.ratio == 4:
            self.idx_wq_b = (get(f"{a}indexer.wq_b.weight"), get(f"{a}indexer.wq_b.scale"))
            self.idx_weights = get(f"{a}indexer.weights_proj.weight").to(act)
            self.idx_compressor = _Compressor(cfg, get, f"{a}indexer.compressor", 4, cfg.index_head_dim, True, work)
        m = f"{p}ffn."
        self.gate = get(f"{m}gate.weight").to(work)
        hashed = cfg.is_hash_layer(layer)
        self.tid2eid = get(f"{m}gate.tid2eid").to(torch.int32) if hashed else None
        self.bias = None if hashed else get(f"{m}gate.bias").to(work)
        self.shared = [(get(f"{m}shared_experts.{n}.weight"), get(f"{m}shared_experts.{n}.scale"))
                       for n in ("w1", "w3", "w2")]

    def _linear(self, x, wsc):
        return torch.ops.dsv4.fp8_linear(x, *wsc)

    def attention(self, x, pos, caches):
        c = self.cfg
        b = x.size(0)
        win, rd, r = c.sliding_window, c.qk_rope_head_dim, self.ratio
        x3 = x[:, None]                                                          # [B, 1, d]
        rot = self.rot.to(x.device)[pos][:, None]                               # [B, 1, rd/2]
        qr = rms_norm(self._linear(x3, self.fp8["wq_a"]), self.q_norm, c.rms_norm_eps)
        q = self._linear(qr, self.fp8["wq_b"]).unflatten(-1, (c.num_attention_heads, c.head_dim))
        q = q * torch.rsqrt(wide(q.square()).mean(-1, keepdim=True).to(q.dtype) + c.rms_norm_eps)
        q = with_rope(q, rot, rd)
        kv = with_rope(rms_norm(self._linear(x3, self.fp8["wkv"]), self.kv_norm, c.rms_norm_eps), rot, rd)
        kv = fp8_kv_roundtrip(kv, rd, KV_FP8_BLOCK)
        ring = torch.arange(win, device=x.device)
        idx = torch.where(ring[None] <= pos[:, None], ring[None], -1)           # window slots holding a token
        _put(caches["kv"], pos % win, kv[:, 0])
        if r:
            rot_table = self.rot.to(x.device)
            compressed = caches["kv"][:, win:]
            self.compressor(x, pos, rot_table, caches["comp_kv"], caches["comp_score"], compressed)
            blocks = torch.arange(compressed.size(1), device=x.device)
            visible = blocks[None] < ((pos + 1) // r)[:, None]
            if r == 4:
                picked = self.indexer(x, qr, pos, rot, rot_table, caches, visible)
            else:
                picked = torch.where(visible, blocks[None], -1)
            idx = torch.cat([idx, torch.where(picked >= 0, picked + win, -1)], dim=-1)
        o = torch.ops.dsv4.sparse_attention(q, caches["kv"], self.sink, idx[:, None], softmax_scale(c.head_dim))
        o = with_rope(o, rot, rd, inverse=True)
        o = einsum("bsgd,grd->bsgr", o.view(b, 1, c.o_groups, -1), self.wo_a)
        return self._linear(o.flatten(2), self.fp8["wo_b"])[:, 0]

    def indexer(self, x, qr, pos, rot, rot_table, caches, visible):
        c = self.cfg
        q = torch.ops.dsv4.fp8_linear(qr, *self.idx_wq_b).unflatten(-1, (c.index_n_heads, c.index_head_dim))
        q = fp4_roundtrip(hadamard(with_rope(q, rot, c.qk_rope_head_dim)))
        self.idx_compressor(x, pos, rot_table, caches["idx_kv"], caches["idx_score"], caches["idx_keys"])
        weights = linear(x[:, None], self.idx_weights) * (softmax_scale(c.index_head_dim) * c.index_n_heads ** -0.5)
        score = einsum("bshd,btd->bsht", q, caches["idx_keys"])
        score = wide(score.relu() * weights[..., None]).sum(dim=2).to(x.dtype)[:, 0]     # [B, T]
        score = score.masked_fill(~visible, float("-inf"))
        top, picked = score.topk(min(c.index_topk, score.size(-1)), dim=-1)
        return torch.where(top == float("-inf"), -1, picked)

    def moe(self, x, ids, table):
        c = self.cfg
        weights, experts = route(c, x, self.gate, self.bias, self.tid2eid, ids)
        y = torch.ops.dsv4.moe_routed(x, experts.to(torch.int32), weights, table, c.moe_intermediate_size,
                                      c.swiglu_limit)
        (w1, s1), (w3, s3), (w2, s2) = self.shared
        gate, up = torch.ops.dsv4.fp8_linear(x, w1, s1), torch.ops.dsv4.fp8_linear(x, w3, s3)
        y = y + torch.ops.dsv4.fp8_linear(swiglu(gate, up, c.swiglu_limit).to(x.dtype), w2, s2).to(y.dtype)
        return y.to(x.dtype)

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor]):
        eps = self.cfg.rms_norm_eps
        h = h[:, None]                                                           # [B, 1, hc, d]
        y, post, comb = hc_pre(h, *self.hc["attn"], self.cfg)
        h = hc_post(self.attention(rms_norm(y[:, 0], self.attn_norm, eps), pos, caches)[:, None], h, post, comb)
        y, post, comb = hc_pre(h, *self.hc["ffn"], self.cfg)
        h = hc_post(self.moe(rms_norm(y[:, 0], self.ffn_norm, eps), ids, table)[:, None], h, post, comb)
        return h[:, 0]


def expert_table(get, cfg: ModelConfig, layer: int, prefix: str | None = None) -> tuple[torch.Tensor, list]:
    """Pack a layer's routed experts into host tensors; return (table of addresses, the tensors to keep alive)."""
    from plugins.moe_experts import pack_expert
    p = prefix or f"layers.{layer}."
    keep = [pack_expert(*(get(f"{p}ffn.experts.{e}.{w}.{k}") for w in ("w1", "w3", "w2") for k in ("weight", "scale")))
            for e in range(cfg.n_routed_experts)]
    return torch.tensor([t.data_ptr() for t in keep], dtype=torch.int64), keep



class DecodeMTP(DecodeLayer):
    """The MTP block's decode step: embeds the next token and the main model's last streams, runs one
    more layer and drafts the token after next: forward(h, pos, ids, table, caches) -> logits [B, vocab]."""

    def __init__(self, cfg: ModelConfig, get, j: int, act: torch.dtype, max_len: int):
        p = f"mtp.{j}."
        super().__init__(cfg, get, cfg.num_hidden_layers + j, act, max_len, prefix=p)
        work = wide_dtype(act)
        self.embed = get("embed.weight").to(act)
        self.e_proj = (get(f"{p}e_proj.weight"), get(f"{p}e_proj.scale"))
        self.h_proj = (get(f"{p}h_proj.weight"), get(f"{p}h_proj.scale"))
        self.enorm, self.hnorm, self.norm = (get(f"{p}{n}.weight").to(work) for n in ("enorm", "hnorm", "norm"))
        self.head_hc = [get(f"{p}hc_head_{n}").to(work) for n in ("fn", "scale", "base")]
        self.head = get("head.weight").to(work)

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor]):
        c = self.cfg
        e = rms_norm(self.embed[ids], self.enorm, c.rms_norm_eps)
        x = self._linear(e, self.e_proj)[:, None] + self._linear(rms_norm(h, self.hnorm, c.rms_norm_eps), self.h_proj)
        x = super().forward(x, pos, ids, table, caches)
        y = rms_norm(hc_head(x[:, None], *self.head_hc, c)[:, 0], self.norm, c.rms_norm_eps)
        return torch.nn.functional.linear(wide(y), self.head)
