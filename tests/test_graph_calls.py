"""bench/kernels.py's graphs hold at least MIN_GRAPH_CALLS calls, in whole rotations of a bench's weight
copies (CPU): a replay timed alone carries a cost of its own that a graph of few calls would charge to each."""
import bench.kernels as kernels


def test_a_graph_holds_whole_rotations_up_to_the_least_calls(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_GRAPH_CALLS", 40)
    assert [kernels.graph_calls(n) for n in (1, 8, 10, 16, 40, 64)] == [40, 40, 40, 48, 40, 64]


def test_a_least_of_one_keeps_the_benchs_own_calls(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_GRAPH_CALLS", 1)
    assert [kernels.graph_calls(n) for n in (1, 10, 16)] == [1, 10, 16]


def test_the_harness_probes_time_the_calls_they_name(monkeypatch):
    """bench/graph_overhead.py times exactly its factor times a line's calls (not rounded up to MIN_GRAPH_CALLS,
    which would time every factor alike), and bench/moe_chain_ab.py's four-times case four times the tree's
    graph (not the tree's own graph again)."""
    import bench.graph_overhead as overhead
    import bench.moe_chain_ab as chain
    exact, rounded = [], []
    monkeypatch.setattr(kernels, "graph_time_ms", kernels.graph_time_ms)   # the probes put theirs back: restored
    monkeypatch.setattr(kernels, "MIN_GRAPH_CALLS", 40)
    monkeypatch.setattr(kernels, "exact_graph_time_ms", lambda fn, calls, replays=20: exact.append(calls) or 1.0)
    monkeypatch.setattr(overhead, "kernel_us", lambda line, bandwidth: kernels.graph_time_ms(None, 10) * 1e3)
    assert [overhead.timed("moe_decode", factor, 1.0)[1] for factor in (1, 2, 6)] == [10, 20, 60]
    assert exact == [10, 20, 60]
    monkeypatch.setattr(chain, "TREE", (kernels.moe_experts_decode,
                                        lambda fn, launches, replays=20: rounded.append(launches) or 1.0))
    monkeypatch.setattr(kernels, "bench_moe_decode", lambda bandwidth, tokens, wgmma: kernels.graph_time_ms(None, 10))
    chain.run_case("tree_4x_calls", 1.0)
    assert rounded == [160]
