"""Expert bank: routed experts repacked from the checkpoint into one file per layer, in the kernels'
layout (`plugins.moe_experts.pack_expert`: each expert contiguous), every expert at a multiple of
4096 bytes so it can be read with direct I/O, with a sha256 per expert.

Streamed one expert at a time (never a whole layer in memory); each file is written under a temporary
name and renamed when complete, so an interrupted build leaves no half-written bank.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from plugins.moe_experts import expert_nbytes, pack_expert

from .checkpoint import Checkpoint

ALIGN = 4096


def stride_of(expert_bytes: int) -> int:
    return -(-expert_bytes // ALIGN) * ALIGN


def write_layer_bank(ckpt: Checkpoint, layer: int, path: Path, progress: Callable[[int, int], None] | None = None,
                     prefix: str | None = None) -> dict:
    """Write the routed experts of `layer` (tensors under `prefix`, default 'layers.N.') to `path`;
    return its bank entry (file, offsets, checksums)."""
    cfg = ckpt.config
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    nbytes = expert_nbytes(d, f)
    stride = stride_of(nbytes)
    pad = bytes(stride - nbytes)
    sums = []
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as out:
        for e in range(cfg.n_routed_experts):
            p = f"{prefix or f'layers.{layer}.'}ffn.experts.{e}."
            blob = pack_expert(*_expert_tensors(ckpt, p)).numpy().tobytes()
            assert len(blob) == nbytes
            sums.append(hashlib.sha256(blob).hexdigest())
            out.write(blob)
            out.write(pad)
            if progress:
                progress(e + 1, cfg.n_routed_experts)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return {"file": path.name, "layer": layer, "experts": cfg.n_routed_experts, "expert_bytes": nbytes,
            "stride": stride, "sha256": sums}


def _expert_tensors(ckpt: Checkpoint, prefix: str) -> tuple:
    """w1, s1, w3, s3, w2, s2 of one expert, in `pack_expert`'s argument order."""
    return tuple(ckpt.get(f"{prefix}{w}.{k}") for w in ("w1", "w3", "w2") for k in ("weight", "scale"))
