"""A probe of the harness, not of a kernel: how much of a decode line's figure is its CUDA graph's own launch.
bench/kernels.py times a line as one graph of N calls (N: enough copies of the weight to defeat L2; 10 for the
MoE), each replay between two events, and divides by N. A replay's time holds a fixed part besides the calls
(the graph's launch, its first kernel starting with no launch before it to overlap, its last draining alone):
in session 59 the MoE took 40.0 us a call at 10 calls a graph and 36.1 at 40 (H100). In a decode step's graph
hundreds of launches share that part. Times each line at 1, 2 and 4 times its N calls a graph (`--factors`)
and fits time per replay = fixed + calls x per_call (least squares), after `--rounds` rounds; `--together R`
also times R replays of the N-call graph back to back between the events.

    python bench/graph_overhead.py [--lines moe_decode,wq_b,...] [--json bench/results/graph-overhead.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.kernels as kernels  # noqa: E402
from bench.read_ceiling import kernel_us  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

TREE = kernels.graph_time_ms
LINES = ("moe_decode", "wq_b", "wo_b", "shared_w13", "shared_w2", "decode_layer")
FACTORS = (1, 2, 4)


def back_to_back_ms(fn, launches: int, replays: int = 20, together: int = 4) -> float:
    """kernels.graph_time_ms, but `together` replays of the graph between the two events: the time per call
    without a host round trip between replays."""
    graph = kernels.capture_calls(fn, launches)
    return kernels.time_ms(lambda: [graph.replay() for _ in range(together)], iters=replays) / (together * launches)


def timed(line: str, factor: int, bandwidth: float, together: int = 0) -> tuple[float, int]:
    """(us per call, calls a graph) of `line` in bench/kernels.py's harness at `factor` times its calls;
    `together` > 0: that many replays back to back between the events."""
    seen = {}

    def graph_time_ms(fn, launches: int, replays: int = 20) -> float:
        seen["calls"] = launches * factor
        if together:
            return back_to_back_ms(fn, launches * factor, replays, together)
        return kernels.exact_graph_time_ms(fn, launches * factor, replays)   # not rounded up to MIN_GRAPH_CALLS
    kernels.graph_time_ms = graph_time_ms
    try:
        return kernel_us(line, bandwidth), seen["calls"]
    finally:
        kernels.graph_time_ms = TREE


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default=",".join(LINES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--factors", default=",".join(map(str, FACTORS)), help="multiples of each line's calls a graph")
    ap.add_argument("--together", type=int, default=0, help="also time this many replays back to back, at 1x")
    ap.add_argument("--json", type=Path, default=Path("bench/results/graph-overhead.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/graph_overhead.py needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, fits = [], {}
    for line in args.lines.split(","):
        points = []
        for r in range(args.rounds):
            for factor in map(int, args.factors.split(",")):
                us, calls = timed(line, factor, bandwidth)
                rows.append({"line": line, "round": r, "factor": factor, "calls": calls, "us_per_call": us})
                points.append((calls, us * calls))
                print(f"{line} round {r}: {calls} calls a graph, {us:.2f} us a call", flush=True)
            if args.together:
                us, calls = timed(line, 1, bandwidth, args.together)
                rows.append({"line": line, "round": r, "factor": 1, "calls": calls, "together": args.together,
                             "us_per_call": us})
                print(f"{line} round {r}: {calls} calls a graph, {args.together} replays back to back, {us:.2f} us "
                      "a call", flush=True)
        calls, replay = np.array(points, dtype=np.float64).T
        per_call, fixed = np.polyfit(calls, replay, 1)
        fits[line] = {"per_call_us": float(per_call), "fixed_us": float(fixed)}
        print(f"{line}: {per_call:.2f} us a call in the chain, {fixed:.1f} us a replay besides", flush=True)
    write_json(args.json, {**run_header(), "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows, "fits": fits})


if __name__ == "__main__":
    main()
