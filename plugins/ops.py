"""The project's torch custom ops, namespace `dsv4`: one definition each, with a plain-torch
implementation (CPU, and the oracle), the CUDA kernel where one exists, and a fake implementation so
torch.export and AOTInductor can trace layer programs through them.

    dsv4::fp8_linear(x, weight, scale)                      FP8 block-scaled linear (act_quant + GEMM)
    dsv4::fp8_linear_normed(x, norm, eps, weight, scale)    the same of x's RMSNorm (one launch for decode)
    dsv4::moe_routed(x, experts, weights, table, inter, limit)   routed MXFP4 experts via a pointer table
    dsv4::moe_with_shared(x, experts, weights, table, ...)  the routed experts and the shared expert
    dsv4::moe_hc_post(x, experts, ..., res, post, comb)    the same, summed, inside the layer's last hc_post
    dsv4::moe_gate_hc_post(x, gate, ..., res, post, comb)  the same from the gate's product and routing on
    dsv4::sparse_attention(q, kv, sink, idx, scale)        attention over picked rows with a sink
    dsv4::decode_attention(q, kv, sink, picked, pos, ...)  a decode step's attention over its window and
                                                            compressed rows, then the output's inverse RoPE
    dsv4::hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters)   hyper-connection pre (mixes, Sinkhorn, sum)
    dsv4::hc_pre_norm(x, fn, scale, base, weight, ...)      the same, then the RMSNorm after it
    dsv4::hc_post_pre_norm(f, res, post, comb, fn, ...)     the attention's hc_post, then the FFN's hc_pre_norm
    dsv4::wide_linear(x, weight, branch)                    float32 product with a weight kept in bf16
                                                            (bf16 x widened first)
    dsv4::fork_side(x), dsv4::join_side(branch, keep, written)   a side branch on a second stream
    dsv4::written_after(written, after)                     nothing: orders a later write after a read
    dsv4::grouped_fp8_linear(x, weight, scale)              per-group FP8 weights, bf16 activations (wo_a)
    dsv4::route_topk(logits, bias, k, scoring, scale, experts)   a score-routed gate's weights (experts
                                                            written in place)
    dsv4::route_hash(logits, tid2eid, ids, k, scoring, scale, experts)   a hash layer's gate's weights
                                                            (experts tid2eid[ids] written in place)
    dsv4::index_query(q, rot, pos, rope_dim)                the indexer's queries: RoPE, Hadamard, FP4
    dsv4::indexer_picks(q, weights, keys, pos, k, ...)     the indexer's top-k compressed blocks
    dsv4::compressor_step(proj, ape, pos, states, cache, ..., branch)   a compressor fed one token (mutates)
    dsv4::compressor_chunk(proj, ape, start, n, states, cache, ...)   a compressor fed a chunk (mutates)
    dsv4::q_heads_kv_row(q, kv, norm, rot, pos, cache, ...)  a decode step's query heads (norm, RoPE) and
                                                            its window row (mutates)
    dsv4::rms_norm_rows(x, weight, eps)                     RMSNorm of decode rows
    dsv4::swiglu_rows(y, size, up, limit)                   the clamped SwiGLU of a stacked gate | up product
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Callable

import torch

from . import moe_experts, streams
from . import route as route_gpu
from .formats import fp8_weight_dequant, mxfp4_dequant
from .head import head_logits, kernel_fits
from .moe_experts import (expert_nbytes, moe_experts_decode, moe_experts_prefill, moe_experts_prefill_wgmma,
                          unpack_expert, wgmma_pays)
from .oracle import (decode_rows, einsum, hc_post, hc_pre_parts, quantised_matmul, rms_norm, route_from_logits,
                     route_weights, router_scores, swiglu, swiglu_stacked, wide_dtype, with_rope)
from .oracle import compressor_chunk as compressor_chunk_oracle
from .oracle import compressor_step as compressor_step_oracle
from .oracle import index_query as index_query_oracle
from .oracle import indexer_picks as indexer_picks_oracle
from .oracle import kv_row as kv_row_oracle
from .oracle import q_heads as q_heads_oracle
from .oracle import sparse_attention as sparse_attention_oracle
from .streams import beside

# ------------------------------------------------------------------ fp8_linear


# Up to this many rows the ops run their decode kernels, which launch without synchronising or allocating;
# past it, prefill kernels, which allocate but never synchronise either: CUDA graphs capture both.
DECODE_ROWS = 16


@torch.library.custom_op("dsv4::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N]; weight [N, K] float8_e4m3fn with E8M0 scales [ceil(N/128), K/128], as
    float8_e8m0fnu or as their raw bytes (uint8: AOTInductor cannot take e8m0 program inputs)."""
    scale = scale.view(torch.float8_e8m0fnu)
    rows = x.reshape(-1, x.size(-1))
    if x.is_cuda and x.dtype == torch.bfloat16:
        if rows.size(0) <= DECODE_ROWS:
            from .fp8_linear import fp8_linear_decode
            return fp8_linear_decode(rows.contiguous(), weight, scale).view(*x.shape[:-1], weight.size(0))
        # prefill: FP8 tensor cores (or bf16 ones), where the generic path below runs a float32 GEMM
        from .fp8_linear import fp8_linear_prefill
        return fp8_linear_prefill(rows.contiguous(), weight, scale).view(*x.shape[:-1], weight.size(0))
    return quantised_matmul(x, fp8_weight_dequant(weight, scale).to(wide_dtype(x.dtype)))


