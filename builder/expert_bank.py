"""Expert bank: routed experts repacked from the checkpoint into one file per layer, in the kernels'
layout (`plugins.moe_experts.pack_expert`: each expert contiguous), every expert at a multiple of
4096 bytes so it can be read with direct I/O, with a sha256 per expert.

Streamed one expert at a time (never a whole layer in memory), each of its six tensors read from the
checkpoint with pread and hashed and written as read: the same bytes as `pack_expert`'s, without its
memory-map page faults and copies. Reading, hashing and writing release the GIL, so layers are packed
side by side in threads (`builder.build`; timings: bench/expert_bank_pack.py, README "Artifacts"). Each
file is written under a temporary name and renamed when complete, so an interrupted build leaves no
half-written bank.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from plugins.moe_experts import bank_parts, expert_nbytes

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
    # the checkpoint tensor of each bank part: w1 -> w1.weight, s1 -> w1.scale, ...
    names = [f"w{part[1]}.{'weight' if part[0] == 'w' else 'scale'}" for part, _, _ in bank_parts(d, f)]
    with tmp.open("wb") as out:
        for e in range(cfg.n_routed_experts):
            p = f"{prefix or f'layers.{layer}.'}ffn.experts.{e}."
            digest, written = hashlib.sha256(), 0
            for name in names:
                data = ckpt.read_bytes(p + name)
                digest.update(data)
                out.write(data)
                written += len(data)
            assert written == nbytes
            sums.append(digest.hexdigest())
            out.write(pad)
            if progress:
                progress(e + 1, cfg.n_routed_experts)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return {"file": path.name, "layer": layer, "experts": cfg.n_routed_experts, "expert_bytes": nbytes,
            "stride": stride, "sha256": sums}

