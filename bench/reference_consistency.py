"""Prefill-vs-decode agreement of the reference model, and its speed, on a (synthetic) checkpoint.

DeepSeek's own code disagrees with itself between one prefill and step-by-step decode by about 1e-4
median (1 - cosine of the logits) in bf16; this measures the same figure for our reference.

    python bench/reference_consistency.py --checkpoint DIR --prompt 300 --steps 32 --dtype bfloat16
Writes bench/results/reference_consistency-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builder.checkpoint import Checkpoint  # noqa: E402
from builder.reference.model import ReferenceModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", type=int, default=300, help="positions compared (prefill length)")
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float32", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ckpt = Checkpoint(args.checkpoint)
    vocab = min(ckpt.config.vocab_size, 4000)
    ids = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    results = []
    for dtype in args.dtype or ["bfloat16"]:
        model = ReferenceModel(ckpt, device=args.device, act=getattr(torch, dtype), max_len=args.prompt + 1)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        t0 = time.perf_counter()
        full = model.forward(ids, 0, all_positions=True)[0].double().cpu()
        sync()
        t_prefill = time.perf_counter() - t0
        model.reset()
        rows = [model.forward(ids[:, :1], 0)[0]]
        t0 = time.perf_counter()
        for p in range(1, args.prompt):
            rows.append(model.forward(ids[:, p:p + 1], p)[0])
        sync()
        t_decode = (time.perf_counter() - t0) / max(args.prompt - 1, 1)
        dec = torch.stack(rows).double().cpu()
        gap = 1 - torch.nn.functional.cosine_similarity(full, dec, dim=-1)
        results.append({
            "dtype": dtype, "positions": args.prompt,
            "median_1_minus_cos": float(gap.median()), "max_1_minus_cos": float(gap.max()),
            "argmax_agreement": float((full.argmax(-1) == dec.argmax(-1)).double().mean()),
            "prefill_s": t_prefill, "decode_s_per_token": t_decode,
        })
        print(json.dumps(results[-1]))
        del model
    name = args.name or Path(args.checkpoint).name
    out = Path(__file__).parent / "results" / f"reference_consistency-{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "layers": ckpt.config.num_hidden_layers, "hidden_size": ckpt.config.hidden_size, "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
