"""Routed experts under a memory budget: a pool of device slots shared by every layer, the rest read
from a cold store, with the slot pool's policy (runtime/pager_policy.py) deciding who is resident.

Each layer's table entry points at the expert's slot when it is resident, else at its cold copy. The
kernels read either, so a miss is a slower read, never a failure: a captured decode graph stays valid
whatever is resident, and only the tables' values change. The cold copy is the memory-mapped bank where the
processor reading it can follow the host's page tables (CPU runs, and GPUs with address translation
services: GB10, GH200), so it costs page cache, not a second copy in the one memory such a box has;
elsewhere (an H200 over PCIe) it is a pinned host copy the GPU reads over the bus.

A step waits only for the copies into its first layers (`WAITED`, below), which run on a stream of their
own; predicted copies run on a second (they are needed within a layer), the other admissions on a third.
A copy repoints the table entry only once the slot holds the expert, so a kernel reads the cold copy or the
complete slot, whichever the entry says when it looks. What must never happen is a slot overwritten while a
kernel may still read it, so an expert leaves its slot only when no running work can read it: before a step
starts (its entry repointed to the cold copy ahead of the step) or, during a step, if its layer has already
run in that step (its entry repointed on a side stream the next step waits for); an expert whose own copy
is still in flight stays.

Per step: `begin_step(tokens)` admits the previous step's misses (those the pool's frequency rule lets in)
and prefetches the hash-routed layers' experts of `tokens` (known exactly from `tid2eid`); inside the step
(and its CUDA graph) `before_layer` records what each layer's table says as the layer starts (what hits
are counted against) and runs the route predictor, whose picks reach the host mid-step; `follow()`, called
once the step is launched, prefetches each prediction as it arrives; `end_step(routed)` counts hits and
misses.
"""
from __future__ import annotations

import contextlib

import torch

from .expert_bank import ExpertBank, expert_addresses
from .manifest import Progress, no_progress
from .pager_policy import PagerStats, SlotPool
from .route_predictor import RoutePredictor

