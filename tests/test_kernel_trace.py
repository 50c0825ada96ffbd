"""bench/kernel_trace.py's reading of the weight kernels' probe records (CPU): the layout it expects is the
kernel source's, and a known timeline gives back its waits, work, prologue and tail."""
import re
from pathlib import Path

import numpy as np
import pytest

from bench.kernel_trace import (CTAS, KERNELS, RECORD, SLOTS, STEPS, WARPS, landed_profile, sm_ends, summarize,
                                timeline)

SOURCE = Path(__file__).resolve().parents[1] / "plugins" / "csrc" / "trace.cuh"


def test_the_record_layout_is_the_kernels():
    text = SOURCE.read_text()
    assert re.search(rf"constexpr int KERNELS = {SLOTS}, CTAS = {CTAS}, WARPS = {WARPS}, STEPS = {STEPS};", text)
    ids = dict(re.findall(r"(k\w+) = (\d+)", re.search(r"enum Kernel \{(.*?)\}", text).group(1)))
    assert {n: int(i) for n, i in ids.items()} == {"kMoeGateUp": KERNELS["moe"]["gate_up"],
                                                   "kMoeDown": KERNELS["moe"]["down"],
                                                   "kFp8Gemv": KERNELS["gemv"]["fp8_gemv"]}
    fields = re.search(r"struct Warp \{(.*?)\};", text, re.S).group(1)
    assert "start_ns, end_ns, start, ready, waited, walk, step[STEPS][4], end;" in fields
    assert "unsigned sm, steps;" in fields
    assert RECORD.itemsize == 8 * (7 + 4 * STEPS) + 8 and list(RECORD.names)[:6] == [
        "start_ns", "end_ns", "start", "ready", "waited", "walk"] and list(RECORD.names)[-2:] == ["sm", "steps"]


def _timeline(marks: list[list[int]]) -> np.ndarray:
    """Two CTAs of four warps, each warp the same three steps with these four marks each, and one stray warp."""
    records = np.zeros((CTAS, WARPS), dtype=RECORD)
    for cta in range(2):
        for warp in range(4):
            r = records[cta, warp]
            r["start"], r["ready"], r["waited"], r["walk"], r["end"] = 100, 250, 700, 1100, 2300
            r["step"][:3] = marks
            r["start_ns"], r["end_ns"], r["sm"], r["steps"] = 5000 + cta, 5600 + cta, cta, 3
    records[2, 0]["steps"] = 5                   # another step count: left out, and counted
    return records


def test_a_known_timeline_is_summarised():
    s = summarize(_timeline([[1300, 1350, 1450, 1500], [1600, 1650, 1850, 1900], [2000, 2010, 2090, 2100]]))
    assert (s["warps"], s["sms"], s["steps_recorded"], s["warps_left_out"]) == (8, 2, 3, 1)
    assert s["before_wait_cycles"]["median"] == 600 and s["after_wait_cycles"]["median"] == 400
    assert s["own_work_before_wait_cycles"]["median"] == 150
    assert s["tail_cycles"]["median"] == 200
    assert s["wait_cycles_per_step"]["median"] == pytest.approx(400 / 3)
    assert s["work_cycles_per_step"]["median"] == pytest.approx(200)
    assert s["convert_cycles_per_step"]["median"] == pytest.approx((50 + 50 + 10) / 3)
    assert s["mma_cycles_per_step"]["median"] == pytest.approx((100 + 200 + 80) / 3)
    assert s["finish_cycles_per_step"]["median"] == pytest.approx((50 + 50 + 10) / 3)
    assert s["loop_share_waiting"] == pytest.approx(400 / 1200)
    assert s["wait_by_step"] == [200, 100, 100] and s["work_by_step"] == [200, 300, 100]
    assert s["cycles_per_ns"] == pytest.approx(2200 / 600) and s["span_us"] == pytest.approx(0.601)


def test_a_gemvs_steps_have_no_parts():
    s = summarize(_timeline([[1300, 0, 0, 1500], [1600, 0, 0, 1900], [2000, 0, 0, 2100]]))
    assert s["work_cycles_per_step"]["median"] == pytest.approx(200) and "mma_cycles_per_step" not in s


