"""The MTP block of an artifact as a drafter for speculative decoding (runtime/speculative.py).

DeepSeek V4's MTP block takes the main model's last streams at position i and the token at i + 1 and drafts
the token at i + 2. It runs at position i as one more layer with a sliding-window cache of its own, so it
must see every position the window covers: after a prompt it is fed the prompt's last `window` positions
(the main model's streams kept for them in `recent`), then the positions each verification settles.
Its head is the main model's head matrix behind its own hc_head and norm (`ArtifactModel._logits`).
"""
from __future__ import annotations

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
        self.model = model
        dev = str(model.device)
        self.decode = model._package(entry["programs"]["1"])
        self.sizes = {b["chunk"]: model._package(b["program"]) for b in entry["prefill"]["buckets"]}
        weights = load_file(str(model.root / entry["weights"]), device=dev) | {"embed.weight": model.embed}
        self.weights = dict(sorted(weights.items()))       # the traced key order
        self.head = model.head_of([weights[f"hc_head_{n}"] for n in ("fn", "scale", "base")], weights["norm.weight"])
        self.experts, self.table = experts, experts.tables[entry["layer"]]
        self.fills = {name: float(fill) for name, (_, _, fill) in entry["caches"].items()}
        self.caches = {name: torch.full(shape, float(fill), dtype=getattr(torch, dtype), device=dev)
                       for name, (shape, dtype, fill) in sorted(entry["caches"].items())}

    def draft(self, ids: list[int], start: int) -> int:
        """Feed positions start.. start + len(ids) - 1 (the main model's streams there from `model.recent`, ids
        the tokens after each) and return the greedy draft after the last: the token after ids[-1]'s."""
        m = self.model
        n, dev = len(ids), m.device
        rows = torch.arange(start, start + n, device=dev) % m.recent.size(1)
        h = m.recent.index_select(1, rows)                                      # [1, n, hc, d]
        if n == 1:                                      # the decode program: no padding row through the experts
            x = self.decode(h[:, 0], torch.tensor([start], device=dev), torch.tensor(ids, device=dev),
                            self.table, self.caches, self.weights)
        else:
            size, run = next((s, r) for s, r in self.sizes.items() if s >= n)
            padded_h = torch.zeros(1, size, *h.shape[2:], dtype=h.dtype, device=dev)
            padded_h[:, :n] = h
            padded = torch.zeros(1, size, dtype=torch.int64, device=dev)       # padding: token 0
            padded[0, :n] = torch.tensor(ids)
            x = run(padded_h, torch.tensor([start], device=dev), torch.tensor([n], device=dev), padded,
                    self.table, self.caches, self.weights)[:, n - 1]
        return int(m._logits(x, self.head).argmax(-1)[0])
