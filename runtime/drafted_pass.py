"""A greedy drafted pass with nothing decided on the host (runtime/speculative.py's greedy loop).

The host's pass (`ArtifactModel.verify`, the judgement, `rewind`, `MTPDraft.draft`) reads the verified tokens
and then the draft between three launches or graph replays, and the GPU idles while it does. Greedy, every
decision is an argmax or a comparison, so the device can take them itself: one pass verifies the last token
drawn and its draft, picks both rows' tokens, puts back the compressor states a rejected draft shifted, has
the MTP block draft again from the positions settled (the 2-position program, its second position counted
only where the draft was right) and moves its own inputs on to the next pass. On a GPU the pass is one CUDA
graph; the host reads four numbers after it (both tokens, whether the draft was right, the draft judged).
Measured in turn in one process (bench/drafted_decode_ab.py, Flash-8 on an H100): 2.83 ms a pass against the
host's 2.99-3.01 where the draft is rejected; 3.02 against 3.06 ms where it is accepted (bench/draft_pass.py).
"""
from __future__ import annotations

import torch

from plugins.head import GreedyPick


class DraftedPass:
    def __init__(self, model):
        """`model`: an ArtifactModel with a drafter (its verification programs, `recent`, `overlapped`)."""
        self.model = model
        dev = model.device
        self.cur = torch.zeros(1, dtype=torch.int64, device=dev)     # the last token drawn, not yet fed
        self.q = torch.zeros(1, dtype=torch.int64, device=dev)       # its position
        self.draft = torch.zeros(1, dtype=torch.int64, device=dev)   # the token drafted after it
        self.two = torch.full((1,), 2, dtype=torch.int64, device=dev)
        self.pick = GreedyPick(2, model.head.size(0), dev)            # both rows' argmax in one launch
        # the ratio-4 compressor states' first rows as the pass found them, flat lists for one foreach copy
        self.states = [t for rows in model.overlap_rows() for t in rows.values()]
        self.kept = [t.clone() for t in self.states]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None       # the graph's [pick 0, pick 1, accepted, the draft judged]

    def start(self, cur: int, q: int, draft: int) -> None:
        """Set the next pass's inputs (the passes move them on themselves)."""
        self.cur.fill_(cur)
        self.q.fill_(q)
        self.draft.fill_(draft)

    def run(self) -> tuple[int, int, bool, int]:
        """One pass: (the token after cur, the token after the draft, whether the draft was that first token,
        the draft); the second is the model's only where the draft was right."""
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self.compute()
        first, second, accepted, judged = out.tolist()
        return first, second, bool(accepted), judged

    def compute(self) -> torch.Tensor:
        """The pass's launches (what the graph captures): no host value, no synchronisation."""
        m = self.model
        judged = self.draft.clone()
        if self.kept:                                # a rejected draft ending a ratio-4 block shifts these
            torch._foreach_copy_(self.kept, self.states)
        logits = m._verify_through(torch.stack([self.cur, self.draft], 1), self.q, self.two)   # [2, vocab]
        picks = self.pick(logits)
        accepted = picks[0] == self.draft[0]
        undo = ~accepted & ((self.q[0] + 2) % 4 == 0)
        for now, before in zip(self.states, self.kept):
            torch.where(undo, before, now, out=now)
        n = (1 + accepted.long()).reshape(1)          # positions settled: cur's, and the draft's if it was right
        drafted = m.drafter._run(picks[None], self.q, n)
        self.cur.copy_(torch.where(accepted, picks[1], picks[0]))
        self.q.add_(n)
        self.draft.copy_(drafted)
        return torch.cat([picks, accepted.long().reshape(1), judged])
