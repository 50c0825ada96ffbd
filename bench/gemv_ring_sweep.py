"""FP8 GEMV time against the depth of its weight ring (csrc/fp8_linear.cu) and against quantising the
activation in every CTA (fused) or once in its own launch (unfused), weights rotated past L2, inside a CUDA
graph: which depth (and so how many CTAs per SM) and which form keep HBM busiest for each Flash shape.

    python bench/gemv_ring_sweep.py [--json bench/results/gemv-ring-sweep-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plugins.fp8_linear as fp8_linear  # noqa: E402
from bench.gemv_probe import SHAPES, gemv_us  # noqa: E402
from bench.kernels import write_report  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gemv-ring-sweep-h200.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    chosen, fuse_limit = fp8_linear.ring_stages, fp8_linear.FUSE_LIMIT_BLOCKS
    rows = []
    for fused in (True, False):
        fp8_linear.FUSE_LIMIT_BLOCKS = fuse_limit if fused else 0
        for stages in (None, 2, 3, 4, 5, 6):
            fp8_linear.ring_stages = chosen if stages is None else (lambda *_, s=stages: s)
            fp8_linear.gemv_plan.cache_clear()               # plans are cached per shape
            for name, n, k in SHAPES:
                us = gemv_us(n, k, rotate=True)
                rows.append({"stages": stages or "default", "fused": fused, "weight": name, "time_us": us,
                             "fraction_of_copy_bw": n * k / (us * 1e-6) / bw})
                print(json.dumps(rows[-1]))
    fp8_linear.ring_stages, fp8_linear.FUSE_LIMIT_BLOCKS = chosen, fuse_limit
    fp8_linear.gemv_plan.cache_clear()
    write_report(args.json, bw, rows)


if __name__ == "__main__":
    main()
