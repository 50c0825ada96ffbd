"""What one link of the decode step's chain costs: a small kernel launched after the one it depends on.

Each figure is the time per launch of 40 dependent launches captured in one CUDA graph (programmatic
dependent launch, as the decode step runs them), for: a one-warp kernel (the floor of a link: `act_quant`
of one 128-wide row), a one-CTA RMSNorm of a 4096-wide row, and hyper-connection pre's two launches for one
row with and without the norm and with 20 or 0 Sinkhorn iterations (its critical path:
bench/results/decode-chain-links-s27-h200.json, session 27).

    python bench/chain_links.py [--json bench/results/chain-links-h200.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import graph_time_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from plugins.fp8_linear import act_quant  # noqa: E402
from plugins.hc_pre import hc_pre_decode, make_workspace  # noqa: E402
from plugins.rows import rms_norm_rows  # noqa: E402

LINKS = 40


def us_per_link(step, links: int = LINKS) -> float:
    """Microseconds per call of `step` with `links` calls, each after the last, in one CUDA graph."""
    return graph_time_ms(step, links, replays=30) * 1e3


def measure(d: int = 4096, hc: int = 4) -> dict[str, float]:
    out: dict[str, float] = {}
    codes, scales = torch.empty(1, 128, dtype=torch.uint8, device="cuda"), torch.empty(1, 1, device="cuda")
    row = torch.randn(1, 128, device="cuda").to(torch.bfloat16)
    out["act_quant_1x128"] = us_per_link(lambda: act_quant(row, codes, scales))

    weight = torch.ones(d, device="cuda")
    state = {"x": torch.randn(1, d, device="cuda").to(torch.bfloat16)}

    def norm_step():                            # each norm reads the last one's output
        state["x"] = rms_norm_rows(state["x"], weight, 1e-6)
    out[f"rms_norm_rows_1x{d}"] = us_per_link(norm_step)

    streams = torch.randn(1, hc, d, device="cuda").to(torch.bfloat16)
    fn = torch.randn((2 + hc) * hc, hc * d, device="cuda") * 0.01
    scale, base = torch.ones(3, device="cuda"), torch.zeros((2 + hc) * hc, device="cuda")
    work = make_workspace(1, d, "cuda")
    outs = (torch.empty(1, d, device="cuda", dtype=torch.bfloat16), torch.empty(1, hc, device="cuda"),
            torch.empty(1, hc, hc, device="cuda"))
    for name, norm, iters in (("hc_pre_mix_finish", None, 20), ("hc_pre_mix_finish_norm", weight, 20),
                              ("hc_pre_mix_finish_norm_0iters", weight, 0)):
        out[name] = us_per_link(lambda norm=norm, iters=iters: hc_pre_decode(streams, fn, scale, base, 1e-6, 1e-6,
                                                                              iters, outs, work, norm=norm))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "chain-links-h200.json")
    args = ap.parse_args()
    links = measure()
    print(json.dumps(links, indent=1))
    write_json(args.json, run_header() | {"links": LINKS, "us_per_link": links})


if __name__ == "__main__":
    main()
