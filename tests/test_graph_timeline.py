import pytest

from bench.graph_timeline import exposed_times, split_replays, summarise


def test_overlapping_kernels_are_charged_only_what_they_add_and_gaps_are_idle():
    step = [("a", 0.0, 10.0), ("b", 4.0, 12.0), ("c", 5.0, 8.0), ("d", 15.0, 20.0)]
    rows, idle = exposed_times(step)
    assert [r[3] for r in rows] == [10.0, 2.0, 0.0, 5.0]     # c ends inside a and b: nothing added
    assert idle == 3.0                                      # 12 .. 15: no kernel running
    assert sum(r[3] for r in rows) + idle == 20.0           # exposed + idle = the span


def test_summary_averages_families_over_replays():
    steps = [[("dsv4_x", 0.0, 4.0), ("dsv4_y", 2.0, 6.0)], [("dsv4_x", 100.0, 106.0), ("dsv4_y", 106.0, 108.0)]]
    s = summarise(steps)
    assert s["families"]["dsv4_x"] == {"exposed_us": 5.0, "raw_us": 5.0, "launches": 1}
    assert s["families"]["dsv4_y"] == {"exposed_us": 2.0, "raw_us": 3.0, "launches": 1}
    assert s["span_us"] == 7.0 and s["idle_us"] == 0.0


def test_replays_are_equal_chunks_that_start_alike_or_refused():
    step = [("copy", 0.0, 1.0), ("dsv4_x", 2.0, 5.0), ("dsv4_y", 5.0, 9.0)]
    kernels = [(n, a + 100 * i, b + 100 * i) for i in range(3) for n, a, b in step]
    assert [[k[0] for k in c] for c in split_replays(kernels, 3)] == [["copy", "dsv4_x", "dsv4_y"]] * 3
    with pytest.raises(SystemExit, match="not the same number"):
        split_replays(kernels[:-1], 3)
    with pytest.raises(SystemExit, match="start with the same kernel"):
        split_replays(kernels[:3] + kernels[4:] + [("dsv4_z", 400.0, 401.0)], 3)   # one copy lost, one extra
