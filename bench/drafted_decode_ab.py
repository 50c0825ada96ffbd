"""Greedy drafted decode with the pass decided on the device (runtime/drafted_pass.py, one CUDA graph) against
the host's pass (the verification and the draft as graphs of their own, the host judging between them), in
turn in one process on one artifact: ms per pass, the MTP block's fill over the prompt's window left out.

    python bench/drafted_decode_ab.py ARTIFACT [--new 64] [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import synthetic_prompt  # noqa: E402
from runtime.speculative import Speculative  # noqa: E402


def pass_ms(model: ArtifactModel, prompt: list[int], new: int) -> tuple[float, list[int], int]:
    """From a fresh prefill of `prompt`: (ms per drafted pass after the first, the tokens, drafts accepted)."""
    model.reset(1)
    first = int(model.forward(torch.tensor([prompt]))[0].argmax())
    spec = Speculative(model, prompt, first, new)
    picks = iter(spec)
    tokens = [next(picks), next(picks)]                # the first, then the fill and the first pass
    torch.cuda.synchronize()
    passes, t0 = spec.stats.drafted, time.perf_counter()
    tokens += picks
    return 1e3 * (time.perf_counter() - t0) / (spec.stats.drafted - passes), tokens, spec.stats.accepted


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = ArtifactModel(args.artifact, "cuda", graphs=True, draft=True)
    device_pass = model.drafted_pass
    if device_pass is None or set(device_pass.graphs) != set(device_pass.forms()):
        raise SystemExit("error: this artifact does not replay greedy's drafted pass as CUDA graphs")
    prompt = synthetic_prompt(args.prompt_len)
    runs: dict[str, list] = {"device": [], "host": []}
    tokens = {}
    for _ in range(args.rounds):
        for mode in runs:
            model.drafted_pass = device_pass if mode == "device" else None
            ms, tokens[mode], accepted = pass_ms(model, prompt, args.new)
            runs[mode].append({"ms_per_pass": ms, "accepted": accepted})
            print(f"{mode}: {ms:.3f} ms a pass, {accepted} drafts accepted", flush=True)
    report = run_header() | {"new_tokens": args.new, "prompt_len": args.prompt_len, "runs": runs,
                             "tokens_same": tokens["device"] == tokens["host"]}
    print("tokens the same:", report["tokens_same"])
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
