"""Where the FP8 GEMV's fixed cost per launch goes (H200): each shape with its weights rotated past L2
and with one L2-resident copy, programmatic dependent launch on and off, a one-warp launch (the graph's
cost per node), and torch's own bf16 sum over the same bytes (a read-only kernel to hold ours against).
Times per launch inside a CUDA graph; fractions of the copy bandwidth measured in the same run.

    python bench/gemv_probe.py [--json bench/results/gemv-probe-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import L2_DEFEAT_BYTES, graph_time_ms, random_fp8, write_report  # noqa: E402
from plugins.fp8_linear import act_quant, fp8_linear_decode, make_workspace  # noqa: E402
from plugins.loader import kernels  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

SHAPES = [("wkv", 512, 4096), ("wq_a", 1024, 4096), ("shared_w1", 2048, 4096), ("wq_b", 32768, 1024),
          ("wo_b", 4096, 8192)]


def gemv_us(n: int, k: int, rotate: bool) -> float:
    copies = max(2, L2_DEFEAT_BYTES // (n * k)) if rotate else 1
    ws, ss = zip(*(random_fp8(n, k) for _ in range(copies)))
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    out, work = torch.empty(1, n, device="cuda", dtype=torch.bfloat16), make_workspace(1, k, "cuda")
    state = {"i": 0}

    def launch():
        i = state["i"] = (state["i"] + 1) % copies
        fp8_linear_decode(x, ws[i], ss[i], out, work)
    return graph_time_ms(launch, max(copies, 16)) * 1e3


def sum_us(nbytes: int) -> float:
    copies = max(2, L2_DEFEAT_BYTES // nbytes)
    bufs = [torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16) for _ in range(copies)]
    out = torch.empty((), device="cuda")
    state = {"i": 0}

    def launch():
        state["i"] = (state["i"] + 1) % copies
        torch.sum(bufs[state["i"]], dim=0, dtype=torch.float32, out=out)
    return graph_time_ms(launch, copies) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gemv-probe-h200.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    lib, rows = kernels(), []
    pdl_supported = lib._pdl
    for pdl in sorted({True, False} if pdl_supported else {False}, reverse=True):
        lib._pdl = pdl
        for name, n, k in SHAPES:
            for rotate in (True, False):
                us = gemv_us(n, k, rotate)
                rows.append({"case": "fp8_gemv", "weight": name, "weight_mb": n * k / 1e6, "pdl": pdl,
                             "weights_past_l2": rotate, "time_us": us, "fraction_of_copy_bw": n * k / (us * 1e-6) / bw})
        x = torch.randn(1, 128, device="cuda").to(torch.bfloat16)
        codes, scales = make_workspace(1, 128, "cuda")
        rows.append({"case": "one-warp act_quant launch", "pdl": pdl,
                     "time_us": graph_time_ms(lambda: act_quant(x, codes, scales), 64) * 1e3})
    lib._pdl = pdl_supported
    for name, n, k in SHAPES:
        us = sum_us(n * k)
        rows.append({"case": "torch.sum bf16 over the same bytes", "weight": name, "weight_mb": n * k / 1e6,
                     "time_us": us, "fraction_of_copy_bw": n * k / (us * 1e-6) / bw})
    for row in rows:
        print(json.dumps(row))
    write_report(args.json, bw, rows)


if __name__ == "__main__":
    main()
