"""bench/kernels.py's graphs hold at least MIN_GRAPH_CALLS calls, in whole rotations of a bench's weight
copies (CPU): a replay timed alone carries a cost of its own that a graph of few calls would charge to each."""
import bench.kernels as kernels


def test_a_graph_holds_whole_rotations_up_to_the_least_calls(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_GRAPH_CALLS", 40)
    assert [kernels.graph_calls(n) for n in (1, 8, 10, 16, 40, 64)] == [40, 40, 40, 48, 40, 64]


def test_a_least_of_one_keeps_the_benchs_own_calls(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_GRAPH_CALLS", 1)
    assert [kernels.graph_calls(n) for n in (1, 10, 16)] == [1, 10, 16]
