"""A probe: what the routed experts' last launch costs in a chain. A trace of the Flash decode MoE
(bench/kernel_trace.py moe, session 59, H100) put the down kernel's last warp's end 38 us after gate_up's
first start, in calls 44 us apart, and gate_up's wait for the launch before it 3.6 us long: the sum over the
pairs (dsv4_moe_sum_pairs, 96 KB read) and the next call's start seemed to take 6-10 us. Times, in turn,
bench/kernels.py's MoE (`bench_moe_decode(wgmma=True)`, 6 experts, 1 token, as read_ceiling's moe_decode
line) with the sum (the tree), without it (`summed=False`: gate_up and down only), and the tree's with four
times the calls in one graph (what a graph's own launch adds per call).

    python bench/moe_chain_ab.py [--rounds 3] [--json bench/results/moe-chain-ab.json]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.kernels as kernels  # noqa: E402
from bench.in_turn import cases_in_one_process  # noqa: E402

CASES = ("tree", "no_sum", "tree_4x_calls")
TREE = (kernels.moe_experts_decode, kernels.graph_time_ms)


def run_case(case: str, bandwidth: float) -> dict:
    decode, graph_time = TREE
    if case == "no_sum":
        kernels.moe_experts_decode = functools.partial(decode, summed=False)
    elif case == "tree_4x_calls":
        kernels.graph_time_ms = lambda fn, launches, replays=20: graph_time(fn, 4 * kernels.graph_calls(launches),
                                                                            replays)
    try:
        return kernels.bench_moe_decode(bandwidth, 1, wgmma=True)
    finally:
        kernels.moe_experts_decode, kernels.graph_time_ms = TREE


def main() -> None:
    cases_in_one_process(__doc__, CASES, run_case, "bench/results/moe-chain-ab.json")


if __name__ == "__main__":
    main()
