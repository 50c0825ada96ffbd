"""How far bf16-unit noise in the prefill MoE's output alone moves the tiny model's forced logits, on CPU:
the scale against which tests/test_artifact_gpu.py's bf16 line (worst cosine >= 0.99 against the reference's
token-by-token logits) judges a kernel whose rounding differs from the oracle's (the wgmma prefill MoE).

    python bench/tiny_moe_noise.py [--seeds 12] [--json bench/results/tiny-moe-noise-cpu.json]

The reference model in bf16 runs the test's prompt with each prefill MoE output multiplied by (1 + r z),
z standard normal per element, r = 2^-9 and 2^-8 (a bf16 unit is 2^-8 relative at most); each run's worst
cosine against the unperturbed token-by-token logits is recorded. Not a test: a measurement."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builder.reference.moe as reference_moe  # noqa: E402
from builder.checkpoint import Checkpoint  # noqa: E402
from builder.forced import TokenByToken, forced_logits  # noqa: E402
from builder.presets import preset_json  # noqa: E402
from builder.reference.model import ReferenceModel  # noqa: E402
from builder.synth import write_synthetic  # noqa: E402

PROMPT, FORCED = [5, 17, 99, 300, 12] * 28, [3, 4, 5, 6, 7, 8]   # tests/test_artifact_gpu.py's


def worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tiny-moe-noise-cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = ReferenceModel(Checkpoint(write_synthetic(preset_json("tiny"), Path(tmp) / "tiny", seed=0)),
                             device="cpu", act=torch.bfloat16, max_len=200)
        decode = forced_logits(TokenByToken(ref), PROMPT, FORCED)
        clean = reference_moe.moe_routed_oracle
        rows = [{"noise": 0.0, "worst_cosine_vs_decode": worst_cosine(forced_logits(ref, PROMPT, FORCED), decode)}]
        for rel in (2.0 ** -9, 2.0 ** -8):
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)

                def noisy(x, experts, weights, expert_weights, limit, rel=rel, g=g):
                    y = clean(x, experts, weights, expert_weights, limit)
                    if x.size(0) > 16:                       # prefill chunks, where the wgmma path runs
                        y = y * (1 + rel * torch.randn(y.shape, generator=g).to(y.dtype))
                    return y

                reference_moe.moe_routed_oracle = noisy
                try:
                    got = forced_logits(ref, PROMPT, FORCED)
                finally:
                    reference_moe.moe_routed_oracle = clean
                rows.append({"noise": rel, "seed": seed, "worst_cosine_vs_decode": worst_cosine(got, decode)})
                print(json.dumps(rows[-1]))
    report = {"command": "python " + " ".join(sys.argv), "device": "cpu", "torch": torch.__version__,
              "python": platform.python_version(), "threshold_in_test": 0.99,
              "below_threshold": {str(r): sum(row["worst_cosine_vs_decode"] < 0.99 for row in rows[1:]
                                              if row["noise"] == r) for r in (2.0 ** -9, 2.0 ** -8)},
              "runs_per_noise": args.seeds, "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["below_threshold"]), f"(of {args.seeds} each); wrote {args.json}")


if __name__ == "__main__":
    main()
