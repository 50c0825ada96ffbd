from bench.graph_timeline import exposed_times, summarise


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
