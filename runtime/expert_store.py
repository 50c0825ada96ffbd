"""Where routed experts live while an artifact runs, and the expert tables the programs read.

A table is one int64 address per expert of a layer. The kernels follow it to device memory or to
pinned host memory alike, so a table can change between steps without recompiling or recapturing
anything (the table's storage stays put; only its values change).

    HostExperts     CPU runs: addresses into the memory-mapped expert bank
    DeviceExperts   every expert of every chained layer copied into device memory once
"""
from __future__ import annotations

import torch

from .expert_bank import ExpertBank, expert_addresses
from .manifest import Progress, no_progress


class HostExperts:
    def __init__(self, bank: ExpertBank, layers: list[int]):
        self.bank = bank                     # owns the maps the addresses point into
        self.tables = {layer: bank.addresses(layer) for layer in layers}


class DeviceExperts:
    def __init__(self, bank: ExpertBank, layers: list[int], device: torch.device,
                 progress: Progress = no_progress, chunk: int = 256 << 20):
        self.slabs: dict[int, torch.Tensor] = {}
        self.tables: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            progress("copying experts to the GPU", i, len(layers))
            entry = bank.entries[layer]
            n, stride = entry["experts"], entry["stride"]
            slab = torch.empty(n * stride, dtype=torch.uint8, device=device)
            mapped = bank.layer_bytes(layer)
            for at in range(0, n * stride, chunk):          # bounded host memory: the page cache does the rest
                slab[at:at + chunk].copy_(mapped[at:at + chunk])
            torch.cuda.synchronize(device)
            bank.release(layer)
            self.slabs[layer] = slab
            self.tables[layer] = expert_addresses(slab.data_ptr(), entry, device)
        progress("copying experts to the GPU", len(layers), len(layers))
