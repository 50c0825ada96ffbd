"""The verification program of speculative decoding: one main layer for two tokens of one sequence, the last
token drawn and its draft at positions q and q + 1, on the decode programs' ops (runtime/speculative.py).

Until session 54 the 2-token prefill program served; on a GPU it spent about 0.4 ms of a Flash-8 verification
on the prefill path's glue (README, "Session 54"). Here the two tokens go through the decode ops as two rows of a
batch wherever a token's result does not depend on the other (hyper-connections, projections, the router, the
experts), and one after the other where it does: the compressors' steps (either token may end a block) and the
window row with its attention (the second token's row takes the ring slot of the row the first still reads).
The compressors' products and both tokens' steps run on a second stream beside the query path, as in the decode
program (session 56; on an H100 at Flash-8, session 57: 2.134-2.138 ms a verification against 2.155 in line,
bench/verify_ab.py).
The caches are the decode program's for one sequence (`new_caches` with batch 1); afterwards they hold what
two decode steps leave, `routed` the second token's experts.

Contract: forward(h [2, hc, d], pos [2] int64 (q, q + 1), ids [2] int64, table [E] int64, caches, weights)
    -> h' [2, hc, d]
Built into aoti artifacts that draft (builder/build.py: programs/KIND-verify.pt2; the runtime's
`ArtifactModel._verify_through`). On the H200 (session 55, Flash-8): 1.90 ms a verification, 1.94 with the
head's input on torch's ops as the 2-token prefill programs had it (their time too), so these programs gained
nothing on their own there; its logits are the decode steps' bit for bit (`dsv4 forced --pairs`).
"""
from __future__ import annotations

import torch

from plugins.oracle import softmax_scale

from ..config import KV_FP8_BLOCK
from .decode import DecodeLayer


class VerifyLayer(DecodeLayer):
    def step_rows(self, rows):
        return [slice(t, t + 1) for t in range(rows)]  # either token may end a block: their steps in order

    def attention(self, x, pos, caches, w):
        """x [2, 1, d]: the two tokens at pos [2]."""
        c = self.cfg
        win, r = c.sliding_window, self.ratio
        # the compressors' products and both tokens' steps (`step_rows`) beside the query path, as in the decode
        # program, joined before the first attention reads what they wrote
        weights, join = self.compressors_beside(x, pos, caches, w) if r else (None, None)
        q, kv, q_idx = self.project(x, w)
        if r == 4:                              # both tokens' queries as one sequence's two [1, 2, ...]
            q_idx = self.index_query(q_idx.transpose(0, 1), pos[None])
        if join is not None:
            join()
        # both tokens' picks in one launch pair: the steps of both are in the keys by now, and each query sees
        # only the blocks complete at its own position
        picked = self.pick_blocks(q_idx, weights[None], caches["idx_keys"], pos[None]) if r == 4 else None
        out = []
        for t in range(2):                      # the first token's attention before the second's window row
            at = pos[t:t + 1, None]
            if t:                               # (with no data path between them, Inductor copied the cache)
                torch.ops.dsv4.written_after([caches["kv"]], out)
            qt = torch.ops.dsv4.q_heads_kv_row(q[t:t + 1], kv[t:t + 1, 0], w["attn.kv_norm.weight"], self.rot,
                                               pos[t:t + 1], caches["kv"], win, c.rms_norm_eps,
                                               c.qk_rope_head_dim, KV_FP8_BLOCK)
            out.append(torch.ops.dsv4.decode_attention(qt, caches["kv"], w["attn.attn_sink"],
                                                       picked[:, t:t + 1] if r == 4 else None, at, win, r,
                                                       softmax_scale(c.head_dim), self.rot))
        return self.output(torch.cat(out), w)

    def forward(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        h, experts = self.block(h[:, None], lambda x: self.attention(x, pos, caches, weights), ids[:, None],
                                table, weights)
        caches["routed"].copy_(experts[-1:, 0])
        return h[:, 0]
