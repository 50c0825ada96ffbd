"""A drafted token's verification on its own programs (builder/programs/verify.py, the decode ops) against the
2-token prefill programs, in turn in one process on one artifact: each as a CUDA graph, timed alone (CUDA
events, the median of `--reps` replays) beside the plain decode step, and the logits of both compared. The
artifact needs both: a build with `prefill_buckets = [2]` (bench/artifact_h200.sh: PREFILL_BUCKETS=2).
A third form, `verify-in-line`, runs the verification programs with their side branch in line (the compressors'
products and steps on the main stream: plugins.streams.SIDE_BRANCHES off, as before session 56). (Session 55's
third form, the head's input on torch's ops, is in git history.)

    python bench/verify_ab.py ARTIFACT [--context 512] [--rounds 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import time_ms  # noqa: E402
from bench.profile_decode import step_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import streams  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402


def use(model: ArtifactModel, form: str, programs: dict) -> None:
    """Verify in `form` (the verification programs, with their side branch or in line, or the 2-token prefill
    programs), recaptured as a graph."""
    model.verify_decode = form != "prefill"
    model.verify_runs = programs["prefill" if form == "prefill" else "verify"]
    streams.SIDE_BRANCHES = form != "verify-in-line"
    model.verify_graph = None
    torch.cuda.empty_cache()
    model.verify_graph = model._capture_size(2, model._verify_through, "the verification")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--context", type=int, default=512, help="tokens fed before timing")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    model = ArtifactModel(args.artifact, "cuda", graphs=True, draft=True)
    if not model.verify_decode or 2 not in model.prefill_buckets:
        raise SystemExit("error: this artifact needs verification programs and 2-token prefill programs "
                         "(an aoti build that drafts, with prefill_buckets = [2])")
    programs = {"verify": model.verify_runs, "prefill": model.prefill_buckets[2]}
    model.forward(torch.arange(args.context)[None] % 1000 + 2)
    q = args.context
    report = run_header() | {"copy_bandwidth_gb_s": bandwidth / 1e9, "plain_step_ms": step_ms(model, args.reps, q),
                             "runs": {"verify": [], "prefill": [], "verify-in-line": []}}
    logits = {}
    for _ in range(args.rounds):
        for name in report["runs"]:
            use(model, name, programs)
            graph, padded, start_t, n_t, out = model.verify_graph
            padded.copy_(torch.tensor([[5, 6]]))
            start_t.fill_(q)
            report["runs"][name].append(time_ms(graph.replay, args.reps))
            graph.replay()
            logits[name] = out.float().clone()
            del graph, out                             # the graph's pool goes with it at the next capture
            print(f"{name}: {report['runs'][name][-1]:.3f} ms", flush=True)
    a = logits["verify"]
    report["logits"] = {name: {"argmax_same": (a.argmax(-1) == b.argmax(-1)).tolist(), "max_abs_diff":
                               (a - b).abs().amax(-1).tolist(), "cosine": torch.nn.functional.cosine_similarity(
                                   a.double(), b.double(), dim=-1).tolist()}
                        for name, b in logits.items() if name != "verify"}
    print(f"plain step {report['plain_step_ms']:.3f} ms; logits {report['logits']}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
