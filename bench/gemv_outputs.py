"""Whether a kernel change keeps the decode FP8 GEMVs' bits: their outputs at Flash sizes, saved and compared.

Every decode GEMV form a Flash layer runs (plain, with the query latent's norm, with the shared expert's SwiGLU,
DeepSeek's grouped wo_a) over fixed random weights and rows, at 1, 2 and 16 rows where the form takes them;
one build's outputs saved, then another's, then compared (bench/moe_outputs.py does the same for the MoE).
The weights are bench/kernels.py's (finite codes), their block scales spread over 2^-10 .. 2^-4.

    python bench/gemv_outputs.py save OUT.pt [--fatbin FATBIN]   (each build's fat binary)
    python bench/gemv_outputs.py cmp A.pt B.pt                    (how many outputs differ, per case)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (name, rows of W, K) of the Flash decode GEMVs (bench/kernels.py FLASH_FP8_SHAPES and wo_a's groups)
PLAIN = (("wq_a_wkv", 1536, 4096), ("wo_b", 4096, 8192), ("shared_w13", 4096, 4096))


def cases() -> dict[str, torch.Tensor]:
    """Each form's output per case name, on fixed random inputs."""
    sys.path.insert(0, str(ROOT))
    from bench.kernels import random_fp8
    from plugins.fp8_linear import fp8_linear_decode, fp8_linear_decode_normed, fp8_linear_decode_swiglu
    from plugins.grouped_linear import grouped_fp8_gemv
    torch.manual_seed(7)
    out = {}
    for name, n, k in PLAIN:
        w = random_fp8(n, k, spread=3)
        for m in (1, 2, 16):
            out[f"{name} m{m}"] = fp8_linear_decode(torch.randn(m, k, device="cuda").to(torch.bfloat16), *w)
    wq_b, norm = random_fp8(32768, 1024, spread=3), torch.rand(1024, device="cuda") + 0.5
    w2 = random_fp8(4096, 2048, spread=3)
    wo_a = random_fp8(8 * 1024, 4096, spread=3)
    for m in (1, 2):
        qr = torch.randn(m, 1536, device="cuda").to(torch.bfloat16)[:, :1024]
        out[f"wq_b normed m{m}"] = fp8_linear_decode_normed(qr, norm, 1e-6, *wq_b)
        gate_up = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
        out[f"shared_w2 swiglu m{m}"] = fp8_linear_decode_swiglu(gate_up, 2048, 2048, 10.0, *w2)
        o = torch.randn(m, 1, 8, 4096, device="cuda").to(torch.bfloat16)
        out[f"wo_a grouped m{m}"] = grouped_fp8_gemv(o, *wo_a)
    torch.cuda.synchronize()
    return {key: value.cpu() for key, value in out.items()}


def compare(a: Path, b: Path) -> int:
    """Prints each case's differing outputs; returns how many cases differ."""
    first, second = torch.load(a), torch.load(b)
    differing = 0
    for key in first:
        x, y = first[key].float(), second[key].float()
        n = int(((x != y) & ~(x.isnan() & y.isnan())).sum())
        differing += n > 0
        print(f"{key}: {n} of {x.numel()} differ")
    return differing


def save(path: Path) -> None:
    torch.save(cases(), path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.outputs_ab import main
    main(__doc__, save, compare)
