"""Decode layer programs: one transformer layer for one new token per sequence, with static shapes,
built from the `dsv4::` custom ops and the plain-torch oracles, ready for torch.export / AOTInductor.

Contract (B sequences, each at its own position):
    forward(h [B, hc, d], pos [B] int64, ids [B] int64, table [E] int64, caches, weights) -> h' [B, hc, d]
A program holds no weights: it is built from the config and the layer's kind alone (`program_kind`),
so every layer of one kind shares one compiled program, and `weights` (see `layer_weights`) are bound
when the artifact is loaded instead of being copied into each package.
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
    # the experts this step routed each sequence to, for the runtime's expert pager
    c["routed"] = torch.zeros(batch, cfg.num_experts_per_tok, dtype=torch.int32, device=device)
    return {k: c[k] for k in sorted(c)}        # sorted, as `layer_weights` (the key order is traced)


def _put(cache: torch.Tensor, rows: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """cache[b, rows[b]] = value[b] for every sequence b (only where mask[b], if given)."""
    batch = torch.arange(cache.size(0), device=cache.device)
    if mask is not None:
        value = torch.where(mask[:, None], value, cache[batch, rows])
    cache.index_put_((batch, rows), value.to(cache.dtype))


def is_mtp(cfg: ModelConfig, layer: int) -> bool:
    return layer >= cfg.num_hidden_layers


def program_kind(cfg: ModelConfig, layer: int) -> str:
    """What makes two layers' programs identical: MTP or not, compression ratio, hash routing."""
    kind = f"{'mtp' if is_mtp(cfg, layer) else 'layer'}-ratio{cfg.ratio(layer)}"
    return kind + ("-hash" if cfg.is_hash_layer(layer) else "")


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    return f"mtp.{layer - cfg.num_hidden_layers}." if is_mtp(cfg, layer) else f"layers.{layer}."


# weights taken from the model's top level by an MTP block: bound from dense.safetensors, not per layer
SHARED_WEIGHTS = ("embed.weight", "head.weight")


def layer_weights(cfg: ModelConfig, get, layer: int, act: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's dense weights in the form its program takes, keyed by checkpoint name without the layer
    prefix. FP8 weights and their scales stay as stored (the kernels read them); what the official code
    computes in float32 is widened here once; `wo_a` is dequantised to bf16 as DeepSeek's convert.py does."""
    p, work, ratio = layer_prefix(cfg, layer), wide_dtype(act), cfg.ratio(layer)
    names_work = ["attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight",
                  "attn.attn_sink", "ffn.gate.weight"]
    names_raw = [f"{n}.{k}" for n in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1",
                                       "ffn.shared_experts.w2", "ffn.shared_experts.w3") for k in ("weight", "scale")]
    names_work += [f"hc_{k}_{part}" for k in ("attn", "ffn") for part in ("fn", "scale", "base")]
    names_act = []
    compressors = (["attn.compressor"] if ratio else []) + (["attn.indexer.compressor"] if ratio == 4 else [])
    names_work += [f"{c}.{n}" for c in compressors for n in ("wkv.weight", "wgate.weight", "ape", "norm.weight")]
    if ratio == 4:
        names_raw += ["attn.indexer.wq_b.weight", "attn.indexer.wq_b.scale"]
        names_act += ["attn.indexer.weights_proj.weight"]
    names_work += [] if cfg.is_hash_layer(layer) else ["ffn.gate.bias"]
    w = {n: get(p + n).to(work) for n in names_work}
    w |= {n: get(p + n) for n in names_raw}
    w |= {n: get(p + n).to(act) for n in names_act}
    if cfg.is_hash_layer(layer):
        w["ffn.gate.tid2eid"] = get(p + "ffn.gate.tid2eid").to(torch.int32)
    wo_a = fp8_weight_dequant(get(p + "attn.wo_a.weight"), get(p + "attn.wo_a.scale")).to(torch.bfloat16)
    w["attn.wo_a"] = wo_a.to(act).view(cfg.o_groups, cfg.o_lora_rank, -1)
    if is_mtp(cfg, layer):
        w |= {n: get(p + n) for n in ("e_proj.weight", "e_proj.scale", "h_proj.weight", "h_proj.scale")}
        w |= {n: get(p + n).to(work) for n in ("enorm.weight", "hnorm.weight", "norm.weight",
                                                  "hc_head_fn", "hc_head_scale", "hc_head_base")}
        w |= shared_weights(get, act)
    # E8M0 scales travel as their bytes: AOTInductor's wrapper has no e8m0 input type (torch 2.11-2.13)
    # sorted: a compiled program takes its dict inputs flattened in the traced key order, and the
    # runtime passes what it loads sorted (safetensors files are sorted anyway)
    return {k: (w[k].view(torch.uint8) if w[k].dtype == torch.float8_e8m0fnu else w[k]).contiguous() for k in sorted(w)}


