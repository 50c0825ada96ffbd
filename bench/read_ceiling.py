"""What the plainest read of a kernel's bytes reaches in bench/kernels.py's harness: the ceiling of each line.

The kernels issue asks each decode kernel for a share of the copy bandwidth (0.8; 0.7 for a layer's kernels
back to back). A kernel that reads its weights once can be no faster than a kernel that does nothing but
read the same bytes, launched the same way (a CUDA graph of launches over buffers rotating past L2, each
launch waiting for the one before, as every decode kernel waits for its input). This script times that plain
read (`dsv4_stream_read`, plugins/csrc/stream_read.cu) for each line's launches, in the kernels' order, and
the kernels themselves, all in one run against one copy bandwidth:

    python bench/read_ceiling.py [--json bench/results/read-ceiling-h200.json] [--wgmma-gemv]
        [--fatbin FILE[@MODULE.NAME=VALUE,...]] [--lines wq_b,moe_decode,...]

--wgmma-gemv times the plain FP8 GEMVs (wq_b, wo_b and the layer's plain ones) on csrc/fp8_gemv_wgmma.cu,
not yet the default (plugins.fp8_linear.WGMMA_GEMV).

Per line: the kernel's fraction of the copy bandwidth, the plain read's, and the kernel's time over the
read's. A line whose plain read falls short of its target cannot be met by any kernel that reads its bytes
in that many dependent launches; one whose read clears it shows how much the kernel leaves. The lines with
the routed experts also time a routed read: the gate_up launch's read starting only after its wait and two
dependent reads (an expert id, then its table entry), as the kernel must start, since the router before it
chooses the experts; the plain read starts its loads before the wait, which no routed kernel can.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import (FLASH_FP8_SHAPES, bench_decode_layer, bench_fp8_gemv, bench_moe_decode,  # noqa: E402
                           bench_wo_a, fp8_bytes, graph_time_ms)
from bench.in_turn import parse_case, turn_switches  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import fp8_linear, loader  # noqa: E402
from plugins.loader import PTR, kernels  # noqa: E402
from plugins.moe_experts import bank_parts, expert_nbytes  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

POOL_BYTES = 1 << 30                   # rotated through: 20x the H200's L2
THREADS = 256
D, F, TOPK = 4096, 2048, 6             # Flash's routed experts
FP8_LINES = ("wq_a_wkv", "wq_b", "wo_b", "shared_w13", "shared_w2")   # the FP8 GEMVs of a decode layer


def lines() -> dict[str, list[int]]:
    """Each acceptance line's launches, as the bytes each must read, in the order the kernels run."""
    gate_up = TOPK * sum(rows * cols for name, (rows, cols), _ in bank_parts(D, F) if name[1] in "13")  # w1 | w3, s1 | s3
    down = TOPK * expert_nbytes(D, F) - gate_up
    wq_a_wkv, wq_b, wo_b, w13, w2 = (fp8_bytes(*FLASH_FP8_SHAPES[name]) for name in FP8_LINES)
    wo_a = fp8_bytes(8 * 1024, 4096)                     # 8 groups of 1024 rows
    return {"wq_b": [wq_b], "wo_a": [wo_a], "wo_b": [wo_b], "shared_w13": [w13], "shared_w2": [w2],
            "shared_expert": [w13, w2], "moe_decode": [gate_up, down],
            "decode_layer": [wq_a_wkv, wq_b, wo_a, wo_b, w13, w2, gate_up, down]}


# The routed experts' gate_up launch in each line that has one: it learns its experts after its wait.
ROUTED_LAUNCH = {"moe_decode": 0, "decode_layer": 6}


