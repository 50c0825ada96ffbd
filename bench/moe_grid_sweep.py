"""MXFP4 decode MoE time against how many of its CTAs each SM may hold (the grid: csrc/moe_decode_wgmma.cu
and csrc/moe_experts.cu walk their items on a persistent grid, so fewer CTAs each stream several items
through one ring without a restart), 1 and 2 tokens, both kernel paths where the GPU has them. The FP8
GEMV's sweep of its split (bench/gemv_split_sweep.py) found one CTA per SM with longer streams faster
than two on some shapes; this asks the same of the experts.

    python bench/moe_grid_sweep.py [--json bench/results/moe-grid-sweep-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import bench_moe_decode, write_report  # noqa: E402
from plugins.loader import KernelImage  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

DECODE_KERNELS = ("dsv4_moe_gate_up_decode_wgmma", "dsv4_moe_down_decode_wgmma", "dsv4_moe_gate_up", "dsv4_moe_down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "moe-grid-sweep-h200.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    on_sm90 = torch.cuda.get_device_capability() == (9, 0)
    resident = KernelImage.resident
    rows = []
    for per_sm in (None, 1, 2, 3):

        def capped(self, name, block, shared=0, per_sm=per_sm):
            full = resident(self, name, block, shared)
            return min(full, per_sm * sms) if per_sm and name in DECODE_KERNELS else full
        KernelImage.resident = capped
        for wgmma in (True, False) if on_sm90 else (False,):
            for tokens in (1, 2):
                row = bench_moe_decode(bw, tokens=tokens, wgmma=wgmma)
                row["ctas_per_sm_cap"] = per_sm or "none (as many as fit)"
                rows.append(row)
                print(json.dumps(row))
    KernelImage.resident = resident
    write_report(args.json, bw, rows)


if __name__ == "__main__":
    main()
