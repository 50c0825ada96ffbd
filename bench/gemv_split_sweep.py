"""FP8 GEMV time against how many warps share a row group's K (`wpr`, csrc/fp8_linear.cu), weights rotated
past L2, inside a CUDA graph: whether the default split (`plugins.fp8_linear.gemv_split`) keeps HBM busiest
on the Flash decode shapes, in particular those whose row groups do not fill the GPU (one item per CTA).

    python bench/gemv_split_sweep.py [--json bench/results/gemv-split-sweep-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plugins.fp8_linear as fp8_linear  # noqa: E402
from bench.gemv_probe import gemv_us  # noqa: E402
from bench.kernels import bench_wo_a, write_report  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

# (name, N, K): the decode step's FP8 GEMVs at Flash size (stacked where the programs stack them)
SHAPES = [("wq_a_wkv", 1536, 4096), ("shared_w13", 4096, 4096), ("shared_w2", 4096, 2048),
          ("wq_b", 32768, 1024), ("wq_b_with_indexer", 40960, 1024), ("wo_b", 4096, 8192),
          ("wo_a", 8192, 4096)]       # the grouped form (plugins.grouped_linear), 1 and 4 rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gemv-split-sweep-h200.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    default = fp8_linear.gemv_split
    rows = []
    for name, n, k in SHAPES:
        for wpr in (None, 1, 2, 4, 8):
            if wpr is not None and (k // 128) % wpr:
                continue

            def forced(n_, k_, kernel, shared, device=None, *, wpr=wpr):
                chosen, _, resident = default(n_, k_, kernel, shared, device)
                p = chosen if wpr is None else wpr
                return p, -(-((n_ + 15) // 16) // (8 // p)), resident
            fp8_linear.gemv_split = forced
            for m in (1, 4) if name == "wo_a" else (1,):
                kernel = "dsv4_fp8_gemv_fused_grouped_m8" if name == "wo_a" else "dsv4_fp8_gemv_fused_m8"
                chosen = default(n, k, kernel, fp8_linear.gemv_plan(m, k, fp8_linear.kernels().shared_memory())[2])[0]
                us = bench_wo_a(bw, m)["time_us"] if name == "wo_a" else gemv_us(n, k, rotate=True)
                rows.append({"weight": name, "N": n, "K": k, "rows": m, "wpr": wpr or f"default ({chosen})",
                             "time_us": us, "fraction_of_copy_bw": n * k / (us * 1e-6) / bw})
                print(json.dumps(rows[-1]))
    fp8_linear.gemv_split = default
    write_report(args.json, bw, rows)


if __name__ == "__main__":
    main()
