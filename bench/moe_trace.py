"""Where a decode MoE warp's time goes: waiting for its weights, or on its own work. Times the Flash-size routed
experts (6 experts, 1 token, wgmma kernels) as `bench/kernels.py` does, on a probe build that records every
warp's timeline (csrc/moe_decode_wgmma.cu, DSV4_MOE_TRACE), then reads the last launch's records:

    python -m plugins.build --out /tmp/trace.fatbin -D DSV4_MOE_TRACE=1
    python bench/moe_trace.py /tmp/trace.fatbin [--json bench/results/moe-trace.json]

Per kernel (gate_up, down), over its warps: the cycles from the warp's start to its walk's loop (the prologue:
x's quantise, the wait for the launch before, the table, the first copies); per step, the cycles from the end of
the previous step to its stage having landed (`wait`: the weights were late) and from there to its products
being added (`work`), split into the first half's conversion (`convert`), the MMAs until they are done
(`mma`: the second half's conversion, the wait for the warpgroup's other warps, the tensor cores) and the
products' scaling (`finish`); the tail after the last step; and the share of the walk spent waiting. Session
43 found the kernels 1.6x their bytes' read and no one part of the step to blame (README, "Kernel status"); a
warp that waits most of each step asks for more in flight, one that works most of it for fewer instructions or
more warps. The probe's own stores slow the kernels somewhat: the
report times the trace build, to set beside the tree's figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402

KERNELS = ("gate_up", "down")
CTAS, STEPS = 1024, 32                      # csrc/moe_decode_wgmma.cu moe_trace
RECORD = np.dtype([("start_ns", "<u8"), ("end_ns", "<u8"), ("start", "<u8"), ("walk", "<u8"),
                   ("step", "<u8", (STEPS, 4)), ("end", "<u8"), ("sm", "<u4"), ("steps", "<u4")])
PARTS = ("convert", "mma", "finish")       # a step's work between its landed, converted, MMAs-done, added marks


def summarize(records: np.ndarray) -> dict:
    """A kernel's records [CTAS, 4] (RECORD) -> its figures, over the warps that walked the most common number of
    steps (at Flash size, one token: all of them); warps that did not run (steps 0) are left out."""
    warps = records.reshape(-1)
    warps = warps[warps["steps"] > 0]
    if warps.size == 0:
        raise ValueError("no warp of this kernel left a record")
    counts, seen = np.unique(warps["steps"], return_counts=True)
    common = counts[seen.argmax()]
    others = int((warps["steps"] != common).sum())
    warps = warps[warps["steps"] == common]
    n = int(min(common, STEPS))                # steps recorded (all, up to STEPS)
    step = warps["step"][:, :n].astype(np.int64)
    landed, added = step[:, :, 0], step[:, :, 3]
    before = np.concatenate([warps["walk"].astype(np.int64)[:, None], added[:, :-1]], axis=1)
    wait, work = landed - before, added - landed
    walk = warps["end"].astype(np.int64) - warps["walk"].astype(np.int64)
    tail = warps["end"].astype(np.int64) - added[:, -1]
    spans = warps["end"].astype(np.int64) - warps["start"].astype(np.int64)
    ns = (warps["end_ns"].astype(np.int64) - warps["start_ns"].astype(np.int64)).clip(min=1)

    def dist(v: np.ndarray) -> dict:
        return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}
    return {
        "warps": int(warps.size), "ctas": int(warps.size // 4), "sms": int(np.unique(warps["sm"]).size),
        "steps_per_warp": int(common), "steps_recorded": n, "warps_left_out": others,
        "prologue_cycles": dist(warps["walk"].astype(np.int64) - warps["start"].astype(np.int64)),
        "wait_cycles_per_step": dist(wait.mean(axis=1)), "work_cycles_per_step": dist(work.mean(axis=1)),
        **{f"{part}_cycles_per_step": dist(np.diff(step, axis=2)[:, :, i].mean(axis=1)) for i, part in enumerate(PARTS)},
        "tail_cycles": dist(tail), "warp_cycles": dist(spans),
        "walk_share_waiting": float(wait.sum() / walk.sum()),
        "wait_by_step": [float(v) for v in np.median(wait, axis=0)],
        "work_by_step": [float(v) for v in np.median(work, axis=0)],
        "cycles_per_ns": float(np.median(spans / ns)),
        "span_us": float((warps["end_ns"].max() - warps["start_ns"].min()) / 1e3),
        "start_spread_us": float((np.percentile(warps["start_ns"], 90) - warps["start_ns"].min()) / 1e3),
    }


def trace_buffer(module) -> tuple[int, int]:
    """(device address, bytes) of the loaded kernel image's trace buffer; exits where the build has none."""
    from cuda.bindings import driver
    from plugins.loader import _check
    try:
        ptr, size = _check(driver.cuModuleGetGlobal(module, b"dsv4_moe_trace"))
    except RuntimeError:
        raise SystemExit("error: the fat binary has no trace: build it with -D DSV4_MOE_TRACE=1") from None
    if size != 2 * CTAS * 4 * RECORD.itemsize:
        raise SystemExit(f"error: the trace buffer has {size} bytes, not the {2 * CTAS * 4 * RECORD.itemsize} "
                         "bench/moe_trace.py reads: its layout and csrc/moe_decode_wgmma.cu's differ")
    return int(ptr), size


