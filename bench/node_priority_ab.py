"""A probe: does the decode layer gain where the routed experts' launches outrank the shared expert's beside
them? In a layer, the shared expert's two GEMVs run on a second stream beside the routed experts; a trace
(bench/kernel_trace.py layer, session 59) showed some of the routed down kernel's CTAs starting up to 10 us
after the rest, their SMs held by the shared expert's w2, and the layer ending with them. A CUDA graph keeps
the stream priorities it was captured with as kernel nodes' priorities, and uses them where it is
instantiated with CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY: the block scheduler then gives a freed SM
to the higher-priority kernel's waiting CTAs first.

Times bench/kernels.py's decode layer (`bench_decode_layer(wgmma=True, beside=True)`, as read_ceiling's
decode_layer line) in turn: the tree's graph; the graph captured on a high-priority stream, the shared expert
on a low one (routed first); the reverse (shared first); each instantiated with node priorities; `--rounds`
rounds. Same kernels, same bits: only the order in which waiting CTAs get SMs differs.

    python bench/node_priority_ab.py [--rounds 3] [--json bench/results/node-priority-ab.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.kernels as kernels  # noqa: E402
from bench.in_turn import cases_in_one_process  # noqa: E402
from plugins import streams  # noqa: E402
from plugins.loader import _check  # noqa: E402

CASES = ("tree", "routed_first", "shared_first")
TREE_GRAPH_TIME = kernels.graph_time_ms
TREE_SIDE_STREAM = streams._side_stream


def prioritised_graph_time_ms(main_priority: int):
    """kernels.graph_time_ms, but captured on a stream of `main_priority` and instantiated with node
    priorities (the second stream's priority is set by the caller)."""
    from cuda.bindings import driver

    def graph_time_ms(fn, launches: int, replays: int = 20) -> float:
        launches = kernels.graph_calls(launches)  # as many calls a graph as the tree's case
        fn()
        torch.cuda.synchronize()
        capture = torch.cuda.Stream(priority=main_priority)
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(graph, stream=capture):
            for _ in range(launches):
                fn()
        flags = driver.CUgraphInstantiate_flags.CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
        exe = _check(driver.cuGraphInstantiate(driver.CUgraph(graph.raw_cuda_graph()), int(flags)))

        def replay():
            _check(driver.cuGraphLaunch(exe, driver.CUstream(torch.cuda.current_stream().cuda_stream)))
        try:
            return kernels.time_ms(replay, iters=replays) / launches
        finally:
            torch.cuda.synchronize()
            _check(driver.cuGraphExecDestroy(exe))
    return graph_time_ms


def run_case(case: str, bandwidth: float) -> dict:
    high, low = -100, 0                     # torch maps a priority past the device's range to its end
    if case == "tree":
        kernels.graph_time_ms, streams._side_stream = TREE_GRAPH_TIME, TREE_SIDE_STREAM
    else:
        main, side = (high, low) if case == "routed_first" else (low, high)
        side_stream = torch.cuda.Stream(priority=side)
        kernels.graph_time_ms = prioritised_graph_time_ms(main)
        streams._side_stream = lambda index: side_stream
    try:
        return kernels.bench_decode_layer(bandwidth, wgmma=True, beside=True)
    finally:
        kernels.graph_time_ms, streams._side_stream = TREE_GRAPH_TIME, TREE_SIDE_STREAM


def main() -> None:
    cases_in_one_process(__doc__, CASES, run_case, "bench/results/node-priority-ab.json",
                         note=lambda: f"a high-priority stream's priority {torch.cuda.Stream(priority=-100).priority}")


if __name__ == "__main__":
    main()
