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
    return int(torch.multinomial(probabilities(logits, s), 1, generator=generator))


def probabilities(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [vocab] -> the distribution a token is drawn from at temperature s.temperature > 0 with nucleus
    s.top_p: float32 [vocab], summing to 1."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p          # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return probs / probs.sum()


def judge(logits: torch.Tensor, draft: int, s: Sampling, generator: torch.Generator | None) -> tuple[int, bool]:
    """The next token given its logits [vocab] and a drafted one: (token, whether it is the draft), drawn as
    `sample` draws (no penalties). Greedy keeps the draft where it is the argmax. Sampling keeps it with its
    probability p(draft), else draws from p without it: p(draft) * [x = draft] + (1 - p(draft)) * p(x) /
    (1 - p(draft)) * [x != draft] = p(x), so the tokens follow the model's distribution exactly (the rejection
    rule of speculative sampling for a draft that is one token, not a distribution)."""
    if s.temperature <= 0:
        token = int(logits.argmax())
        return token, token == draft
    probs = probabilities(logits, s)
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return draft, True
    probs[draft] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator)), False
