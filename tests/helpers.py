"""Helpers shared by tests."""
import torch

from plugins.formats import mxfp4_quant


def random_experts(n: int, d: int, f: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """n routed experts as checkpoint tensors (w1, s1, w3, s3, w2, s2), realistically scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w1, s1 = mxfp4_quant(torch.randn(f, d, generator=g) / d ** 0.5)
        w3, s3 = mxfp4_quant(torch.randn(f, d, generator=g) / d ** 0.5)
        w2, s2 = mxfp4_quant(torch.randn(d, f, generator=g) / f ** 0.5)
        out.append((w1, s1, w3, s3, w2, s2))
    return out
