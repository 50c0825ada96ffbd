"""Mixture of experts of one layer: gate (hash- or score-routed), MXFP4 routed experts, shared expert."""
from __future__ import annotations

from typing import Callable

import torch

from plugins.formats import mxfp4_dequant
from plugins.ops import moe_routed_oracle
from plugins.oracle import FP8Linear, route_from_logits, route_weights, router_scores, swiglu, wide, wide_dtype

from ..config import ModelConfig

Weights = Callable[[str], torch.Tensor]


def route(cfg: ModelConfig, x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None,
          tid2eid: torch.Tensor | None, ids: torch.Tensor, product=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d], ids [n] -> (weights [n, k] float32, experts [n, k]).

    Scores in float32; the bias only chooses experts; hash layers take experts from the token id.
    `product(x, gate_w)` computes the scores' logits from x as it is, widened (layer programs pass their op;
    same values).
    """
    if product is not None:
        logits = product(x, gate_w)
    else:
        xf = wide(x)
        logits = xf @ gate_w.to(xf.dtype).T
    if tid2eid is None:
        return route_from_logits(logits, bias, cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor)
    experts = tid2eid[ids]
    scores = router_scores(logits, cfg.scoring_func)
    return route_weights(scores, experts, cfg.scoring_func, cfg.routed_scaling_factor), experts


class MoE:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, act: torch.dtype):
        self.cfg, self.w, self.prefix, self.wide = cfg, w, f"{prefix}ffn.", wide_dtype(act)
        p = self.prefix
        self.gate = w(f"{p}gate.weight")
        hashed = cfg.is_hash_layer(layer)
        self.tid2eid = w(f"{p}gate.tid2eid").to(torch.int32) if hashed else None
        self.bias = None if hashed else w(f"{p}gate.bias")
        # Dequantised experts cached up to ~256 MB per layer (all of them on small models).
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.cache_size = max(2, (256 << 20) // per_expert)
        self.shared = [FP8Linear(w(f"{p}shared_experts.{n}.weight"), w(f"{p}shared_experts.{n}.scale"), act)
                       for n in ("w1", "w3", "w2")]

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantised w1, w3, w2 of routed expert `e`, kept in a small cache."""
        if e not in self.cache:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            base = f"{self.prefix}experts.{e}"
            self.cache[e] = tuple(mxfp4_dequant(self.w(f"{base}.{n}.weight"), self.w(f"{base}.{n}.scale"))
                                  .to(self.wide) for n in ("w1", "w3", "w2"))
        return self.cache[e]

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = route(self.cfg, x, self.gate, self.bias, self.tid2eid, ids.flatten())
        y = moe_routed_oracle(x, experts, weights, self.expert_weights, self.cfg.swiglu_limit)
        w1, w3, w2 = self.shared
        y += w2(swiglu(w1(x), w3(x), self.cfg.swiglu_limit).to(x.dtype))
        return y.to(x.dtype).view(shape)
