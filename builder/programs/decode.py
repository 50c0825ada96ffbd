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
from plugins.compressor import MAX_ROWS as COMPRESSOR_KERNEL_ROWS
from plugins.hc_pre import MAX_ROWS as HC_PRE_KERNEL_ROWS
from plugins.indexer import MAX_ROWS as INDEXER_KERNEL_ROWS
from plugins.oracle import (compressor_step, decode_rows, einsum, finish_rows, hc_head, hc_post, hc_pre, index_query,
                            indexer_picks, kv_row, q_heads, rms_norm, softmax_scale, swiglu_stacked, wide, wide_dtype,
                            with_rope)
from plugins.route import MAX_ROWS as ROUTE_KERNEL_ROWS

from ..checkpoint import CheckpointError
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


# the caches a layer's compressors write, by compression ratio (`DecodeLayer.compressors`)
COMPRESSOR_CACHES = {128: ("kv", "comp_kv", "comp_score"),
                     4: ("kv", "comp_kv", "comp_score", "idx_kv", "idx_score", "idx_keys")}


def is_mtp(cfg: ModelConfig, layer: int) -> bool:
    return layer >= cfg.num_hidden_layers


def program_kind(cfg: ModelConfig, layer: int) -> str:
    """What makes two layers' programs identical: MTP or not, compression ratio, hash routing."""
    kind = f"{'mtp' if is_mtp(cfg, layer) else 'layer'}-ratio{cfg.ratio(layer)}"
    return kind + ("-hash" if cfg.is_hash_layer(layer) else "")


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    return f"mtp.{layer - cfg.num_hidden_layers}." if is_mtp(cfg, layer) else f"layers.{layer}."


# weights taken from the model's top level by an MTP block: bound from dense.safetensors, not per layer
SHARED_WEIGHTS = ("embed.weight",)
# an MTP block's own head (hc_head and norm before the model's shared head): in its weights file, read by the
# runtime's head, unused by its programs, which end with the block's streams as every layer's do
MTP_HEAD = ("hc_head_fn", "hc_head_scale", "hc_head_base", "norm.weight")
HC_PRE_OP_ROWS = HC_PRE_KERNEL_ROWS  # decode batches take the fused op (ONNX export sets 0)
WIDE_LINEAR_OP = True                # products with bf16-stored float32 weights through the op (not in ONNX)
ROUTE_OP_ROWS = ROUTE_KERNEL_ROWS    # decode batches' gates (score or hash) take the one-launch ops (ONNX: 0)
INDEXER_OP_ROWS = INDEXER_KERNEL_ROWS  # decode batches' indexer queries and picks take the ops (ONNX: 0)
COMPRESSOR_OP_ROWS = COMPRESSOR_KERNEL_ROWS  # decode batches' compressor steps, window rows, query heads, the
                                             # query latent's norm and the shared SwiGLU take the one-launch ops
                                             # (ONNX: 0)


