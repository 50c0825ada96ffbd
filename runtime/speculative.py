"""Speculative decoding with the MTP block as drafter (runtime/draft.py).

Decode reads every weight once a step for a single token; a drafted token verified in the same step costs
its experts and little more. Each step feeds the last token drawn and the MTP block's draft of the token
after it (`ArtifactModel.verify`), whose two rows of logits give the next token and, where that is the
draft, the one after it as well: two tokens for one pass. A rejected draft is taken back
(`ArtifactModel.rewind`) and the step still gives one token. Greedy, the tokens are the model's greedy
tokens exactly as far as its two-token pass computes what one-token steps compute (bit for bit in float32;
in bfloat16 its kernels differ, so a near-tie may break the other way); sampling, they follow the model's
distribution exactly (`runtime.sampling.judge`), though not the same draws as without drafts. Greedy without
the expert pager, the device judges and drafts itself, one graph a pass (runtime/drafted_pass.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .sampling import Sampling, judge, sample


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0
    drafts: list[int] = field(default_factory=list)      # each pass's draft, in order


class Speculative:
    """The tokens after prompt `ids` (all fed) from `first` (drawn from the prompt's logits, not fed), up to
    `count` in all, `first` included, drawn as `sampling` says (no penalties: their counts change with each
    token drawn) with `generator`. Iterating draws them; `last_fed` says whether the caches already hold the
    last token drawn (they do right after an accepted draft), which the next turn of a conversation must not
    feed again; `stats` counts drafts."""

    def __init__(self, model, ids: list[int], first: int, count: int, sampling: Sampling = Sampling(),
                 generator: torch.Generator | None = None):
        if sampling.penalised:
            raise ValueError("speculative decoding draws without penalties")
        self.model, self.ids, self.first, self.count = model, ids, first, count
        self.sampling, self.generator = sampling, generator
        self.last_fed = False
        self.stats = DraftStats()

    def __iter__(self) -> Iterator[int]:
        m, n, cur = self.model, len(self.ids), self.first
        if self.count < 1:
            return
        self.last_fed = False
        yield cur
        if self.count < 2:
            return
        # the MTP block fed the prompt's last `window` positions: position i with the token at i + 1
        start = max(0, n - m.recent.size(1))
        draft = m.drafter.draft(self.ids[start + 1:] + [cur], start)
        drawn, q = 1, n                                  # q: cur's position, not yet fed
        # greedy, the device judges and drafts itself (runtime/drafted_pass.py): one graph a pass
        device = self.sampling.temperature <= 0 and m.drafted_pass is not None and m.pager is None
        if device:
            m.drafted_pass.start(cur, q, draft)
        while drawn < self.count and q + 2 <= m.max_len:
            if device:
                nxt, after, accepted, draft = m.drafted_pass.run()
            else:
                nxt, after, accepted = self._judged(cur, draft, q)
            self.stats.drafts.append(draft)
            self.stats.drafted += 1
            self.stats.accepted += accepted
            self.last_fed = accepted                     # the caches hold an accepted draft: it was verified
            yield nxt
            drawn += 1
            if accepted:
                if drawn == self.count:
                    return
                self.last_fed = False
                yield after
                drawn += 1
            settled = [nxt, after] if accepted else [nxt]
            if device:
                replace = getattr(m.drafter, "replace", None)     # a drafter told the answer (tests)
                if replace is not None:
                    made = m.drafted_pass.draft
                    made.fill_(replace(q + len(settled) + 1, int(made[0])))
            else:
                draft = m.drafter.draft(settled, q)
            cur, q = settled[-1], q + len(settled)
        # a token or two left at the context's end: one-token steps (no room to verify a draft)
        while drawn < self.count:
            cur = sample(m.forward(torch.tensor([[cur]]), q)[0], self.sampling, self.generator)
            self.last_fed = False
            yield cur
            drawn, q = drawn + 1, q + 1

    def _judged(self, cur: int, draft: int, q: int) -> tuple[int, int | None, bool]:
        """The host's pass: verify cur at q and its draft, judge the draft, draw the token after it where it
        was accepted, else take it back (before the token is handed on: the caller may stop there)."""
        m = self.model
        logits = m.verify([cur, draft], q)
        if self.sampling.temperature > 0:               # drawn on the host, as `sample` draws; greedy reads
            logits = logits.cpu()                       # two argmaxes off the device, not 2 x vocab floats
        nxt, accepted = judge(logits[0], draft, self.sampling, self.generator)
        if not accepted:
            m.rewind(q + 1)
            return nxt, None, False
        return nxt, sample(logits[1], self.sampling, self.generator), True
