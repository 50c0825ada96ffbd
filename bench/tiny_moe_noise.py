"""How far bf16-unit noise in the prefill MoE's output alone moves the tiny model's forced logits, on CPU:
the scale against which tests/test_artifact_gpu.py's bf16 line (worst cosine >= 0.99 against the reference's
token-by-token logits) judges a kernel whose rounding differs from the oracle's (the wgmma prefill MoE).

    python bench/tiny_moe_noise.py [--seeds 12] [--search N] [--json bench/results/tiny-moe-noise-cpu.json]

The reference model in bf16 runs a prompt with each prefill MoE output multiplied by (1 + r z), z standard
normal per element, r = 2^-9 and 2^-8 (a bf16 unit is 2^-8 relative at most); each run's worst cosine
against the unperturbed token-by-token logits is recorded, for the test's prompt and, with --search N, for
N random 140-token prompts (ids 10-999, `random_prompt(seed)`); the prefill is the whole prompt at once (the
reference takes no chunks after its first; the artifact's are 64 tokens). A prompt on which the reference's own paths and every noisy run stay far above the test's
line can tell a kernel's rounding from a fault; the test's own prompt cannot. Not a test: a measurement."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builder.reference.moe as reference_moe  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from builder.checkpoint import Checkpoint  # noqa: E402
from builder.forced import TokenByToken, forced_logits  # noqa: E402
from builder.presets import preset_json  # noqa: E402
from builder.reference.model import ReferenceModel  # noqa: E402
from builder.synth import write_synthetic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY_FORCED as FORCED, TINY_PROMPT as TEST_PROMPT  # noqa: E402  (the test's own)


def random_prompt(seed: int, length: int = 140) -> list[int]:
    return torch.randint(10, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def noisy_runs(ref, prompt: list[int], decode: torch.Tensor, rel: float, seeds: int) -> list[float]:
    clean = reference_moe.moe_routed_oracle
    out = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)

        def noisy(x, experts, weights, expert_weights, limit):
            y = clean(x, experts, weights, expert_weights, limit)
            if x.size(0) > 16:                       # prefill chunks, where the wgmma path runs
                y = y * (1 + rel * torch.randn(y.shape, generator=g).to(y.dtype))
            return y

        reference_moe.moe_routed_oracle = noisy
        try:
            out.append(worst_cosine(forced_logits(ref, prompt, FORCED), decode))
        finally:
            reference_moe.moe_routed_oracle = clean
    return out


def examine(ref, prompt: list[int], seeds: int) -> dict:
    decode = forced_logits(TokenByToken(ref), prompt, FORCED)
    row = {"prefill_vs_decode": worst_cosine(forced_logits(ref, prompt, FORCED), decode)}
    for rel in (2.0 ** -9, 2.0 ** -8):
        row[f"noise_{rel}"] = noisy_runs(ref, prompt, decode, rel, seeds)
    row["worst"] = min([row["prefill_vs_decode"]] + row[f"noise_{2.0 ** -9}"] + row[f"noise_{2.0 ** -8}"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12, help="noisy runs per noise level")
    ap.add_argument("--search", type=int, default=0, help="random prompts to examine besides the test's")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tiny-moe-noise-cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = ReferenceModel(Checkpoint(write_synthetic(preset_json("tiny"), Path(tmp) / "tiny", seed=0)),
                             device="cpu", act=torch.bfloat16, max_len=200)
        rows = [{"prompt": "test", **examine(ref, TEST_PROMPT, args.seeds)}]
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("noise")}))
        for seed in range(args.search):
            rows.append({"prompt": f"random_prompt({seed})", **examine(ref, random_prompt(seed), args.seeds)})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("noise")}))
    write_json(args.json, run_header() | {"threshold_in_test": 0.99, "runs_per_noise": args.seeds, "results": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