def shared_weights(get, act: torch.dtype) -> dict[str, torch.Tensor]:
    """The top-level tensors an MTP block reads, in its program's form."""
    return {"embed.weight": get("embed.weight").to(act), "head.weight": get("head.weight").to(wide_dtype(act))}


class _Compressor(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, ratio: int, dim: int, rotate: bool):
        super().__init__()
        self.cfg, self.prefix, self.ratio, self.dim, self.rotate = cfg, prefix, ratio, dim, rotate

    def forward(self, x, pos, rot, kv_state, score_state, cache, w):
        """x [B, dm]: feed one token per sequence, write the rows completed at `pos` into `cache`."""
        r, d, p = self.ratio, self.dim, self.prefix
        xf = wide(x)
        kv, score = xf @ w[f"{p}.wkv.weight"].T, xf @ w[f"{p}.wgate.weight"].T + w[f"{p}.ape"][pos % r]
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
        row = rms_norm(row.to(x.dtype), w[f"{p}.norm.weight"], self.cfg.rms_norm_eps)[:, None]
        row = with_rope(row, rot[(pos + 1 - r).clamp(min=0)][:, None], self.cfg.qk_rope_head_dim)
        if self.rotate:
            row = fp4_roundtrip(hadamard(row))
        else:
            row = fp8_kv_roundtrip(row, self.cfg.qk_rope_head_dim, KV_FP8_BLOCK)
        _put(cache, pos // r, row[:, 0], emit)


def _linear(x, w, name):
    return torch.ops.dsv4.fp8_linear(x, w[f"{name}.weight"], w[f"{name}.scale"])


class DecodeLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int):
        """`max_len` bounds positions (the RoPE table, caches). Only the layer's kind matters."""
        super().__init__()
        self.cfg, self.act, self.max_len = cfg, act, max_len
        self.ratio, self.hashed = cfg.ratio(layer), cfg.is_hash_layer(layer)
        # a buffer, so .to(device) moves it; an own copy, so programs never share a tensor when exported
        self.register_buffer("rot", rope_table(cfg, self.ratio > 0, max_len, "cpu").clone(), persistent=False)
        if self.ratio:
            self.compressor = _Compressor(cfg, "attn.compressor", self.ratio, cfg.head_dim, False)
        if self.ratio == 4:
            self.idx_compressor = _Compressor(cfg, "attn.indexer.compressor", 4, cfg.index_head_dim, True)

    def attention(self, x, pos, caches, w):
        c = self.cfg
        b = x.size(0)
        win, rd, r = c.sliding_window, c.qk_rope_head_dim, self.ratio
        x3 = x[:, None]                                                          # [B, 1, d]
        rot = self.rot[pos][:, None]                               # [B, 1, rd/2]
        qr = rms_norm(_linear(x3, w, "attn.wq_a"), w["attn.q_norm.weight"], c.rms_norm_eps)
        q = _linear(qr, w, "attn.wq_b").unflatten(-1, (c.num_attention_heads, c.head_dim))
        q = q * torch.rsqrt(wide(q.square()).mean(-1, keepdim=True).to(q.dtype) + c.rms_norm_eps)
        q = with_rope(q, rot, rd)
        kv = with_rope(rms_norm(_linear(x3, w, "attn.wkv"), w["attn.kv_norm.weight"], c.rms_norm_eps), rot, rd)
        kv = fp8_kv_roundtrip(kv, rd, KV_FP8_BLOCK)
        ring = torch.arange(win, device=x.device)
        idx = torch.where(ring[None] <= pos[:, None], ring[None], -1)           # window slots holding a token
        _put(caches["kv"], pos % win, kv[:, 0])
        if r:
            rot_table = self.rot
            compressed = caches["kv"][:, win:]
            self.compressor(x, pos, rot_table, caches["comp_kv"], caches["comp_score"], compressed, w)
            blocks = torch.arange(compressed.size(1), device=x.device)
            visible = blocks[None] < ((pos + 1) // r)[:, None]
            if r == 4:
                picked = self.indexer(x, qr, pos, rot, rot_table, caches, visible, w)
            else:
                picked = torch.where(visible, blocks[None], -1)
            idx = torch.cat([idx, torch.where(picked >= 0, picked + win, -1)], dim=-1)
        o = torch.ops.dsv4.sparse_attention(q, caches["kv"], w["attn.attn_sink"], idx[:, None],
                                            softmax_scale(c.head_dim))
        o = with_rope(o, rot, rd, inverse=True)
        o = einsum("bsgd,grd->bsgr", o.view(b, 1, c.o_groups, -1), w["attn.wo_a"])
        return _linear(o.flatten(2), w, "attn.wo_b")[:, 0]

    def indexer(self, x, qr, pos, rot, rot_table, caches, visible, w):
        c = self.cfg
        q = _linear(qr, w, "attn.indexer.wq_b").unflatten(-1, (c.index_n_heads, c.index_head_dim))
        q = fp4_roundtrip(hadamard(with_rope(q, rot, c.qk_rope_head_dim)))
        self.idx_compressor(x, pos, rot_table, caches["idx_kv"], caches["idx_score"], caches["idx_keys"], w)
        weights = (linear(x[:, None], w["attn.indexer.weights_proj.weight"])
                   * (softmax_scale(c.index_head_dim) * c.index_n_heads ** -0.5))
        score = einsum("bshd,btd->bsht", q, caches["idx_keys"])
        score = wide(score.relu() * weights[..., None]).sum(dim=2).to(x.dtype)[:, 0]     # [B, T]
        score = score.masked_fill(~visible, float("-inf"))
        top, picked = score.topk(min(c.index_topk, score.size(-1)), dim=-1)
        return torch.where(top == float("-inf"), -1, picked)

    def moe(self, x, ids, table, w, routed):
        c = self.cfg
        weights, experts = route(c, x, w["ffn.gate.weight"], w.get("ffn.gate.bias"), w.get("ffn.gate.tid2eid"), ids)
        routed.copy_(experts.to(torch.int32))
        y = torch.ops.dsv4.moe_routed(x, experts.to(torch.int32), weights, table, c.moe_intermediate_size,
                                      c.swiglu_limit)
        gate, up = _linear(x, w, "ffn.shared_experts.w1"), _linear(x, w, "ffn.shared_experts.w3")
        y = y + _linear(swiglu(gate, up, c.swiglu_limit).to(x.dtype), w, "ffn.shared_experts.w2").to(y.dtype)
        return y.to(x.dtype)

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        eps, w = self.cfg.rms_norm_eps, weights
        hc = {k: [w[f"hc_{k}_{part}"] for part in ("fn", "scale", "base")] for k in ("attn", "ffn")}
        h = h[:, None]                                                           # [B, 1, hc, d]
        y, post, comb = hc_pre(h, *hc["attn"], self.cfg)
        h = hc_post(self.attention(rms_norm(y[:, 0], w["attn_norm.weight"], eps), pos, caches, w)[:, None],
                    h, post, comb)
        y, post, comb = hc_pre(h, *hc["ffn"], self.cfg)
        ffn = self.moe(rms_norm(y[:, 0], w["ffn_norm.weight"], eps), ids, table, w, caches["routed"])
        h = hc_post(ffn[:, None], h, post, comb)
        return h[:, 0]


class DecodeMTP(DecodeLayer):
    """The MTP block's decode step: embeds the next token and the main model's last streams, runs one
    more layer and drafts the token after next: forward(h, pos, ids, table, caches, weights) -> logits."""

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        c, w = self.cfg, weights
        e = rms_norm(w["embed.weight"][ids], w["enorm.weight"], c.rms_norm_eps)
        x = _linear(e, w, "e_proj")[:, None] + _linear(rms_norm(h, w["hnorm.weight"], c.rms_norm_eps), w, "h_proj")
        x = super().forward(x, pos, ids, table, caches, weights)
        head_hc = [w[f"hc_head_{n}"] for n in ("fn", "scale", "base")]
        y = rms_norm(hc_head(x[:, None], *head_hc, c)[:, 0], w["norm.weight"], c.rms_norm_eps)
        return torch.nn.functional.linear(wide(y), w["head.weight"])


def make_program(cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int) -> DecodeLayer:
    return (DecodeMTP if is_mtp(cfg, layer) else DecodeLayer)(cfg, layer, act, max_len)


def expert_table(get, cfg: ModelConfig, layer: int) -> tuple[torch.Tensor, list]:
    """Pack a layer's routed experts into host tensors; return (table of addresses, the tensors to keep alive)."""
    from plugins.moe_experts import pack_expert
    p = layer_prefix(cfg, layer)
    keep = [pack_expert(*(get(f"{p}ffn.experts.{e}.{w}.{k}") for w in ("w1", "w3", "w2") for k in ("weight", "scale")))
            for e in range(cfg.n_routed_experts)]
    return torch.tensor([t.data_ptr() for t in keep], dtype=torch.int64), keep
