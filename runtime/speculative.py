"""Greedy speculative decoding with the MTP block as drafter (runtime/draft.py).

Decode reads every weight once a step for a single token; a drafted token verified in the same step costs
its experts and little more. Each step feeds the last token drawn and the MTP block's draft of the token
after it (`ArtifactModel.verify`), whose two rows of logits give the greedy next token and, where that is
the draft, the one after it as well: two tokens for one pass. A rejected draft is taken back
(`ArtifactModel.rewind`) and the step still gives one token. The tokens are the model's greedy tokens
exactly as far as its two-token pass computes what one-token steps compute (bit for bit in float32; in
bfloat16 its kernels differ, so a near-tie may break the other way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0


class SpeculativeGreedy:
    """The greedy tokens after prompt `ids` (all fed) from `first` (drawn from the prompt's logits, not fed), up
    to `count` in all, `first` included. Iterating draws them; `last_fed` says whether the caches already hold
    the last token drawn (they do right after an accepted draft), which the next turn of a conversation must
    not feed again; `stats` counts drafts."""

    def __init__(self, model, ids: list[int], first: int, count: int):
        self.model, self.ids, self.first, self.count = model, ids, first, count
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
        while drawn < self.count and q + 2 <= m.max_len:
            logits = m.verify([cur, draft], q)
            nxt = int(logits[0].argmax())
            self.stats.drafted += 1
            if nxt == draft:
                self.stats.accepted += 1
                after = int(logits[1].argmax())
                self.last_fed = True
                yield nxt
                drawn += 1
                if drawn == self.count:
                    return
                self.last_fed = False
                yield after
                drawn += 1
                draft = m.drafter.draft([nxt, after], q)
                cur, q = after, q + 2
            else:
                m.rewind(q + 1)
                self.last_fed = False
                yield nxt
                drawn += 1
                draft = m.drafter.draft([nxt], q)
                cur, q = nxt, q + 1
        # a token or two left at the context's end: one-token steps (no room to verify a draft)
        while drawn < self.count:
            cur = int(m.forward(torch.tensor([[cur]]), q)[0].argmax())
            self.last_fed = False
            yield cur
            drawn, q = drawn + 1, q + 1

