"""Two or more builds of the kernels' fat binary on the prefill MoE's warpgroup-MMA kernels (sm_90), in turn.

Each fat binary runs in a process of its own (a process loads one kernel image), for `--rounds` rounds: it
times `moe_experts_prefill_wgmma` at Flash size (D 4096, F 2048, 6 of 256 experts per token, routed uniformly
at random, as bench/kernels.py) for each chunk size and group size, against a bf16 matmul measured in the
same process, and hashes the outputs, which must agree across builds that keep the math. The first build
named is the baseline; build another with `python -m plugins.build --out FILE` from another tree.

    python bench/moe_prefill_ab.py OLD.fatbin NEW.fatbin [--tokens 256 2048 4096] [--rounds 2] \\
        --json bench/results/moe-prefill-ab-h200.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.in_turn import runs_in_turn  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402


def one_build(fatbin: Path, tokens: list[int], groups: list[int]) -> dict:
    """This process's figures with `fatbin` as its kernel image."""
    import torch

    from bench.kernels import bf16_matmul_tflops, moe_prefill_tflops, random_flash_bank, random_routing, time_ms
    from plugins import loader
    from plugins.moe_experts import moe_experts_prefill_wgmma

    loader.FATBIN = fatbin.resolve()            # before anything loads the kernels
    d, f, k, n_experts = 4096, 2048, 6, 256
    matmul = bf16_matmul_tflops()
    torch.manual_seed(0)                        # the same experts and activations in every process
    bank, table = random_flash_bank(n_experts, d, f)
    rows = []
    for t in tokens:
        x, experts, w = random_routing(t, n_experts, d, k)
        for group in groups:
            def run():
                return moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0, group)
            digest = hashlib.sha256(run().cpu().numpy().tobytes()).hexdigest()[:16]
            ms = time_ms(run, iters=10)
            tflops = moe_prefill_tflops(t, k, d, f, ms)
            rows.append({"tokens": t, "group": group, "ms": ms, "tflops": tflops,
                         "fraction_of_bf16_matmul": tflops / matmul, "output_sha256": digest})
    return {"fatbin": str(fatbin), "bf16_matmul_tflops": matmul, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fatbins", type=Path, nargs="+")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 4096])
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 64], choices=[128, 64])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_build(args.fatbins[0], args.tokens, args.groups)))
        return

    def child_argv(case: str) -> list[str]:
        return [__file__, case, "--child", "--tokens", *map(str, args.tokens), "--groups", *map(str, args.groups)]

    def describe(run: dict) -> str:
        return ", ".join(f"{r['tokens']}/{r['group']}: {r['ms']:.3f} ms {r['fraction_of_bf16_matmul']:.3f}"
                         for r in run["rows"])

    runs = runs_in_turn([str(f) for f in args.fatbins], args.rounds, child_argv, describe)
    digests = {(r["tokens"], r["group"]): set() for run in runs for r in run["rows"]}
    for run in runs:
        for r in run["rows"]:
            digests[(r["tokens"], r["group"])].add(r["output_sha256"])
    same = all(len(d) == 1 for d in digests.values())
    print(f"outputs identical across builds: {same}")
    if args.json:
        write_json(args.json, run_header() | {"fatbins": [str(f) for f in args.fatbins], "rounds": args.rounds,
                                              "same_outputs": same, "runs": runs})


if __name__ == "__main__":
    main()
