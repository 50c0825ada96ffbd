"""Forced-token harness: logits of a prompt and of each forced continuation token, for comparing
implementations step by step (`dsv4 forced`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runtime.errors import UserError


def parse_ids(text: str, what: str) -> list[int]:
    """Token ids separated by commas and/or whitespace."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise UserError(f"{what}: {bad!r} is not a token id") from None


def check_ids(ids: list[int], vocab: int, what: str) -> None:
    for i in ids:
        if not 0 <= i < vocab:
            raise UserError(f"{what}: token id {i} is outside the vocabulary (0..{vocab - 1})")


@torch.inference_mode()
def forced_logits(model, prompt: list[int], forced: list[int], paired: bool = False) -> torch.Tensor:
    """float32 [1 + len(forced), vocab]: row 0 after prefilling `prompt`, row i after feeding
    forced[i-1] as one decode step. `model` has `reset()` and `forward(ids, start)`. `paired`: the forced
    tokens go two at a time through the verification of a drafted token (an ArtifactModel's `verify`, the
    pass speculative decoding runs), a last odd one as a decode step: the same rows, from that path."""
    model.reset(1)
    rows = [model.forward(torch.tensor([prompt]), 0)[0].float().cpu()]
    step = 0
    while step < len(forced):
        at = len(prompt) + step
        if paired and step + 1 < len(forced):
            rows.extend(model.verify(forced[step:step + 2], at).float().cpu())
            step += 2
        else:
            rows.append(model.forward(torch.tensor([[forced[step]]]), at)[0].float().cpu())
            step += 1
    return torch.stack(rows)


class TokenByToken:
    """A model (`reset()`, `forward(ids, start)`) fed one token per call: a prompt goes through the decode
    step instead of prefill, for comparing the two paths."""

    def __init__(self, model):
        self.model = model

    def reset(self, batch: int = 1) -> None:
        self.model.reset(batch)

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        for i in range(ids.size(1)):
            logits = self.model.forward(ids[:, i:i + 1], start + i)
        return logits


def save_logits(path: str | Path, logits: torch.Tensor, prompt: list[int], forced: list[int], source: str) -> None:
    meta = {"prompt_ids": ",".join(map(str, prompt)), "forced_ids": ",".join(map(str, forced)), "source": source}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits.contiguous()}, str(path), metadata=meta)


def load_logits(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no logits file at {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    if "logits" not in tensors or tensors["logits"].dim() != 2:
        raise UserError(f"{path} has no 2-D tensor 'logits'")
    return tensors["logits"].float()


@dataclass(frozen=True)
class StepStats:
    step: int
    argmax_a: int
    argmax_b: int
    cosine: float
    max_abs: float


def compare(a: torch.Tensor, b: torch.Tensor) -> list[StepStats]:
    if a.shape != b.shape:
        raise UserError(f"logits shapes differ: {list(a.shape)} vs {list(b.shape)}")
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    diff = (a - b).abs().amax(-1)
    return [StepStats(i, int(a[i].argmax()), int(b[i].argmax()), float(cos[i]), float(diff[i]))
            for i in range(a.size(0))]
