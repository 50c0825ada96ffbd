"""The model-level check of the sm_90 warpgroup-MMA MoE paths on a built bf16 CUDA artifact (Flash-8 in
bench/h200_all.sh): forced-token logits with each path switched on (plugins.moe_experts.WGMMA), against the
same artifact on its default kernels, next to that default's own noise: the same prompt fed token by token
through the decode step instead of through the prefill programs (one-ulp summation differences flip FP8
roundings in bf16; the reference model disagrees with itself the same way, README).

    python bench/wgmma_gate.py /tmp/art/flash8-bfloat16 --json bench/results/wgmma-gate-flash8-h200.json

A path passes when its worst cosine and argmax agreement against the default are no worse than the default's
own prompt-as-prefill against prompt-as-decode. Each path's prefill and decode speed (the prompt, then 32
greedy tokens, on the same loaded artifact) is recorded beside the default's.
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
from builder.forced import TokenByToken, forced_logits  # noqa: E402
from plugins import moe_experts  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import measure  # noqa: E402


def logits_with(artifact: Path, prompt: list[int], forced: list[int], decode=False, prefill=False,
                token_by_token=False, speed: dict | None = None) -> torch.Tensor:
    """The forced logits with the chosen kernels; with `speed`, also the artifact's prefill and decode speed
    on them (runtime.bench.measure: `prompt`, then 32 greedy tokens) put there."""
    default = moe_experts.WGMMA
    # prefill: every chunk, whatever its pairs per expert (a bench artifact's 256-token chunks have 6 per
    # expert at Flash size, below where the speed rule would take it)
    moe_experts.WGMMA = moe_experts.WgmmaPaths(decode=decode, prefill=prefill, prefill_min_pairs_per_expert=0)
    model = ArtifactModel(artifact, "cuda", graphs=True)          # the decode graph captures the chosen kernels
    try:
        logits = forced_logits(TokenByToken(model) if token_by_token else model, prompt, forced)
        if speed is not None:
            figures = measure(model, prompt, 33)
            speed |= {k: figures[k] for k in ("prefill_tok_s", "decode_tok_s", "tokens")}
        return logits
    finally:
        moe_experts.WGMMA = default
        del model
        gc.collect()
        torch.cuda.empty_cache()


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"worst_cosine": cos.min().item(), "cosine_per_step": cos.tolist(),
            "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (through the prefill programs "
                    "in the recipe's chunks)")
    ap.add_argument("--forced", type=int, default=16, help="forced decode steps after the prompt")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = [(7 * i + 3) % 1000 + 2 for i in range(args.prompt_len)]
    forced = [(11 * i + 5) % 1000 + 2 for i in range(args.forced)]
    base_speed: dict = {}
    base = logits_with(args.artifact, prompt, forced, speed=base_speed)
    noise = agreement(logits_with(args.artifact, prompt, forced, token_by_token=True), base)
    report = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "prompt_tokens": len(prompt),
              "forced_steps": len(forced), "default_prefill_vs_token_by_token": noise, "default_speed": base_speed,
              "paths": {}}
    print(f"noise (default kernels, prompt as prefill vs token by token): worst cosine "
          f"{noise['worst_cosine']:.6f}, argmax agreement {noise['argmax_agreement']:.3f}")
    for path in ("decode", "prefill"):
        speed: dict = {}
        got = agreement(logits_with(args.artifact, prompt, forced, speed=speed, **{path: True}), base)
        got["speed"] = speed
        got["decode_speedup"] = speed["decode_tok_s"] / base_speed["decode_tok_s"]
        got["prefill_speedup"] = speed["prefill_tok_s"] / base_speed["prefill_tok_s"]
        got["passes"] = (got["worst_cosine"] >= noise["worst_cosine"]
                         and got["argmax_agreement"] >= noise["argmax_agreement"])
        report["paths"][path] = got
        print(f"wgmma {path}: worst cosine {got['worst_cosine']:.6f}, argmax agreement "
              f"{got['argmax_agreement']:.3f} against the default kernels: {'passes' if got['passes'] else 'FAILS'}; "
              f"decode {speed['decode_tok_s']:.1f} tok/s (x{got['decode_speedup']:.3f}), prefill "
              f"{speed['prefill_tok_s']:.1f} tok/s (x{got['prefill_speedup']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