@fp8_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.size(0))


@torch.library.custom_op("dsv4::fp8_linear_normed", mutates_args=())
def fp8_linear_normed(x: torch.Tensor, norm: torch.Tensor, eps: float, weight: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """`fp8_linear(rms_norm_rows(x, norm, eps), weight, scale)`: on a GPU, for up to 8 decode rows, one launch
    (the GEMV normalises the rows as it loads them, the same bits), where the norm is the GEMV's only reader
    (the query latent before wq_b and the indexer's wq_b)."""
    rows = x.reshape(-1, x.size(-1))
    from . import rows as row_kernels
    if row_kernels.supports_norm(x, norm) and rows.size(0) <= DECODE_ROWS:
        from .fp8_linear import fp8_linear_decode_normed
        return fp8_linear_decode_normed(rows, norm.float().contiguous(), eps, weight,
                                        scale.view(torch.float8_e8m0fnu)).view(*x.shape[:-1], weight.size(0))
    return fp8_linear(rms_norm_rows(x, norm, eps), weight, scale)


@fp8_linear_normed.register_fake
def _(x, norm, eps, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.size(0))


# ------------------------------------------------------------------ moe_routed


class _DeviceBytes:
    """A zero-copy CUDA view of `n` bytes at a device (or mapped pinned host) address, through the CUDA
    array interface, so the oracle can read experts the kernels would read."""

    def __init__(self, address: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (address, False), "version": 3,
                                         "strides": None}


def _expert_at(address: int, d: int, f: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantised (w1, w3, w2) of the expert at `address`: host memory for a CPU run, else device memory."""
    n = expert_nbytes(d, f)
    if device.type == "cpu":
        blob = torch.frombuffer((ctypes.c_uint8 * n).from_address(address), dtype=torch.uint8)
    else:
        blob = torch.as_tensor(_DeviceBytes(address, n), device=device)
    w1, s1, w3, s3, w2, s2 = unpack_expert(blob, d, f)
    return mxfp4_dequant(w1, s1), mxfp4_dequant(w3, s3), mxfp4_dequant(w2, s2)


def moe_routed_oracle(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                      expert: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      limit: float) -> torch.Tensor:
    """Routed experts as DeepSeek's MoE loop: ascending expert ids, each expert's output (in x's dtype)
    added in working precision, the route weight applied before w2. `expert(e)` gives the dequantised
    (w1, w3, w2) of expert e."""
    work = wide_dtype(x.dtype)
    y = torch.zeros(x.shape, dtype=work, device=x.device)
    for e in torch.unique(experts).tolist():
        w1, w3, w2 = (t.to(device=x.device, dtype=work) for t in expert(e))
        rows, slot = torch.where(experts == e)
        xe = x[rows]
        h = weights[rows, slot, None].to(work) * swiglu(quantised_matmul(xe, w1), quantised_matmul(xe, w3), limit)
        y[rows] += quantised_matmul(h.to(x.dtype), w2).to(work)
    return y


@torch.library.custom_op("dsv4::moe_routed", mutates_args=())
def moe_routed(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, inter: int,
               limit: float) -> torch.Tensor:
    """x [T, D], experts [T, k] int32, weights [T, k] float32, table [E] int64 expert addresses -> [T, D]
    float32 (float64 for a float32/float64 model): the routed experts' sum, shared expert excluded."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        if x.size(0) > DECODE_ROWS:
            # prefill: each expert read once per group of its tokens, not once per token (through warpgroup
            # MMAs only where switched on: moe_experts.WgmmaPaths). Neither path synchronises (their group
            # table and its count come from a kernel), so a CUDA graph captures a whole prefill chunk.
            args = (x.contiguous(), experts.contiguous(), weights.contiguous(), table, inter, limit)
            if wgmma_pays(x, experts, table.numel(), inter):
                return moe_experts_prefill_wgmma(*args)
            return moe_experts_prefill(*args)
        return moe_experts_decode(x.contiguous(), experts, weights, table, inter, limit)
    # the oracle (CPU, and float32 models on CUDA, which check compiled programs exactly); it reads the
    # table on the host, so it cannot be captured in a CUDA graph
    addresses = table.tolist()
    return moe_routed_oracle(x, experts, weights, lambda e: _expert_at(addresses[e], x.size(1), inter, x.device),
                             limit)


@moe_routed.register_fake
def _(x, experts, weights, table, inter, limit):
    return x.new_empty(x.shape, dtype=wide_dtype(x.dtype))


@torch.library.custom_op("dsv4::moe_with_shared", mutates_args=())
def moe_with_shared(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, inter: int,
                    limit: float, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                    up: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE of decode rows x [T, D]: (`moe_routed`'s sum of the routed experts, the shared expert's output
    [T, D] in x's dtype: the stacked w1 | w3 FP8 linear (w3's rows from `up`), the clamped SwiGLU, w2). With
    moe_experts.SHARED_BESIDE_ROUTED on a GPU, the shared expert runs on a second stream beside the routed
    experts (a fork and a join inside the op, so a captured step holds two parallel branches)."""
    def routed():
        return moe_routed(x, experts, weights, table, inter, limit)

    def shared():
        return _shared_expert(x, inter, up, limit, w13, s13, w2, s2)
    if x.is_cuda and moe_experts.SHARED_BESIDE_ROUTED:
        return beside(routed, shared, x.device)
    return routed(), shared()


def fp8_linear_after_swiglu(y: torch.Tensor, size: int, up: int, limit: float, weight: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """`fp8_linear(swiglu_rows(y, size, up, limit), weight, scale)`: on a GPU, for up to 8 decode rows, one
    launch (the GEMV applies the SwiGLU to the rows as it loads them, the same bits)."""
    from . import rows as row_kernels
    rows = y.reshape(-1, y.size(-1))
    if row_kernels.supports_swiglu(y, size, up) and rows.size(0) <= DECODE_ROWS:
        from .fp8_linear import fp8_linear_decode_swiglu
        return fp8_linear_decode_swiglu(rows, size, up, limit, weight, scale.view(torch.float8_e8m0fnu)).view(
            *y.shape[:-1], weight.size(0))
    return fp8_linear(swiglu_rows(y, size, up, limit), weight, scale)


@moe_with_shared.register_fake
def _(x, experts, weights, table, inter, limit, w13, s13, w2, s2, up):
    return x.new_empty(x.shape, dtype=wide_dtype(x.dtype)), x.new_empty(x.shape)


@torch.library.custom_op("dsv4::moe_hc_post", mutates_args=())
def moe_hc_post(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, inter: int,
                limit: float, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, up: int,
                res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The decode MoE inside the hyper-connection post that ends the layer: `moe_with_shared`'s two outputs
    added and rounded to x's dtype (the FFN's output f [T, D]), then `plugins.oracle.hc_post` of f over the
    streams res [T, hc, D] with post [T, hc] and comb [T, hc, hc] -> the layer's new streams [T, hc, D]. On a
    GPU (bf16, decode rows, 4 streams) one launch adds each token's expert pairs and the shared output and
    applies the post, where the sum over pairs and a kernel of the program's own ran."""
    if _moe_post_fits(x, res):
        return _experts_post(x, experts, lambda: weights, table, inter, limit, (w13, s13, w2, s2, up), res, post,
                             comb, moe_experts.SHARED_BESIDE_ROUTED)
    y, y_shared = moe_with_shared(x, experts, weights, table, inter, limit, w13, s13, w2, s2, up)
    f = (y + y_shared.to(y.dtype)).to(x.dtype)
    streams.join_pending(x.device)               # comb, where an hc_pre finished it beside
    return hc_post(f[:, None], res[:, None], post[:, None], comb[:, None])[:, 0]


def _moe_post_fits(x: torch.Tensor, res: torch.Tensor) -> bool:
    """Whether the decode MoE's kernels and its one-launch sum and post (`sum_pairs_post`) serve: a GPU, bf16,
    1 to DECODE_ROWS rows, 4 streams."""
    return x.is_cuda and x.dtype == torch.bfloat16 and 1 <= x.size(0) <= DECODE_ROWS and res.size(1) == 4 and x.size(1) % 4 == 0


def _shared_expert(x, inter: int, up: int, limit: float, w13, s13, w2, s2) -> torch.Tensor:
    """The shared expert of x: the stacked w1 | w3 FP8 linear, the clamped SwiGLU inside w2's launch."""
    return fp8_linear_after_swiglu(fp8_linear(x, w13, s13), inter, up, limit, w2, s2)


def _experts_post(x, experts, weights_of: Callable[[], torch.Tensor], table, inter: int, limit: float,
                  shared_args: tuple, res, post, comb, beside_routed: bool) -> torch.Tensor:
    """The decode MoE's kernels (`_moe_post_fits`): the routed pairs with the weights weights_of() gives (made
    on the routed branch: the router's launches where it runs there), the shared expert on a second stream
    beside that branch or after it, then one launch adding the pairs and the shared output inside the
    layer's last hc_post."""
    w13, s13, w2, s2, up = shared_args

    def routed():
        return moe_experts_decode(x.contiguous(), experts.contiguous(), weights_of().contiguous(), table, inter,
                                  limit, summed=False)

    def shared():
        return _shared_expert(x, inter, up, limit, w13, s13, w2, s2)
    (parts, k), y_shared = beside(routed, shared, x.device) if beside_routed else (routed(), shared())
    streams.join_pending(x.device)               # comb, where an hc_pre finished it beside
    return moe_experts.sum_pairs_post(parts, experts, k, y_shared.contiguous(), res.contiguous(),
                                      post.float().contiguous(), comb.float().contiguous())


@moe_hc_post.register_fake
def _(x, experts, weights, table, inter, limit, w13, s13, w2, s2, up, res, post, comb):
    return torch.empty_like(res)


@torch.library.custom_op("dsv4::moe_gate_hc_post", mutates_args=("experts",))
def moe_gate_hc_post(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
                     ids: torch.Tensor, k: int, scoring_func: str, scale: float, experts: torch.Tensor,
                     table: torch.Tensor, inter: int, limit: float, w13: torch.Tensor, s13: torch.Tensor,
                     w2: torch.Tensor, s2: torch.Tensor, up: int, res: torch.Tensor, post: torch.Tensor,
                     comb: torch.Tensor) -> torch.Tensor:
    """The decode MoE from its gate on: the gate's product of x [T, D] (`wide_linear`; bf16 x as it is, else
    widened), the routing (`route_hash` over ids [T] where tid2eid is given, else `route_topk` with bias;
    the experts written into `experts` [T, k]), then `moe_hc_post`. On a GPU with
    moe_experts.SHARED_BEFORE_GATE the shared expert starts on the second stream before the gate's
    product, so that its weights stream while the gate and the router run (two short launches bound by
    latency, not bandwidth), where it started after them; the same bits."""
    def weights():
        logits = wide_linear(x if x.dtype == torch.bfloat16 else x.to(wide_dtype(x.dtype)), gate)
        if tid2eid is not None:
            return route_hash(logits, tid2eid, ids, k, scoring_func, scale, experts)
        return route_topk(logits, bias, k, scoring_func, scale, experts)
    if moe_experts.SHARED_BEFORE_GATE and _moe_post_fits(x, res):
        return _experts_post(x, experts, weights, table, inter, limit, (w13, s13, w2, s2, up), res, post, comb, True)
    return moe_hc_post(x, experts, weights(), table, inter, limit, w13, s13, w2, s2, up, res, post, comb)


@moe_gate_hc_post.register_fake
def _(x, gate, bias, tid2eid, ids, k, scoring_func, scale, experts, table, inter, limit, w13, s13, w2, s2, up, res,
      post, comb):
    return torch.empty_like(res)


# ------------------------------------------------------------------ sparse_attention


@torch.library.custom_op("dsv4::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [b, s, h, d] over rows kv[b, idx[b, s, k]] (-1 = none) with a per-head sink -> [b, s, h, d]: the
    kernels for bf16 on a GPU (decode rows and prefill chunks), else the oracle."""
    from . import sparse_attention as kernel
    if kernel.fits(q, kv, idx.size(-1)):
        return kernel.sparse_attention_chunked(q.contiguous(), kv.contiguous(), sink.float().contiguous(),
                                               idx.long().contiguous(), scale)
    return sparse_attention_oracle(q, kv, sink, idx, scale)


@sparse_attention.register_fake
def _(q, kv, sink, idx, scale):
    return torch.empty_like(q)


@torch.library.custom_op("dsv4::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, picked: torch.Tensor | None,
                     pos: torch.Tensor, window: int, ratio: int, scale: float, rot: torch.Tensor) -> torch.Tensor:
    """A decode step's attention: q [b, s, h, d] at positions pos [b, s] over the rows of kv [b, T, d] that
    `plugins.oracle.decode_rows` names (the window ring's written slots, then ratio 4: the picked blocks [b, s,
    k], ratio 128: every complete block), then the inverse RoPE of the output's last r channels at each
    query's position (rot: the layer's table [max_len, r/2, 2]). One launch pair for decode rows on a GPU,
    which build the row list and read the table themselves (two launches of glue before them otherwise);
    else the oracle's steps."""
    from . import sparse_attention as kernel
    picks = picked.size(-1) if ratio == 4 else 0
    if kernel.supports(q, kv, kernel.decode_row_count(kv.size(1), window, ratio, picks)):
        return kernel.sparse_attention_decode(q.contiguous(), kv.contiguous(), sink.float().contiguous(),
                                              picked.long().contiguous() if ratio == 4 else None, scale,
                                              rot=rot.float().contiguous(), pos=pos.long().contiguous(),
                                              window=window, ratio=ratio)
    o = sparse_attention(q, kv, sink, decode_rows(pos, picked, window, ratio, kv.size(1)), scale)
    return with_rope(o, rot[pos], 2 * rot.size(-2), inverse=True)


@decode_attention.register_fake
def _(q, kv, sink, picked, pos, window, ratio, scale, rot):
    return torch.empty_like(q)


# ------------------------------------------------------------------ hc_pre


@torch.library.custom_op("dsv4::hc_pre", mutates_args=())
def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
           hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [b, s, hc, d] -> (y [b, s, d] like x, post [b, s, hc], comb [b, s, hc, hc] in working precision)."""
    from .hc_pre import hc_pre_decode, supports
    if supports(x, fn):
        return hc_pre_decode(x.contiguous(), fn.contiguous(), scale, base, norm_eps, hc_eps, iters)
    return hc_pre_parts(x, fn, scale, base, norm_eps, hc_eps, iters)


@hc_pre.register_fake
def _hc_pre_fake(x, fn, scale, base, norm_eps, hc_eps, iters):
    wide = wide_dtype(x.dtype)
    hc = x.size(-2)
    return (x.new_empty(*x.shape[:-2], x.size(-1)), x.new_empty(*x.shape[:-2], hc, dtype=wide),
            x.new_empty(*x.shape[:-2], hc, hc, dtype=wide))


@torch.library.custom_op("dsv4::hc_pre_norm", mutates_args=())
def hc_pre_norm(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, weight: torch.Tensor,
                norm_eps: float, hc_eps: float, iters: int,
                comb_beside: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_pre, its y then through RMSNorm (`weight`, norm_eps: the model's one rms_norm_eps serves both) ->
    (x [b, s, d] like x, post, comb): the layer's attn_norm / ffn_norm inside the same two launches on a GPU.
    `comb_beside` (the decode program, where comb's reader is `hc_post_pre_norm` or the MoE's post, which join
    the second stream first): on a GPU comb's Sinkhorn iterations may run there (plugins/hc_pre.py
    SINKHORN_BESIDE)."""
    from .hc_pre import hc_pre_decode, supports_norm
    if supports_norm(x, fn):
        return hc_pre_decode(x.contiguous(), fn.contiguous(), scale, base, norm_eps, hc_eps, iters,
                             norm=weight.float().contiguous(), comb_beside=comb_beside)
    y, post, comb = hc_pre_parts(x, fn, scale, base, norm_eps, hc_eps, iters)
    return rms_norm(y, weight, norm_eps), post, comb


@hc_pre_norm.register_fake
def _(x, fn, scale, base, weight, norm_eps, hc_eps, iters, comb_beside=False):
    return _hc_pre_fake(x, fn, scale, base, norm_eps, hc_eps, iters)


@torch.library.custom_op("dsv4::hc_post_pre_norm", mutates_args=())
def hc_post_pre_norm(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
                     scale: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, norm_eps: float, hc_eps: float,
                     iters: int, comb_beside: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """The attention's hyper-connection post (`plugins.oracle.hc_post` of f [b, s, d] over the streams res
    [b, s, hc, d] with post and comb), then `hc_pre_norm` of the new streams (the FFN's) -> (the new streams,
    x, post, comb): on a GPU the post inside hc_pre's first launch, where it was a launch of its own. comb may
    come from an `hc_pre_norm` with comb_beside (joined before it is read); `comb_beside` is the new comb's."""
    from .hc_pre import hc_post_pre_decode, supports_norm
    streams.join_pending(f.device)               # comb, before anything reads it
    if supports_norm(res, fn) and f.is_cuda and f.dtype == torch.bfloat16:
        return hc_post_pre_decode(f.contiguous(), res.contiguous(), post.float().contiguous(),
                                  comb.float().contiguous(), fn.contiguous(), scale, base,
                                  weight.float().contiguous(), norm_eps, hc_eps, iters, comb_beside)
    h = hc_post(f, res, post, comb)
    return (h, *hc_pre_norm(h, fn, scale, base, weight, norm_eps, hc_eps, iters, comb_beside))


@hc_post_pre_norm.register_fake
def _(f, res, post, comb, fn, scale, base, weight, norm_eps, hc_eps, iters, comb_beside=False):
    return (torch.empty_like(res, memory_format=torch.contiguous_format),
            *_hc_pre_fake(res, fn, scale, base, norm_eps, hc_eps, iters))


# ------------------------------------------------------------------ wide_linear


@torch.library.custom_op("dsv4::wide_linear", mutates_args=())
def wide_linear(x: torch.Tensor, weight: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] in working precision (float32 or float64; or bf16 activations, widened to float32 first,
    exactly) @ weight [N, K]^T -> [..., N] in that precision, for the official model's float32 parameters
    loaded from bf16 (the compressors' projections, the router's gate), kept here in their bf16: on a GPU
    the head's kernel reads them as such (half the bytes of the float32 copy, the same products, another
    float32 summation order), and widens bf16 rows itself as it loads them (no widening launch before it);
    elsewhere they are widened for the product. With `branch` (`fork_side`'s token), on the side branch."""
    rows = x.reshape(-1, x.size(-1))
    with _on_branch(branch):
        if (weight.dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
                and kernel_fits(rows.size(0), x.size(-1), x.device)):
            return head_logits(rows, weight).view(*x.shape[:-1], weight.size(0))
        x = x.float() if x.dtype == torch.bfloat16 else x
        return x @ weight.to(x.dtype).T


@wide_linear.register_fake
def _(x, weight, branch=None):
    return x.new_empty(*x.shape[:-1], weight.size(0), dtype=torch.float32 if x.dtype == torch.bfloat16 else x.dtype)


# ------------------------------------------------------------------ fork_side, join_side


@torch.library.custom_op("dsv4::fork_side", mutates_args=())
def fork_side(x: torch.Tensor) -> torch.Tensor:
    """Starts a side branch of x's device (plugins/streams.py, on a GPU with streams.SIDE_BRANCHES): its
    second stream waits for everything queued so far. Returns the branch's token (an empty tensor): the
    ops given it (`wide_linear`, `compressor_step`) launch on that stream, beside what the program queues
    on its own until `join_side`."""
    if x.is_cuda and streams.SIDE_BRANCHES:
        streams.fork(x.device)
    return x.new_empty(0)


@fork_side.register_fake
def _(x):
    return x.new_empty(0)


@torch.library.custom_op("dsv4::join_side", mutates_args=("written",))
def join_side(branch: torch.Tensor, keep: list[torch.Tensor], written: list[torch.Tensor]) -> None:
    """Ends the side branch of `branch` (`fork_side`'s token): the current stream waits for it. `keep`: the
    tensors the branch reads that the program made (not its inputs), held allocated until here; `written`:
    what the branch wrote (declared written here, so that every later reader is ordered after the join)."""
    if branch.is_cuda and streams.SIDE_BRANCHES:
        streams.join(branch.device)


@join_side.register_fake
def _(branch, keep, written):
    return None


@torch.library.custom_op("dsv4::written_after", mutates_args=("written",))
def written_after(written: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    """Nothing, declared as writing `written` after reading `after`: a program that reads a cache and then
    writes it again with no data path between the two (the verification program's first attention, then the
    second token's window row) passes the reader's output here and the cache, so that the write is ordered
    after the read and AOTInductor writes the cache in place, where it otherwise copied the whole cache and
    back around the write (builder/programs/verify.py)."""


@written_after.register_fake
def _(written, after):
    return None


def _on_branch(branch: torch.Tensor | None):
    """Where an op given `fork_side`'s token launches: the side stream, if that fork started one."""
    return streams.on_side(branch.device, branch.is_cuda and streams.SIDE_BRANCHES) if branch is not None \
        else contextlib.nullcontext()


# ------------------------------------------------------------------ route_topk, route_hash


@torch.library.custom_op("dsv4::route_topk", mutates_args=("experts",))
def route_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, scoring_func: str, scale: float,
               experts: torch.Tensor) -> torch.Tensor:
    """A score-routed gate from its logits [n, E] float32 -> weights [n, k] float32, its experts written into
    `experts` [n, k] int32 (a decode program's cache of the experts it routed to, which the runtime's pager
    reads: no copy after): one kernel launch for decode rows on a GPU (V4's scores), the oracle elsewhere."""
    if route_gpu.kernel_fits(logits, k, scoring_func) and experts.is_contiguous():
        return route_gpu.route_topk(logits, bias, k, scale, experts)[0]
    weights, picked = route_from_logits(logits, bias, k, scoring_func, scale)
    experts.copy_(picked)
    return weights


@route_topk.register_fake
def _(logits, bias, k, scoring_func, scale, experts):
    return logits.new_empty(logits.size(0), k, dtype=torch.float32)


@torch.library.custom_op("dsv4::route_hash", mutates_args=("experts",))
def route_hash(logits: torch.Tensor, tid2eid: torch.Tensor, ids: torch.Tensor, k: int, scoring_func: str,
               scale: float, experts: torch.Tensor) -> torch.Tensor:
    """A hash layer's gate from its logits [n, E] float32 and token ids [n] int64 -> weights [n, k] float32 (the
    scores at experts tid2eid[ids] ([V, k] int32 table), normalised), the experts written into `experts` [n, k]
    int32 as `route_topk` does: the same kernel launch on a GPU, the oracle elsewhere."""
    if (route_gpu.kernel_fits(logits, k, scoring_func) and experts.is_contiguous() and tid2eid.dtype == torch.int32
            and ids.dtype == torch.int64):
        return route_gpu.route_hash(logits, tid2eid, ids, k, scale, experts)[0]
    picked = tid2eid[ids]
    experts.copy_(picked)
    return route_weights(router_scores(logits, scoring_func), picked, scoring_func, scale)


@route_hash.register_fake
def _(logits, tid2eid, ids, k, scoring_func, scale, experts):
    return logits.new_empty(logits.size(0), k, dtype=torch.float32)


# ------------------------------------------------------------------ index_query


@torch.library.custom_op("dsv4::index_query", mutates_args=())
def index_query(q: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The indexer's queries q [B, S, heads, dim] at positions pos [B, S] after RoPE (rot: the layer's table
    [max_len, rope_dim/2, 2]), Hadamard and FP4 round-trip (see `plugins.oracle.index_query`): one launch for
    decode rows on a GPU, which reads the table at each position itself, the oracle elsewhere."""
    from . import indexer as kernel
    if kernel.supports_query(q, rot, rope_dim, pos):
        return kernel.index_query(q.contiguous(), rot.float().contiguous(), pos.long().contiguous())
    return index_query_oracle(q, rot[pos], rope_dim).contiguous()


@index_query.register_fake
def _(q, rot, pos, rope_dim):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ indexer_picks


@torch.library.custom_op("dsv4::indexer_picks", mutates_args=())
def indexer_picks(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, k: int, ratio: int,
                  weight_scale: float) -> torch.Tensor:
    """The indexer's top k compressed blocks [B, S, k] int64 (-1 = none) of queries q [B, S, heads, dim] at
    positions pos [B, S] over keys [B, T, dim], blocks t < (pos + 1) // ratio visible, with the raw head
    weights [B, S, heads] (see `plugins.oracle.indexer_picks`): two launches for decode rows in bf16 on a GPU
    (the weights' rounding and scale and the visible count inside them), the oracle elsewhere."""
    from . import indexer as kernel
    if kernel.supports(q, weights, keys, k):
        return kernel.indexer_picks(q.contiguous(), weights.contiguous(), keys.contiguous(), pos.long().contiguous(),
                                    k, ratio, weight_scale)
    return indexer_picks_oracle(q, weights, keys, pos, k, ratio, weight_scale)


@indexer_picks.register_fake
def _(q, weights, keys, pos, k, ratio, weight_scale):
    return q.new_empty(*q.shape[:2], k, dtype=torch.int64)


# ------------------------------------------------------------------ compressor_step


@torch.library.custom_op("dsv4::compressor_step", mutates_args=("kv_state", "score_state", "cache"))
def compressor_step(proj: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, kv_state: torch.Tensor,
                    score_state: torch.Tensor, cache: torch.Tensor, first_row: int, norm: torch.Tensor,
                    rot: torch.Tensor, ratio: int, rotate: bool, eps: float, rope_dim: int, fp8_block: int,
                    branch: torch.Tensor | None = None) -> None:
    """A compressor fed one token per sequence (see `plugins.oracle.compressor_step`): one launch for decode
    batches on a GPU, the oracle elsewhere. Mutates the partial-block states and the cache. With `branch`
    (`fork_side`'s token), on the side branch."""
    from . import compressor as kernel
    with _on_branch(branch):
        if kernel.supports(proj, cache, ratio, rope_dim, fp8_block) and all(
                t.is_contiguous() for t in (kv_state, score_state, cache)):
            kernel.compressor_step(proj.contiguous(), ape.float().contiguous(), pos.long().contiguous(), kv_state,
                                   score_state, cache, first_row, norm.float().contiguous(), rot.float().contiguous(),
                                   ratio, rotate, eps)
            return
        compressor_step_oracle(proj, ape, pos, kv_state, score_state, cache, first_row, norm, rot, ratio, rotate, eps,
                               rope_dim, fp8_block)


@compressor_step.register_fake
def _(proj, ape, pos, kv_state, score_state, cache, first_row, norm, rot, ratio, rotate, eps, rope_dim, fp8_block,
      branch=None):
    return None


# ------------------------------------------------------------------ compressor_chunk


@torch.library.custom_op("dsv4::compressor_chunk", mutates_args=("kv_state", "score_state", "cache"))
def compressor_chunk(proj: torch.Tensor, ape: torch.Tensor, start: torch.Tensor, n: torch.Tensor,
                     kv_state: torch.Tensor, score_state: torch.Tensor, cache: torch.Tensor, first_row: int,
                     norm: torch.Tensor, rot: torch.Tensor, ratio: int, rotate: bool, eps: float, rope_dim: int,
                     fp8_block: int) -> None:
    """A compressor fed a prefill chunk (see `plugins.oracle.compressor_chunk`): two launches on a GPU, the
    oracle elsewhere. Mutates the partial-block states and the cache."""
    from . import compressor as kernel
    if kernel.supports_chunk(proj, cache, ratio, rope_dim, fp8_block) and all(
            t.is_contiguous() for t in (kv_state, score_state, cache)):
        kernel.compressor_chunk(proj.contiguous(), ape.float().contiguous(), start.long().contiguous(),
                                n.long().contiguous(), kv_state, score_state, cache, first_row,
                                norm.float().contiguous(), rot.float().contiguous(), ratio, rotate, eps)
        return
    compressor_chunk_oracle(proj, ape, start, n, kv_state, score_state, cache, first_row, norm, rot, ratio, rotate,
                            eps, rope_dim, fp8_block)


@compressor_chunk.register_fake
def _(proj, ape, start, n, kv_state, score_state, cache, first_row, norm, rot, ratio, rotate, eps, rope_dim,
      fp8_block):
    return None


# ------------------------------------------------------------------ q_heads_kv_row


@torch.library.custom_op("dsv4::q_heads_kv_row", mutates_args=("cache",))
def q_heads_kv_row(q: torch.Tensor, kv: torch.Tensor, norm: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor,
                   cache: torch.Tensor, window: int, eps: float, rope_dim: int, fp8_block: int) -> torch.Tensor:
    """A decode step's query heads q [B, 1, heads, hd] through their norm and RoPE (`plugins.oracle.q_heads`),
    returned, and each sequence's new window row from kv [B, hd] (`plugins.oracle.kv_row`, with the kv norm's
    weight `norm`; mutates the cache), both at positions pos [B] (rot: the layer's table [max_len, rope_dim/2,
    2]): one launch on a GPU, which reads the table at each position itself; the oracles elsewhere."""
    from . import compressor as kernel
    if kernel.supports_q_heads(q, rot, rope_dim, pos[:, None]) and kernel.supports_kv_row(q, kv, cache, fp8_block):
        return kernel.q_heads_kv_row(q.contiguous(), kv, norm.float().contiguous(), rot.float().contiguous(),
                                     pos.long().contiguous(), cache, window, eps)
    kv_row_oracle(kv, norm, rot, pos, cache, window, eps, rope_dim, fp8_block)
    return q_heads_oracle(q, rot[pos[:, None]], eps, rope_dim).contiguous()


@q_heads_kv_row.register_fake
def _(q, kv, norm, rot, pos, cache, window, eps, rope_dim, fp8_block):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ rms_norm_rows, swiglu_rows


@torch.library.custom_op("dsv4::rms_norm_rows", mutates_args=())
def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., K] (see `plugins.oracle.rms_norm`): one launch on a GPU that lets the next kernel
    start early, the oracle elsewhere."""
    from . import rows
    if rows.supports_norm(x, weight):
        return rows.rms_norm_rows(x, weight.float().contiguous(), eps)
    return rms_norm(x, weight, eps).contiguous()


@rms_norm_rows.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsv4::swiglu_rows", mutates_args=())
def swiglu_rows(y: torch.Tensor, size: int, up: int, limit: float) -> torch.Tensor:
    """The clamped SwiGLU of a stacked gate | up product (see `plugins.oracle.swiglu_stacked`): one launch on a
    GPU that lets the next kernel start early, the oracle elsewhere."""
    from . import rows
    if rows.supports_swiglu(y, size, up):
        return rows.swiglu_rows(y, size, up, limit)
    return swiglu_stacked(y, size, up, limit).contiguous()


@swiglu_rows.register_fake
def _(y, size, up, limit):
    return y.new_empty(*y.shape[:-1], size)


# ------------------------------------------------------------------ grouped_fp8_linear


@torch.library.custom_op("dsv4::grouped_fp8_linear", mutates_args=())
def grouped_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [b, s, G, D] -> [b, s, G, R] in x's dtype: group g's rows weight[g*R:(g+1)*R] (float8_e4m3fn, E8M0
    scales [G*R/128, D/128] or their bytes) applied to x[..., g, :] with no activation quantisation. This is
    DeepSeek's wo_a, which its convert.py dequantises to bf16 and the model applies as a bf16 grouped einsum:
    the same here, or on a GPU the kernel reading the FP8 codes (exact in bf16: the same products)."""
    from .grouped_linear import grouped_fp8_gemv, supports
    if supports(x, weight):
        return grouped_fp8_gemv(x.contiguous(), weight, scale.contiguous())
    w = fp8_weight_dequant(weight, scale.view(torch.float8_e8m0fnu)).to(torch.bfloat16).to(x.dtype)
    # contiguous, as the fake: einsum may return a permuted view, and a compiled caller reads the strides it
    # traced (an AOTInductor package got wrong values from the permuted output)
    return einsum("bsgd,grd->bsgr", x, w.view(x.size(-2), -1, x.size(-1))).contiguous()


@grouped_fp8_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.size(0) // x.size(-2))
