"""DeepSeek's wo_a for decode on the GPU (csrc/grouped_gemv.cu): per-group FP8 weights times bf16
activations with no activation quantisation, reading the FP8 codes (half the bytes of the bf16 weight that
DeepSeek's convert.py makes; the same products).

Oracle: the bf16 grouped einsum over `fp8_weight_dequant(weight, scale)` (plugins/ops.py grouped_fp8_linear).
"""
from __future__ import annotations

import torch

from .formats import fp8_weight_dequant
from .loader import INT, PTR, kernels

MAX_ROWS = 4                      # csrc/grouped_gemv.cu MAX_M


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [..., G, D] bf16 on a GPU, at most 4 rows of G groups, D in 512-column chunks, 128-row blocks."""
    rows = x.numel() // (x.size(-1) * x.size(-2)) if x.dim() >= 2 else 0
    return (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.float8_e4m3fn
            and 1 <= rows <= MAX_ROWS and x.size(-1) % 512 == 0 and weight.size(1) == x.size(-1)
            and weight.size(0) % (128 * x.size(-2)) == 0)


def grouped_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., G, D] bf16, weight [G*R, D] float8_e4m3fn, scale [G*R/128, D/128] E8M0 (or its bytes)
    -> [..., G, R] bf16. Contiguous inputs; launches never allocate when given `out`."""
    assert supports(x, weight) and x.is_contiguous() and weight.is_contiguous() and scale.is_contiguous()
    g, d = x.shape[-2:]
    n = weight.size(0)
    rows = x.numel() // (g * d)
    assert scale.shape == (n // 128, d // 128)
    out = x.new_empty(*x.shape[:-1], n // g) if out is None else out
    lib = kernels()
    grid = min(-(-n // 8), lib.resident("dsv4_grouped_fp8_gemv", 256))
    lib.launch("dsv4_grouped_fp8_gemv", grid, 256,
               [(x, PTR), (weight, PTR), (scale.view(torch.uint8), PTR), (out, PTR), (rows, INT), (g, INT),
                (n // g, INT), (d, INT)])
    return out


def wo_a_as_bf16(weights: dict[str, torch.Tensor], act: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's weights (plugins' layer-program form) with wo_a dequantised as DeepSeek's convert.py does,
    bf16 [G*R, D] in `act`, under "attn.wo_a" in place of its FP8 pair: the form of the ONNX/TensorRT graphs,
    which have no grouped FP8 plugin (their artifacts store it so). Sorted, as programs take dict inputs."""
    if "attn.wo_a.weight" not in weights:
        return weights
    scale = weights["attn.wo_a.scale"].view(torch.float8_e8m0fnu)
    out = {k: v for k, v in weights.items() if not k.startswith("attn.wo_a.")}
    out["attn.wo_a"] = fp8_weight_dequant(weights["attn.wo_a.weight"], scale).to(torch.bfloat16).to(act)
    return dict(sorted(out.items()))