def read_once(ptr: int, nbytes: int, sink: torch.Tensor, grid: int, route: tuple | None = None) -> None:
    """One plain read of the nbytes // 16 words at device address ptr (16-byte aligned) over `grid` CTAs;
    CTA b writes the XOR of the words it read to sink[b] (sink: int32, at least `grid` long). route: (ids,
    table) device tensors (int32, uint64): the routed read, of the words at table[ids[0]] + ptr."""
    ids, table = route if route is not None else (0, 0)
    kernels().launch("dsv4_stream_read", grid, THREADS, [(ptr, PTR), (nbytes // 16, ctypes.c_longlong), (sink, PTR),
                                                         (ids, PTR), (table, PTR)])


def parse_read_form(form: str) -> tuple[int, int, int, int] | None:
    """--read-form: "ldg" (None: the plain read's register loads) or "ring:CHUNKS:STAGES:WARPS:CTAS" (the ring
    read's 16-byte pieces per lane and step, ring slots, warps a CTA and CTAs an SM)."""
    if form == "ldg":
        return None
    kind, *fields = form.split(":")
    try:
        chunks, stages, warps, ctas = (int(f) for f in fields)
    except ValueError:
        raise SystemExit(f"error: --read-form {form!r} is not ldg or ring:CHUNKS:STAGES:WARPS:CTAS") from None
    if kind != "ring" or not (1 <= chunks <= 16 and 2 <= stages <= 8 and 1 <= warps <= 8 and ctas >= 1):
        raise SystemExit(f"error: --read-form {form!r}: ring:CHUNKS(1-16):STAGES(2-8):WARPS(1-8):CTAS")
    return chunks, stages, warps, ctas


class PlainRead:
    """Launches of the plain read over one pool, each at the next offset, so no launch finds its bytes in L2.
    ring: parse_read_form's fields, to read through cp.async rings (dsv4_stream_read_ring) instead."""

    def __init__(self, ring: tuple[int, int, int, int] | None = None):
        self.pool = torch.empty(POOL_BYTES, dtype=torch.uint8, device="cuda")
        self.ring = ring
        if ring is None:
            self.grid = kernels().resident("dsv4_stream_read", THREADS)
        else:                                   # shared memory sized so that `ctas` fit an SM
            chunks, stages, warps, ctas = ring
            per_sm, per_block = kernels().shared_memory()
            need = warps * stages * chunks * 512
            self.shared = max(need, min(per_block, per_sm // (ctas + 1) - 1024 + 16) // 16 * 16)
            if need > per_block:
                raise SystemExit(f"error: the ring read needs {need} bytes of shared memory a CTA")
            self.grid = kernels().resident("dsv4_stream_read_ring", 32 * warps, self.shared)
        self.sink = torch.zeros(self.grid, dtype=torch.int32, device="cuda")
        # the routed read's id and table: expert 0, based at the pool (offsets are the launch's own)
        self.route = (torch.zeros(1, dtype=torch.int32, device="cuda"),
                      torch.tensor([self.pool.data_ptr()], dtype=torch.uint64, device="cuda"))
        self.at = 0

    def launch(self, nbytes: int, routed: bool = False) -> None:
        if self.at + nbytes > POOL_BYTES:
            self.at = 0
        if self.ring is not None:
            chunks, stages, warps, _ = self.ring
            kernels().launch("dsv4_stream_read_ring", self.grid, 32 * warps,
                             [(self.pool.data_ptr() + self.at, PTR), (nbytes // 16, ctypes.c_longlong),
                              (self.sink, PTR), (chunks, ctypes.c_int), (stages, ctypes.c_int)], self.shared)
        elif routed:
            read_once(self.at, nbytes, self.sink, self.grid, self.route)
        else:
            read_once(self.pool.data_ptr() + self.at, nbytes, self.sink, self.grid)
        self.at += (nbytes + 4095) // 4096 * 4096

    def time_us(self, launches: list[int], routed: int | None = None) -> float:
        """One pass over `launches` (bytes each, back to back; launch `routed` the routed read), replayed from
        a graph of enough passes to sweep the pool: microseconds per pass."""
        def one_pass():
            for i, n in enumerate(launches):
                self.launch(n, routed=i == routed)
        return graph_time_ms(one_pass, max(4, 2 * POOL_BYTES // sum(launches))) * 1e3


def kernel_us(line: str, bandwidth: float) -> float:
    """The line's kernels in bench/kernels.py's harness (the shared expert: its two GEMVs, each timed there)."""
    if line in FP8_LINES:
        return bench_fp8_gemv(line, *FLASH_FP8_SHAPES[line], 1, bandwidth)["time_us"]
    if line == "shared_expert":
        return kernel_us("shared_w13", bandwidth) + kernel_us("shared_w2", bandwidth)
    if line == "wo_a":
        return bench_wo_a(bandwidth, 1)["time_us"]
    if line == "moe_decode":
        return bench_moe_decode(bandwidth, 1, wgmma=True)["time_us"]
    return bench_decode_layer(bandwidth, wgmma=True, beside=True)["time_us"]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "read-ceiling-h200.json")
    ap.add_argument("--wgmma-gemv", action="store_true", help="the plain FP8 GEMVs on csrc/fp8_gemv_wgmma.cu")
    ap.add_argument("--fatbin", default=str(loader.FATBIN),
                    help="the kernels' fat binary to time, FATBIN[@MODULE.NAME=VALUE,...] with switches to turn "
                         "(as bench/fatbin_ab.py's cases)")
    ap.add_argument("--lines", default=None, help="comma-separated lines to time (default: all, and single reads)")
    ap.add_argument("--read-form", default="ldg",
                    help="the read: ldg (register loads, the default) or ring:CHUNKS:STAGES:WARPS:CTAS (cp.async "
                         "rings as the decode kernels stream; no routed read)")
    ap.add_argument("--no-kernels", action="store_true", help="time the reads only")
    args = ap.parse_args()
    head, switches = parse_case(args.fatbin)
    loader.FATBIN = Path(head).resolve()
    turn_switches(switches)
    every = lines()
    asked = list(every) if args.lines is None else args.lines.split(",")
    if unknown := [k for k in asked if k not in every]:
        raise SystemExit(f"error: no line {unknown[0]!r}; the lines are {', '.join(every)}")
    chosen = {k: every[k] for k in asked}
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/read_ceiling.py needs a CUDA GPU")
    if args.wgmma_gemv:                          # else as the module (or a --fatbin switch) has it
        fp8_linear.WGMMA_GEMV = True
    bandwidth = copy_bandwidth()
    reader = PlainRead(parse_read_form(args.read_form))
    report = {**run_header(), "copy_bandwidth_gb_s": bandwidth / 1e9, "read_grid": reader.grid,
              "read_form": args.read_form,
              "wgmma_gemv": fp8_linear.WGMMA_GEMV, "fatbin": str(loader.FATBIN),
              "switches": [f"{m}.{n}={v!r}" for m, n, v in switches], "single_reads": [], "lines": []}
    for mib in (4, 8, 16, 32, 64, 128, 256) if args.lines is None else ():
        us = reader.time_us([mib << 20])
        report["single_reads"].append({"mib": mib, "time_us": us, "fraction_of_copy_bw": (mib << 20) / (us * 1e-6) / bandwidth})
        print(json.dumps(report["single_reads"][-1]), flush=True)
    for line, launches in chosen.items():
        read = reader.time_us(launches)
        frac = lambda us: sum(launches) / (us * 1e-6) / bandwidth       # noqa: E731
        report["lines"].append({"line": line, "launches_mb": [n / 1e6 for n in launches], "read_us": read,
                                "read_fraction": frac(read)})
        if not args.no_kernels:
            kern = kernel_us(line, bandwidth)
            report["lines"][-1] |= {"kernel_us": kern, "kernel_fraction": frac(kern), "kernel_over_read": kern / read}
        if line in ROUTED_LAUNCH and reader.ring is None:
            routed = reader.time_us(launches, ROUTED_LAUNCH[line])
            report["lines"][-1] |= {"routed_read_us": routed, "routed_read_fraction": frac(routed)}
            if not args.no_kernels:
                report["lines"][-1]["kernel_over_routed_read"] = kern / routed
        print(json.dumps(report["lines"][-1]), flush=True)
        write_json(args.json, report)


if __name__ == "__main__":
    main()
