"""The MTP block of an artifact as a drafter for speculative decoding (runtime/speculative.py).

DeepSeek V4's MTP block takes the main model's last streams at position i and the token at i + 1 and drafts
the token at i + 2. It runs at position i as one more layer with a sliding-window cache of its own, so it
must see every position the window covers: after a prompt it is fed the prompt's last `window` positions
(the main model's streams kept for them in `recent`), then the positions each verification settles.
Its head is the main model's head matrix behind its own hc_head and norm (`ArtifactModel._logits`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from safetensors.torch import load_file


@dataclass
class Head:
    """What turns hc streams into logits besides the shared head matrix: hc_head's weights, the final norm,
    and hc_head in `dsv4::hc_pre_norm`'s form where the GPU kernel serves (else None)."""
    hc: list[torch.Tensor]
    norm: torch.Tensor
    hc_pre: list[torch.Tensor] | None = None


class MTPDraft:
    def __init__(self, model, entry: dict, experts):
        """`model`: the ArtifactModel (its embedding, head, packages, streams of recent positions); `entry`: the
        MTP block's manifest entry, with its decode program and prefill programs (`prefill.buckets`); `experts`:
        the store holding the block's routed experts (runtime/expert_store.py)."""
        self.model = weakref.proxy(model)   # the model holds its drafter: no cycle keeping either alive
        dev = str(model.device)
        self.decode = model._package(entry["programs"]["1"])
        self.sizes = {b["chunk"]: model._package(b["program"])        # smallest first (`draft`)
                      for b in sorted(entry["prefill"]["buckets"], key=lambda b: b["chunk"])}
        weights = load_file(str(model.root / entry["weights"]), device=dev) | {"embed.weight": model.embed}
        self.weights = dict(sorted(weights.items()))       # the traced key order
        self.head = model.head_of([weights[f"hc_head_{n}"] for n in ("fn", "scale", "base")], weights["norm.weight"])
        self.experts, self.table = experts, experts.tables[entry["layer"]]
        self.fills = {name: float(fill) for name, (_, _, fill) in entry["caches"].items()}
        self.graphs: dict[int, tuple] = {}             # drafts by program size as CUDA graphs (`capture`)
        self.caches = {name: torch.full(shape, float(fill), dtype=getattr(torch, dtype), device=dev)
                       for name, (shape, dtype, fill) in sorted(entry["caches"].items())}

    def draft(self, ids: list[int], start: int) -> int:
        """Feed positions start.. start + len(ids) - 1 (the main model's streams there from `model.recent`, ids
        the tokens after each) and return the greedy draft after the last: the token after ids[-1]'s. Each
        program size (one or two positions: each decode step's; the window: a turn's fill over the prompt's
        last positions) replays a CUDA graph where `capture` made one."""
        m, n = self.model, len(ids)
        size = 1 if n == 1 else next(s for s in self.sizes if s >= n)
        if size in self.graphs:
            graph, padded, start_t, n_t, out = self.graphs[size]
            if size > 2:                                 # the window's graph takes any count: padding token 0
                padded.zero_()
                n_t.fill_(n)
            padded[:, :n].copy_(torch.tensor([ids]), non_blocking=True)
            start_t.fill_(start)
            graph.replay()
            return int(out[0])
        padded = torch.zeros(1, size, dtype=torch.int64)                       # padding: token 0
        padded[0, :n] = torch.tensor(ids)
        return int(self._run(padded.to(m.device), torch.tensor([start], device=m.device),
                             torch.tensor([n], device=m.device))[0])

    def _run(self, padded: torch.Tensor, start: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The draft after position start + n - 1, as an int64 [1] on the device, from ids padded [1, size] (n
        real) at positions start..: the decode program for size 1, else the prefill program of that size. No
        host value, so a CUDA graph captures it."""
        m, size = self.model, padded.size(1)
        rows = (start + torch.arange(size, device=m.device)) % m.recent.size(1)
        h = m.recent.index_select(1, rows)            # [1, size, hc, d]; padding rows' streams are ignored
        if size == 1:
            x = self.decode(h[:, 0], start, padded[0], self.table, self.caches, self.weights)
        else:
            x = self.sizes[size](h, start, n, padded, self.table, self.caches, self.weights)
            x = x.index_select(1, n - 1)[:, 0]
        return m.pick(m._logits(x, self.head))

    def capture(self) -> None:
        """The drafts of one and two positions (after a rejected and an accepted draft: every decode step's) and
        of the window (the fill over a prompt's last positions, once a turn: each of its kernels launched from the
        host otherwise) as CUDA graphs over static inputs: one replay each. A size that does not capture, or whose
        memory would pass the budget, runs plainly with a warning."""
        for size in sorted({1, 2, max(self.sizes)}):
            graphed = self.model._capture_size(size, self._run, f"the MTP block's drafts of {size} positions")
            if graphed is not None:
                self.graphs[size] = graphed

