"""Whether a kernel change keeps the decode MoE's bits: its outputs at Flash size, saved and compared.

Fixed random experts and inputs, 1 and 2 tokens; one build's outputs saved, then another's, then compared.
On an sm_90 GPU the default decode path is the warpgroup-MMA kernels; elsewhere the mma.sync ones.

    python bench/moe_outputs.py save OUT.pt [--fatbin FATBIN]   (each build's fat binary)
    python bench/moe_outputs.py cmp A.pt B.pt                    (how many of h and y differ, 1 and 2 tokens)

Session 32 ran it (as probe/moe_out.py, the same code) to compare each step of its MoE change with a126741:
bench/results/moe-decode-ab-s32-h200.txt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def save(path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_experts
    from plugins.formats import mxfp4_dequant
    from plugins.moe_experts import make_workspace, moe_experts_decode, pack_expert
    from plugins.ops import moe_routed_oracle
    d, f, n, k = 4096, 2048, 8, 6
    bank = random_experts(n, d, f, seed=3)
    stores = [pack_expert(*e).cuda() for e in bank]
    table = torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device="cuda")
    dequantised = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    g = torch.Generator().manual_seed(5)
    out = {}
    for tokens in (1, 2):
        x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
        experts = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)]).to(torch.int32).cuda()
        weights = (torch.rand(tokens, k, generator=g) + 0.1).cuda()
        ws, y = make_workspace(tokens, k, d, f, "cuda"), torch.empty(tokens, d, device="cuda")
        moe_experts_decode(x, experts, weights, table, f, 10.0, y, ws)
        torch.cuda.synchronize()
        expect = moe_routed_oracle(x, experts, weights, dequantised.__getitem__, 10.0)
        cos = torch.nn.functional.cosine_similarity(y.double(), expect.double(), dim=-1)
        out[tokens] = {"y": y.cpu(), "h": ws["h"].cpu(), "cos": cos.cpu()}
    torch.save(out, path)


def compare(a: Path, b: Path) -> int:
    """Prints each output's differences; returns how many outputs differ anywhere."""
    first, second = torch.load(a), torch.load(b)
    differing = 0
    for tokens in first:
        for name in ("h", "y"):
            x, y = first[tokens][name].float(), second[tokens][name].float()
            differ = x != y
            differing += bool(differ.any())
            rel = ((x - y).abs() / x.abs().clamp_min(1e-30))[differ]
            print(f"tokens {tokens} {name}: {int(differ.sum())} of {x.numel()} differ; max rel "
                  f"{rel.max().item() if rel.numel() else 0:.3g}; cos vs oracle "
                  f"{first[tokens]['cos'].min().item():.7f} (A) {second[tokens]['cos'].min().item():.7f} (B)")
    return differing


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.outputs_ab import main
    main(__doc__, save, compare)
