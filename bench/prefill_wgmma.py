"""Prefill time of a built bf16 CUDA artifact with the wgmma prefill MoE kernels (csrc/moe_wgmma.cu) against
the grouped mma.sync kernels, over prompt lengths, on one loaded model (the switch is read per chunk, outside
the decode graph): where the wgmma path starts to pay end to end (plugins.moe_experts.WgmmaPaths), and which
of its two kernel sizes (groups of up to 128 pairs, or of 64 at two CTAs an SM) does.

    python bench/prefill_wgmma.py /tmp/art/f8 [--modes grouped g128 g64 default] \
        --json bench/results/prefill-wgmma-flash8-h200.json

Each length and mode runs its prompt twice (the first warms) and records the second, interleaved, in --reps
rounds; every chunk takes the mode's kernels (prefill_min_pairs_per_expert 0), `default` the tree's rules.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import moe_experts  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import prefill_seconds, synthetic_prompt  # noqa: E402


# each mode's switches (plugins.moe_experts.WgmmaPaths); `default` keeps the tree's
MODES = {"grouped": {"prefill": False}, "default": {},
         "g128": {"prefill": True, "prefill_min_pairs_per_expert": 0, "prefill_small_groups_up_to": 0.0},
         "g64": {"prefill": True, "prefill_min_pairs_per_expert": 0, "prefill_small_groups_up_to": float("inf")}}


@torch.inference_mode()          # as runtime.bench.measure (outside it, session 26 saw 10-25 ms more per prompt)
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["grouped", "g128", "g64"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = ArtifactModel(args.artifact, "cuda", graphs=True)
    default, rows = moe_experts.WGMMA, []
    try:
        for rep in range(args.reps):
            for n in args.lengths:
                prompt = synthetic_prompt(n)
                for mode in args.modes:
                    moe_experts.WGMMA = dataclasses.replace(default, **MODES[mode])
                    prefill_seconds(model, prompt)
                    rows.append({"tokens": n, "mode": mode, "rep": rep, "ms": prefill_seconds(model, prompt)[0] * 1e3})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        moe_experts.WGMMA = default
    if args.json:
        write_json(args.json, run_header() | {"rows": rows})


if __name__ == "__main__":
    main()
