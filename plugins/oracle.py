"""Plain-torch numerics of DeepSeek V4, each matching the official code step by step: the building
blocks of the reference model (builder/reference/) and the oracles of the CUDA kernels.

`act` is the activation dtype: bfloat16 reproduces the official numerics; float32 is used by tests
that need prefill and decode to agree closely. Quantised linears dequantise exactly in float32, so a
product equals the official FP8/FP4 GEMM up to summation order.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:                     # type only: plugins never import the builder at run time
    from builder.config import ModelConfig

from .formats import fp4_act_roundtrip, fp8_act_roundtrip, fp8_weight_dequant


def wide_dtype(act: torch.dtype) -> torch.dtype:
    """Working precision of the official code's float32 steps (products, norms, softmax, routing).

    With bfloat16 activations (the official numerics) it is float32. With float32 or float64
    activations it is float64: then each step's float32 result is one rounding of a nearly exact value,
    the same whatever the summation order, so prefill and step-by-step decode round identically.
    """
    return torch.float32 if act in (torch.bfloat16, torch.float16) else torch.float64


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in its float32 (or, for a float64 model, float64) working precision."""
    return x.to(wide_dtype(x.dtype))


def _cublas_does_it(x: torch.Tensor) -> bool:
    """Whether a half-precision product on x's device is cuBLAS's, which accumulates in float32 and rounds
    once by itself. There the operands stay as they are: widening them first adds a conversion kernel
    and a float32 GEMM over twice the bytes (the H200 Flash-8 profile's conversion kernels, wo_a's
    widening when it went through here, took 11% of the step: bench/results/profile-decode-flash8-h200.json)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def einsum(spec: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An activation-dtype einsum: accumulated in working precision, rounded once (as cuBLAS does)."""
    if _cublas_does_it(a):
        return torch.einsum(spec, a, b.to(a.dtype))
    return torch.einsum(spec, wide(a), wide(b)).to(a.dtype)


