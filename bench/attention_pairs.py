"""Sparse attention's decode launch pair (split + combine) in a CUDA graph, per fat binary and case.

Flash sizes (64 heads x 512, one query) over 128, 640 and 2176 rows of a 4096-row cache: a graph of 20 pairs
back to back, replayed 20 times per timing, 7 timings, the median per pair. Each case runs in a process of
its own (a process loads one kernel image), in turn, for `--rounds` rounds; each reports a hash of its
output, which must agree across cases that change no math. A case is FATBIN[:W[:R]]: W the split launch's
warps per CTA (plugins.sparse_attention.DECODE_WARPS_PER_CTA; `warps_per_cta` still puts every warp in one
CTA past one wave, as at 2176 rows), R the rows per split (32, the default, or 64: another rounding of the
probabilities, so another hash); `@MODULE.NAME=VALUE[,...]` after it turns other switches in its process
(bench/in_turn.py).

    python bench/attention_pairs.py plugins/dsv4_kernels.fatbin:4 plugins/dsv4_kernels.fatbin:2 \\
        --json bench/results/attention-pairs-h200.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.in_turn import parse_case, runs_in_turn, turn_switches  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402

ROWS = (128, 640, 2176)


def one_case(spec: str) -> dict:
    """This process's figures for case `spec` (FATBIN[:W[:R]][@switches])."""
    import torch

    from plugins import loader
    head, switches = parse_case(spec)
    fatbin, warps, rows = (head.split(":") + ["", ""])[:3]
    loader.FATBIN = Path(fatbin).resolve()      # before anything loads the kernels
    turn_switches(switches)
    from plugins import sparse_attention as sa
    if warps:
        sa.DECODE_WARPS_PER_CTA = int(warps)
    split_rows = int(rows) if rows else sa.ROWS
    h, d, t = 64, 512, 4096
    figures = {}
    for k in ROWS:
        torch.manual_seed(0)
        q = torch.randn(1, 1, h, d, device="cuda").to(torch.bfloat16)
        kv = torch.randn(1, t, d, device="cuda").to(torch.bfloat16)
        sink = torch.randn(h, device="cuda")
        idx = torch.randperm(t, device="cuda")[:k].view(1, 1, k).contiguous()
        ws, out = sa.make_workspace(1, h, d, k, "cuda", split_rows), torch.empty_like(q)

        def pair():
            sa.sparse_attention_decode(q, kv, sink, idx, d ** -0.5, out=out, workspace=ws, rows=split_rows)

        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            pair()
            torch.cuda.synchronize()
            digest = hashlib.sha256(out.cpu().view(torch.int16).numpy().tobytes()).hexdigest()[:16]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                for _ in range(20):
                    pair()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / 400)
        figures[str(k)] = {"us_per_pair": sorted(times)[3], "output_sha256_16": digest}
    return {"case": spec, "figures": figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", help="FATBIN[:WARPS_PER_CTA[:ROWS_PER_SPLIT]][@MODULE.NAME=VALUE,...]; the "
                                             "first is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: one case, JSON out
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_case(args.cases[0])))
        return
    missing = [c for c in args.cases if not Path(parse_case(c)[0].partition(":")[0]).is_file()]
    if missing:
        raise SystemExit(f"error: no fat binary for {', '.join(missing)}")
    runs = runs_in_turn(args.cases, args.rounds, lambda case: [__file__, case, "--one"],
                        lambda run: ", ".join(f"{k} rows {v['us_per_pair']:.2f} us" for k, v in run["figures"].items()))
    if args.json:
        write_json(args.json, run_header() | {"rows": list(ROWS), "runs": runs})


if __name__ == "__main__":
    main()
