import random

import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.reference.model import ReferenceModel
from builder.reference.moe import MoE, route
from runtime.pager_policy import SlotPool, simulate


@pytest.mark.parametrize("rule", ["always", "frequency"])
def test_budget_is_never_exceeded_and_only_allowed_experts_are_evicted(rule):
    rng = random.Random(0)
    pool = SlotPool(10, admit_rule=rule)
    for step in range(2000):
        needed = [(rng.randrange(4), rng.randrange(32)) for _ in range(6)]
        misses = pool.record(needed, [k in pool.resident for k in needed])
        assert misses == [k for k in needed if k not in pool.resident]
        before = dict(pool.resident)
        pool.prefetch([(rng.randrange(4), rng.randrange(32)) for _ in range(6)], layers=[0, 1],
                      busy=lambda k: k == (0, step % 32))
        assert all(before.get(k) == slot for k, slot in pool.resident.items() if k in before)
        assert all(k in pool.resident for k in before if k[0] >= 2 or k == (0, step % 32))   # only these went
        pool.admit(misses)
        assert rule == "frequency" or all(k in pool.resident for k in misses)
        assert len(pool.resident) <= 10 and len(set(pool.resident.values())) == len(pool.resident)
    assert pool.stats.hits + pool.stats.misses == 2000 * 6


def test_the_victim_is_the_least_used_then_the_least_recent():
    pool = SlotPool(3, aging_period=4, admit_rule="always")
    pool.fill([(0, 0), (0, 1), (0, 2)])
    pool.record([(0, 0), (0, 1), (0, 0), (0, 2), (0, 1)], [True] * 5)
    # counts: (0,0) 1 + 1 (last used 3rd), (0,1) 1 + 2 (the 4th use onwards counts twice), (0,2) 2 (4th)
    pool.admit([(1, 0)])
    assert (0, 0) not in pool.resident and (1, 0) in pool.resident      # the tie goes to the least recent
    pool.prefetch([(1, 1)])                  # (1, 0) was never used: a prediction may replace it
    assert (1, 0) not in pool.resident and (1, 1) in pool.resident
    pool.record([(0, 2)], [True])            # (0,2) now 4, (0,1) 3: both count more than a use (2)
    pool.prefetch([(1, 2)], layers=[0])
    assert (1, 2) not in pool.resident and pool.stats.prefetches == 1


def test_a_miss_comes_in_only_over_an_expert_it_outweighs_by_more_than_one_use():
    pool = SlotPool(2, aging_period=10**6)
    pool.fill([(0, 0), (0, 1)])
    pool.record([(0, 0), (0, 1), (0, 1)], [True] * 3)          # counts: (0,0) 1, (0,1) 2
    assert pool.record([(1, 0)], [False]) == [(1, 0)]
    pool.admit([(1, 0)])                                        # used once: no better than (0,0)
    assert (1, 0) not in pool.resident and pool.stats.admissions == 0
    pool.record([(1, 0)] * 2, [False] * 2)                      # now 3 uses, 2 before this one: > 1
    pool.admit([(1, 0)])
    assert (1, 0) in pool.resident and (0, 0) not in pool.resident and pool.stats.admissions == 1
    pool.admit([(1, 1)])                                        # never used: nothing to replace
    assert (1, 1) not in pool.resident


def _zipf_trace(steps, layers, experts, k, seed):
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(experts)]
    perms = [rng.sample(range(experts), experts) for _ in range(layers)]
    trace = []
    for _ in range(steps):
        step = []
        for lay in range(layers):
            chosen = set()
            while len(chosen) < k:
                chosen.add(perms[lay][rng.choices(range(experts), weights)[0]])
            step.append(sorted(chosen))
        trace.append(step)
    return trace


def test_skewed_routing_beats_the_uniform_hit_rate():
    trace = _zipf_trace(300, 8, 64, 6, seed=1)
    stats = simulate(trace, slots=int(0.75 * 8 * 64))
    assert stats.hit_rate > 0.85                                # uniform routing would give about 0.75