class _DeviceBytes:
    """`size` bytes at device address `ptr`, for torch.as_tensor to view without a copy."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def read_trace(module) -> np.ndarray:
    """The trace buffer of the loaded kernel image -> [2, CTAS, 4] RECORD."""
    ptr, size = trace_buffer(module)
    torch.cuda.synchronize()
    host = torch.as_tensor(_DeviceBytes(ptr, size), device="cuda").cpu().numpy()
    return host.view(RECORD).reshape(2, CTAS, 4)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fatbin", type=Path, help="a build with -D DSV4_MOE_TRACE=1")
    ap.add_argument("--json", type=Path, default=Path("bench/results/moe-trace.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/moe_trace.py needs a CUDA GPU")
    from plugins import loader
    loader.FATBIN = args.fatbin.resolve()
    from bench.kernels import bench_moe_decode
    from runtime.bench import copy_bandwidth
    trace_buffer(loader.kernels().module)                    # fails before any timing on a build without it
    bandwidth = copy_bandwidth()
    timed = bench_moe_decode(bandwidth, 1, wgmma=True)       # CUDA-graph replays; the last one's records stay
    records = read_trace(loader.kernels().module)
    report = {**run_header(), "copy_bandwidth_gb_s": bandwidth / 1e9, "fatbin": str(args.fatbin),
              "traced_kernels": timed, **{k: summarize(records[i]) for i, k in enumerate(KERNELS)}}
    write_json(args.json, report)
    for k in KERNELS:
        s = report[k]
        print(f"{k}: {s['ctas']} CTAs on {s['sms']} SMs, {s['steps_per_warp']} steps a warp; a step waits "
              f"{s['wait_cycles_per_step']['median']:.0f} and works {s['work_cycles_per_step']['median']:.0f} "
              f"cycles (median warp: convert {s['convert_cycles_per_step']['median']:.0f}, MMAs "
              f"{s['mma_cycles_per_step']['median']:.0f}, finish {s['finish_cycles_per_step']['median']:.0f}); "
              f"{s['walk_share_waiting']:.2f} of the walk waiting; prologue "
              f"{s['prologue_cycles']['median']:.0f}, tail {s['tail_cycles']['median']:.0f} cycles; "
              f"span {s['span_us']:.1f} us")
    print(f"traced MoE: {timed['time_us']:.1f} us, {timed['fraction_of_copy_bw']:.3f} of the copy bandwidth")


if __name__ == "__main__":
    main()