# the chained layers whose admissions a step waits for (begin_step): the predictor's lead is one layer
WAITED = 2
# predicted experts copied per layer, most likely first: the lead is one layer, about 0.3 ms at Flash size
# on the H200, and one expert takes about that over PCIe. A copy still in flight when its layer starts
# leaves the kernel reading the cold copy beside it: the bus bytes twice and a miss all the same.
PREDICTED_COPIES = 2
# predicted copies evict no expert of the first WAITED layers: the next step would wait to copy those back.
# On the tiny artifact (CPU, 60 slots for 80 experts, 48 tokens) letting them evict such experts made the
# steps wait for 2.14 MB of copies (15 of them experts a prediction had evicted) against 1.41 MB with hash
# prefetch alone; sparing them, 1.57 MB (none), at the same hit rate. Not yet measured at Flash size, where
# the H200's wait with prediction was 54-58 ms against 41-42 (session 13's sweep, before this).
SPARE_WAITED = True


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
                 tid2eid: dict[int, torch.Tensor] | None = None, prefetch: bool = True,
                 progress: Progress = no_progress):
        """`layers`: the chained layers in order; `tid2eid[layer]` [vocab, k] for the hash-routed ones
        (exact prefetch); `prefetch` off leaves only admissions on a miss (the baseline)."""
        self.device, self.layers, self.prefetch_enabled = device, layers, prefetch
        # the module's defaults; bench/pager_sweep.py varies them on one loaded artifact
        self.waited, self.predicted_copies, self.spare_waited = WAITED, PREDICTED_COPIES, SPARE_WAITED
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.tid2eid = {layer: t.cpu() for layer, t in (tid2eid or {}).items()}
        self.stride = max(bank.entries[layer]["stride"] for layer in layers)
        self.expert_bytes = {layer: bank.entries[layer]["expert_bytes"] for layer in layers}
        self.strides = {layer: bank.entries[layer]["stride"] for layer in layers}
        self.pool = SlotPool(slots)
        self.slab = torch.empty(slots * self.stride, dtype=torch.uint8, device=device)
        cuda = device.type == "cuda"
        self.mapped_cold = not cuda or reads_pageable_memory(device)
        self.cold: dict[int, torch.Tensor] = {}
        self.cold_tables: dict[int, list[int]] = {}
        self.tables: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            progress("reading experts", i, len(layers))
            e = bank.entries[layer]
            mapped = bank.layer_bytes(layer)
            if self.mapped_cold:
                store = mapped
            else:
                store = torch.empty(mapped.numel(), dtype=torch.uint8, pin_memory=True).copy_(mapped)
                bank.release(layer)                   # the pinned copy serves from now on
            self.cold[layer] = store
            table = expert_addresses(store.data_ptr(), e)
            self.cold_tables[layer] = table.tolist()
            self.tables[layer] = table.to(device)
        progress("reading experts", len(layers), len(layers))
        self.snapshots = torch.zeros(len(layers), max(t.numel() for t in self.tables.values()), dtype=torch.int64,
                                     device=device)
        self.bank = bank                              # owns the maps the CPU cold store points into
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        # the copies a step waits for get a stream of their own, of the highest priority: on the shared one
        # they queued behind the last step's predicted copies still in flight (H200 Flash-8, session 9: the
        # wait grew with prediction); on their own they still shared PCIe with them (session 10: it grew less)
        self.urgent_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        # predicted copies are needed within a layer: not queued behind the admissions racing the step
        self.ahead_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self.table_stream = torch.cuda.Stream(device) if cuda else None
        self.repointed = torch.cuda.Event() if cuda else None     # the last mid-step repointing to a cold copy
        # admissions not yet settled: their copy's event (None on a CPU, where copies land at once)
        self.in_flight: dict[tuple[int, int], torch.cuda.Event | None] = {}
        self.predictor: RoutePredictor | None = None
        self.predicted: dict[int, list[int]] = {}
        self.missed: list[tuple[int, int]] = []
        self.reset_stats()
        self.pool.fill(self.fill_order(bank))
        self._carry_out(self._current(), self.copy_stream)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.bytes_moved = 0                          # load-time copies are not the run's
        self._settle()                                # the filled experts' file pages are not needed now

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
    def stats(self) -> PagerStats:
        return self.pool.stats

    def reset_stats(self) -> None:
        """Start counting afresh (hits, misses, bytes moved and read cold, predictions, time the GPU waited
        for copies), keeping what is resident."""
        self.pool.stats = PagerStats()
        self.bytes_moved = self.cold_bytes_read = 0
        self.stall_s, self.waits = 0.0, []
        # what the steps waited for: bytes copied before they started, and how many of those copies
        # brought back an expert that a predicted copy had evicted (`displaced`: those not back yet)
        self.waited_bytes = self.waited_again = 0
        self.displaced: set[tuple[int, int]] = set()

    def report(self) -> dict:
        """The counters since `reset_stats`, for benchmark reports."""
        st = self.stats
        return {"slots": self.pool.slots, "hit_rate": st.hit_rate, "hits": st.hits, "misses": st.misses,
                "prefetch_hits": st.prefetch_hits, "admissions": st.admissions, "prefetches": st.prefetches,
                "experts_predicted_for": st.predicted, "predicted_right": st.predicted_used,
                "bytes_copied_in": self.bytes_moved, "bytes_read_cold": self.cold_bytes_read,
                "stall_s": self.stall_s, "waited_bytes": self.waited_bytes, "waited_again": self.waited_again}

    def device_bytes(self) -> int:
        return self.slab.numel()

    def predict_with(self, predictor: RoutePredictor) -> None:
        """Prefetch the score-routed layers' experts predicted one layer ahead by `predictor`."""
        self.predictor = predictor

    # ------------------------------------------------------------------ the step, host side
    def begin_step(self, tokens: list[int]) -> None:
        """Before a step (the last one finished): admit its misses, prefetch the hash-routed layers' experts
        of `tokens`, repoint evicted experts to their cold copies ahead of the step. The step waits for the
        copies into its first `waited` layers (WAITED), which have no time to land otherwise: over PCIe an expert
        (12.6 MB at Flash size) should copy in about 0.25 ms at PCIe 5 rates (not measured), while each miss
        cost about 1.7 ms in the H200's Flash-8 paged run (decode time lost to paging, less the time waiting
        for copies, over the misses: a kernel reading the expert from host memory); the other copies race
        the step."""
        stream = self._current()
        if self.repointed is not None:
            stream.wait_event(self.repointed)
        self._settle()
        hashed = {layer: [(layer, int(e)) for t in tokens for e in table[t].tolist()]
                  for layer, table in (self.tid2eid.items() if self.prefetch_enabled else ())}
        for early in (True, False):
            chosen = lambda key: (self.position[key[0]] < self.waited) == early      # noqa: E731
            self.pool.admit([key for key in self.missed if chosen(key)], busy=self._in_flight)
            for layer, keys in hashed.items():
                if chosen((layer, 0)):
                    self.pool.prefetch(keys, busy=self._in_flight)
            copied = self._carry_out(stream, self.urgent_stream if early else self.copy_stream, wait=early)
            if early:
                self.waited_bytes += sum(self.expert_bytes[layer] for layer, _ in copied)
                self.waited_again += len(self.displaced.intersection(copied))
            self.displaced.difference_update(copied)
            if early and self.copy_stream is not None:
                # the later layers' copies start once the waited ones have landed, not beside them on PCIe
                self.copy_stream.wait_stream(self.urgent_stream)
        self.missed = []
        if self.predictor is not None:
            self.predictor.clear()

    def follow(self) -> None:
        """While the launched step runs: prefetch each layer's predicted experts as they arrive, evicting
        only experts of layers that have run (the prediction for layer j is made as layer j-1 starts), and
        with `spare_waited` none of the first `waited` layers'."""
        if self.predictor is None:
            return
        for j in self.predictor.order:
            layer = self.layers[j]
            self.predicted[layer] = self.predictor.wait(j)
            cold = [(layer, e) for e in self.predicted[layer] if (layer, e) not in self.pool.resident]
            run = self.layers[self.waited if self.spare_waited else 0:max(j - 1, 0)]   # layers done this step
            self.pool.prefetch(cold[:self.predicted_copies], layers=run, busy=self._in_flight)
            self.displaced.update(key for key, slot in self.pool.changes if slot is None)
            self.displaced.difference_update(self._carry_out(self.table_stream, self.ahead_stream))
            if self.mapped_cold:                      # those left cold: read ahead from the file
                self.bank.will_need(layer, [e for e in self.predicted[layer] if (layer, e) not in self.pool.resident])

    def end_step(self, routed: list[torch.Tensor]) -> None:
        """After a step: `routed[i]` [B, k] the experts chained layer i used. A use is a hit if the layer's
        table pointed at a slot when the layer started; misses are admitted before the next step."""
        base, end = self.slab.data_ptr(), self.slab.data_ptr() + self.slab.numel()
        ids = torch.stack([r.reshape(-1).long() for r in routed])                  # [layers, B*k]
        seen = self.snapshots.gather(1, ids)
        rows = torch.cat([ids, ((seen >= base) & (seen < end)).long()], 1).tolist()   # one transfer
        for layer, row in zip(self.layers, rows):
            experts, hits = row[:len(row) // 2], row[len(row) // 2:]
            misses = self.pool.record([(layer, e) for e in experts], [bool(h) for h in hits])
            self.missed += misses
            self.cold_bytes_read += len(misses) * self.expert_bytes[layer]
            if layer in self.predicted:
                self.stats.predicted += len(set(experts))
                self.stats.predicted_used += len(set(experts) & set(self.predicted[layer]))
        self.predicted = {}
        self.stall_s += sum(before.elapsed_time(after) for before, after in self.waits) / 1e3
        self.waits = []

    # ------------------------------------------------------------------ the step, device side
    def before_layer(self, i: int, h: torch.Tensor) -> None:
        """Inside the step, as chained layer i starts on streams h: note its table; predict layer i+1."""
        table = self.tables[self.layers[i]]
        self.snapshots[i, :table.numel()].copy_(table)
        if self.predictor is not None and i + 1 in self.predictor.index:
            self.predictor(i + 1, h)

    # ------------------------------------------------------------------ copies
    def _current(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _settle(self) -> None:
        """Forget the admissions whose copies have landed; where the cold store is the mapped bank, drop their
        file pages: the slot holds those bytes now, and on a GB10 a cached page is a second copy in the one
        memory (page cache kept in check)."""
        landed = [key for key, event in self.in_flight.items() if event is None or event.query()]
        for key in landed:
            del self.in_flight[key]
        if self.mapped_cold:
            for layer in {lay for lay, _ in landed}:
                self.bank.drop_cached(layer, [e for lay, e in landed if lay == layer])

    def _in_flight(self, key: tuple[int, int]) -> bool:
        """Whether the expert's admission copy may not have landed yet: until it has, it stays."""
        event = self.in_flight.get(key)
        return event is not None and not event.query()

    def _carry_out(self, repoint_stream, copies, wait: bool = False) -> list[tuple[int, int]]:
        """Carry out the pool's evictions and admissions since the last call: evicted experts' entries back
        to their cold copies on `repoint_stream`, then on the stream `copies` each admitted expert copied
        into its slot and its entry repointed there; with `wait`, the current stream waits for those copies.
        Returns the experts copied in."""
        changes, self.pool.changes = self.pool.changes, []
        final = dict(changes)                  # admitted then evicted within one call: never copied
        if not final:
            return []
        cuda = self.copy_stream is not None
        with torch.cuda.stream(repoint_stream) if cuda else contextlib.nullcontext():
            # every expert that left a slot, readmitted or not: its entry must not point at a slot that
            # another expert's copy may be overwriting
            for layer, e in {key for key, slot in changes if slot is None}:
                self.tables[layer][e].fill_(self.cold_tables[layer][e])
            if cuda:
                copies.wait_stream(repoint_stream)
                if repoint_stream is self.table_stream:
                    self.repointed.record(repoint_stream)
        with torch.cuda.stream(copies) if cuda else contextlib.nullcontext():
            for (layer, e), slot in final.items():
                if slot is None:
                    continue
                n, at = self.expert_bytes[layer], slot * self.stride
                self.slab[at:at + n].copy_(self.cold[layer][e * self.strides[layer]:e * self.strides[layer] + n],
                                           non_blocking=True)
                self.tables[layer][e].fill_(self.slab.data_ptr() + at)
                self.bytes_moved += n
                self.in_flight[(layer, e)] = torch.cuda.Event() if cuda else None
                if cuda:
                    self.in_flight[(layer, e)].record(copies)
        if cuda and wait:
            # the wait, timed on the GPU between two events (read after the step): the stall on copies
            stream = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            stream.wait_stream(copies)
            after.record(stream)
            self.waits.append((before, after))
        return [key for key, slot in final.items() if slot is not None]
