"""Quantised formats of the official checkpoint and the activation round-trips of its reference.

Weights:
  FP8   e4m3 values, one E8M0 scale per 128x128 block: W[o,i] = e4m3[o,i] * 2^(S[o//128, i//128] - 127)
  MXFP4 two E2M1 codes per byte (element 2j = low nibble), one E8M0 scale per 32 K elements:
        W[o,i] = e2m1(code[o,i]) * 2^(S[o, i//32] - 127)
Activations (DeepSeek's `act_quant` / `fp4_act_quant` kernels, current revision):
  scale = 2^ceil(log2(amax * (1/qmax))) per block (amax floored), q = cast(clamp(x / scale)), x' = q * scale.
All functions are plain torch and run on any device.
"""
from __future__ import annotations

from functools import lru_cache

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring E2M1 magnitudes, and which way a tie goes under round-to-nearest-even:
# a tie rounds to the neighbour whose code is even (True: the upper neighbour).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_UP = (False, True, False, True, False, True, False)


# ---------------------------------------------------------------- E8M0 scales
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (float8_e8m0fnu or uint8) -> float32 powers of two 2^(byte - 127)."""
    bits = s.view(torch.uint8).to(torch.int32)
    # a Python scalar, not a new tensor: a CPU tensor copied to the GPU would break CUDA graph capture
    return ((bits << 23).view(torch.float32)).where(bits > 0, 2.0 ** -127)


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Exact powers of two (float32) -> float8_e8m0fnu bytes."""
    bits = x.float().view(torch.int32)
    if bool(((bits & 0x7FFFFF) != 0).any()):
        raise ValueError("E8M0 scales must be exact powers of two")
    return ((bits >> 23) & 0xFF).to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for positive float32 x, by exponent bits, as the official kernels compute it."""
    bits = x.float().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((exp + 127) << 23).view(torch.float32)


def block_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale of a block from its amax: the multiply by fp32(1/qmax) is as in the kernels. (The
    constant is filled on the device, not copied from the host: a CUDA graph can capture it.)"""
    inv = torch.full((), 1.0 / qmax, dtype=torch.float32, device=amax.device)
    return pow2_ceil(amax.float() * inv)


# ---------------------------------------------------------------- E2M1 (FP4)
def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already scaled into [-6, 6]) to the E2M1 grid, ties to even code."""
    codes = e2m1_codes(x)
    return e2m1_decode(codes)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Float32 values in [-6, 6] -> 4-bit E2M1 codes (bit 3 = sign), round to nearest, ties to even."""
    mag = x.abs().clamp(max=FP4_MAX)
    idx = torch.zeros_like(mag, dtype=torch.int32)
    for mid, up in zip(_E2M1_MIDPOINTS, _E2M1_TIE_UP):
        idx += (mag > mid).to(torch.int32)
        if up:
            idx += (mag == mid).to(torch.int32)
    sign = (x < 0) & (idx > 0)
    return (idx | (sign.to(torch.int32) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] 4-bit codes -> [..., K/2] int8 bytes: element 2j in the low nibble, 2j+1 in the high."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] int8 bytes -> [..., K] 4-bit codes (uint8)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------- weights
def fp8_weight_dequant(w: torch.Tensor, s: torch.Tensor, block: int = 128,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 e4m3 [O, I] with E8M0 block scales [ceil(O/b), ceil(I/b)] -> [O, I] in float32, or in `dtype`
    (bf16 holds every such value exactly: 3 mantissa bits times a power of two)."""
    o, i = w.shape
    scale = e8m0_to_float(s).repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return w.to(dtype) * scale.to(dtype)


def fp8_weight_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float [O, I] -> (e4m3 [O, I], E8M0 scales [ceil(O/b), ceil(I/b)]); block scale = 2^ceil(log2(amax/448))."""
    o, i = w.shape
    po, pi = -o % block, -i % block
    wp = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wp.view((o + po) // block, block, (i + pi) // block, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-30)
    scale = block_scale(amax, FP8_MAX)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(o + po, i + pi)[:o, :i].contiguous(), float_to_e8m0(scale)


@lru_cache(maxsize=4)
def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the (low nibble, high nibble) E2M1 values of every byte."""
    return e2m1_decode(unpack_e2m1(torch.arange(256, dtype=torch.uint8, device=device))).view(256, 2)


def mxfp4_dequant(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """MXFP4 int8 [O, K/2] with E8M0 scales [O, K/32] -> float32 [O, K]."""
    values = _byte_pairs(packed.device)[packed.view(torch.uint8).long()].flatten(-2)
    return (values.unflatten(-1, (-1, 32)) * e8m0_to_float(s)[..., None]).flatten(-2)


def mxfp4_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [O, K] -> (packed int8 [O, K/2], E8M0 scales [O, K/32]); scale = 2^ceil(log2(amax/6))."""
    o, k = w.shape
    blocks = w.float().view(o, k // 32, 32)
    scale = block_scale(blocks.abs().amax(-1).clamp(min=1e-30), FP4_MAX)
    codes = e2m1_codes((blocks / scale[..., None]).clamp(-FP4_MAX, FP4_MAX)).view(o, k)
    return pack_e2m1(codes), float_to_e8m0(scale)


# ---------------------------------------------------------------- activations
def fp8_act_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's FP8 activation quantisation along the last dim, returned dequantised in float32.

    The result is exact in float32 (an e4m3 value times a power of two), so `fp8_act_roundtrip(x) @ W`
    equals the official fp8 GEMM up to summation order. amax is floored at 1e-4 as in `act_quant`.
    """
    xb = x.float().unflatten(-1, (-1, block))
    scale = block_scale(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2)


def fp4_act_roundtrip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """DeepSeek's FP4 activation round-trip (`fp4_act_quant`, inplace) in float32: ties to even on E2M1."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = block_scale(xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126), FP4_MAX)
    q = round_to_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2)