def test_a_kernel_without_records_is_refused():
    with pytest.raises(ValueError):
        summarize(np.zeros((CTAS, WARPS), dtype=RECORD))


def test_two_kernels_share_one_clock():
    """The second kernel's warps start 1 us after the first's on the global timer, at 2 cycles a ns on their own
    SM's clock: its wait's return is placed by its own clock, and the first kernel's empty CTAs are skipped."""
    first = _timeline([[1300, 1350, 1450, 1500]] * 3)
    first[2, 0]["steps"] = 0                     # the stray warp has no times; a CTA that did not run
    second = np.zeros((CTAS, WARPS), dtype=RECORD)
    r = second[0, 0]
    r["start"], r["ready"], r["waited"], r["walk"], r["end"], r["steps"] = 10_000, 10_200, 10_400, 10_600, 12_000, 1
    r["start_ns"], r["end_ns"] = 6000, 7000
    t = timeline({"a": first, "b": second})
    assert t["a"]["start"]["first"] == 0 and t["a"]["end"]["last"] == pytest.approx(0.601)
    assert t["b"]["start"]["median"] == pytest.approx(1.0) and t["b"]["waited"]["median"] == pytest.approx(1.2)
    assert t["b"]["ready"]["median"] == pytest.approx(1.1)
    assert t["b"]["walk"]["last"] == pytest.approx(1.3) and t["b"]["end"]["first"] == pytest.approx(2.0)
    assert t["a"]["ctas"] == {"index": [0, 1], "sm": [0, 1], "start_us": [0.0, 0.001], "end_us": [0.6, 0.601]}
    assert t["b"]["ctas"] == {"index": [0], "sm": [0], "start_us": [1.0], "end_us": [2.0]}


def test_sm_ends_say_where_a_launchs_tail_is():
    """Three SMs of two CTAs and one of one: CTAs 0-2 placed first on SMs 5, 6, 7, then 3-5 on the same; SM 8 holds
    CTA 6 alone. The later-placed CTA ends last on SMs 5 and 7, the earlier on SM 6."""
    ctas = {"index": [0, 1, 2, 3, 4, 5, 6], "sm": [5, 6, 7, 5, 6, 7, 8],
            "end_us": [10.0, 13.0, 11.0, 12.0, 12.5, 11.5, 9.0]}
    e = sm_ends(ctas)
    assert e["within_sm_spread_us"] == pytest.approx((2.0 + 0.5 + 0.5) / 3)
    last = np.array([12.0, 13.0, 11.5, 9.0])
    assert e["sm_last_end_us"] == pytest.approx({"sd": last.std(), "first": 9.0, "last": 13.0})
    assert e["ctas_per_sm"] == 2 and e["last_to_end_by_place"] == [1, 2]
    records = _timeline([[1300, 1350, 1450, 1500]] * 3)
    records[2, 0]["steps"] = 0                   # the stray warp's CTA did not run: two CTAs on SMs 0 and 1
    t = timeline({"a": records})
    assert t["a"]["sm_ends"]["ctas_per_sm"] == 1 and t["a"]["sm_ends"]["within_sm_spread_us"] == 0.0
    assert t["a"]["sm_ends"]["last_to_end_by_place"] == [2]


def test_the_landed_rate_is_binned_in_time():
    """Eight warps of three steps each (_timeline), 2400 bytes in all, so 100 a step. Every warp starts at
    cycle 100 at 5000 ns (one CTA) or 5001 ns and runs 2200 cycles in 600 ns: steps landed at cycles 1300,
    1600, 2000 fall at about 327, 409 and 518 ns (the second CTA's 1 ns later), in 0.25 us bins 1, 1 and 2."""
    records = _timeline([[1300, 1350, 1450, 1500], [1600, 1650, 1850, 1900], [2000, 2010, 2090, 2100]])
    records[2, 0]["steps"] = 0
    p = landed_profile({"k": (records, 2400)}, bin_us=0.25)
    assert p["gb_s"]["k"] == pytest.approx([0.0, 1600 / 250, 800 / 250]) and p["all_gb_s"] == p["gb_s"]["k"]
