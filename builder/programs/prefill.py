"""Prefill layer programs: one transformer layer for a chunk of C tokens per sequence, with static shapes,
built from the same pieces as the decode programs (builder/programs/decode.py) and mutating the same
caches, so decode continues right after a chunk.

Contract (B sequences, each at its own position):
    forward(h [B, C, hc, d], start [B] int64, n [B] int64, ids [B, C] int64, table [E] int64, caches, weights)
        -> h' [B, C, hc, d]
Token i of sequence b sits at position start[b] + i. Only tokens i < n[b] (1 <= n <= C) are real: the rest
are padding, change no cache and give outputs to ignore (their ids must still be valid token ids).
`caches` and `weights` are exactly the decode program's (`new_caches`, `layer_weights`). Afterwards the
caches hold what the decode program leaves after feeding the same n tokens one at a time: window ring,
compressed rows, the compressors' partial-block states (stale slots included) and the indexer keys;
`routed` holds the experts of each sequence's last real token.

Every query sees what it would see in a one-shot prefill of the whole prompt: its window (ring rows from
before the chunk and the chunk's own earlier tokens, gathered before the ring is overwritten), the
compressed rows of blocks completed before it (blocks completed inside the chunk included) and, on
ratio-4 layers, the indexer's top-k among those. Nothing branches on tensor values: positions only
build indices and masks, so one graph serves every start.
"""
from __future__ import annotations

import torch

from plugins.oracle import block_rows, compressor_chunk, ring_update

from ..config import KV_FP8_BLOCK, ModelConfig
from . import decode
from .decode import Compressor, DecodeLayer, is_mtp, mtp_input


class ChunkCompressor(Compressor):
    """The compressor fed a chunk of tokens per sequence (the row math is the decode compressor's)."""

    def forward(self, proj, start, n, rot, kv_state, score_state, cache, first_row, w):
        """proj [B, C, 2*coff*dim]: the wkv | wgate products of the chunk's tokens (`products_of_x`); feed tokens
        i < n at positions start + i; write the rows of blocks completed in the chunk into cache[b, first_row +
        block]; leave the states as the decode step would (two launches on a GPU: `dsv4::compressor_chunk`)."""
        p, c = self.prefix, self.cfg
        feed = torch.ops.dsv4.compressor_chunk if proj.size(0) <= decode.COMPRESSOR_OP_ROWS else compressor_chunk
        feed(proj, w[f"{p}.ape"], start, n, kv_state, score_state, cache, first_row,
             w[f"{p}.norm.weight"], rot, self.ratio, self.rotate, c.rms_norm_eps, c.qk_rope_head_dim, KV_FP8_BLOCK)


class PrefillLayer(DecodeLayer):
    compressor_type = ChunkCompressor

    def __init__(self, cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int, chunk: int):
        super().__init__(cfg, layer, act, max_len)
        self.chunk = chunk

    def attention(self, x, start, n, caches, w):
        """x [B, C, d]: the chunk's tokens at positions start + i."""
        c = self.cfg
        win, r = c.sliding_window, self.ratio
        dev, cache = x.device, caches["kv"]
        pos = start[:, None] + torch.arange(x.size(1), device=dev)                # [B, C]
        at = pos.clamp(max=self.max_len - 1)                                       # padding may run past the table
        rot = self.rot[at]
        q, kv, q_idx = self.project(x, w)
        q = self.query_heads(q, rot)
        kv = self.kv_rows(kv, rot, w)
        # Attention reads [cache | chunk kv]: window positions before the chunk from the ring (still
        # unwritten), the chunk's own from behind the cache.
        seen = pos[..., None] - win + 1 + torch.arange(win, device=dev)           # [B, C, win] window positions
        behind = start[:, None, None]
        idx = torch.where(seen >= behind, cache.size(1) + seen - behind, seen % win)
        idx = torch.where(seen < 0, -1, idx)
        if r:
            comp, idx_comp, weights = self.products_of_x(x, w)
            self.compressor(comp, start, n, self.rot, caches["comp_kv"], caches["comp_score"], cache, win, w)
            picked = None                               # ratio 128: every complete block (`block_rows`)
            if r == 4:
                self.idx_compressor(idx_comp, start, n, self.rot, caches["idx_kv"], caches["idx_score"],
                                    caches["idx_keys"], 0, w)
                picked = self.pick_blocks(self.index_query(q_idx, at), weights, caches["idx_keys"], pos)
            idx = torch.cat([idx, block_rows(pos, picked, win, r, cache.size(1))], dim=-1)
        rows = torch.cat([cache, kv], dim=1)
        cache[:, :win] = ring_update(cache[:, :win], kv, start, n)
        return self.attend(q, rows, idx, rot, w)

    def forward(self, h, start, n, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        h, experts = self.block(h, lambda x: self.attention(x, start, n, caches, weights), ids, table, weights)
        batch = torch.arange(h.size(0), device=h.device)
        caches["routed"].copy_(experts[batch, (n - 1).clamp(min=0)])
        return h


class PrefillMTP(PrefillLayer):
    """The MTP block over a chunk: forward(h, start, n, ids, table, caches, weights) -> its output streams
    [B, C, hc, d], with h the main model's last streams and ids the tokens after them, as DecodeMTP."""

    def forward(self, h, start, n, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        return super().forward(mtp_input(self.cfg, h, ids, weights), start, n, ids, table, caches, weights)


def make_prefill_program(cfg: ModelConfig, layer: int, act: torch.dtype, max_len: int, chunk: int) -> PrefillLayer:
    """The prefill program of `layer`'s kind for chunks of `chunk` tokens."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
    ratio = cfg.ratio(layer)
    if ratio and (ratio + chunk - 1) // ratio > max_len // ratio:
        raise ValueError(f"prefill chunk of {chunk} tokens completes more ratio-{ratio} blocks than a context "
                         f"of {max_len} tokens holds")
    return (PrefillMTP if is_mtp(cfg, layer) else PrefillLayer)(cfg, layer, act, max_len, chunk)
