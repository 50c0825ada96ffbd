"""DeepSeek's wo_a for decode on the GPU: per-group FP8 weights times bf16 activations with no activation
quantisation, reading the FP8 codes (half the bytes of the bf16 weight that DeepSeek's convert.py makes;
the same products). It runs on the FP8 GEMV's kernel (csrc/fp8_linear.cu, its kGrouped form): the weight
ring, f16 MMAs over the bf16 activation held exactly as f16 times a power of two per 128 values.

Oracle: the bf16 grouped einsum over `fp8_weight_dequant(weight, scale)` (plugins/ops.py grouped_fp8_linear).
"""
from __future__ import annotations

import torch

from .formats import fp8_weight_dequant
from .fp8_linear import gemv_launch, gemv_plan
from .loader import kernels

MAX_ROWS = 4                      # decode rows: 4 x 4096 fill the GEMV's activation room (gemv_plan)
KERNEL = "dsv4_fp8_gemv_fused_grouped_m8"


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [..., G, D] bf16 on a GPU, at most 4 rows of G groups whose activations fit the GEMV's shared
    memory, D and each group's rows in 128-blocks."""
    if x.dim() < 2 or x.numel() == 0:
        return False
    g, d = x.shape[-2:]
    rows = x.numel() // (g * d)
    return (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.float8_e4m3fn
            and rows <= MAX_ROWS and d % 128 == 0 and weight.size(1) == d and weight.size(0) % (128 * g) == 0
            and gemv_plan(rows, d, kernels().shared_memory())[0])


def grouped_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     out: torch.Tensor | None = None, max_ctas: int | None = None) -> torch.Tensor:
    """x [..., G, D] bf16, weight [G*R, D] float8_e4m3fn, scale [G*R/128, D/128] E8M0 (or its bytes)
    -> [..., G, R] bf16. Contiguous inputs; launches never allocate when given `out`. `max_ctas` caps the
    grid below what the GPU holds (tests: CTAs whose items cross from one group into the next)."""
    assert supports(x, weight) and x.is_contiguous() and weight.is_contiguous() and scale.is_contiguous()
    g, d = x.shape[-2:]
    n = weight.size(0)
    rows = x.numel() // (g * d)
    assert scale.shape == (n // 128, d // 128)
    out = x.new_empty(*x.shape[:-1], n // g) if out is None else out
    _, stages, shared = gemv_plan(rows, d, kernels().shared_memory())
    # an item (a CTA's 16-128 rows over all of K) lies inside one group, whose rows are whole 128-blocks
    # (supports): its rows share one activation
    gemv_launch(KERNEL, x, x, x, weight, scale.view(torch.uint8), out, rows, d, stages, shared,
                (None, g * d, n // g, 0.0), max_ctas=max_ctas)
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
