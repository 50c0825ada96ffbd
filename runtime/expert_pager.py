"""Routed experts under a memory budget: a pool of device slots shared by every layer, the rest read
from a cold store, with the slot pool's policy (runtime/pager_policy.py) deciding who is resident.

Each layer's table entry points at the expert's slot when it is resident, else at its cold copy. The
kernels read either, so a miss is a slower read, never a failure: a captured decode graph stays valid
whatever is resident, and only the tables' values change between steps. The cold copy is the
memory-mapped bank where the processor reading it can follow the host's page tables (CPU runs, and GPUs
with address translation services: GB10, GH200), so it costs page cache, not a second copy in the one
memory such a box has; elsewhere (an H200 over PCIe) it is a pinned host copy the GPU reads over the bus.

The pool is filled at load. After each step the runtime reports what every layer routed to (the
programs write it to their `routed` cache); before the next it gives the next tokens. The pager counts
hits and misses against what was resident during the step, admits the missed experts, prefetches the
hash-routed layers' experts of the next tokens (known exactly from the token ids: `tid2eid`), evicts by
frequency then recency, and copies on its own stream; the next step waits for those copies through an
event.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .expert_bank import ExpertBank, expert_addresses
from .pager_policy import PagerStats, SlotPool


def reads_pageable_memory(device: torch.device) -> bool:
    """Whether this GPU reads pageable host memory through the host's own page tables (ATS), as a GB10 or
    a GH200 does; not an H200 on PCIe (there pageable access, if any, goes through software page faults)."""
    try:
        from cuda.bindings import driver
        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES
    except (ImportError, AttributeError):         # no cuda-python: the kernels cannot run either
        return False
    driver.cuInit(0)
    err, dev = driver.cuDeviceGet(device.index if device.index is not None else torch.cuda.current_device())
    if int(err) != 0:
        return False
    err, value = driver.cuDeviceGetAttribute(attr, dev)
    return int(err) == 0 and value == 1


class PagedExperts:
    def __init__(self, bank: ExpertBank, layers: list[int], device: torch.device, slots: int,
                 tid2eid: dict[int, torch.Tensor] | None = None):
        """`tid2eid[layer]` [vocab, k] for the hash-routed layers among `layers` (exact prefetch)."""
        self.device, self.layers = device, layers
        self.tid2eid = {layer: t.cpu() for layer, t in (tid2eid or {}).items()}
        self.stride = max(bank.entries[layer]["stride"] for layer in layers)
        self.expert_bytes = {layer: bank.entries[layer]["expert_bytes"] for layer in layers}
        self.strides = {layer: bank.entries[layer]["stride"] for layer in layers}
        self.pool = SlotPool(slots)
        self.slab = torch.empty(slots * self.stride, dtype=torch.uint8, device=device)
        cuda = device.type == "cuda"
        self.mapped_cold = not cuda or reads_pageable_memory(device)
        self.cold: dict[int, torch.Tensor] = {}
        self.cold_tables: dict[int, torch.Tensor] = {}
        self.tables: dict[int, torch.Tensor] = {}
        for layer in layers:
            e = bank.entries[layer]
            mapped = bank.layer_bytes(layer)
            if self.mapped_cold:
                store = mapped
            else:
                store = torch.empty(mapped.numel(), dtype=torch.uint8, pin_memory=True).copy_(mapped)
                bank.release(layer)                   # the pinned copy serves from now on
            self.cold[layer] = store
            self.cold_tables[layer] = expert_addresses(store.data_ptr(), e)
            self.tables[layer] = self.cold_tables[layer].clone().to(device)
        # the tables' values on the host (pinned on CUDA, for asynchronous copies), changed entry by entry
        self.host_tables = {layer: t.clone().pin_memory() if cuda else t.clone()
                            for layer, t in self.cold_tables.items()}
        self.bank = bank                              # owns the maps the CPU cold store points into
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.ready = torch.cuda.Event() if cuda else None
        self.bytes_moved = 0
        self.stall_s = 0.0
        self.prefetch_enabled = True                  # off: only the policy's admissions on use (a baseline)
        self.pool.fill(self.fill_order(bank))
        self._apply()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.bytes_moved = 0                          # load-time copies are not the run's
        if self.mapped_cold:                          # the filled experts' file pages are not needed now
            for layer in layers:
                bank.drop_cached(layer, [e for lay, e in self.pool.resident if lay == layer])

    def fill_order(self, bank: ExpertBank) -> list[tuple[int, int]]:
        """The experts that fill the pool at load, best first: the layers take turns so each gets an even
        share; a hash-routed layer offers its experts by how many token ids route to them, the others in
        index order (a router's load is balanced by training: no expert is known to be hotter)."""
        ranked = []
        for layer in self.layers:
            experts = list(range(bank.entries[layer]["experts"]))
            if layer in self.tid2eid:
                uses = torch.bincount(self.tid2eid[layer].flatten().long(), minlength=len(experts))
                experts.sort(key=lambda e: -int(uses[e]))
            ranked.append(experts)
        return [(layer, order[i]) for i in range(max(map(len, ranked)))
                for layer, order in zip(self.layers, ranked) if i < len(order)]

    @property
    def stats(self):
        return self.pool.stats

    def reset_stats(self) -> None:
        """Start counting afresh (hits, misses, bytes moved, stall), keeping what is resident."""
        self.pool.stats = PagerStats()
        self.bytes_moved, self.stall_s = 0, 0.0

    def device_bytes(self) -> int:
        return self.slab.numel()

    def observe(self, routed: dict[int, torch.Tensor]) -> None:
        """After a step: `routed[layer]` [B, k] the experts each layer used. Counts hits and misses against
        what was resident during the step, admits the missed experts and starts copying them."""
        used = torch.stack([routed[layer] for layer in self.layers]).tolist()   # one transfer for all layers
        for layer, experts in zip(self.layers, used):
            self.pool.use([(layer, e) for row in experts for e in row])
        self._apply()

    def prepare(self, tokens: list[int]) -> None:
        """Before a step: prefetch the hash-routed layers' experts of `tokens`, then make the compute
        stream wait for every copy and table update (the wait counts as stall time if it blocks)."""
        for layer, table in (self.tid2eid.items() if self.prefetch_enabled else ()):
            self.pool.prefetch([(layer, int(e)) for t in tokens for e in table[t].tolist()])
        self._apply()
        if self.ready is not None:
            t0 = time.perf_counter()
            if not self.ready.query():
                self.ready.synchronize()
                self.stall_s += time.perf_counter() - t0
            torch.cuda.current_stream(self.device).wait_event(self.ready)

    def _apply(self) -> None:
        """Carry out the pool's admissions and evictions since the last call: copy admitted experts into
        their slots, repoint the table entries that changed."""
        changes, self.pool.changes = self.pool.changes, []
        if not changes:
            return
        # only each expert's last change counts: one admitted and evicted again within the same call is
        # never copied (at most one expert ends up in any slot)
        changes = dict(changes)
        touched = set()
        stream = torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext()
        with stream:
            if self.copy_stream is not None:
                # the step that read the slots being overwritten has finished (the runtime synchronised on
                # its logits); still, order after all work on the compute stream
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            base = self.slab.data_ptr()
            for (layer, e), slot in changes.items():
                touched.add(layer)
                if slot is None:                      # evicted: read from the cold copy again
                    self.host_tables[layer][e] = self.cold_tables[layer][e]
                    continue
                if self.host_tables[layer][e] == base + slot * self.stride:
                    continue                          # evicted and readmitted to the slot it still holds
                n = self.expert_bytes[layer]
                src = self.cold[layer][e * self.strides[layer]:e * self.strides[layer] + n]
                self.slab[slot * self.stride:slot * self.stride + n].copy_(src, non_blocking=True)
                self.bytes_moved += n
                self.host_tables[layer][e] = base + slot * self.stride
            # host tables are reused: the next change to them comes after the step that waited for these
            # copies has finished
            for layer in touched:
                self.tables[layer].copy_(self.host_tables[layer], non_blocking=True)
            if self.ready is not None:
                self.ready.record(self.copy_stream)
