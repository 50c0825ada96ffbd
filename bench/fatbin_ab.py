"""Two or more builds of the kernels' fat binary on one artifact: the replayed decode step of each, alternating.

Each fat binary runs in a process of its own (a process loads one kernel image), in turn, for `--rounds`
rounds, so that drift of the machine falls on every build alike. Each process reports its replayed decode
step (two medians of 5 runs of `--steps` steps, as bench/profile_decode.py times them), that step's fraction
of the copy bandwidth it measured, and the greedy tokens of a fixed prompt, which must agree across builds
(a build that changes the math changes them). Build the other fat binary with `python -m plugins.build --out
FILE` from the other tree (or with other nvcc flags); the first one named is the baseline. A case may also
turn runtime switches, as FATBIN@MODULE.NAME=VALUE[,...] (VALUE a Python literal), set in its process before
the model loads: one fat binary with a switch turned each way.

    python bench/fatbin_ab.py /tmp/art/flash8-bfloat16 plugins/dsv4_kernels.fatbin /tmp/new.fatbin \\
        [--rounds 2] --json bench/results/fatbin-ab-h200.json
    python bench/fatbin_ab.py /tmp/art/flash8-bfloat16 plugins/dsv4_kernels.fatbin \\
        plugins/dsv4_kernels.fatbin@plugins.hc_pre.SINKHORN_BESIDE=False
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
from runtime.bench import synthetic_prompt  # noqa: E402

PROMPT = synthetic_prompt(40)


def one_build(artifact: Path, case: str, steps: int, new: int) -> dict:
    """This process's figures with the case's fat binary as its kernel image and its switches turned."""
    import torch

    from bench.profile_decode import step_ms
    from plugins import loader
    from runtime.artifact import ArtifactModel
    from runtime.bench import bytes_per_token, copy_bandwidth

    head, switches = parse_case(case)
    fatbin = Path(head).resolve()
    loader.FATBIN = fatbin                      # before anything loads the kernels
    turn_switches(switches)
    with torch.inference_mode():
        bandwidth = copy_bandwidth("cuda")
        model = ArtifactModel(artifact, "cuda", graphs=True)
        model.forward(torch.arange(64)[None] % 1000 + 2)
        times = [step_ms(model, steps, 64) for _ in range(2)]
        floor_ms = 1e3 * bytes_per_token(model) / bandwidth
        model.reset(1)
        tokens = [int(model.forward(torch.tensor([PROMPT]), 0)[0].argmax())]
        for i in range(new - 1):
            tokens.append(int(model.step(torch.tensor(tokens[-1:]), torch.tensor([len(PROMPT) + i]))[0].argmax()))
    return {"case": case, "fatbin": str(fatbin), "sha256": hashlib.sha256(fatbin.read_bytes()).hexdigest(),
            "graph_step_ms": times, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "fraction_of_copy_bandwidth": [floor_ms / t for t in times], "greedy_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("cases", nargs="+", help="the fat binaries (FATBIN[@MODULE.NAME=VALUE,...]); the first is "
                                             "the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per timed run (5 runs, the median)")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens compared across builds")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: one build, JSON out
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_build(args.artifact, args.cases[0], args.steps, args.new)))
        return
    missing = sorted({f for f, _ in map(parse_case, args.cases) if not Path(f).is_file()})
    if missing:
        raise SystemExit(f"error: no fat binary at {', '.join(missing)}")
    runs = runs_in_turn(args.cases, args.rounds,
                        lambda case: [__file__, str(args.artifact), case, "--one", "--steps", str(args.steps),
                                      "--new", str(args.new)],
                        lambda run: f"step {' / '.join(f'{t:.3f}' for t in run['graph_step_ms'])} ms, "
                                    f"{max(run['fraction_of_copy_bandwidth']):.3f} of copy bandwidth")
    base = runs[0]["greedy_tokens"]
    report = {**run_header(), "artifact": str(args.artifact), "runs": runs,
              "greedy_tokens_agree": all(r["greedy_tokens"] == base for r in runs), "mean_step_ms": {}}
    for case in args.cases:
        times = [t for r in runs if r["case"] == case for t in r["graph_step_ms"]]
        report["mean_step_ms"][case] = sum(times) / len(times)
    first = report["mean_step_ms"][args.cases[0]]
    report["step_over_baseline"] = {f: t / first for f, t in report["mean_step_ms"].items()}
    print("mean step: " + ", ".join(f"{f} {t:.3f} ms ({report['step_over_baseline'][f]:.3f}x)"
                                    for f, t in report["mean_step_ms"].items())
          + f"; greedy tokens agree: {report['greedy_tokens_agree']}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
