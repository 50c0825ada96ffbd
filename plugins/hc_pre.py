"""Hyper-connection pre for decode on the GPU (csrc/hc_pre.cu): the mixes over slices of the flattened
streams, then Sinkhorn and the weighted sum of streams (optionally through the RMSNorm that follows it in
the layer); two launches. Where the caller allows it (`comb_beside`: comb's reader joins the second stream
of plugins/streams.py first, as the decode program's readers do) and SINKHORN_BESIDE is on, the Sinkhorn
iterations run on that stream instead (a third launch, off the decode step's chain: comb is read only by
the sub-layer's hyper-connection post).

Oracle: `plugins.oracle.hc_pre_parts` (then `plugins.oracle.rms_norm`). Pass `out` and `workspace` to launch
without allocating.
"""
from __future__ import annotations

import torch

from . import streams
from .loader import FLOAT, INT, PTR, kernels

HC, MIXES, SLICE, MAX_ROWS = 4, 24, 256, 16          # csrc/hc_pre.cu
NORM_D = 8 * 256 * 4                                 # csrc/hc_pre.cu NORM_STEPS x 256 threads x 4
# Whether comb's Sinkhorn iterations run beside the chain where the caller allows it (`comb_beside`): about
# 1.4 us of dependent shuffles and divisions were the finish launch's critical path, 17 times a Flash-8 step
# (bench/results/decode-chain-links-s27-h200.json). Written in session 27; on since session 28, whose
# Flash-8 profile took the step from 1.387 to 1.316 ms (bench/results/profile-decode-flash8-s28-h200.json)
# and whose GPU tests gave the same bits as in line. A runtime switch (bench/profile_decode.py turns it).
SINKHORN_BESIDE = True


def supports(x: torch.Tensor, fn: torch.Tensor) -> bool:
    """x [..., hc, d]: bf16 on a GPU, 4 streams, at most 16 rows, hc*d in 256-element slices."""
    rows = x.numel() // (x.size(-1) * x.size(-2)) if x.dim() >= 2 else 0
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.size(-2) == HC and fn.shape == (MIXES, HC * x.size(-1))
            and 1 <= rows <= MAX_ROWS and (HC * x.size(-1)) % SLICE == 0)


