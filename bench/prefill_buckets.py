"""Time to first token of a built CUDA artifact over prompt lengths: with its smaller prefill programs (the
recipe's `prefill_buckets`: a prompt's last chunk through the smallest that holds it) and without (every chunk
padded to the whole `prefill_chunk`), each with the prefill sizes replayed as CUDA graphs (those that
captured at load) and run plainly, on one loaded model, the modes interleaved; whether the first token agrees;
and the device memory the prefill graphs hold.

    python bench/prefill_buckets.py /tmp/art/flash8-bfloat16 [--lengths 5 16 32 ...] [--grouped-moe] \
        --json bench/results/prefill-buckets-flash8-h200.json

--grouped-moe runs the prefill MoE on the grouped kernels, as every GPU but sm_90 does (a GB10's path).

Each length and mode runs its prompt twice (the first warms) and records the second, in --reps rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import moe_experts  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import prefill_seconds, synthetic_prompt  # noqa: E402


@torch.inference_mode()          # as runtime.bench.measure
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--lengths", type=int, nargs="+", default=[5, 16, 32, 100, 256, 1000, 2048, 2100])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--grouped-moe", action="store_true",
                    help="the prefill MoE on the grouped kernels, not sm_90's warpgroup-MMA ones")
    args = ap.parse_args()
    if args.grouped_moe:
        moe_experts.WGMMA = moe_experts.WgmmaPaths(prefill=False)
    model = ArtifactModel(args.artifact, "cuda", graphs=True)
    if not model.prefill_buckets:
        raise SystemExit(f"error: {args.artifact} has no prefill buckets (the recipe's prefill_buckets)")
    rows, graphs = [], model.prefill_graphs
    whole = {c: g for c, g in graphs.items() if c == model.chunk}
    modes = {"buckets": (True, graphs), "buckets_no_graphs": (True, {}), "padded_graph": (False, whole),
             "padded": (False, {})}
    for rep in range(args.reps):
        for n in args.lengths:
            prompt, first = synthetic_prompt(n), {}
            for mode, (buckets, graphed) in modes.items():
                model.use_buckets, model.prefill_graphs = buckets, graphed
                prefill_seconds(model, prompt)
                seconds, logits = prefill_seconds(model, prompt)
                first[mode] = int(logits[0].argmax())
                rows.append({"tokens": n, "mode": mode, "rep": rep, "ms": seconds * 1e3, "first_token": first[mode]})
                print(json.dumps(rows[-1]), flush=True)
            for row in rows[-len(modes):]:
                row["same_first_token"] = len(set(first.values())) == 1
    graphed_sizes = list(graphs)
    with_graphs = torch.cuda.memory_reserved()
    graphs.clear()                                     # the model's own dict: the graphs' pools go back
    whole.clear()
    torch.cuda.empty_cache()
    graph_bytes = with_graphs - torch.cuda.memory_reserved()
    print(f"prefill graphs {graphed_sizes}: {graph_bytes / 2**20:.0f} MiB of device memory", flush=True)
    if args.json:
        write_json(args.json, run_header() | {"artifact": str(args.artifact), "prefill_chunk": model.chunk,
                                              "prefill_moe": "grouped" if args.grouped_moe else "default",
                                              "prefill_buckets": list(model.prefill_buckets),
                                              "graphed_sizes": graphed_sizes, "prefill_graph_bytes": graph_bytes,
                                              "rows": rows})


if __name__ == "__main__":
    main()
