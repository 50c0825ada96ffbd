"""Where a decode weight kernel's warps spend their time: waiting for the weights, or on their own work. Times
the Flash-size routed experts (6 experts, 1 token, wgmma kernels) or one Flash FP8 GEMV as `bench/kernels.py`
does, on a probe build that records every warp's timeline (csrc/trace.cuh, DSV4_TRACE), then reads the last
launch's records:

    python -m plugins.build --out /tmp/trace.fatbin -D DSV4_TRACE=1
    python bench/kernel_trace.py /tmp/trace.fatbin moe|layer|GEMV [--json bench/results/kernel-trace.json]

GEMV: a line of bench/kernels.py's FLASH_FP8_SHAPES (wq_b, wo_b, shared_w13, shared_w2, ...); layer: a whole decode
layer's kernels as bench/read_ceiling.py's decode_layer line runs them, the MoE's two traced, and the GEMV that ran
last. Per kernel (the MoE's gate_up and down, or the GEMV), over its warps: the cycles from the warp's start to its
wait for the launch before returning (`before_wait`: what it does first, `own_work_before_wait`, and the wait),
from there to its loop (`after_wait`: the routing table, the activation's quantise); per step, from the end of the
previous step to its weights having landed (`wait`: they were late) and from there to its products being added
(`work`; in the MoE split into the first half's conversion, the MMAs until done, with the wait for the warpgroup's
other warps, and the scaling); the tail after the last step (the epilogue); the share of the loop spent waiting. A
warp that waits most of each step asks for more in flight; one that works most of it, for fewer instructions or
more warps; a long prologue or tail, for the launch's edges. The kernels' marks on one clock (`timeline_us`) show
the gaps between one launch's end and the next one's wait, and each CTA's SM, start and end (which CTAs end last,
and whether their SMs or their items make them late); the rate at which their weights landed over time (`landed`,
each step an equal share of the launch's bytes), where the memory sat idle. The probe's own stores slow the kernels
somewhat: the report times the trace build, to set beside the tree's figure (bench/kernel_trace_h200.sh runs both).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402

KERNELS = {"moe": {"gate_up": 0, "down": 1}, "gemv": {"fp8_gemv": 2}}   # csrc/trace.cuh Kernel
SLOTS, CTAS, WARPS, STEPS = 3, 512, 8, 32   # csrc/trace.cuh
RECORD = np.dtype([("start_ns", "<u8"), ("end_ns", "<u8"), ("start", "<u8"), ("ready", "<u8"), ("waited", "<u8"),
                   ("walk", "<u8"), ("step", "<u8", (STEPS, 4)), ("end", "<u8"), ("sm", "<u4"), ("steps", "<u4")])
PARTS = ("convert", "mma", "finish")       # a step's work between its landed, converted, MMAs-done, added marks


def _ran(records: np.ndarray) -> np.ndarray:
    """The warps of a kernel's records [CTAS, WARPS] that ran (steps > 0)."""
    flat = records.reshape(-1)
    return flat[flat["steps"] > 0]


def _origin(warps: list[np.ndarray]) -> int:
    """The earliest start of these warps (that ran) on the global timer, ns: the zero of a shared clock."""
    return min(int(w["start_ns"].min()) for w in warps if w.size)


