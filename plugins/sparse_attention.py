"""Sparse attention with a sink on the GPU (csrc/sparse_attention.cu): a split launch that gathers each
split's rows once for every head and runs both products on tensor cores, and a combine launch. Decode takes
one launch pair; a prefill chunk takes one pair per group of `prefill_group` queries
(`sparse_attention_chunked`). Decode in one launch (split and combine in a thread-block cluster, the partial
rows in shared memory) was correct and slower in two forms on the H200 (sessions 36 and 37; README, patch in
bench/results/attention-one-launch-s37.patch).

Oracle: `plugins.oracle.sparse_attention`. Pass `workspace` (from `make_workspace`) to launch without
allocating.
"""
from __future__ import annotations

import torch

from .loader import FLOAT, INT, PTR, device_index, kernels, sm_count

ROWS, MAX_SPLITS, ROW_PAD = 32, 2048, 8     # csrc/sparse_attention.cu: indices per split, splits, row padding
PREFILL_ROWS = 64                            # indices per split in a prefill chunk (the `_r64` kernels: faster there)
MAX_QUERIES = 16                             # decode sizes: one launch pair
PREFILL_QUERIES = 32                         # more queries than this: a prefill chunk, in launch pairs
# A prefill chunk's launch pairs take as many queries as this workspace holds (splits x heads x d floats
# each): 76 at Flash's 640 rows, 5 at 8320 (a ratio-128 layer at 1M tokens, where 32 queries took 545 MB).
# Session 26, H200, a 256-query Flash chunk: 32 or 33 queries a pair kept the GPU waiting on the host's
# launches (0.57 ms of host time, 0.58 in all), 76 hardly (0.28 and 0.42 ms), 153 0.16 and 0.38 ms
# (bench/results/attention-prefill-groups-s26-h200.txt).
PREFILL_WORKSPACE_BYTES = 96 << 20
CHUNKS = (1, 2, 4)                           # head_dim / 128 the kernel is built for
MAX_HEADS = 128                              # a warp per 16 heads, 8 warps
# Warps (16 heads each) per CTA of a split launch whose CTAs fit the GPU at once (decode): each CTA writes its
# heads' float32 partial rows (2 KB a head), and an SM writes them far slower than it reads: one CTA for all
# 64 Flash heads wrote 128 KB, and halving that took 1.0-1.3 us off the launch pair at 128 and 640 rows, the
# same bits (H200, bench/results/attention-pairs-s34-h200.json; one warp a CTA gained nothing on two).
DECODE_WARPS_PER_CTA = 2


def fits(q: torch.Tensor, kv: torch.Tensor, k: int) -> bool:
    """Whether the kernels take q [b, s, h, d] over kv rows with k indices per query (any number of queries:
    `supports` says which fit one launch pair)."""
    d = q.size(-1)
    return (q.is_cuda and q.dtype == kv.dtype == torch.bfloat16 and d % 128 == 0 and d // 128 in CHUNKS
            and kv.size(-1) == d and k <= ROWS * MAX_SPLITS and q.size(2) <= MAX_HEADS)


def supports(q: torch.Tensor, kv: torch.Tensor, k: int) -> bool:
    """Whether one launch pair (`sparse_attention_decode`) takes q [b, s, h, d]: decode sizes."""
    return fits(q, kv, k) and q.size(0) * q.size(1) <= MAX_QUERIES


