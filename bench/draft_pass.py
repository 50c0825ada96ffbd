"""Where a drafted decode pass's time goes (speculative decoding with the MTP block, runtime/speculative.py).

A pass verifies the last token and its draft in one 2-token replay of the main model, then the MTP block drafts
the next token from the two positions. Sampling runs it as two CUDA graphs, with the host reading the logits
and then the draft between them; greedy as one graph that decides on the device (runtime/drafted_pass.py).
Here each graph is timed alone (CUDA events, the median of `--reps` replays) beside the plain decode step's
graph, each one's kernels are laid out in time (exposed time per kernel family, as bench/graph_timeline.py
does for the step), and both passes are timed as the host runs them (`dsv4 bench`'s accepted_pass_ms and
host_pass_ms). The gap between the pass and the plain step is what drafting must win back:

    python bench/draft_pass.py ARTIFACT [--context 512] [--json bench/results/draft-pass-flash8-h200.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.graph_timeline import print_families, recorded_replays, summarise  # noqa: E402
from bench.kernels import time_ms  # noqa: E402
from bench.profile_decode import step_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import accepted_pass_seconds, bytes_per_token, copy_bandwidth  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--context", type=int, default=512, help="tokens fed before timing")
    ap.add_argument("--reps", type=int, default=50, help="replays timed per graph")
    ap.add_argument("--record", type=int, default=20, help="replays recorded per graph for the kernel layout")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    model = ArtifactModel(args.artifact, "cuda", graphs=True, draft=True)
    drafter = model.drafter
    if model.graph is None or model.verify_graph is None or drafter is None or not {1, 2} <= set(drafter.graphs) \
            or set(model.drafted_pass.graphs) != set(model.drafted_pass.forms()):
        raise SystemExit("error: this artifact does not replay the decode step, the verification, both drafts and "
                         "the greedy pass as CUDA graphs (a bfloat16 aoti build with draft_tokens = 1 and an MTP block)")
    model.forward(torch.arange(args.context)[None] % 1000 + 2)
    q = args.context
    verify, padded, start_t, n_t, _ = model.verify_graph
    padded.copy_(torch.tensor([[5, 6]]))
    start_t.fill_(q)
    model.tokens.fill_(5)
    model.positions.fill_(q)
    graphs = {"plain_step": model.graph.replay, "verify_2_tokens": verify.replay}
    for n, (g, ids, start, _, _) in sorted(drafter.graphs.items()):     # each pass's, and a turn's fill (the window)
        ids.copy_(torch.arange(n)[None] + 5)
        start.fill_(q - n + 1 if n > 2 else q)
        graphs[f"draft_{n}_positions"] = g.replay
    passes = model.drafted_pass                        # from the same place each time (a pass moves it on)
    ends = q + (2 - q) % 4                             # a position whose draft ends a ratio-4 block
    for name, at in (("greedy_pass", ends + 1), ("greedy_pass_ending_a_block", ends)):
        passes.start(5, at, 6)                         # its form, as a pass from `at` takes it (without the
        form = passes.graphs[passes.ends_block()][0]   # states put back, and with them where ratio-4 layers are)
        graphs[name] = lambda at=at, form=form: (passes.start(5, at, 6), form.replay())
    report = run_header() | {"copy_bandwidth_gb_s": bandwidth / 1e9,
                             "floor_step_ms": 1e3 * bytes_per_token(model) / bandwidth,
                             "plain_step_ms": step_ms(model, args.reps, q)}
    report["graphs_ms"] = {name: time_ms(replay, args.reps) for name, replay in graphs.items()}
    report["greedy_pass_ms"] = 1e3 * accepted_pass_seconds(model, [5, 6, 7], q, args.reps)
    report["host_pass_ms"] = 1e3 * accepted_pass_seconds(model, [5, 6, 7], q, args.reps, device=False)
    report["timelines"] = {name: summarise(recorded_replays(lambda i: replay(), args.record))
                           for name, replay in graphs.items()}
    g = report["graphs_ms"]
    print(f"plain step {report['plain_step_ms']:.3f} ms (floor {report['floor_step_ms']:.3f}); verification "
          f"{g['verify_2_tokens']:.3f} ms, drafts {g['draft_1_positions']:.3f} / {g['draft_2_positions']:.3f} ms, "
          f"greedy pass {g['greedy_pass']:.3f} ms ({g['greedy_pass_ending_a_block']:.3f} with the states kept); passes as the host runs them: greedy "
          f"{report['greedy_pass_ms']:.3f} ms, sampling's {report['host_pass_ms']:.3f} ms")
    for name, line in report["timelines"].items():
        print(f"{name}: span {line['span_us']:.1f} us, idle {line['idle_us']:.1f} us")
        print_families(line)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