def make_workspace(rows: int, d: int, device) -> torch.Tensor:
    """Per slice and row: the 24 partial mixes and the partial sum of squares."""
    return torch.empty(HC * d // SLICE * rows * (MIXES + 1), dtype=torch.float32, device=device)


def supports_norm(x: torch.Tensor, fn: torch.Tensor) -> bool:
    """As `supports`, for the form that also applies the RMSNorm: d <= 8192."""
    return supports(x, fn) and x.size(-1) <= NORM_D and x.size(-1) % 4 == 0


def head_as_hc_pre(fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> list[torch.Tensor]:
    """The model's hc_head weights (fn [hc, hc*d], scale [1], base [hc]) in hc_pre's form (fn [24, hc*d],
    scale [3], base [24]): hc_head is hc_pre's `pre` half (sigmoid(mix * scale + base) + eps, then the weighted
    sum of the streams), so with zero rows after its own the hc_pre kernels' y is hc_head's (their post and
    comb are to be ignored; no Sinkhorn iterations are needed)."""
    hc = fn.size(0)
    return [torch.cat([fn, fn.new_zeros(MIXES - hc, fn.size(1))]).contiguous(),
            torch.cat([scale, scale.new_zeros(2)]), torch.cat([base, base.new_zeros(MIXES - hc)])]


def hc_pre_decode(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
                  hc_eps: float, iters: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  workspace: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                  comb_beside: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., 4, d] bf16, fn [24, 4d], scale [3], base [24] float32 -> y [..., d] bf16, post [..., 4],
    comb [..., 4, 4] float32. All contiguous. With `norm` ([d] float32), y comes out through RMSNorm with
    that weight and `norm_eps` (one CTA finishes: d <= 8192). `comb_beside`: comb's reader calls
    streams.join_pending first, so comb may be finished on the second stream (SINKHORN_BESIDE)."""
    assert (supports_norm if norm is not None else supports)(x, fn) and x.is_contiguous() and fn.is_contiguous()
    assert fn.dtype == torch.float32 and (norm is None or (norm.dtype == torch.float32 and norm.is_contiguous()))
    d = x.size(-1)
    rows = x.numel() // (HC * d)
    part = make_workspace(rows, d, x.device) if workspace is None else workspace
    y, post, comb = _outputs(x) if out is None else out
    _finish(x, _mix("dsv4_hc_pre_mix", x, fn, part, rows, []), scale, base, norm, y, post, comb, norm_eps, hc_eps,
            iters, comb_beside)
    return y, post, comb


def hc_post_pre_decode(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
                       scale: torch.Tensor, base: torch.Tensor, norm: torch.Tensor, norm_eps: float, hc_eps: float,
                       iters: int, comb_beside: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """The attention's hyper-connection post (f [..., d] bf16, res [..., 4, d] bf16, post [..., 4], comb
    [..., 4, 4] float32: `plugins.oracle.hc_post`), then the FFN's hc_pre with its norm, as `hc_pre_decode`
    (norm given) -> (the new streams [..., 4, d], y, post, comb): the post inside the mix launch, two
    launches where three ran. All contiguous. `comb_beside` as in `hc_pre_decode` (the new comb's; a comb read
    here that an hc_pre finished beside is joined by the caller, dsv4::hc_post_pre_norm)."""
    assert supports_norm(res, fn) and res.is_contiguous() and fn.is_contiguous() and f.is_contiguous()
    assert f.shape == res.shape[:-2] + res.shape[-1:] and f.dtype == torch.bfloat16
    assert post.dtype == comb.dtype == torch.float32 and post.is_contiguous() and comb.is_contiguous()
    d = res.size(-1)
    rows = res.numel() // (HC * d)
    x = torch.empty_like(res)
    y, post_out, comb_out = _outputs(res)
    part = make_workspace(rows, d, res.device)
    _mix("dsv4_hc_post_pre_mix", x, fn, part, rows, [(f, PTR), (res, PTR), (post, PTR), (comb, PTR)])
    _finish(x, part, scale, base, norm, y, post_out, comb_out, norm_eps, hc_eps, iters, comb_beside)
    return x, y, post_out, comb_out


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New y [..., d] (x's dtype), post [..., 4] and comb [..., 4, 4] (float32) for streams x [..., 4, d]."""
    lead = x.shape[:-2]
    return (x.new_empty(*lead, x.size(-1)), torch.empty(*lead, HC, dtype=torch.float32, device=x.device),
            torch.empty(*lead, HC, HC, dtype=torch.float32, device=x.device))


def _mix(name: str, x: torch.Tensor, fn: torch.Tensor, part: torch.Tensor, rows: int, extra: list) -> torch.Tensor:
    """The mix launch over x's slices (csrc/hc_pre.cu); `extra`: the post's inputs (dsv4_hc_post_pre_mix)."""
    d = x.size(-1)
    kernels().launch(name, HC * d // SLICE, 256, [(x, PTR), (fn, PTR), (part, PTR), (rows, INT), (HC * d, INT)] + extra)
    return part


def _finish(x, part, scale, base, norm, y, post, comb, norm_eps: float, hc_eps: float, iters: int,
            comb_beside: bool = False) -> None:
    """The finish launch (csrc/hc_pre.cu); with `comb_beside` (and iterations to run) its _beside form writes
    comb's logits and dsv4_hc_pre_sinkhorn finishes comb on the second stream, forked here for comb's reader
    to join."""
    d = x.size(-1)
    rows = x.numel() // (HC * d)
    later = comb_beside and SINKHORN_BESIDE and iters > 0 and streams.SIDE_BRANCHES
    lib = kernels()
    lib.launch("dsv4_hc_pre_finish_beside" if later else "dsv4_hc_pre_finish", -(-d // 1024) if norm is None else 1,
               256, [(x, PTR), (part, PTR), (scale, PTR), (base, PTR), (0 if norm is None else norm, PTR), (y, PTR),
                     (post, PTR), (comb, PTR), (rows, INT), (d, INT), (HC * d // SLICE, INT), (norm_eps, FLOAT),
                     (hc_eps, FLOAT), (iters, INT)])
    if later:
        streams.fork_for_later(x.device)
        with streams.on_side(x.device):
            lib.launch("dsv4_hc_pre_sinkhorn", 1, 256, [(comb, PTR), (rows, INT), (hc_eps, FLOAT), (iters, INT)])
