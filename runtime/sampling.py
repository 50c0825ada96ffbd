"""Next-token choice from logits: greedy at temperature 0, else temperature and nucleus (top-p) sampling; OpenAI's
presence and frequency penalties lower the logits of tokens already generated (as vLLM applies them: the answer's
tokens, not the prompt's)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0     # taken from a token's logit once it has been generated
    frequency_penalty: float = 0.0    # taken from a token's logit for each time it has been generated

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None,
           counts: torch.Tensor | None = None) -> int:
    """logits [vocab] (float32) -> a token id; `counts` [vocab]: how often each token has been generated so far
    (the penalties'; kept up to date by the caller, one increment a token)."""
    if s.penalised and counts is not None:
        logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(logits.dtype)
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p          # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