def top_k(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along the last dim, ties to the lower index: (values, indices). torch.topk
    leaves ties to its implementation, which picked differently for different lengths (CPU, session 11: the
    reference scores its visible indexer blocks, a program every block of its cache), so the indexer's
    picks followed the buffer's length; a stable descending sort does not."""
    values, indices = score.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def q_heads(q: torch.Tensor, rot: torch.Tensor, eps: float, rope_dim: int) -> torch.Tensor:
    """The attention's queries q [B, S, heads, hd] (the wq_b product) -> each head through RMSNorm without a
    weight, in q's dtype op by op as the reference, then RoPE at rot [B, S, rope_dim/2, 2]."""
    q = q * torch.rsqrt(wide(q.square()).mean(-1, keepdim=True).to(q.dtype) + eps)
    return with_rope(q, rot, rope_dim)


def index_query(q: torch.Tensor, rot: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The indexer's queries q [B, S, heads, dim] (the wq_b product) with rot [B, S, rope_dim/2, 2] at their
    positions -> RoPE, Hadamard, FP4 round-trip, in q's dtype: the keys' last steps without their norm."""
    return fp4_roundtrip(hadamard(with_rope(q, rot, rope_dim)))


def indexer_picks(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, k: int,
                  ratio: int, weight_scale: float) -> torch.Tensor:
    """The compressed blocks each query attends to [B, S, k] int64 (-1 = none): the top k of
    sum_h w_h * relu(q_h . key_t) over the blocks t < (pos + 1) // ratio visible to the query at position pos
    [B, S]. q [B, S, heads, dim], keys [B, T, dim]; the head weights w = weights [B, S, heads] (the raw
    weights_proj product) in q's dtype times weight_scale; a bf16 einsum, its product with w rounded
    likewise."""
    weights = weights.to(q.dtype) * weight_scale
    count = (pos + 1) // ratio
    score = einsum("bshd,btd->bsht", q, keys)
    score = wide(score.relu() * weights[..., None]).sum(dim=2).to(q.dtype)          # [B, S, T]
    visible = torch.arange(keys.size(1), device=keys.device) < count[..., None]
    top, picked = top_k(score.masked_fill(~visible, float("-inf")), k)
    return torch.where(top == float("-inf"), -1, picked)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An unquantised activation-dtype linear, accumulated in working precision, rounded once."""
    if _cublas_does_it(x):
        return F.linear(x, w.to(x.dtype))
    return F.linear(wide(x), wide(w.to(x.dtype))).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 with a float32 weight, cast back to the input dtype."""
    xf = wide(x)
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


# ------------------------------------------------------------------ rotary embedding
def apply_rope(x: torch.Tensor, rot: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [b, s, (h,) r] by rot [s, r/2, 2] (shared positions) or
    [b, s, r/2, 2] (each sequence at its own positions), (cos, sin) pairs; returns x's dtype.

    DeepSeek's complex product written out in real terms, in working precision: compilers fuse it with
    its neighbours (Inductor has no complex kernels: a complex multiply fell back to separate ATen
    kernels around every RoPE), and ONNX has no complex tensors."""
    xr = wide(x).unflatten(-1, (-1, 2))
    if rot.dim() == 3:
        rot = rot[None]
    rot = rot[:, :, None] if x.dim() == 4 else rot
    cos, sin = rot[..., 0], rot[..., 1]
    sin = -sin if inverse else sin
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


def with_rope(x: torch.Tensor, rot: torch.Tensor, rope_dim: int, inverse: bool = False) -> torch.Tensor:
    """x with RoPE applied to its last `rope_dim` channels."""
    return torch.cat([x[..., :-rope_dim], apply_rope(x[..., -rope_dim:], rot, inverse)], dim=-1)


# ------------------------------------------------------------------ Hadamard
def _hadamard(n: int, device: str) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix. Not cached: a cache filled while torch.export traces would
    hold a fake tensor."""
    h = torch.ones(1, 1, device=device)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard transform of the last dim scaled by d^-0.5, computed in float32, cast back."""
    n = x.size(-1)
    return (wide(x) @ _hadamard(n, str(x.device)).to(wide_dtype(x.dtype)) * n ** -0.5).to(x.dtype)


# ------------------------------------------------------------------ linears
class FP8Linear:
    """FP8 e4m3 weight with 128x128 E8M0 scales. Input activations round-trip through FP8
    (block 128) as the official `act_quant` + `fp8_gemm` do; the output has the input's dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, act: torch.dtype):
        self.w = fp8_weight_dequant(weight, scale).to(wide_dtype(act))      # exact in float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quantised_matmul(x, self.w)


def quantised_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [.., K] round-tripped through FP8 (block 128) times a dequantised weight w [N, K], in float32,
    cast to x's dtype: the official `act_quant` + `fp8_gemm` / `fp4_gemm` up to summation order. A bf16 w
    (exact for FP8 and MXFP4 values, as are the round-tripped activations) takes `bf16_gemm`: the same
    products and float32 sums, on a GPU's tensor cores."""
    xq = fp8_act_roundtrip(x).to(w.dtype)
    if w.dtype == torch.bfloat16:
        return bf16_gemm(xq.reshape(-1, xq.size(-1)), w).to(x.dtype).view(*x.shape[:-1], w.size(0))
    return (xq @ w.T).to(x.dtype)


def bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T of bf16 matrices with float32 sums -> float32 [M, N]. On a GPU one cuBLAS GEMM
    with a float32 output (so no split-K partial sum is rounded to bf16, which torch allows for bf16
    outputs); on the CPU in float32 arithmetic."""
    if a.is_cuda:
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return a.float() @ b.float().T


def fp8_kv_roundtrip(kv: torch.Tensor, rope_dim: int, block: int) -> torch.Tensor:
    """FP8 round-trip of the non-rope channels (block `block`); rope channels stay as they are."""
    nope = fp8_act_roundtrip(kv[..., :-rope_dim], block).to(kv.dtype)
    return torch.cat([nope, kv[..., -rope_dim:]], dim=-1)


def fp4_roundtrip(x: torch.Tensor) -> torch.Tensor:
    return fp4_act_roundtrip(x).to(x.dtype)


# ------------------------------------------------------------------ compressor
def put_rows(cache: torch.Tensor, rows: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """cache[b, rows[b, k]] = value[b, k] for every sequence b (only where mask[b, k], if given); rows [B] or
    [B, K] with no row twice in one sequence."""
    batch = torch.arange(cache.size(0), device=cache.device).view(-1, *[1] * (rows.dim() - 1))
    if mask is not None:
        value = torch.where(mask.view(*mask.shape, *[1] * (value.dim() - mask.dim())), value, cache[batch, rows])
    cache.index_put_((batch, rows), value.to(cache.dtype))


def compressor_inputs(proj: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, ratio: int):
    """The stacked wkv | wgate products [..., 2C] of tokens at positions pos [...] -> kv, score [..., C]; the
    score carries the APE of the token's slot in its block."""
    kv, score = proj.chunk(2, dim=-1)
    return kv, score + ape[pos % ratio]


def compressor_pool(kv: torch.Tensor, score: torch.Tensor, ratio: int) -> torch.Tensor:
    """kv, score [..., coff*r, coff*dim] in the state layout (ratio 4: rows [:r] the previous block, [r:]
    the current one) -> the block's row [..., dim]: per channel sum_t kv_t * softmax_t(score_t)."""
    if ratio == 4:      # overlap: the previous block's first half of channels, the current block's second
        # a select, not a cat of the two halves: torch 2.11's Inductor lowers a cat into a pointwise
        # kernel (on CUDA) whose Identity(...) row offsets break its index simplification ("The argument
        # '((-4)) + 4' is not comparable") once a clamped index reads the cat's input (the prefill timeline)
        d = kv.size(-1) // 2
        previous = (torch.arange(2 * ratio, device=kv.device) < ratio)[:, None]
        kv = torch.where(previous, kv[..., :d], kv[..., d:])
        score = torch.where(previous, score[..., :d], score[..., d:])
    return (kv * score.softmax(dim=-2)).sum(dim=-2)


def finish_rows(rows: torch.Tensor, rot: torch.Tensor, dtype: torch.dtype, norm: torch.Tensor, eps: float,
                rotate: bool, rope_dim: int, fp8_block: int) -> torch.Tensor:
    """The last steps of KV cache rows (the window's new rows, the compressors' pooled ones): rows [B, M, dim]
    with rot [B, M, rope_dim/2, 2] at each row's position -> RMSNorm, RoPE, then Hadamard + FP4 round-trip
    (`rotate`: indexer keys) or FP8 round-trip of the non-rope channels, in `dtype`."""
    rows = with_rope(rms_norm(rows.to(dtype), norm, eps), rot, rope_dim)
    return fp4_roundtrip(hadamard(rows)) if rotate else fp8_kv_roundtrip(rows, rope_dim, fp8_block)


def compressor_step(proj: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, kv_state: torch.Tensor,
                    score_state: torch.Tensor, cache: torch.Tensor, first_row: int, norm: torch.Tensor,
                    rot: torch.Tensor, ratio: int, rotate: bool, eps: float, rope_dim: int, fp8_block: int) -> None:
    """The compressor fed one token per sequence at pos [B], its products proj [B, 2C]: the token into the
    partial-block states [B, coff*r, C], and where it completes block j, that block's row into
    cache[b, first_row + j] (rot: the layer's table [max_len, rope_dim/2, 2])."""
    kv, score = compressor_inputs(proj, ape, pos, ratio)
    slot = pos % ratio + (ratio if ratio == 4 else 0)
    put_rows(kv_state, slot, kv)
    put_rows(score_state, slot, score)
    row = compressor_pool(kv_state, score_state, ratio)                       # [B, dim]
    emit = (pos + 1) % ratio == 0
    if ratio == 4:      # a completed block becomes the previous one
        kv_state[:, :ratio] = torch.where(emit[:, None, None], kv_state[:, ratio:], kv_state[:, :ratio])
        score_state[:, :ratio] = torch.where(emit[:, None, None], score_state[:, ratio:], score_state[:, :ratio])
    row = finish_rows(row[:, None], rot[(pos + 1 - ratio).clamp(min=0)][:, None], cache.dtype, norm, eps, rotate,
                      rope_dim, fp8_block)
    put_rows(cache, first_row + pos // ratio, row[:, 0], emit)


def ring_update(old: torch.Tensor, new: torch.Tensor, start: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The ring old [B, R, ...] after writing new[b, i] [B, C, ...] into slot (start[b] + i) % R for
    i < n[b] in order: a slot keeps the last token written to it, or its old row if none was."""
    size, chunk = old.size(1), new.size(1)
    slot = torch.arange(size, device=old.device)
    first = (slot[None] - start[:, None]) % size                 # [B, R] first chunk token landing in the slot
    written = first < n[:, None]
    last = first + size * ((n[:, None] - 1 - first).clamp(min=0) // size)
    batch = torch.arange(old.size(0), device=old.device)[:, None]
    picked = new[batch, last.clamp(max=chunk - 1)]
    return torch.where(written.view(*written.shape, *[1] * (old.dim() - 2)), picked, old)


def compressor_chunk(proj: torch.Tensor, ape: torch.Tensor, start: torch.Tensor, n: torch.Tensor,
                     kv_state: torch.Tensor, score_state: torch.Tensor, cache: torch.Tensor, first_row: int,
                     norm: torch.Tensor, rot: torch.Tensor, ratio: int, rotate: bool, eps: float, rope_dim: int,
                     fp8_block: int) -> None:
    """The compressor fed a chunk (prefill): proj [B, C, 2*coff*dim] the products of tokens i at positions
    start + i, only i < n [B] real. The rows of blocks completed by real tokens go to cache[b, first_row +
    block % (rows - first_row)]; the states end as `compressor_step` fed the n tokens one at a time leaves
    them (stale slots included). rot: the layer's table [max_len, rope_dim/2, 2]."""
    r = ratio
    off = r if r == 4 else 0                      # with overlap, state rows [:r] hold the previous block
    b, chunk = proj.shape[:2]
    dev = proj.device
    kv, score = compressor_inputs(proj, ape, start[:, None] + torch.arange(chunk, device=dev), r)   # [B, C, coff*dim]
    # A timeline of whole blocks from the block before the current one (overlap) or the current one:
    # its rows before the chunk's first token come from the state, the rest from the chunk. Block k is
    # pooled over timeline rows k*r .. k*r + off + r - 1 (with overlap, the block before it too), gathered
    # straight into [B, blocks, off + r, .] windows: no cat of shifted blocks, which torch 2.11's Inductor
    # lowers (on CUDA) into a pointwise kernel whose Identity(...) offsets inside the clamped state rows
    # below fail its index simplification ("The argument '((-4)) + 4' is not comparable").
    blocks = (r + chunk - 1) // r                 # blocks that can complete inside a chunk
    k = torch.arange(blocks, device=dev)
    u = k[:, None] * r + torch.arange(off + r, device=dev)                   # [blocks, off + r] timeline rows
    filled = (off + start % r)[:, None, None]     # [B, 1, 1] timeline rows taken from the state
    from_state = (u[None] < filled)[..., None]
    batch = torch.arange(b, device=dev)
    src = (u[None] - filled).clamp(0, chunk - 1)
    state_rows = u.clamp(max=off + r - 1)

    def windows(state, new):                      # -> [B, blocks, off + r, coff*dim]
        return torch.where(from_state, state[:, state_rows], new[batch[:, None, None], src])
    win_kv, win_score = windows(kv_state, kv), windows(score_state, score)
    rows = compressor_pool(win_kv, win_score, r)                             # [B, blocks, dim]
    index = start[:, None] // r + k                                           # [B, blocks] block number
    done = (k[None] + 1) * r <= (start % r + n)[:, None]                      # completed by a real token
    rows = finish_rows(rows, rot[(index * r).clamp(max=rot.size(0) - 1)], cache.dtype, norm, eps, rotate, rope_dim,
                       fp8_block)
    # consecutive rows modulo the cache: never one row twice, and a masked row past the end stays in range
    put_rows(cache, first_row + index % (cache.size(1) - first_row), rows, done)
    if off:                                       # the last block completed becomes the previous block
        last = (start % r + n) // r                                          # [B] its timeline block (0: none)
        moved = (last > 0)[:, None, None]
        window = (last - 1).clamp(min=0)          # timeline block `last` is the second half of window last-1
        prev_kv = torch.where(moved, win_kv[batch, window, r:], kv_state[:, :r])
        prev_score = torch.where(moved, win_score[batch, window, r:], score_state[:, :r])
        kv_state[:, :r] = prev_kv
        score_state[:, :r] = prev_score
    kv_state[:, off:] = ring_update(kv_state[:, off:], kv, start, n)
    score_state[:, off:] = ring_update(score_state[:, off:], score, start, n)


def kv_row(kv: torch.Tensor, norm: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
           window: int, eps: float, rope_dim: int, fp8_block: int) -> None:
    """The window row of each sequence's new token: kv [B, dim] before its norm, at positions pos [B], into
    cache[b, pos % window] (RMSNorm, RoPE, FP8 round-trip of the non-rope channels; rot the layer's table
    [max_len, rope_dim/2, 2])."""
    row = finish_rows(kv[:, None], rot[pos][:, None], cache.dtype, norm, eps, False, rope_dim, fp8_block)
    put_rows(cache, pos % window, row[:, 0])


# ------------------------------------------------------------------ attention core
def decode_rows(pos: torch.Tensor, picked: torch.Tensor | None, window: int, ratio: int, rows: int) -> torch.Tensor:
    """The cache rows [B, S, K] (-1 = none) that decode queries at positions pos [B, S] attend to, in a cache
    of `rows` rows (the window ring, then the compressed rows): the ring's slots already written (slot j <=
    pos), then the compressed rows (`block_rows`). The decode attention kernel builds the same list itself
    (csrc/sparse_attention.cu)."""
    ring = torch.arange(window, device=pos.device)
    idx = torch.where(ring <= pos[..., None], ring, -1)
    return torch.cat([idx, block_rows(pos, picked, window, ratio, rows)], dim=-1) if ratio else idx


def block_rows(pos: torch.Tensor, picked: torch.Tensor | None, window: int, ratio: int, rows: int) -> torch.Tensor:
    """The compressed rows [B, S, K] (-1 = none) that queries at positions pos [B, S] attend to, in a cache of
    `rows` rows whose compressed block j is row window + j: ratio 4, the picked blocks [B, S, K] (-1 = none);
    ratio 128, every complete block ((pos + 1) // ratio of them)."""
    if ratio != 4:
        blocks = torch.arange(rows - window, device=pos.device)
        picked = torch.where(blocks < ((pos + 1) // ratio)[..., None], blocks, -1)
    return torch.where(picked >= 0, picked + window, -1)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of q [b, s, h, d] over rows kv[b, idx[b, s, k]] (-1 = no row), one shared K=V row
    per index, with a per-head sink exp(sink_h) added to the softmax denominator only.

    As the official kernel: scores and the normaliser in float32, the probabilities rounded to the
    activation dtype before they weight the rows, output in q's dtype.
    """
    b, s, h, d = q.shape
    valid = idx >= 0
    rows = kv.gather(1, idx.clamp(min=0).long().flatten(1)[..., None].expand(-1, -1, d))
    rows = wide(rows.view(b, s, -1, d))                                          # [b, s, k, d]
    scores = torch.einsum("bshd,bskd->bshk", wide(q), rows) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    top = scores.amax(-1, keepdim=True)                                         # [b, s, h, 1]
    p = torch.exp(scores - top)
    denom = p.sum(-1) + torch.exp(sink.view(1, 1, h) - top.squeeze(-1))
    o = torch.einsum("bshk,bskd->bshd", wide(p.to(q.dtype)), rows) / denom[..., None]
    return o.to(q.dtype)


# ------------------------------------------------------------------ hyper-connections
def sinkhorn_split(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mix [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc] (rows j: input stream,
    columns k: output stream), comb made doubly stochastic by Sinkhorn iterations (float32).

    The hc x hc matrix is iterated as hc * hc separate tensors of the batch's shape, its row and column
    sums as explicit adds in index order: elementwise ops on one shape, which a compiler fuses into a few
    kernels, where every reduction over 4 elements became its own kernel (43 per hc_pre with Inductor)."""
    pre = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = mix[..., 2 * hc:] * scale[2] + base[2 * hc:]
    c = [[logits[..., j * hc + k] for k in range(hc)] for j in range(hc)]       # c[j][k] [...]

    def row_sum(j):
        total = c[j][0]
        for k in range(1, hc):
            total = total + c[j][k]
        return total

    def col_sum(k):
        total = c[0][k]
        for j in range(1, hc):
            total = total + c[j][k]
        return total

    for j in range(hc):                              # softmax over each row, + eps
        top = c[j][0]
        for k in range(1, hc):
            top = torch.maximum(top, c[j][k])
        c[j] = [torch.exp(v - top) for v in c[j]]
        total = row_sum(j)
        c[j] = [v / total + eps for v in c[j]]
    for it in range(iters):
        if it:                                       # the first iteration normalises columns only
            sums = [row_sum(j) + eps for j in range(hc)]
            c = [[c[j][k] / sums[j] for k in range(hc)] for j in range(hc)]
        sums = [col_sum(k) + eps for k in range(hc)]
        c = [[c[j][k] / sums[k] for k in range(hc)] for j in range(hc)]
    comb = torch.stack([torch.stack(row, -1) for row in c], -2)
    return pre, post, comb


def hc_mix(x: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, s, hc, d] -> (mixes [b, s, rows], x flattened in float32 [b, s, hc*d])."""
    xf = wide(x.flatten(2))
    return (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps), xf


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, cfg: ModelConfig):
    """Collapse the hc streams into one sub-layer input; also return post weights and comb."""
    return hc_pre_parts(x, fn, scale, base, cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)


def hc_pre_parts(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
                 hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_pre with its config values spelled out (the dsv4::hc_pre op's signature): x [b, s, hc, d] ->
    y [b, s, d] in x's dtype, post [b, s, hc], comb [b, s, hc, hc] in working precision."""
    mix, xf = hc_mix(x, fn, norm_eps)
    pre, post, comb = sinkhorn_split(mix, scale, base, x.size(-2), iters, hc_eps)
    y = (pre[..., None] * xf.view(x.shape)).sum(-2)
    return y.to(x.dtype), post, comb


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out_k = post_k * f + sum_j comb[j, k] * res_j, in float32, cast to f's dtype. f [b,s,d], res [b,s,hc,d]."""
    y = post[..., None] * f[:, :, None, :] + (comb[..., None] * res[:, :, :, None, :]).sum(2)
    return y.to(f.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            cfg: ModelConfig) -> torch.Tensor:
    """Final collapse of the hc streams: sigmoid weights, no Sinkhorn."""
    mix, xf = hc_mix(x, fn, cfg.rms_norm_eps)
    pre = torch.sigmoid(mix * scale + base) + cfg.hc_eps
    return (pre[..., None] * xf.view(x.shape)).sum(2).to(x.dtype)


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """A MoE gate's scores from its logits x @ W_gate^T (float32): softmax, sigmoid, or V4's sqrt(softplus)."""
    if scoring_func == "softmax":
        return logits.softmax(-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


def route_from_logits(logits: torch.Tensor, bias: torch.Tensor | None, k: int, scoring_func: str,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A score-routed gate from its logits [n, E] float32: (weights [n, k] float32, experts [n, k]); the bias
    only chooses the experts."""
    scores = router_scores(logits, scoring_func)
    experts = (scores + bias if bias is not None else scores).topk(k, dim=-1)[1]
    return route_weights(scores, experts, scoring_func, scale), experts


def route_weights(scores: torch.Tensor, experts: torch.Tensor, scoring_func: str, scale: float) -> torch.Tensor:
    """The chosen experts' scores, normalised unless softmax made them, times the routed scaling factor."""
    weights = scores.gather(1, experts.long())
    if scoring_func != "softmax":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up in float32 with DeepSeek's clamps (up to [-limit, limit], gate to <= limit)."""
    gate, up = wide(gate), wide(up)
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    return F.silu(gate) * up


def swiglu_stacked(y: torch.Tensor, size: int, up: int, limit: float) -> torch.Tensor:
    """`swiglu` of a stacked gate | up product y [..., W] (gate columns [0, size), up [up, up + size)), in y's
    dtype: what the shared expert's w2 takes."""
    return swiglu(y[..., :size], y[..., up:up + size], limit).to(y.dtype)


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
