"""Expert pager policy: which routed experts occupy the device slot pool, decided per decode step.

This is the bookkeeping half of the pager (no copies): a fixed pool of slots, experts admitted on use
or ahead of use (prefetch), evicted by frequency with recency as the tie-break (counts age by halving,
so yesterday's favourites fade). The caller says which experts may be evicted (runtime/expert_pager.py:
none a running step may still read). `changes` lists what a copy engine must carry out; `simulate` replays
a routing trace to measure hit rates.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

Key = tuple[int, int]      # (layer, expert)
ADMIT_RULES = ("frequency", "always")


@dataclass
class PagerStats:
    hits: int = 0
    misses: int = 0            # needed and not resident: read from the cold copy (host memory or file)
    admissions: int = 0        # copied in after a miss
    prefetches: int = 0        # copied ahead of use
    prefetch_hits: int = 0     # needed experts that were resident thanks to a prefetch
    evictions: int = 0
    predicted: int = 0         # experts used by layers whose experts were predicted
    predicted_used: int = 0    # of those, the ones the prediction named

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


@dataclass
class SlotPool:
    slots: int
    aging_period: int = 1024           # accesses between doublings of what a use counts (old counts fade)
    resident: dict[Key, int] = field(default_factory=dict)       # key -> slot
    count: dict[Key, float] = field(default_factory=dict)
    last_use: dict[Key, int] = field(default_factory=dict)
    prefetched: set[Key] = field(default_factory=set)
    clock: int = 0
    unit: float = 1.0                  # what one use adds to a count now
    heaps: dict = field(default_factory=dict)   # layer -> heap of (count, last use, key), stale entries skipped
    stats: PagerStats = field(default_factory=PagerStats)
    # "frequency": a missed expert replaces only a resident one it outweighs by more than one use (aged
    # counts): copying it in costs as many bus bytes as one cold read, so it pays only if it is used again
    # more often than the expert it evicts would have been. On a Zipf trace this copies a third fewer
    # bytes at the same hit rate (tests/test_pager_policy.py). "always": every miss comes in (up to session 11)
    admit_rule: str = "frequency"
    # (key, slot) admitted or (key, None) evicted, in order: what a copy engine must carry out
    changes: list[tuple[Key, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("the slot pool needs at least one slot")
        if self.admit_rule not in ADMIT_RULES:
            raise ValueError(f"admit_rule must be one of {ADMIT_RULES}, not {self.admit_rule!r}")
        self.free = list(range(self.slots - 1, -1, -1))

    def _touch(self, key: Key) -> None:
        self.clock += 1
        if self.clock % self.aging_period == 0:
            self.unit *= 2.0                       # later uses weigh twice as much: old counts fade
            if self.unit > 2.0 ** 64:
                self.count = {k: v / self.unit for k, v in self.count.items()}
                self.unit = 1.0
                self._reheap()
        self.count[key] = self.count.get(key, 0.0) + self.unit
        self.last_use[key] = self.clock
        if key in self.resident:
            self._push(key)

    def _push(self, key: Key) -> None:
        heap = self.heaps.setdefault(key[0], [])
        heapq.heappush(heap, (self.count.get(key, 0.0), self.last_use.get(key, 0), key))
        if len(heap) > 4 * self.slots // len(self.heaps) + 64:      # mostly stale: rebuild from the pool
            self._reheap(key[0])

    def _reheap(self, layer=None) -> None:
        for lay in list(self.heaps) if layer is None else [layer]:
            self.heaps[lay] = [(self.count.get(k, 0.0), self.last_use.get(k, 0), k) for k in self.resident
                               if k[0] == lay]
            heapq.heapify(self.heaps[lay])

    def _least_used(self, layer, keep: set[Key], busy: Callable[[Key], bool]):
        """The heap entry of `layer`'s least used (then least recent) resident expert outside `keep` that is
        not `busy`, left on its heap; None if there is none."""
        heap, skipped, found = self.heaps.get(layer, []), [], None
        while heap:
            count, last, key = heap[0]
            if key not in self.resident or self.count.get(key, 0.0) != count or self.last_use.get(key, 0) != last:
                heapq.heappop(heap)                    # stale: the key was used or evicted since
                continue
            if key in keep or busy(key):
                skipped.append(heapq.heappop(heap))
                continue
            found = heap[0]
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _victim(self, keep: set[Key], layers: Iterable | None, busy: Callable[[Key], bool],
                below: float = float("inf")) -> Key | None:
        """The resident expert used least (then longest ago) among `layers`' (None: every layer's), not in
        `keep` nor `busy`, if its count is at most `below`. One heap per layer keeps this cheap with
        thousands of slots: the runtime chooses victims while a decode step runs on the GPU, among the
        layers that step has finished."""
        best = None
        for layer in list(self.heaps) if layers is None else layers:
            entry = self._least_used(layer, keep, busy)
            if entry is not None and (best is None or entry < best):
                best = entry
        if best is None or best[0] > below:
            return None
        return best[2]

    def _evict(self, victim: Key) -> None:
        self.free.append(self.resident.pop(victim))
        self.prefetched.discard(victim)
        self.stats.evictions += 1
        self.changes.append((victim, None))

    def _admit(self, key: Key) -> int:
        slot = self.free.pop()
        self.resident[key] = slot
        self.changes.append((key, slot))
        self._push(key)
        return slot

    def fill(self, keys: Iterable[Key]) -> None:
        """Admit `keys` in order into the free slots, evicting nothing and counting nothing: the pool
        filled at load time, so that a run starts from a full pool, not from an empty one that every
        first use must miss into (the H200 Flash-8 paged bench started empty: in 32 steps it copied 13 GB
        without filling its 1536 slots, at a hit rate of 0.35 without prefetch)."""
        for key in keys:
            if not self.free:
                break
            if key not in self.resident:
                self._admit(key)

    def record(self, used: Iterable[Key], resident: Iterable[bool]) -> list[Key]:
        """A layer's step used `used`, each resident (read from its slot) or not (read from its cold copy):
        count hits and misses, age the counts; returns the misses."""
        misses = []
        for key, hit in zip(used, resident):
            if hit:
                self.stats.hits += 1
                if key in self.prefetched:
                    self.stats.prefetch_hits += 1
                    self.prefetched.discard(key)
            else:
                self.stats.misses += 1
                misses.append(key)
            self._touch(key)
        return misses

    def admit(self, keys: Iterable[Key], layers: Iterable | None = None,
              busy: Callable[[Key], bool] = lambda k: False) -> None:
        """Bring used experts in (the misses of a step), most used first, evicting the least used of
        `layers`' experts (None: any layer's) that are not `busy`; by the "frequency" rule only one used less
        often than the expert coming in."""
        keys = sorted(dict.fromkeys(keys), key=lambda k: -self.count.get(k, 0.0))
        for key in keys:
            if key in self.resident:
                continue
            if not self.free:
                # its count less this use: what it was used before, against what the victim was
                below = (math.nextafter(self.count.get(key, 0.0) - self.unit, -math.inf)
                         if self.admit_rule == "frequency" else math.inf)
                victim = self._victim(set(keys), layers, busy, below=below)
                if victim is None:
                    continue
                self._evict(victim)
            self._admit(key)
            self.stats.admissions += 1
        assert len(self.resident) <= self.slots

    def prefetch(self, predicted: Iterable[Key], layers: Iterable | None = None,
                 busy: Callable[[Key], bool] = lambda k: False) -> None:
        """Copy predicted experts ahead of use, evicting only `layers`' experts (None: any layer's) that are
        not `busy`, and nothing used more often than a prediction is worth (a predicted expert counts as one
        use)."""
        predicted = list(dict.fromkeys(predicted))
        for key in predicted:
            if key in self.resident:
                continue
            if not self.free:
                victim = self._victim(set(predicted), layers, busy, below=self.unit)
                if victim is None:
                    continue
                self._evict(victim)
            self._admit(key)
            self.prefetched.add(key)
            self.stats.prefetches += 1
        assert len(self.resident) <= self.slots


def simulate(trace: list[list[list[int]]], slots: int, predicted: list[list[list[int]]] | None = None,
             filled: Iterable[Key] = (), admit_rule: str = "frequency") -> PagerStats:
    """Replay trace[step][layer] = experts used, as the runtime's pager meets it: a step's misses are
    admitted before the next step; with `predicted[step][layer]` = the experts predicted for layer+1 while
    layer runs, those are prefetched then, evicting only experts of layers that have run in this step.
    Copies land at once here (a GPU's may not). `filled`: the pool's keys at the start."""
    pool = SlotPool(slots, admit_rule=admit_rule)
    pool.fill(filled)
    for step, layers in enumerate(trace):
        misses = []
        for layer, experts in enumerate(layers):
            if predicted is not None and layer + 1 < len(layers):
                pool.prefetch([(layer + 1, e) for e in predicted[step][layer]], layers=range(layer))
            needed = [(layer, e) for e in experts]
            misses += pool.record(needed, [k in pool.resident for k in needed])
        pool.admit(misses)
    return pool.stats
