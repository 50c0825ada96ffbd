"""The attention's first links alone: hyper-connection pre with its norm, then the wq_a | wkv GEMV, with the
finish in a launch of its own or inside the GEMV's CTAs (plugins.hc_pre.FINISH_IN_GEMV), at Flash sizes.

Each figure is the time per pair of links (mix, then finish and GEMV or the GEMV finishing itself) over 40
pairs in one CUDA graph, each GEMV reading its own weight (past L2), comb's Sinkhorn iterations beside on
the second stream and joined once at the end: the decode step's main path through these launches without
what runs beside it. Both forms in one process (one kernel image), alternating for `--rounds` rounds.

    python bench/hc_fold_links.py [--rounds 3] [--json bench/results/hc-fold-links-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import random_fp8, time_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import hc_pre, streams  # noqa: E402

PAIRS, D, N = 40, 4096, 1536                     # Flash: d, q_lora_rank + head_dim


def us_per_pair(inside: bool, weights, x, fn, scale, base, norm) -> float:
    """Microseconds per mix + GEMV pair, the finish inside the GEMV or in its own launch."""
    hc_pre.FINISH_IN_GEMV = inside

    def pairs():
        for w, s in weights:
            hc_pre.hc_pre_norm_linear(x, fn, scale, base, norm, 1e-6, 1e-6, 20, w, s)
        streams.join_pending(x.device)
    pairs()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pairs()
    return time_ms(graph.replay, iters=30) * 1e3 / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hc-fold-links-h200.json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1, 4, D, device="cuda", generator=g).to(torch.bfloat16)
    fn = torch.randn(24, 4 * D, device="cuda", generator=g) * 1e-2
    scale, base = torch.rand(3, device="cuda", generator=g) + 0.25, torch.randn(24, device="cuda", generator=g)
    norm = torch.rand(D, device="cuda", generator=g) + 0.5
    weights = [random_fp8(N, D) for _ in range(PAIRS)]     # 40 x 6.3 MB: each read from DRAM
    runs = {"finish_apart": [], "finish_in_gemv": []}
    for _ in range(args.rounds):
        runs["finish_apart"].append(us_per_pair(False, weights, x, fn, scale, base, norm))
        runs["finish_in_gemv"].append(us_per_pair(True, weights, x, fn, scale, base, norm))
    print(json.dumps(runs, indent=1))
    write_json(args.json, run_header() | {"pairs": PAIRS, "d": D, "n": N, "us_per_pair": runs})


if __name__ == "__main__":
    main()
