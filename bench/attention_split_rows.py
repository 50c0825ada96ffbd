"""GPU time of sparse attention's kernels by split size (indices per split: csrc/sparse_attention.cu ROWS, 32
for decode, `PREFILL_ROWS` 64 for prefill chunks), Flash ratio-4 sizes: 64 heads x 512 over 640 picked rows
of a 2176-row cache, for one decode query and for a 256-query prefill chunk. Kernel durations come from the
profiler (the split and combine launches overlap through PDL: their sum counts that overlap twice).

    python bench/attention_split_rows.py --json bench/results/attention-split-rows-h200.json

Session 25 ran this as a probe with the split size set in the source (the numbers are in
bench/results/attention-split-rows-s25-h200.txt); `--rows` came after, not yet run.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import sparse_attention as sa  # noqa: E402


def kernel_us(fn, calls: int = 10) -> dict[str, float]:
    """GPU microseconds per call of each sparse attention kernel `fn` launches (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "sparse_attention" in e.name:
            total[e.name] = total.get(e.name, 0.0) + e.time_range.elapsed_us() / calls
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[sa.ROWS, sa.PREFILL_ROWS],
                    help="prefill split sizes to time (each must have a kernel: 32 or 64)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "attention-split-rows-h200.json")
    args = ap.parse_args()
    h, d, t, k, s = 64, 512, 2176, 640, 256
    torch.manual_seed(0)
    q = torch.randn(1, s, h, d, device="cuda").to(torch.bfloat16)
    kv = torch.randn(1, t, d, device="cuda").to(torch.bfloat16)
    sink = torch.randn(h, device="cuda")
    idx = torch.stack([torch.randperm(t, device="cuda")[:k] for _ in range(s)]).view(1, s, k)
    rows = []
    for r in args.rows:
        sa.PREFILL_ROWS = r                     # what sparse_attention_chunked splits a chunk by
        decode = kernel_us(lambda: sa.sparse_attention_decode(q[:, :1].contiguous(), kv, sink,
                                                              idx[:, :1].contiguous(), d ** -0.5, rows=r))
        chunk = kernel_us(lambda: sa.sparse_attention_chunked(q, kv, sink, idx, d ** -0.5))
        rows.append({"rows_per_split": r, "decode_kernels_us": decode, "chunk_256_kernels_us": chunk})
        print(json.dumps(rows[-1]))
    write_json(args.json, run_header() | {"results": rows})


if __name__ == "__main__":
    main()