def test_admitting_by_frequency_copies_less_at_about_the_same_hit_rate():
    """A copy moves as many bytes as one cold read: admitting every miss on a skewed trace mostly copies
    experts that leave before they are used again."""
    trace = _zipf_trace(300, 8, 64, 6, seed=1)
    filled = [(lay, e) for e in range(64) for lay in range(8)]
    bus = {}
    for rule in ("always", "frequency"):
        s = simulate(trace, int(0.75 * 8 * 64), filled=filled, admit_rule=rule)
        bus[rule] = (s.misses + s.admissions, s.hit_rate)
    assert bus["frequency"][0] < 0.8 * bus["always"][0] and bus["frequency"][1] > bus["always"][1] - 0.01, bus


def test_prediction_raises_hits_on_a_skewed_trace():
    trace = _zipf_trace(300, 8, 64, 6, seed=2)
    rng = random.Random(3)
    # a predictor right on 4 of the 6 experts of the next layer
    predicted = [[sorted(trace[s][lay + 1][:4] + rng.sample(range(64), 2)) if lay + 1 < 8 else []
                  for lay in range(8)] for s in range(300)]
    plain = simulate(trace, slots=int(0.75 * 8 * 64))
    ahead = simulate(trace, slots=int(0.75 * 8 * 64), predicted=predicted)
    assert ahead.misses < plain.misses and ahead.prefetch_hits > 0


def test_prediction_on_a_trace_recorded_from_the_tiny_model(tiny_dir):
    """Routing recorded from the tiny model's decode; prediction = the next layer's gate applied to the
    current layer's MoE input (exact on hash layers, which route by token id)."""
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    model = ReferenceModel(ckpt, act=torch.float32, max_len=256)
    moes = [b.moe for b in model.layers]
    record: dict[int, tuple] = {}
    orig = MoE.__call__

    def spy(self, x, ids):
        layer = moes.index(self)
        flat = x.reshape(-1, x.shape[-1])
        used = route(cfg, flat, self.gate, self.bias, self.tid2eid, ids.flatten())[1]
        nxt = None
        if layer + 1 < len(moes):
            n = moes[layer + 1]
            nxt = route(cfg, flat, n.gate, n.bias, n.tid2eid, ids.flatten())[1]
        record[layer] = (used[-1].tolist(), nxt[-1].tolist() if nxt is not None else [])
        return orig(self, x, ids)
    MoE.__call__ = spy
    try:
        ids = torch.randint(0, 900, (1, 200), generator=torch.Generator().manual_seed(5))
        trace, predicted = [], []
        model.forward(ids[:, :1], 0)
        for p in range(1, 200):
            model.forward(ids[:, p:p + 1], p)
            trace.append([sorted(record[lay][0]) for lay in range(len(moes))])
            predicted.append([record[lay][1] for lay in range(len(moes))])
    finally:
        MoE.__call__ = orig
    slots = int(0.75 * cfg.num_hidden_layers * cfg.n_routed_experts)
    plain, ahead = simulate(trace, slots), simulate(trace, slots, predicted)
    assert ahead.misses < plain.misses, (plain, ahead)


def test_a_pool_filled_at_load_misses_less_than_one_filled_on_use():
    """Uniform routing, a quarter of the experts off the device: a pool filled at load hits about as often
    as it holds experts from the first step; one filled by misses pays for every first use."""
    rng = random.Random(4)
    trace = [[rng.sample(range(64), 6) for _ in range(8)] for _ in range(40)]
    slots = int(0.75 * 8 * 64)
    empty = simulate(trace, slots)
    full = simulate(trace, slots, filled=[(lay, e) for e in range(64) for lay in range(8)])
    assert full.misses < empty.misses and full.hit_rate > 0.65, (empty, full)
    pool = SlotPool(5)
    pool.fill([(0, 1), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)])
    assert sorted(pool.resident) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)] and not pool.free
    assert pool.stats == type(pool.stats)()                         # filling counts no hit, miss or prefetch
