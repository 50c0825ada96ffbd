"""The expert pager with route prediction against without, in turn: the runtime issue's paged line.

`dsv4 bench --expert-slots N` runs its paged modes once each, one after another, so whatever drifts over a
run (the first mode also meets a cold page cache) falls on one mode. This loads the artifact afresh for each
mode, alternating the modes for `--rounds` rounds, and reports per run the decode speed, the hit rate, the
time waited for copies and the greedy tokens (which must agree: paging never changes what is computed).

    python bench/pager_prediction_ab.py /tmp/art/flash8-bfloat16 --expert-slots 1536 [--rounds 2] [--new 96] \\
        [--modes predict,hash] [--json bench/results/pager-prediction-ab-h200.json]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from dsv4.cli import _open_artifact  # noqa: E402
from runtime.artifact import PREFETCH  # noqa: E402
from runtime.bench import measure, synthetic_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--expert-slots", type=int, required=True, help="routed experts kept in device slots")
    ap.add_argument("--modes", default="predict,hash", help=f"pager prefetch modes, of {', '.join(PREFETCH)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=96, help="greedy tokens per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pager-prediction-ab-h200.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in PREFETCH]:
        raise SystemExit(f"error: no prefetch mode {unknown[0]!r}; the modes are {', '.join(PREFETCH)}")
    prompt = synthetic_prompt(args.prompt_len)
    report = run_header() | {"artifact": str(args.artifact), "expert_slots": args.expert_slots, "runs": []}
    for r in range(args.rounds):
        for mode in modes:
            model = _open_artifact(args.artifact, expert_slots=args.expert_slots, prefetch=mode)
            if model.pager is None:
                raise SystemExit(f"error: with --expert-slots {args.expert_slots} every routed expert is resident: "
                                 "nothing is paged")
            figures = measure(model, prompt, args.new)
            run = {"round": r, "mode": mode, "decode_tok_s": figures["decode_tok_s"], "pager": model.pager.report(),
                   "tokens": figures["tokens"]}
            report["runs"].append(run)
            p = run["pager"]
            print(f"round {r} {mode:8s} decode {run['decode_tok_s']:6.1f} tok/s  hit rate {p['hit_rate']:.3f}  "
                  f"waited {p['stall_s'] * 1e3:.1f} ms for {p['waited_bytes'] / 1e6:.0f} MB", flush=True)
            write_json(args.json, report)          # after every run: a cut-off run keeps what it measured
            del model
            gc.collect()
            torch.cuda.empty_cache()
    for mode in modes:
        mine = [run for run in report["runs"] if run["mode"] == mode]
        report[f"median_decode_tok_s_{mode}"] = statistics.median(run["decode_tok_s"] for run in mine)
        report[f"median_stall_ms_{mode}"] = statistics.median(run["pager"]["stall_s"] * 1e3 for run in mine)
        report[f"median_hit_rate_{mode}"] = statistics.median(run["pager"]["hit_rate"] for run in mine)
    report["tokens_agree"] = all(run["tokens"] == report["runs"][0]["tokens"] for run in report["runs"])
    print({k: v for k, v in report.items() if k.startswith("median") or k == "tokens_agree"})
    write_json(args.json, report)


if __name__ == "__main__":
    main()