def summarize(records: np.ndarray) -> dict:
    """A kernel's records [CTAS, WARPS] (RECORD) -> its figures, over the warps that walked the most common
    number of steps (at Flash size, one token: all that ran); warps that did not run (steps 0) are left out.
    A step's middle marks are reported where every warp set them (the MoE's; the GEMV leaves them zero)."""
    warps = _ran(records)
    if warps.size == 0:
        raise ValueError("no warp of this kernel left a record")
    counts, seen = np.unique(warps["steps"], return_counts=True)
    common = counts[seen.argmax()]
    others = int((warps["steps"] != common).sum())
    warps = warps[warps["steps"] == common]
    n = int(min(common, STEPS))                # steps recorded (all, up to STEPS)
    at = {k: warps[k].astype(np.int64) for k in ("start", "ready", "waited", "walk", "end", "start_ns", "end_ns")}
    step = warps["step"][:, :n].astype(np.int64)
    landed, added = step[:, :, 0], step[:, :, 3]
    before = np.concatenate([at["walk"][:, None], added[:, :-1]], axis=1)
    wait, work = landed - before, added - landed

    def dist(v: np.ndarray) -> dict:
        return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}
    report = {
        "warps": int(warps.size), "sms": int(np.unique(warps["sm"]).size), "steps_per_warp": int(common),
        "steps_recorded": n, "warps_left_out": others,
        "before_wait_cycles": dist(at["waited"] - at["start"]), "after_wait_cycles": dist(at["walk"] - at["waited"]),
        "own_work_before_wait_cycles": dist(at["ready"] - at["start"]),   # then waiting: before_wait less this
        "wait_cycles_per_step": dist(wait.mean(axis=1)), "work_cycles_per_step": dist(work.mean(axis=1)),
        "tail_cycles": dist(at["end"] - added[:, -1]), "warp_cycles": dist(at["end"] - at["start"]),
        "loop_share_waiting": float(wait.sum() / (at["end"] - at["walk"]).sum()),
        "wait_by_step": [float(v) for v in np.median(wait, axis=0)],
        "work_by_step": [float(v) for v in np.median(work, axis=0)],
        "cycles_per_ns": float(np.median((at["end"] - at["start"]) / (at["end_ns"] - at["start_ns"]).clip(min=1))),
        "span_us": float((at["end_ns"].max() - at["start_ns"].min()) / 1e3),
        "start_spread_us": float((np.percentile(at["start_ns"], 90) - at["start_ns"].min()) / 1e3),
    }
    if (step[:, :, 1:3] > 0).all():
        parts = np.diff(step, axis=2)
        report |= {f"{part}_cycles_per_step": dist(parts[:, :, i].mean(axis=1)) for i, part in enumerate(PARTS)}
    return report


