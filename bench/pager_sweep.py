"""The expert pager's settings swept on one built artifact, in one process: each variant's hit rate, waits on
copies and decode time lost to paging against the all-resident run, and the two main modes (route
prediction, hash prefetch only) run twice each so that the run-to-run spread sits beside the differences.

    python bench/pager_sweep.py /tmp/art/flash8-bfloat16 --slots 1536 \
        --json bench/results/pager-sweep-flash8-h200.json

Variants: what a step waits for (`waited`: its first 1 or 2 layers' copies), how many predicted experts a
layer copies (`predicted_copies`), and whether predicted copies may evict the waited layers' experts
(`spare_waited`, the default since session 13); each reports the bytes a step waited for and how many of
those copies brought back experts a prediction had evicted.
`dsv4 bench --expert-slots` compares the admission rules. Greedy tokens must be the same in every variant
(where experts are read from never changes the arithmetic).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import measure, synthetic_prompt  # noqa: E402

# (name, prefetch, waited, predicted copies per layer, waited layers spared by predicted copies). Session 14
# settled the eviction rule (evicting the waited layers' experts made 122 re-copies and 62 ms of waits, twice)
# and found 4 copies no different from 2; the two modes run three times each here, interleaved with the two
# variants that were best once (1 copy per layer, a step waiting for 1 layer), to see past the ~10 ms spread.
VARIANTS = [
    ("predict", "predict", 2, 2, True),
    ("hash", "hash", 2, 2, True),
    ("predict-1-copy", "predict", 2, 1, True),
    ("predict-wait-1", "predict", 1, 2, True),
    ("predict-again", "predict", 2, 2, True),
    ("hash-again", "hash", 2, 2, True),
    ("predict-1-copy-again", "predict", 2, 1, True),
    ("predict-wait-1-again", "predict", 1, 2, True),
    ("hash-third", "hash", 2, 2, True),
    ("predict-third", "predict", 2, 2, True),
]


def run(artifact: Path, device: str, slots: int, prompt: list[int], new: int, prefetch: str, waited: int,
        copies: int, spare: bool) -> dict:
    model = ArtifactModel(artifact, device, graphs=device == "cuda", expert_slots=slots, prefetch=prefetch)
    try:
        if model.pager is not None:
            model.pager.waited, model.pager.predicted_copies, model.pager.spare_waited = waited, copies, spare
        figures = measure(model, prompt, new)
        if model.pager is not None:
            figures["pager"] = model.pager.report()
        return figures
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--slots", type=int, required=True, help="routed experts kept in device slots")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=96, help="greedy tokens per variant")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no timing worth reading)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = synthetic_prompt(args.prompt_len)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    report = {"command": "python " + " ".join(sys.argv), "gpu": gpu,
              "torch": torch.__version__, "python": platform.python_version(), "slots": args.slots,
              "variants": {}}
    resident = run(args.artifact, args.device, 0, prompt, args.new, "predict", 2, 2, True)
    report["resident"] = resident
    print(f"resident: decode {resident['decode_tok_s']:.1f} tok/s")
    for name, prefetch, waited, copies, spare in VARIANTS:
        f = run(args.artifact, args.device, args.slots, prompt, args.new, prefetch, waited, copies, spare)
        f["settings"] = {"prefetch": prefetch, "waited": waited, "predicted_copies": copies,
                         "spare_waited": spare}
        f["time_lost_to_paging_s"] = (f["decode_step_ms"] - resident["decode_step_ms"]) * f["decode_tokens"] / 1e3
        f["tokens_as_resident"] = f["tokens"] == resident["tokens"]
        report["variants"][name] = f
        p = f["pager"]
        print(f"{name:29s} hit {p['hit_rate']:.3f}  misses {p['misses']:4d}  copied "
              f"{p['bytes_copied_in'] / 1e6:7.0f} MB  cold {p['bytes_read_cold'] / 1e6:7.0f} MB  wait "
              f"{p['stall_s'] * 1e3:6.1f} ms ({p['waited_bytes'] / 1e6:5.0f} MB, {p['waited_again']:3d} again)  lost "
              f"{f['time_lost_to_paging_s'] * 1e3:6.1f} ms  decode {f['decode_tok_s']:6.1f} tok/s"
              f"  tokens {'same' if f['tokens_as_resident'] else 'DIFFER'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