def make_workspace(queries: int, heads: int, d: int, k: int, device, rows: int = ROWS) -> dict[str, torch.Tensor]:
    """Per (query, split, head): the split's unnormalised output row (acc) and its maximum and normaliser;
    `rows` indices per split."""
    splits = -(-k // rows)
    return {"acc": torch.empty(queries * splits * heads * d, dtype=torch.float32, device=device),
            "ml": torch.empty(queries * splits * heads * 2, dtype=torch.float32, device=device)}


def workspace_bytes(queries: int, heads: int, d: int, k: int, rows: int = ROWS) -> int:
    """The size of `make_workspace`'s tensors: float32 acc (d) and ml (2) per (query, split, head)."""
    return queries * -(-k // rows) * heads * (d + 2) * 4


def prefill_group(batch: int, queries: int, heads: int, d: int, k: int) -> int:
    """Queries of each sequence per launch pair of a prefill chunk (`batch` sequences of `queries` queries
    over k indices): as many as PREFILL_WORKSPACE_BYTES holds, at least one."""
    per_query = workspace_bytes(batch, heads, d, k, PREFILL_ROWS)
    return max(1, min(queries, PREFILL_WORKSPACE_BYTES // per_query))


def warps_per_cta(splits: int, queries: int, warps: int, sms: int) -> int:
    """Warps per CTA of the split launch (CTAs along z share a split's heads): DECODE_WARPS_PER_CTA where all
    the launch's CTAs then fit one wave of `sms` SMs (more CTAs each gather the same rows again; at 2176 rows,
    136 CTAs on 132 SMs, the pair took 0.9 us longer), else every warp in one CTA (and so prefill chunks)."""
    per_cta = min(warps, DECODE_WARPS_PER_CTA)
    return per_cta if splits * queries * -(-warps // per_cta) <= sms else warps


def decode_row_count(t: int, window: int, ratio: int, picks: int) -> int:
    """How many rows a decode step's query attends to in a cache of t rows (`plugins.oracle.decode_rows`)."""
    return window + (picks if ratio == 4 else t - window if ratio else 0)


def sparse_attention_decode(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor | None,
                            scale: float, out: torch.Tensor | None = None,
                            workspace: dict[str, torch.Tensor] | None = None, rot: torch.Tensor | None = None,
                            pos: torch.Tensor | None = None, window: int = 0, ratio: int = 0,
                            rows: int = ROWS) -> torch.Tensor:
    """q [b, s, h, d] bf16 over rows kv[b, idx[b, s, k]] (kv [b, T, d] bf16; idx int64, -1 = none) with a
    per-head sink [h] float32 -> [b, s, h, d] bf16. All contiguous. With `rot` [b, s, r/2, 2] float32 (cos,
    sin), the output's last r channels are rotated back (the inverse RoPE) as they are combined.
    With `pos` [b, s] int64 (the queries' positions), the split launch takes the decode step's rows itself
    (`plugins.oracle.decode_rows` of `window` and `ratio`; idx: ratio 4's picked blocks [b, s, picks], else
    unused) and `rot` is the layer's whole table [max_len, r/2, 2], read at each query's position. `rows`:
    indices per split, ROWS or PREFILL_ROWS (the workspace's splits must be made for the same)."""
    b, s, h, d = q.shape
    t = kv.size(1)
    if pos is None:
        assert idx is not None and idx.shape[:2] == (b, s) and idx.dtype == torch.int64 and idx.is_contiguous()
        k = idx.size(-1)
    else:
        assert pos.shape == (b, s) and pos.dtype == torch.int64 and pos.is_contiguous()
        picks = idx.size(-1) if ratio == 4 else 0
        assert ratio != 4 or (idx.shape == (b, s, picks) and idx.dtype == torch.int64 and idx.is_contiguous())
        k = decode_row_count(t, window, ratio, picks)
    assert fits(q, kv, k) and sink.numel() == h
    assert q.is_contiguous() and kv.is_contiguous() and sink.dtype == torch.float32
    assert rows in (ROWS, PREFILL_ROWS)
    if rot is not None:
        assert rot.dtype == torch.float32 and rot.is_contiguous()
        assert pos is not None or rot.numel() == b * s * rot.size(-2) * 2
    out = torch.empty_like(q) if out is None else out
    lib = kernels()
    splits, warps = -(-k // rows), -(-h // 16)
    ws = make_workspace(b * s, h, d, k, q.device, rows) if workspace is None else workspace
    acc, ml = ws["acc"], ws["ml"]
    per_cta = warps_per_cta(splits, b * s, warps, sm_count(device_index(q.device)))
    suffix = "" if rows == ROWS else f"_r{rows}"
    lib.launch(f"dsv4_sparse_attention_split_d{d // 128}{suffix}", (splits, b * s, -(-warps // per_cta)), 32 * per_cta,
               [(q, PTR), (kv, PTR), (0 if idx is None else idx, PTR), (acc, PTR), (ml, PTR), (s, INT), (h, INT),
                (t, INT), (k, INT), (scale, FLOAT), (0 if pos is None else pos, PTR), (window, INT), (ratio, INT)],
               rows * (d + ROW_PAD) * 2)
    lib.launch("dsv4_sparse_attention_combine", (h, b * s), 128,             # 4 elements a thread: d <= 512
               [(acc, PTR), (ml, PTR), (sink, PTR), (out, PTR), (h, INT), (d, INT), (splits, INT),
                (0 if rot is None else rot, PTR), (0 if rot is None else 2 * rot.size(-2), INT),
                (0 if pos is None else pos, PTR)])
    return out


def sparse_attention_chunked(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """`sparse_attention_decode` over any number of queries: one launch pair up to PREFILL_QUERIES (decode),
    else `prefill_group` queries at a time through one workspace (prefill chunks), with no gathered copy of
    each query's rows as the oracle makes. Allocates without a workspace (prefill runs outside CUDA graphs)."""
    b, s, h, d = q.shape
    if s <= PREFILL_QUERIES:                     # decode: one launch pair, nothing to join
        return sparse_attention_decode(q, kv, sink, idx, scale)
    group = prefill_group(b, s, h, d, idx.size(-1))
    ws = make_workspace(b * group, h, d, idx.size(-1), q.device, PREFILL_ROWS)
    return torch.cat([sparse_attention_decode(q[:, i:i + group].contiguous(), kv, sink,
                                              idx[:, i:i + group].contiguous(), scale, workspace=ws,
                                              rows=PREFILL_ROWS)
                      for i in range(0, s, group)], dim=1)
