"""Runs a built artifact: the decode layer programs (AOTInductor packages) chained over caches
allocated once, routed experts read through tables of addresses into the memory-mapped expert bank.

`ArtifactModel` has the reference model's interface (`reset`, `forward(ids, start)`), so the
forced-token harness drives both. The prompt goes through the same one-token programs as decoding
(prefill programs do not exist yet).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import plugins.ops  # noqa: F401  (the packages call torch.ops.dsv4)
from plugins.oracle import hc_head, rms_norm, wide, wide_dtype

from .expert_bank import ExpertBank
from .manifest import load_manifest


class _Config:
    """The few config values the runtime's head needs, read from the artifact's config.json."""

    def __init__(self, raw: dict):
        self.hc_mult, self.hidden_size = raw["hc_mult"], raw["hidden_size"]
        self.rms_norm_eps, self.hc_eps = raw["rms_norm_eps"], raw["hc_eps"]
        self.vocab_size = raw["vocab_size"]


class ArtifactModel:
    def __init__(self, root: str | Path, device: str = "cpu"):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if device != "cpu":
            from .errors import UserError
            raise UserError("artifacts run on the CPU only so far (the backend built is aoti for cpu)")
        self.config = _Config(json.loads((self.root / "config.json").read_text()))
        self.act = getattr(torch, self.manifest["dtype"])
        self.max_len = self.manifest["max_context"]
        self.work = wide_dtype(self.act)
        dense = load_file(str(self.root / "dense.safetensors"))
        self.embed = dense["embed.weight"].to(self.act)
        self.head = dense["head.weight"].to(self.work)
        self.norm = dense["norm.weight"].to(self.work)
        self.head_hc = [dense[f"hc_head_{n}"].to(self.work) for n in ("fn", "scale", "base")]
        bank_entries = json.loads((self.root / "bank.json").read_text())
        self.bank = ExpertBank(self.root / "experts", list(bank_entries.values()))
        main = [e for e in self.manifest["layers"] if e["prefix"].startswith("layers.")]
        self.layers = []
        for e in main:
            program = torch._inductor.aoti_load_package(str(self.root / e["program"]))
            self.layers.append((program, self.bank.addresses(e["layer"]), e["caches"]))
        self.reset()

    def reset(self, batch: int = 1) -> None:
        if batch != 1:
            raise ValueError("this artifact was built for decode batch 1")
        self.caches = []
        for _, _, spec in self.layers:
            self.caches.append({name: torch.full(shape, float(fill), dtype=getattr(torch, dtype))
                                for name, (shape, dtype, fill) in spec.items()})

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Feed ids [1, s] at positions start.. one token at a time; float32 logits [1, vocab] of the last."""
        if start + ids.size(1) > self.max_len:
            raise ValueError(f"position {start + ids.size(1)} exceeds the artifact's context of {self.max_len}")
        for i in range(ids.size(1)):
            token = ids[:, i]
            h = self.embed[token][:, None].repeat(1, self.config.hc_mult, 1)
            pos = torch.tensor([start + i])
            for (program, table, _), caches in zip(self.layers, self.caches):
                h = program(h, pos, token, table, caches)
        y = rms_norm(hc_head(h[:, None], *self.head_hc, self.config)[:, 0], self.norm, self.config.rms_norm_eps)
        return torch.nn.functional.linear(wide(y), self.head).float()