def wide_product(x: torch.Tensor, weight: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] in activation precision, widened to working precision, @ weight [N, K]^T, for a weight the
    official model holds in float32 after loading it from bf16: through `dsv4::wide_linear`, which reads it
    as stored (on a GPU these products were cuBLAS float32 GEMMs over widened copies: with wo_a's and the
    indexer's, 43 launches and 16% of a Flash-8 decode step, bench/results/profile-decode-flash8-h200.json)
    and takes bf16 activations as they are (its kernel widens them: no widening launch before it); written
    out for ONNX (a Cast and a MatMul). With `branch` (`dsv4::fork_side`'s token), on that side branch."""
    if WIDE_LINEAR_OP:
        return torch.ops.dsv4.wide_linear(x if x.dtype == torch.bfloat16 else wide(x), weight, branch)
    x = wide(x)
    return x @ weight.to(x.dtype).T


def layer_weights(cfg: ModelConfig, get, layer: int, act: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's dense weights in the form its program takes, keyed by checkpoint name without the layer
    prefix. FP8 weights and their scales stay as stored (the kernels read them); what the official code
    computes in float32 is widened here once, except the products' weights that `wide_product` takes as
    stored. `wo_a` stays FP8 too (`dsv4::grouped_fp8_linear`; `plugins.grouped_linear.wo_a_as_bf16` gives
    the form of graphs without that op)."""
    p, work, ratio = layer_prefix(cfg, layer), wide_dtype(act), cfg.ratio(layer)
    names_work = ["attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight",
                  "attn.attn_sink"]
    names_kept = ["ffn.gate.weight"]                   # float32 in the official model, taken by `wide_product`
    names_raw = [f"{n}.{k}" for n in ("attn.wo_a", "attn.wo_b", "ffn.shared_experts.w2") for k in ("weight", "scale")]
    names_work += [f"hc_{k}_{part}" for k in ("attn", "ffn") for part in ("fn", "scale", "base")]
    compressors = (["attn.compressor"] if ratio else []) + (["attn.indexer.compressor"] if ratio == 4 else [])
    names_work += [f"{c}.{n}" for c in compressors for n in ("ape", "norm.weight")]
    names_work += [] if cfg.is_hash_layer(layer) else ["ffn.gate.bias"]
    w = {n: get(p + n).to(work) for n in names_work}
    w |= {n: get(p + n) for n in names_raw}
    for name, parts in (FUSED_FP8 | query_fp8(ratio)).items():
        w[f"{name}.weight"], w[f"{name}.scale"] = stack_fp8([(get(f"{p}{n}.weight"), get(f"{p}{n}.scale"))
                                                             for n in parts])
    # the attention input's bf16-weight products stacked by rows: one launch (`DecodeLayer.products_of_x`)
    parts = {f"{c}.wkv_wgate": [get(f"{p}{c}.wkv.weight"), get(f"{p}{c}.wgate.weight")] for c in compressors}
    if ratio == 4:
        parts["attn.indexer.weights_proj"] = [get(p + "attn.indexer.weights_proj.weight")]
    stacked = {f"{name}.weight": torch.cat([t for n in members for t in parts[n]])
               for name, members in x_products(ratio).items()}
    # kept in bf16 for a bf16 model (as the checkpoint stores them); widened for a float32 one (an exact gate)
    w |= {n: t if t.dtype == act == torch.bfloat16 else t.to(work)
          for n, t in [(n, get(p + n)) for n in names_kept] + list(stacked.items())}
    if cfg.is_hash_layer(layer):
        w["ffn.gate.tid2eid"] = hash_routes(cfg, get(p + "ffn.gate.tid2eid"), p + "ffn.gate.tid2eid")
    if is_mtp(cfg, layer):
        w |= {n: get(p + n) for n in ("e_proj.weight", "e_proj.scale", "h_proj.weight", "h_proj.scale")}
        w |= {n: get(p + n).to(work) for n in ("enorm.weight", "hnorm.weight", *MTP_HEAD)}
        w |= shared_weights(get, act)
    # E8M0 scales travel as their bytes: AOTInductor's wrapper has no e8m0 input type (torch 2.11-2.13)
    # sorted: a compiled program takes its dict inputs flattened in the traced key order, and the
    # runtime passes what it loads sorted (safetensors files are sorted anyway)
    return {k: (w[k].view(torch.uint8) if w[k].dtype == torch.float8_e8m0fnu else w[k]).contiguous() for k in sorted(w)}


def hash_routes(cfg: ModelConfig, tid2eid: torch.Tensor, name: str) -> torch.Tensor:
    """A hash layer's table of experts per token id, as int32 (DeepSeek's dtype for it), refused where it names
    an expert the layer does not have: the router kernel would hand that id to the MoE, whose expert table
    read out of bounds faults the GPU in the middle of a decode step."""
    bad = (tid2eid < 0) | (tid2eid >= cfg.n_routed_experts)
    if bad.any():
        raise CheckpointError(f"{name} names expert {int(tid2eid[bad][0])}, outside 0..{cfg.n_routed_experts - 1}: "
                              "the checkpoint is corrupt")
    return tid2eid.to(torch.int32)


def shared_weights(get, act: torch.dtype) -> dict[str, torch.Tensor]:
    """The top-level tensors an MTP block reads, in its program's form."""
    return {"embed.weight": get("embed.weight").to(act)}


def linear_fp8(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.ops.dsv4.fp8_linear(x, w[f"{name}.weight"], w[f"{name}.scale"])


# FP8 projections of one input that run as one linear (one launch, one read of the activation, one longer
# stream of weights): the program's weight name -> the checkpoint's, in order. On the H200 the two pairs
# were four GEMVs of 2-8 MB at 0.14-0.52 of the copy bandwidth (bench/results/kernels-h200.json).
FUSED_FP8 = {"attn.wq_a_wkv": ("attn.wq_a", "attn.wkv"),
             "ffn.shared_experts.w13": ("ffn.shared_experts.w1", "ffn.shared_experts.w3")}


def x_products(ratio: int) -> dict[str, tuple[str, ...]]:
    """The products of the attention's normed input with bf16-stored weights (`wide_product`), stacked by
    rows into one weight each: the compressor's wkv | wgate and, on ratio-4 layers, the indexer compressor's
    and the indexer's head weights (weights_proj) after it: one launch where three ran."""
    if ratio == 4:
        return {"attn.x_products": ("attn.compressor.wkv_wgate", "attn.indexer.compressor.wkv_wgate",
                                    "attn.indexer.weights_proj")}
    return {"attn.compressor.wkv_wgate": ("attn.compressor.wkv_wgate",)} if ratio else {}


def query_fp8(ratio: int) -> dict[str, tuple[str, ...]]:
    """The FP8 linears of the normed query latent, stacked as `FUSED_FP8`: wq_b, and on ratio-4 layers the
    indexer's wq_b after it (one launch and one longer weight stream where an 8 MB GEMV of its own ran)."""
    return {"attn.wq_b_idx": ("attn.wq_b", "attn.indexer.wq_b")} if ratio == 4 else {"attn.wq_b": ("attn.wq_b",)}


def stack_fp8(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weights [n_i, K] with their 128x128 block scales stacked by rows into one, each part's rows padded
    to a multiple of 128 (zero rows, scale 1) so that every block keeps its own scale."""
    weights, scales = [], []                   # stacked as bytes: not every dtype here has a CPU `cat`
    for weight, scale in parts:
        pad = -weight.size(0) % 128
        weights += [weight.view(torch.uint8), torch.zeros(pad, weight.size(1), dtype=torch.uint8)]
        scales.append(scale.view(torch.uint8))
    return torch.cat(weights).view(parts[0][0].dtype), torch.cat(scales).view(parts[0][1].dtype)


def stacked_width(n: int) -> int:
    """The columns a part of n output features takes in a stacked linear (`FUSED_FP8`): whole 128-row blocks."""
    return -(-n // 128) * 128


def linear_fp8_parts(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, sizes: tuple[int, ...]):
    """The outputs of a stacked linear (`FUSED_FP8`), one per part of `sizes` output features."""
    return stacked_parts(linear_fp8(x, w, name), sizes)


def stacked_parts(y: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """A stacked linear's output y [..., N] cut into its parts of `sizes` output features (views)."""
    at, out = 0, []
    for n in sizes:
        out.append(y[..., at:at + n])
        at += stacked_width(n)
    return out


class Compressor(torch.nn.Module):
    """Gated pooling of `ratio` tokens into one compressed row (ratio 4: overlapping the previous block's
    first half of channels). The row math lives in plugins.oracle (`compressor_*`) once; `forward` is the
    decode step, one token per sequence (the prefill program subclasses it for chunks)."""

    def __init__(self, cfg: ModelConfig, prefix: str, ratio: int, dim: int, rotate: bool):
        super().__init__()
        self.cfg, self.prefix, self.ratio, self.dim, self.rotate = cfg, prefix, ratio, dim, rotate
        self.width = 2 * (2 if ratio == 4 else 1) * dim       # its wkv | wgate products: 2 * coff * dim

    def forward(self, proj, pos, rot, kv_state, score_state, cache, first_row, w, branch=None):
        """proj [B, 2*coff*dim]: the wkv | wgate products of one token per sequence (`products_of_x`); write the
        rows completed at `pos` into cache[b, first_row + block] (one launch for decode batches on a GPU:
        `dsv4::compressor_step`, on the side branch `branch` where one is given)."""
        p, c = self.prefix, self.cfg
        args = (proj, w[f"{p}.ape"], pos, kv_state, score_state, cache, first_row, w[f"{p}.norm.weight"], rot,
                self.ratio, self.rotate, c.rms_norm_eps, c.qk_rope_head_dim, KV_FP8_BLOCK)
        if proj.size(0) <= COMPRESSOR_OP_ROWS:
            torch.ops.dsv4.compressor_step(*args, branch)
        else:
            compressor_step(*args)


class DecodeLayer(torch.nn.Module):
    compressor_type = Compressor

    def __init__(self, cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int):
        """`max_len` bounds positions (the RoPE table, caches). Only the layer's kind matters."""
        super().__init__()
        self.cfg, self.act, self.max_len = cfg, act, max_len
        self.ratio, self.hashed = cfg.ratio(layer), cfg.is_hash_layer(layer)
        # a buffer, so .to(device) moves it; an own copy, so programs never share a tensor when exported
        self.register_buffer("rot", rope_table(cfg, self.ratio > 0, max_len, "cpu").clone(), persistent=False)
        if self.ratio:
            self.compressor = self.compressor_type(cfg, "attn.compressor", self.ratio, cfg.head_dim, False)
        if self.ratio == 4:
            self.idx_compressor = self.compressor_type(cfg, "attn.indexer.compressor", 4, cfg.index_head_dim, True)

    def project(self, x, w):
        """x [B, S, d] -> q [B, S, heads, hd] before its heads' norm and RoPE (`query_heads`), kv [B, S, hd]
        before its norm (`kv_rows`) and, on ratio-4 layers, the indexer's wq_b product [B, S, iheads * idim]
        (`index_query`), else None."""
        c = self.cfg
        qr, kv = linear_fp8_parts(x, w, "attn.wq_a_wkv", (c.q_lora_rank, c.head_dim))
        (name, parts), = query_fp8(self.ratio).items()
        sizes = (c.num_attention_heads * c.head_dim, c.index_n_heads * c.index_head_dim)[:len(parts)]
        q, *q_idx = stacked_parts(self.from_latent(qr, w, name), sizes)
        return q.unflatten(-1, (c.num_attention_heads, c.head_dim)), kv, (q_idx or [None])[0]

    def query_heads(self, q, rot):
        """The query heads q [B, S, heads, hd] (`project`) through their norm and RoPE at their positions' rows
        rot [B, S, rd/2, 2] of the table (decode rows: inside `dsv4::q_heads_kv_row`, with the window row)."""
        c = self.cfg
        return q_heads(q, rot, c.rms_norm_eps, c.qk_rope_head_dim)

    def from_latent(self, qr, w, name):
        """The FP8 linear `name` (`query_fp8`) of the query latent qr [B, S, q_lora] through its RMSNorm, the
        GEMV's only reader of the normed rows: one launch for decode rows on a GPU (`dsv4::fp8_linear_normed`),
        the norm written out for prefill chunks."""
        c = self.cfg
        if qr.size(0) * qr.size(1) <= COMPRESSOR_OP_ROWS:
            return torch.ops.dsv4.fp8_linear_normed(qr, w["attn.q_norm.weight"], c.rms_norm_eps,
                                                    w[f"{name}.weight"], w[f"{name}.scale"])
        return linear_fp8(rms_norm(qr, w["attn.q_norm.weight"], c.rms_norm_eps), w, name)

    def kv_rows(self, kv, rot, w):
        """kv [B, S, hd] from `project` -> cache rows: norm, RoPE, FP8 round-trip of the non-rope channels."""
        c = self.cfg
        return finish_rows(kv, rot, kv.dtype, w["attn.kv_norm.weight"], c.rms_norm_eps, False, c.qk_rope_head_dim,
                           KV_FP8_BLOCK)

    def attend(self, q, rows, idx, rot, w):
        """Sparse attention of q [B, S, heads, hd] over rows[b, idx[b, s]] (-1 = none), then the output
        projection (inverse RoPE at rot [B, S, rd/2, 2], grouped wo_a, wo_b) -> [B, S, d]."""
        c = self.cfg
        o = torch.ops.dsv4.sparse_attention(q, rows, w["attn.attn_sink"], idx, softmax_scale(c.head_dim))
        return self.output(with_rope(o, rot, c.qk_rope_head_dim, inverse=True), w)

    def output(self, o, w):
        """The attention's output o [B, S, heads, hd] after its inverse RoPE through grouped wo_a and wo_b ->
        [B, S, d]."""
        c = self.cfg
        o = o.view(*o.shape[:2], c.o_groups, -1)
        if "attn.wo_a" in w:                    # the bf16 form (ONNX/TensorRT: no grouped FP8 plugin)
            o = einsum("bsgd,grd->bsgr", o, w["attn.wo_a"].view(c.o_groups, -1, o.size(-1)))
        else:
            o = torch.ops.dsv4.grouped_fp8_linear(o, w["attn.wo_a.weight"], w["attn.wo_a.scale"])
        return linear_fp8(o.flatten(2), w, "attn.wo_b")

    def products_of_x(self, x, w, branch=None):
        """The attention input x [..., d]'s products in working precision (`x_products`, one launch, on the side
        branch `branch` where one is given): the compressor's wkv | wgate, and on ratio-4 layers the indexer
        compressor's and the indexer's raw head weights [..., iheads]; None for those a layer lacks."""
        (name, _), = x_products(self.ratio).items()
        y = wide_product(x, w[f"{name}.weight"], branch)
        if self.ratio != 4:
            return y, None, None
        return torch.split(y, (self.compressor.width, self.idx_compressor.width, self.cfg.index_n_heads), dim=-1)

    def attention(self, x, pos, caches, w):
        """x [B, 1, d]: one token per sequence at `pos` [B]."""
        c = self.cfg
        win, r, at = c.sliding_window, self.ratio, pos[:, None]
        ops = x.size(0) <= COMPRESSOR_OP_ROWS
        weights, join = self.compressors_beside(x, pos, caches, w, ops) if r else (None, None)
        q, kv, q_idx = self.project(x, w)
        row = (kv[:, 0], w["attn.kv_norm.weight"], self.rot, pos, caches["kv"], win, c.rms_norm_eps,
               c.qk_rope_head_dim, KV_FP8_BLOCK)                    # the new window row
        if ops:                                 # the query heads and that row in one launch
            q = torch.ops.dsv4.q_heads_kv_row(q, *row)
        else:
            q = self.query_heads(q, self.rot[at])
            kv_row(*row)
        if r == 4:
            q_idx = self.index_query(q_idx, at)
        if join is not None:
            join()
        picked = self.pick_blocks(q_idx, weights[:, None], caches["idx_keys"], at) if r == 4 else None  # [B, 1, topk]
        args, scale = (q, caches["kv"], w["attn.attn_sink"]), softmax_scale(c.head_dim)
        if ops:                                 # the rows (`decode_rows`) and the inverse RoPE in its launches
            return self.output(torch.ops.dsv4.decode_attention(*args, picked, at, win, r, scale, self.rot), w)
        return self.attend(q, caches["kv"], decode_rows(at, picked, win, r, caches["kv"].size(1)), self.rot[at], w)

    def compressors_beside(self, x, pos, caches, w, ops=True):
        """The compressors of x [B, 1, d] at `pos` (`compressors`), on a second stream beside the query path where
        `ops` (decode rows) -> (the indexer's raw head weights or None; `join`, which the caller calls before
        anything reads what they wrote, or None where they ran in line). Only where the products go through
        `dsv4::wide_linear` too, since a product written out would run on this stream, unordered with the steps
        that read it on the other."""
        branch = torch.ops.dsv4.fork_side(x) if ops and WIDE_LINEAR_OP else None
        weights, side = self.compressors(x[:, 0], pos, caches, w, branch)
        if branch is None:
            return weights, None
        # the branch's inputs held until the join; the caches its steps wrote declared written there
        return weights, lambda: torch.ops.dsv4.join_side(branch, [x, *side],
                                                         [caches[k] for k in COMPRESSOR_CACHES[self.ratio]])

    def compressors(self, x, pos, caches, w, branch=None):
        """The compressors of one token per sequence x [B, d] at `pos` [B] (their products of x, then their steps,
        mutating the caches of `COMPRESSOR_CACHES`), on the side branch `branch` where one is given -> (the
        indexer's raw head weights [B, iheads] on ratio-4 layers, else None; the products, which the branch
        reads)."""
        win = self.cfg.sliding_window
        comp, idx_comp, weights = self.products_of_x(x, w, branch)
        for rows in self.step_rows(x.size(0)):
            self.compressor(comp[rows], pos[rows], self.rot, caches["comp_kv"], caches["comp_score"], caches["kv"],
                            win, w, branch)
            if self.ratio == 4:
                self.idx_compressor(idx_comp[rows], pos[rows], self.rot, caches["idx_kv"], caches["idx_score"],
                                    caches["idx_keys"], 0, w, branch)
        return weights, [t for t in (comp, idx_comp, weights) if t is not None]

    def step_rows(self, rows: int) -> list[slice]:
        """The rows each compressor step takes: here every row is its own sequence, so one step takes them all
        (the verification program's rows are one sequence's tokens: a step each, in order)."""
        return [slice(None)]

    def index_query(self, q, pos):
        """The indexer's queries [B, S, iheads, idim] (RoPE, Hadamard, FP4 round-trip) of tokens at positions
        pos [B, S] (inside the RoPE table) from their wq_b product q [B, S, iheads * idim] (`project`)."""
        c = self.cfg
        q = q.unflatten(-1, (c.index_n_heads, c.index_head_dim))
        # one launch for decode rows on a GPU where Inductor made a RoPE, a cuBLAS product and the FP4 kernels
        if q.size(0) * q.size(1) <= INDEXER_OP_ROWS:
            q = torch.ops.dsv4.index_query(q, self.rot, pos, c.qk_rope_head_dim)
        else:
            q = index_query(q, self.rot[pos], c.qk_rope_head_dim)
        return q

    def pick_blocks(self, q, weights, keys, pos):
        """The compressed blocks each query q [B, S, iheads, idim] at position pos [B, S] attends to [B, S, topk]
        (-1 = none): the top-k of sum_h w_h * relu(q_h . key_t) over the blocks t < (pos + 1) // ratio visible to
        it, w_h the raw weights [B, S, iheads] in q's dtype times the indexer's scale (inside the kernels'
        launches for decode rows, where they were two launches of their own)."""
        c = self.cfg
        k, scale = min(c.index_topk, keys.size(1)), softmax_scale(c.index_head_dim) * c.index_n_heads ** -0.5
        if q.size(0) * q.size(1) <= INDEXER_OP_ROWS:
            return torch.ops.dsv4.indexer_picks(q, weights, keys, pos, k, self.ratio, scale)
        return indexer_picks(q, weights, keys, pos, k, self.ratio, scale)

    def moe(self, x, ids, table, w, routed=None, post_of=None):
        """x [N, d], ids [N] -> (y [N, d], the routed experts [N, k] int32, or None where the gate wrote them
        into `routed` [N, k] itself: the decode step's cache of them, which the pager reads). With `post_of`
        (res [N, hc, d], post, comb) for decode rows: y is the new streams [N, hc, d] (`experts_ffn`)."""
        c = self.cfg
        k = c.num_experts_per_tok
        if x.size(0) <= ROUTE_OP_ROWS and ("ffn.gate.tid2eid" in w or "ffn.gate.bias" in w):
            into = routed if routed is not None and routed.shape == (x.size(0), k) else None
            if into is not None and post_of is not None and WIDE_LINEAR_OP:    # decode rows: gate to post, one op
                return torch.ops.dsv4.moe_gate_hc_post(
                    x, w["ffn.gate.weight"], w.get("ffn.gate.bias"), w.get("ffn.gate.tid2eid"), ids, k,
                    c.scoring_func, c.routed_scaling_factor, into, table, c.moe_intermediate_size, c.swiglu_limit,
                    *self.shared_expert(w), *post_of), None
            logits = wide_product(x, w["ffn.gate.weight"])
            experts = into if into is not None else x.new_empty(x.size(0), k, dtype=torch.int32)
            if "ffn.gate.tid2eid" in w:            # hash layer: the experts from the token ids, by the same launch
                weights = torch.ops.dsv4.route_hash(logits, w["ffn.gate.tid2eid"], ids, k, c.scoring_func,
                                                    c.routed_scaling_factor, experts)
            else:
                weights = torch.ops.dsv4.route_topk(logits, w["ffn.gate.bias"], k, c.scoring_func,
                                                    c.routed_scaling_factor, experts)
            if into is not None:
                return self.experts_ffn(x, experts, weights, table, w, post_of), None
        else:
            weights, experts = route(c, x, w["ffn.gate.weight"], w.get("ffn.gate.bias"), w.get("ffn.gate.tid2eid"),
                                     ids, product=wide_product)
            experts = experts.to(torch.int32)
        return self.experts_ffn(x, experts, weights, table, w, post_of), experts

    def experts_ffn(self, x, experts, weights, table, w, post_of=None):
        """The routed experts [N, k] with their weights and the shared expert of x [N, d] -> [N, d] (prefill
        chunks); with `post_of` (decode rows, `block`) that output inside the layer's last hyper-connection
        post -> the new streams [N, hc, d] (dsv4::moe_hc_post: one launch for the sum and the post on a GPU)."""
        c = self.cfg
        f = c.moe_intermediate_size
        if post_of is not None:                  # the shared expert may run beside the routed ones (moe_with_shared)
            return torch.ops.dsv4.moe_hc_post(x, experts, weights, table, f, c.swiglu_limit, *self.shared_expert(w),
                                              *post_of)
        y = torch.ops.dsv4.moe_routed(x, experts, weights, table, f, c.swiglu_limit)
        h = swiglu_stacked(linear_fp8(x, w, "ffn.shared_experts.w13"), f, stacked_width(f), c.swiglu_limit)
        shared = linear_fp8(h, w, "ffn.shared_experts.w2")
        return (y + shared.to(y.dtype)).to(x.dtype)

    def shared_expert(self, w) -> tuple:
        """The shared expert's arguments of the decode MoE ops: w1 | w3 stacked and w2, FP8 with their scales,
        and where w3's rows start."""
        return (w["ffn.shared_experts.w13.weight"], w["ffn.shared_experts.w13.scale"],
                w["ffn.shared_experts.w2.weight"], w["ffn.shared_experts.w2.scale"],
                stacked_width(self.cfg.moe_intermediate_size))

    def block(self, h, attention, ids, table, w, routed=None):
        """h [B, S, hc, d] -> (h' [B, S, hc, d], routed experts [B, S, k], or None where the gate wrote them
        into `routed` (`moe`)): the attention sub-layer (`attention`: normed x [B, S, d] -> [B, S, d]) and the
        MoE, each inside hyper-connections."""
        hc = {k: [w[f"hc_{k}_{part}"] for part in ("fn", "scale", "base")] for k in ("attn", "ffn")}
        c = self.cfg
        rows = h.size(0) * h.size(1)
        # comb may be finished beside the chain where its reader is an op that joins the side stream first (the
        # attention's: hc_post_pre_norm; the FFN's: the MoE's post); plugins/hc_pre.py SINKHORN_BESIDE decides
        beside = {"comb_beside": True} if WIDE_LINEAR_OP else {}
        attn_beside = beside if rows <= HC_PRE_OP_ROWS else {}
        ffn_beside = beside if rows <= COMPRESSOR_OP_ROWS else {}
        x, post, comb = hc_pre_normed(h, *hc["attn"], w["attn_norm.weight"], c, **attn_beside)
        if rows <= HC_PRE_OP_ROWS:     # the attention's hc_post inside the FFN's hc_pre launches
            h, x, post, comb = torch.ops.dsv4.hc_post_pre_norm(attention(x), h, post, comb, *hc["ffn"],
                                                               w["ffn_norm.weight"], c.rms_norm_eps, c.hc_eps,
                                                               c.hc_sinkhorn_iters, **ffn_beside)
        else:
            h = hc_post(attention(x), h, post, comb)
            x, post, comb = hc_pre_normed(h, *hc["ffn"], w["ffn_norm.weight"], c)
        if rows <= COMPRESSOR_OP_ROWS:     # the MoE's end inside the layer's last hc_post
            post_of = (h.flatten(0, 1), post.flatten(0, 1), comb.flatten(0, 1))
            out, experts = self.moe(x.flatten(0, 1), ids.flatten(), table, w, routed, post_of)
            out = out.view(h.shape)
        else:
            ffn, experts = self.moe(x.flatten(0, 1), ids.flatten(), table, w, routed)
            out = hc_post(ffn.view(x.shape), h, post, comb)
        return out, None if experts is None else experts.view(*x.shape[:2], -1)

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        h, experts = self.block(h[:, None], lambda x: self.attention(x, pos, caches, weights), ids[:, None],
                                table, weights, caches["routed"])
        if experts is not None:                 # else the gate wrote them there itself
            caches["routed"].copy_(experts[:, 0])
        return h[:, 0]


def hc_pre_normed(h, fn, scale, base, norm, cfg: ModelConfig, **op_options):
    """hc_pre of h [B, S, hc, d], its y through the RMSNorm with weight `norm` -> (x [B, S, d], post, comb):
    through the dsv4 op for decode-sized inputs (two fused launches on a GPU, the norm in the second, where a
    compiler makes dozens of kernels), written out for prefill chunks (which Inductor fuses well). The choice
    is made from static shapes while tracing; both compute the same values on the CPU. `op_options`: the
    op's (comb_beside)."""
    if h.size(0) * h.size(1) <= HC_PRE_OP_ROWS:
        return torch.ops.dsv4.hc_pre_norm(h, fn, scale, base, norm, cfg.rms_norm_eps, cfg.hc_eps,
                                          cfg.hc_sinkhorn_iters, **op_options)
    y, post, comb = hc_pre(h, fn, scale, base, cfg)
    return rms_norm(y, norm, cfg.rms_norm_eps), post, comb


def mtp_input(cfg: ModelConfig, h, ids, w):
    """The MTP block's input streams [..., hc, d]: e_proj(enorm(embed(ids))) added to every stream of
    h_proj(hnorm(h)), for h [..., hc, d] and ids [...]."""
    e = rms_norm(w["embed.weight"][ids], w["enorm.weight"], cfg.rms_norm_eps)
    return linear_fp8(e, w, "e_proj").unsqueeze(-2) + linear_fp8(rms_norm(h, w["hnorm.weight"], cfg.rms_norm_eps),
                                                                  w, "h_proj")


def mtp_logits(cfg: ModelConfig, x, w, head):
    """The MTP block's draft logits [B, S, vocab] (working precision) from its output streams [B, S, hc, d]:
    its own hc_head and norm (`MTP_HEAD` in its weights w), then the model's head [vocab, d]."""
    head_hc = [w[f"hc_head_{n}"] for n in ("fn", "scale", "base")]
    y = rms_norm(hc_head(x, *head_hc, cfg), w["norm.weight"], cfg.rms_norm_eps)
    return torch.nn.functional.linear(wide(y), head.to(wide(y).dtype))


class DecodeMTP(DecodeLayer):
    """The MTP block's decode step: h the main model's last streams at pos, ids the tokens after them;
    forward(h, pos, ids, table, caches, weights) -> its output streams, whose head (`mtp_logits`) drafts the
    token after ids. The head stays out of the program so that the runtime reads the model's head matrix
    once, in the form and through the kernel its own head uses."""

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        return super().forward(mtp_input(self.cfg, h, ids, weights), pos, ids, table, caches, weights)


def make_program(cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int) -> DecodeLayer:
    return (DecodeMTP if is_mtp(cfg, layer) else DecodeLayer)(cfg, layer, act, max_len)


def expert_table(get, cfg: ModelConfig, layer: int) -> tuple[torch.Tensor, list]:
    """Pack a layer's routed experts into host tensors; return (table of addresses, the tensors to keep alive)."""
    from plugins.moe_experts import pack_expert
    p = layer_prefix(cfg, layer)
    keep = [pack_expert(*(get(f"{p}ffn.experts.{e}.{w}.{k}") for w in ("w1", "w3", "w2") for k in ("weight", "scale")))
            for e in range(cfg.n_routed_experts)]
    return torch.tensor([t.data_ptr() for t in keep], dtype=torch.int64), keep
