"""Parameter counts, bytes read per decoded token and memory fit of a model, from its config alone."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .config import ModelConfig
from .layout import TensorSpec, checkpoint_specs

GIB = 1 << 30


@dataclass(frozen=True)
class ModelSizes:
    params_total: int                 # main model, MTP excluded
    params_mtp: int
    params_active: int                # per token: top-k routed experts, input embedding excluded
    params_by_dtype: dict[str, int]   # main model, by stored dtype (MXFP4 counted as FP4)
    checkpoint_bytes: int             # every tensor incl. scales and MTP
    bytes_per_token: int              # weights one decode step reads (MTP excluded)
    expert_bytes: int                 # one routed expert (w1, w3, w2 and scales)


def _expert_index(spec: TensorSpec) -> int | None:
    if ".ffn.experts." not in spec.name:
        return None
    return int(spec.name.split(".ffn.experts.")[1].split(".")[0])


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    main = checkpoint_specs(cfg, include_mtp=False)
    every = checkpoint_specs(cfg, include_mtp=True)
    k = cfg.num_experts_per_tok
    active = read = 0
    by_dtype: Counter[str] = Counter()
    for s in main:
        expert = _expert_index(s)
        by_dtype["FP4" if s.kind == "mxfp4" else s.dtype] += s.params
        routed_out = expert is not None and expert >= k          # count k experts per layer
        if s.name != "embed.weight" and not routed_out:
            active += s.params
        # A decode step reads one embedding row and one tid2eid row, everything else it uses whole.
        if s.name == "embed.weight" or s.name.endswith("tid2eid"):
            read += s.nbytes // s.shape[0]
        elif not routed_out:
            read += s.nbytes
    expert_bytes = sum(s.nbytes for s in main if _expert_index(s) == 0 and s.name.startswith("layers.0."))
    total = sum(s.params for s in main)
    return ModelSizes(
        params_total=total,
        params_mtp=sum(s.params for s in every) - total,
        params_active=active,
        params_by_dtype={d: n for d, n in by_dtype.items() if n},
        checkpoint_bytes=sum(s.nbytes for s in every),
        bytes_per_token=read,
        expert_bytes=expert_bytes,
    )
