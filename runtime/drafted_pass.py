"""A greedy drafted pass with nothing decided on the host (runtime/speculative.py's greedy loop).

The host's pass (`ArtifactModel.verify`, the judgement, `rewind`, `MTPDraft.draft`) reads the verified tokens
and then the draft between three launches or graph replays, and the GPU idles while it does. Greedy, every
decision is an argmax or a comparison, so the device can take them itself: one pass verifies the last token
drawn and its draft, picks both rows' tokens, puts back the compressor states a rejected draft shifted, has
the MTP block draft again from the positions settled (the 2-position program, its second position counted
only where the draft was right) and moves its own inputs on to the next pass. On a GPU the pass is one CUDA
graph; the host reads four numbers after it (both tokens, whether the draft was right, the draft judged).
Measured in turn in one process (bench/drafted_decode_ab.py, Flash-8 on the H200, session 55): 2.38-2.39 ms a
pass against the host's 2.59-2.63 where the draft is rejected; 2.49 against 2.56 ms where it is accepted
(bench/draft_pass.py).
Only a pass whose draft ends a ratio-4 block (one in four positions) can need the states put back, and the
host knows the position of every pass (it reads whether each draft was right), so the pass has two forms,
each its own graph: with the states kept and put back, and without (a copy and a where a state fewer; on the
H200 2.504 against 2.523 ms at Flash-8).
"""
from __future__ import annotations

import weakref

import torch

from plugins.head import GreedyPick


class DraftedPass:
    def __init__(self, model):
        """`model`: an ArtifactModel with a drafter (its verification programs, `recent`, `overlapped`)."""
        self.model = weakref.proxy(model)   # the model holds its pass: no cycle keeping either alive
        dev = model.device
        self.cur = torch.zeros(1, dtype=torch.int64, device=dev)     # the last token drawn, not yet fed
        self.q = torch.zeros(1, dtype=torch.int64, device=dev)       # its position
        self.draft = torch.zeros(1, dtype=torch.int64, device=dev)   # the token drafted after it
        self.two = torch.full((1,), 2, dtype=torch.int64, device=dev)
        self.pick = GreedyPick(2, model.head.size(0), dev)            # both rows' argmax in one launch
        # the ratio-4 compressor states' first rows as the pass found them, flat lists for one foreach copy
        self.states = [t for rows in model.overlap_rows() for t in rows.values()]
        self.kept = [t.clone() for t in self.states]
        self.at = 0                                  # the host's copy of q
        # by form (`ends_block`): the graph and its output [pick 0, pick 1, accepted, the draft judged]
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def forms(self) -> tuple[bool, ...]:
        """The pass's forms (`ends_block`'s values): one where no layer has ratio-4 states."""
        return (True, False) if self.kept else (False,)

    def ends_block(self) -> bool:
        """Whether the next pass's draft (at q + 1) ends a ratio-4 block: the form that keeps the states."""
        return self.model.draft_ends_block(self.at)

    def start(self, cur: int, q: int, draft: int) -> None:
        """Set the next pass's inputs (the passes move them on themselves)."""
        self.cur.fill_(cur)
        self.q.fill_(q)
        self.draft.fill_(draft)
        self.at = q

    def run(self) -> tuple[int, int, bool, int]:
        """One pass: (the token after cur, the token after the draft, whether the draft was that first token,
        the draft); the second is the model's only where the draft was right."""
        ends = self.ends_block()
        if ends in self.graphs:
            graph, out = self.graphs[ends]
            graph.replay()
        else:
            out = self.compute(ends)
        first, second, accepted, judged = out.tolist()
        self.at += 1 + accepted
        return first, second, bool(accepted), judged

    def compute(self, ends_block: bool) -> torch.Tensor:
        """The pass's launches (what its graphs capture), for a draft that ends a ratio-4 block or not: no host
        value, no synchronisation."""
        m = self.model
        judged = self.draft.clone()
        if ends_block:                               # a rejected draft ending a ratio-4 block shifts these
            torch._foreach_copy_(self.kept, self.states)
        logits = m._verify_through(torch.stack([self.cur, self.draft], 1), self.q, self.two)   # [2, vocab]
        picks = self.pick(logits)
        accepted = picks[0] == self.draft[0]
        if ends_block:
            for now, before in zip(self.states, self.kept):
                torch.where(accepted, now, before, out=now)
        n = (1 + accepted.long()).reshape(1)          # positions settled: cur's, and the draft's if it was right
        drafted = m.drafter._run(picks[None], self.q, n)
        self.cur.copy_(torch.where(accepted, picks[1], picks[0]))
        self.q.add_(n)
        self.draft.copy_(drafted)
        return torch.cat([picks, accepted.long().reshape(1), judged])
