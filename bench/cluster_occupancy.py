"""How many thread-block clusters of a kernel the GPU holds at once, as the driver reckons it.

A grid of clusters that the GPU cannot hold at once runs in waves, the last at the cost of a whole kernel's
time; a cluster is placed on SMs of one GPC, so the answer is not the per-SM occupancy times the SMs over the
cluster size (session 51's one-launch shared expert: 16 clusters of 8 CTAs at one CTA an SM, 2.3-3x its
read; were they all resident?):

    python bench/cluster_occupancy.py --fatbin F --kernel NAME --block 256 --shared BYTES --cluster 8
        [--grid 128] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import loader  # noqa: E402
from plugins.loader import _check, kernels, sm_count  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fatbin", type=Path, default=loader.FATBIN)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--block", type=int, required=True, help="threads a CTA")
    ap.add_argument("--shared", type=int, default=0, help="dynamic shared memory a CTA, bytes")
    ap.add_argument("--cluster", type=int, required=True, help="CTAs a cluster")
    ap.add_argument("--grid", type=int, default=None, help="CTAs of the launch (default: one cluster)")
    ap.add_argument("--policy", default="", help="the clusters' placement (plugins.loader.CLUSTER_POLICY)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/cluster_occupancy.py needs a CUDA GPU")
    loader.FATBIN = args.fatbin.resolve()
    loader.CLUSTER_POLICY = args.policy
    lib = kernels()
    lib._allow_shared(args.kernel, args.shared)
    fn = lib.function(args.kernel)
    driver = lib.driver
    per_sm = _check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, args.block, args.shared))
    grid = args.grid or args.cluster
    stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
    config = lib._config((grid, 1, 1), args.block, args.shared, stream, args.cluster)
    clusters = _check(driver.cuOccupancyMaxActiveClusters(fn, config))
    in_grid = -(-grid // args.cluster)
    report = {**run_header(), "kernel": args.kernel, "block": args.block, "shared_bytes": args.shared,
              "cluster": args.cluster, "policy": args.policy, "grid": grid, "sms": sm_count(torch.cuda.current_device()),
              "ctas_per_sm": per_sm, "max_active_clusters": clusters, "clusters_in_grid": in_grid,
              "waves": -(-in_grid // max(1, clusters))}
    print(json.dumps(report))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