def _ns(w: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Cycle marks of warps `w` (one per warp, or [warp, ...]) on the global timer, in ns: through each warp's
    own cycles per ns (its SM's clock) from its start."""
    start, start_ns = w["start"].astype(np.int64), w["start_ns"].astype(np.int64)
    per_ns = (w["end"].astype(np.int64) - start) / (w["end_ns"].astype(np.int64) - start_ns).clip(min=1)
    shape = (-1,) + (1,) * (cycles.ndim - 1)
    return start_ns.reshape(shape) + (cycles.astype(np.int64) - start.reshape(shape)) / per_ns.reshape(shape)


def timeline(kernels: dict[str, np.ndarray]) -> dict:
    """Kernels' records (name -> [CTAS, WARPS] RECORD) on one clock, in us from the earliest warp's start:
    when their warps started, their waits returned, their loops began and they ended (first, median, last),
    so the gaps between a launch's end and the next one's wait show; and per CTA that ran (`ctas`: its index in
    the grid, its SM, its first warp's start and its last warp's end, in us)."""
    warps = {name: _ran(r) for name, r in kernels.items()}
    origin = _origin(list(warps.values()))
    report = {}
    for name, w in warps.items():
        if not w.size:
            continue
        at = {"start": w["start_ns"].astype(np.float64), "end": w["end_ns"].astype(np.float64)}
        for mark in ("ready", "waited", "walk"):
            at[mark] = _ns(w, w[mark])
        report[name] = {mark: {q: float((np.percentile(v, p) - origin) / 1e3) for q, p in
                               (("first", 0), ("median", 50), ("last", 100))} for mark, v in at.items()}
        ran = kernels[name]["steps"].max(axis=1) > 0
        start = np.where(kernels[name]["steps"] > 0, kernels[name]["start_ns"], np.iinfo(np.uint64).max)
        report[name]["ctas"] = {
            "index": [int(i) for i in np.flatnonzero(ran)],
            "sm": [int(v) for v in kernels[name]["sm"].max(axis=1)[ran]],     # warps that did not run: 0
            "start_us": [round((int(v) - origin) / 1e3, 3) for v in start.min(axis=1)[ran]],
            "end_us": [round((int(v) - origin) / 1e3, 3) for v in kernels[name]["end_ns"].max(axis=1)[ran]]}
        report[name]["sm_ends"] = sm_ends(report[name]["ctas"])
    return report


def sm_ends(ctas: dict) -> dict:
    """Where a launch's tail is, from `timeline`'s per-CTA record: the mean spread of the ends of the CTAs one SM
    held, the SMs' last ends (standard deviation, first, last, in us), and on the SMs that held the most CTAs,
    how often each CTA, by its place in the grid (the order CTAs are handed out), was the SM's last to end.
    Ties go to the earlier-placed CTA. One launch's records: where several launches share a kernel's slot (the
    GEMVs of `layer`), the figures mix them. (Session 60, gate_up on an H100: within an SM 1.0-1.2 us, the
    last-placed CTA last on 99-112 of 120 SMs; between SMs a standard deviation of 1.2-1.4 us.)"""
    by_sm: dict[int, list[tuple[int, float]]] = {}
    for index, sm, end in zip(ctas["index"], ctas["sm"], ctas["end_us"]):
        by_sm.setdefault(sm, []).append((index, end))
    last = np.array([max(end for _, end in held) for held in by_sm.values()])
    most = max(len(held) for held in by_sm.values())
    last_by_place = [0] * most
    for held in by_sm.values():
        if len(held) == most:
            last_by_place[int(np.argmax([end for _, end in sorted(held)]))] += 1
    spreads = [max(end for _, end in held) - min(end for _, end in held) for held in by_sm.values() if len(held) > 1]
    return {"within_sm_spread_us": float(np.mean(spreads)) if spreads else 0.0,
            "sm_last_end_us": {"sd": float(last.std()), "first": float(last.min()), "last": float(last.max())},
            "ctas_per_sm": most, "last_to_end_by_place": last_by_place}


def landed_profile(kernels: dict[str, tuple[np.ndarray, int]], bin_us: float = 0.5) -> dict:
    """The rate at which kernels' weights landed, over time: name -> (records, the bytes the launch reads),
    each recorded step of a warp taken as an equal share of those bytes, landed at its `landed` mark. Bins of
    `bin_us` from the earliest warp's start; GB/s per kernel and in all. Where the sum sits far below the copy
    bandwidth, the memory was idle: at a launch's edges, or in a loop that asks for too little."""
    warps = {name: (_ran(r), nbytes) for name, (r, nbytes) in kernels.items()}
    origin = _origin([w for w, _ in warps.values()])
    landed = {}
    for name, (w, nbytes) in warps.items():
        n = np.minimum(w["steps"], STEPS).astype(np.int64)
        at = _ns(w, w["step"][:, :, 0])[np.arange(STEPS)[None, :] < n[:, None]]
        landed[name] = ((at - origin) / 1e3, nbytes / max(1, int(n.sum())))
    bins = int(max(t.max() for t, _ in landed.values()) / bin_us) + 1
    rate = {name: np.bincount((t / bin_us).astype(np.int64), minlength=bins) * share / (bin_us * 1e3)
            for name, (t, share) in landed.items()}
    return {"bin_us": bin_us, "gb_s": {name: [round(float(v), 1) for v in r] for name, r in rate.items()},
            "all_gb_s": [round(float(v), 1) for v in sum(rate.values())]}


class _DeviceBytes:
    """`size` bytes at device address `ptr`, for torch.as_tensor to view without a copy."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def trace_buffer(module) -> torch.Tensor:
    """The loaded kernel image's trace buffer as a uint8 CUDA tensor (a view); exits where the build has none."""
    from cuda.bindings import driver
    from plugins.loader import _check
    try:
        ptr, size = _check(driver.cuModuleGetGlobal(module, b"dsv4_trace_buffer"))
    except RuntimeError:
        raise SystemExit("error: the fat binary has no trace: build it with -D DSV4_TRACE=1") from None
    if size != SLOTS * CTAS * WARPS * RECORD.itemsize:
        raise SystemExit(f"error: the trace buffer has {size} bytes, not the {SLOTS * CTAS * WARPS * RECORD.itemsize} "
                         "bench/kernel_trace.py reads: its layout and csrc/trace.cuh's differ")
    return torch.as_tensor(_DeviceBytes(int(ptr), size), device="cuda")


@torch.inference_mode()
def main() -> None:
    from bench.kernels import FLASH_FP8_SHAPES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fatbin", type=Path, help="a build with -D DSV4_TRACE=1")
    ap.add_argument("what", help="moe; layer (a decode layer's kernels as read_ceiling times them: the MoE's, and "
                    f"the last GEMV to run); or a GEMV line: {', '.join(FLASH_FP8_SHAPES)}")
    ap.add_argument("--json", type=Path, default=Path("bench/results/kernel-trace.json"))
    args = ap.parse_args()
    if args.what not in ("moe", "layer") and args.what not in FLASH_FP8_SHAPES:
        raise SystemExit(f"error: {args.what!r} is neither moe, layer nor a GEMV line ({', '.join(FLASH_FP8_SHAPES)})")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/kernel_trace.py needs a CUDA GPU")
    from plugins import loader
    loader.FATBIN = args.fatbin.resolve()
    from bench import read_ceiling
    from bench.kernels import bench_decode_layer, bench_fp8_gemv, bench_moe_decode, fp8_bytes
    from runtime.bench import copy_bandwidth
    buffer = trace_buffer(loader.kernels().module)            # fails before any timing on a build without it
    buffer.zero_()                                            # no record of an earlier launch's shape stays
    bandwidth = copy_bandwidth()
    if args.what == "moe":                                    # CUDA-graph replays; the last one's records stay
        timed, kernels = bench_moe_decode(bandwidth, 1, wgmma=True), KERNELS["moe"]
    elif args.what == "layer":                                # as read_ceiling's decode_layer line
        timed, kernels = bench_decode_layer(bandwidth, wgmma=True, beside=True), KERNELS["moe"] | KERNELS["gemv"]
    else:
        timed, kernels = bench_fp8_gemv(args.what, *FLASH_FP8_SHAPES[args.what], 1, bandwidth), KERNELS["gemv"]
    torch.cuda.synchronize()
    launches = read_ceiling.lines()                           # the bytes each launch reads
    launch_bytes = dict(zip(("gate_up", "down"), launches["moe_decode"]))
    if args.what in FLASH_FP8_SHAPES:
        launch_bytes["fp8_gemv"] = fp8_bytes(*FLASH_FP8_SHAPES[args.what])
    records = buffer.cpu().numpy().view(RECORD).reshape(SLOTS, CTAS, WARPS)
    report = {**run_header(), "copy_bandwidth_gb_s": bandwidth / 1e9, "fatbin": str(args.fatbin), "what": args.what,
              "traced_timing": timed, **{k: summarize(records[i]) for k, i in kernels.items()},
              "timeline_us": timeline({k: records[i] for k, i in kernels.items()}),
              "landed": landed_profile({k: (records[i], launch_bytes[k]) for k, i in kernels.items()
                                        if k in launch_bytes})}
    write_json(args.json, report)
    for k in kernels:
        s = report[k]
        parts = ("" if "mma_cycles_per_step" not in s else
                 f" (convert {s['convert_cycles_per_step']['median']:.0f}, MMAs {s['mma_cycles_per_step']['median']:.0f},"
                 f" finish {s['finish_cycles_per_step']['median']:.0f})")
        print(f"{k}: {s['warps']} warps on {s['sms']} SMs, {s['steps_per_warp']} steps a warp; before the wait "
              f"{s['before_wait_cycles']['median']:.0f} cycles (its own work "
              f"{s['own_work_before_wait_cycles']['median']:.0f}), after it {s['after_wait_cycles']['median']:.0f}; a step "
              f"waits {s['wait_cycles_per_step']['median']:.0f} and works {s['work_cycles_per_step']['median']:.0f}"
              f"{parts}; {s['loop_share_waiting']:.2f} of the loop waiting; tail {s['tail_cycles']['median']:.0f}; "
              f"span {s['span_us']:.1f} us (median warp, cycles)")
    for k, marks in report["timeline_us"].items():
        print(f"{k} (us from the first start; first/median/last): " + "; ".join(
            f"{mark} {v['first']:.2f}/{v['median']:.2f}/{v['last']:.2f}" for mark, v in marks.items()
            if mark not in ("ctas", "sm_ends")))
        e = marks["sm_ends"]
        print(f"{k} by SM: ends within an SM {e['within_sm_spread_us']:.2f} us apart (mean); the SMs' last ends "
              f"{e['sm_last_end_us']['first']:.2f}..{e['sm_last_end_us']['last']:.2f} us (sd "
              f"{e['sm_last_end_us']['sd']:.2f}); on SMs of {e['ctas_per_sm']} CTAs, last to end by place in the "
              f"grid: {e['last_to_end_by_place']}")
    rate = np.array(report["landed"]["all_gb_s"])
    busy = rate[rate.nonzero()[0].min():rate.nonzero()[0].max() + 1] if rate.any() else rate
    print(f"weights landed ({report['landed']['bin_us']} us bins, from the first to the last that landed any; GB/s): "
          + " ".join(f"{v:.0f}" for v in busy))
    print(f"traced: {timed['time_us']:.1f} us, {timed['fraction_of_copy_bw']:.3f} of the copy bandwidth")


if __name__ == "__main__":
    main()
