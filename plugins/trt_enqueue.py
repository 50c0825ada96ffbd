"""The GPU side of the TensorRT plugins: TensorRT's raw pointers and stream -> the same launch functions the
torch ops call (plugins/fp8_linear.py, plugins/moe_experts.py), so no kernel exists twice.

TensorRT's buffers are wrapped as torch tensors without copying (`__cuda_array_interface__`), its stream
is made torch's current stream for the call (the loader launches on the current stream), and outputs and
scratch are TensorRT's own memory: nothing here allocates or synchronises (SparseAttention excepted: it
has no kernel yet and runs the torch oracle, as `dsv4::sparse_attention` does on CUDA).
"""
from __future__ import annotations

import torch

from . import plugin_specs as ps

_TORCH = {ps.FLOAT: torch.float32, ps.FLOAT16: torch.float16, ps.BFLOAT16: torch.bfloat16, ps.UINT8: torch.uint8,
          ps.INT32: torch.int32, ps.INT64: torch.int64, ps.DOUBLE: torch.float64,
          ps.FLOAT8E4M3FN: torch.float8_e4m3fn, ps.FLOAT8E8M0: torch.float8_e8m0fnu}
# typestr of a same-sized type the array interface knows (it has no bfloat16)
_TYPESTR = {1: "|u1", 2: "<u2", 4: "<u4", 8: "<u8"}


class _Device:
    """A raw device pointer as an object torch can view (`torch.as_tensor(..., device='cuda')`)."""

    def __init__(self, ptr: int, shape: list[int], itemsize: int):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": _TYPESTR[itemsize],
                                         "data": (int(ptr), False), "version": 2}


def view(ptr: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor over TensorRT's memory at `ptr` (no copy)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.as_tensor(_Device(ptr, shape, itemsize), device="cuda").view(dtype)


def workspace_layout(spec: ps.PluginSpec, shapes: list[list[int]], fields: dict | None = None
                     ) -> dict[str, tuple[list[int], torch.dtype, int]]:
    """Scratch tensors a plugin carves from TensorRT's workspace: name -> (shape, dtype, bytes rounded to
    256), taken from the kernels' own `make_workspace` (on the meta device), so the two cannot drift."""
    from . import fp8_linear, moe_experts, sparse_attention
    if spec.name == "Fp8Linear":
        m = 1
        for s in shapes[0][:-1]:
            m *= s
        codes, scales = fp8_linear.make_workspace(m, shapes[0][-1], "meta")
        parts = {"codes": codes, "scales": scales}
    elif spec.name == "MoeRouted":
        (t, d), k = shapes[0], shapes[1][1]
        parts = moe_experts.make_workspace(t, k, d, int((fields or {})["inter"]), "meta")
    elif spec.name == "SparseAttention":
        (b, s, h, d), k = shapes[0], shapes[3][-1]
        parts = sparse_attention.make_workspace(b * s, h, d, k, "meta")
    else:
        parts = {}
    return {name: (list(x.shape), x.dtype, (x.numel() * x.element_size() + 255) // 256 * 256)
            for name, x in parts.items()}


def _carve(workspace: int, layout) -> dict[str, torch.Tensor]:
    at, out = workspace, {}
    for name, (shape, dtype, nbytes) in layout.items():
        out[name] = view(at, shape, dtype)
        at += nbytes
    return out


def enqueue(spec: ps.PluginSpec, fields: dict, ins: list[tuple[list[int], int]], outs: list[tuple[list[int], int]],
            in_ptrs: list[int], out_ptrs: list[int], workspace: int, stream: int) -> None:
    x = [view(p, shape, _TORCH[elem]) for p, (shape, elem) in zip(in_ptrs, ins)]
    y = view(out_ptrs[0], outs[0][0], _TORCH[outs[0][1]])
    ws = _carve(workspace, workspace_layout(spec, [s for s, _ in ins], fields))
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        if spec.name == "Fp8Linear":
            from .fp8_linear import fp8_linear_decode
            rows = x[0].reshape(-1, x[0].size(-1))
            fp8_linear_decode(rows, x[1].view(torch.float8_e4m3fn), x[2].view(torch.float8_e8m0fnu),
                              out=y.view(rows.size(0), -1), workspace=(ws["codes"], ws["scales"]))
        elif spec.name == "MoeRouted":
            from .moe_experts import moe_experts_decode
            moe_experts_decode(x[0], x[1], x[2], x[3], int(fields["inter"]), float(fields["limit"]), out=y,
                               workspace=ws)
        elif spec.name == "SparseAttention":
            from .sparse_attention import sparse_attention_decode, supports
            if supports(x[0], x[1], x[3].size(-1)) and x[3].dtype == torch.int64:
                sparse_attention_decode(x[0], x[1], x[2], x[3], float(fields["scale"]), out=y, workspace=ws)
            else:                             # float32 engines, int32 indices: the oracle (it allocates)
                from .oracle import sparse_attention
                y.copy_(sparse_attention(x[0], x[1], x[2], x[3], float(fields["scale"])))
        elif spec.name == "BitCast":
            y.view(torch.uint8).copy_(x[0].view(torch.uint8))
        else:
            raise KeyError(spec.name)
