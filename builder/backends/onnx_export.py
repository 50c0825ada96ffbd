"""Layer program -> ONNX: standard ops as standard ONNX, the `dsv4::` ops as nodes of domain `dsv4`
that TensorRT's ONNX parser maps to our plugins (node op_type = plugin name, attributes
`plugin_version`, `plugin_namespace`, and the plugin fields; see plugins/plugin_specs.py).

I/O contract of an exported layer (names are the ONNX graph's, B = decode batch, dim `batch`):
    inputs   h [B, hc, d], pos [B] i64, ids [B] i64, table [E] i64,
             cache_<name> (see decode.new_caches), w_<name> (decode.layer_weights, wo_a in bf16; '.' -> '_',
             FP8 weights as float8e4m3fn, E8M0 scales as their bytes typed float8e4m3fn)
    outputs  out (h' [B, hc, d]), new_cache_<name> for every cache
The program mutates its caches in place; ONNX has no in-place writes, so each cache comes back as an
explicit output holding the whole updated cache (the executor binds it to a second buffer set and swaps).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from plugins import plugin_specs as ps
from plugins.grouped_linear import wo_a_as_bf16

from ..programs import decode
from .export_math import onnx_friendly

log = logging.getLogger(__name__)
OPSET = 20              # Cast to float8 (the FP8 round-trips) needs >= 19
_RAW = (torch.float8_e4m3fn, torch.float8_e8m0fnu)
# E8M0 scales arrive as E8M0 or as their uint8 bytes (decode.layer_weights; the only uint8 weights).
# uint8 must not reach TensorRT: no plugin accepts it, and TensorRT-RTX 1.7 then corrupts its heap
# (`malloc_consolidate(): invalid chunk size`) instead of reporting the unsupported format.
_SCALE_BYTES = (torch.float8_e8m0fnu, torch.uint8)


def register_schemas() -> None:
    """Declare the dsv4 ops to onnx, so onnxscript can emit them and onnx.checker can check them."""
    from onnx import defs
    if defs.has("Fp8Linear", ps.DOMAIN):
        return
    schema = defs.OpSchema
    kinds = {"int": schema.AttrType.INT, "float": schema.AttrType.FLOAT}
    types = ["tensor(float)", "tensor(double)", "tensor(bfloat16)", "tensor(float16)", "tensor(uint8)", "tensor(float8e4m3fn)",
             "tensor(int32)", "tensor(int64)"]
    for spec in ps.SPECS.values():
        attrs = [schema.Attribute(f.name, kinds[f.kind], "plugin field") for f in spec.fields]
        attrs += [schema.Attribute(a, schema.AttrType.STRING, "TensorRT plugin lookup")
                  for a in ("plugin_version", "plugin_namespace")]
        defs.register_schema(schema(
            spec.name, ps.DOMAIN, int(ps.VERSION), doc=f"dsv4 plugin {spec.name}",
            inputs=[schema.FormalParameter(n, f"T{i}") for i, n in enumerate(spec.inputs)],
            outputs=[schema.FormalParameter("y", "Y")],
            type_constraints=[(f"T{i}", types, "") for i in range(len(spec.inputs))] + [("Y", types, "")],
            attributes=attrs))


def _translations() -> dict:
    """torch op -> onnxscript function emitting the plugin node (and one float64 workaround)."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir
    import onnxscript
    from onnxscript import opset20 as op
    register_schemas()
    dsv4 = onnxscript.values.Opset(ps.DOMAIN, int(ps.VERSION))
    lookup = {"plugin_version": ps.VERSION, "plugin_namespace": ps.NAMESPACE}

    def fp8_linear(x, weight, scale):
        return dsv4.Fp8Linear(x, weight, scale, **lookup)

    def moe_routed(x, experts, weights, table, inter: int, limit: float):
        return dsv4.MoeRouted(x, experts, weights, table, inter=inter, limit=limit, **lookup)

    def sparse_attention(q, kv, sink, idx, scale: float):
        return dsv4.SparseAttention(q, kv, sink, idx, scale=scale, **lookup)

    def bitcast(x, dtype: int):
        return dsv4.BitCast(x, to=int(dtype), **lookup)

    def softplus(x, beta: float = 1.0, threshold: float = 20.0):
        """onnxruntime has no float64 Softplus on CPU: spelt out there, TensorRT keeps its own op."""
        if x.dtype != ir.DataType.DOUBLE:
            return op.Softplus(op.Mul(x, op.CastLike(beta, x))) / op.CastLike(beta, x) if beta != 1.0 \
                else op.Softplus(x)
        bx = op.Mul(x, op.CastLike(beta, x))
        soft = op.Div(op.Log(op.Add(op.Exp(bx), op.CastLike(1.0, x))), op.CastLike(beta, x))
        return op.Where(op.Greater(bx, op.CastLike(threshold, x)), x, soft)

    def to_copy(x, dtype: int = -1, layout: str = "", device: str = "", pin_memory: bool = False,
                non_blocking: bool = False, memory_format: str = ""):
        """Casts, with float8 ones as QuantizeLinear / DequantizeLinear at scale 1 (the same rounding and
        saturation): TensorRT takes FP8 tensors only from and into Q/DQ layers."""
        f8, one = ir.DataType.FLOAT8E4M3FN, op.Constant(value=ir.tensor(1.0, dtype=ir.DataType.FLOAT))
        if dtype == -1 or dtype == x.dtype:
            return op.Identity(x)
        if dtype == f8:
            zero = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))
            return op.QuantizeLinear(op.CastLike(x, one) if x.dtype != ir.DataType.FLOAT else x, one, zero)
        if x.dtype == f8:
            y = op.DequantizeLinear(x, one)
            return y if dtype == ir.DataType.FLOAT else op.Cast(y, to=dtype)
        return op.Cast(x, to=dtype)

    return {torch.ops.aten._to_copy.default: to_copy, torch.ops.aten.softplus.default: softplus, torch.ops.dsv4.fp8_linear.default: fp8_linear, torch.ops.dsv4.moe_routed.default: moe_routed,
            torch.ops.dsv4.sparse_attention.default: sparse_attention, torch.ops.aten.view.dtype: bitcast}


class Functional(torch.nn.Module):
    """The layer program with its cache writes turned into outputs: (out, *new caches), inputs untouched."""

    def __init__(self, program: torch.nn.Module, cache_names: list[str]):
        super().__init__()
        self.program, self.cache_names = program, cache_names

    def forward(self, h, pos, ids, table, caches, weights):
        caches = {k: caches[k].clone() for k in self.cache_names}
        out = self.program(h, pos, ids, table, caches, weights)
        return (out, *(caches[k] for k in self.cache_names))


@dataclass
class LayerInputs:
    """Example inputs of one layer program (batch B) plus what keeps the expert table's memory alive."""
    args: tuple
    keep: list


def example_inputs(cfg, get, layer: int, act: torch.dtype, max_len: int, batch: int) -> LayerInputs:
    table, keep = decode.expert_table(get, cfg, layer)
    caches = decode.new_caches(cfg, layer, batch, max_len, act)
    g = torch.Generator().manual_seed(layer)
    h = torch.randn(batch, cfg.hc_mult, cfg.hidden_size, generator=g).to(act)
    pos = torch.arange(batch, dtype=torch.int64) * 7 + 3
    ids = torch.arange(batch, dtype=torch.int64) * 5 + 1
    weights = wo_a_as_bf16(decode.layer_weights(cfg, get, layer, act), act)
    return LayerInputs((h, pos, ids, table, caches, weights), keep)


def io_names(caches: dict, weights: dict) -> tuple[list[str], list[str]]:
    """ONNX input and output names, in graph order (the contract in the module docstring)."""
    def flat(name: str) -> str:
        return name.replace(".", "_")
    inputs = ["h", "pos", "ids", "table", *(f"cache_{k}" for k in caches), *(f"w_{flat(k)}" for k in weights)]
    return inputs, ["out", *(f"new_cache_{k}" for k in caches)]


def feeds(h, pos, ids, table, caches, weights) -> dict[str, torch.Tensor]:
    """The ONNX inputs, by name, for one call of the layer program (FP8/E8M0 as uint8: numpy has neither;
    onnx_reference runs a copy whose FP8 inputs are typed uint8)."""
    names, _ = io_names(caches, weights)
    return dict(zip(names, [h, pos, ids, table, *caches.values(), *raw_bytes(weights).values()]))


def raw_bytes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 and E8M0 tensors as their uint8 bytes."""
    return {k: v.view(torch.uint8) if v.dtype in _RAW else v for k, v in weights.items()}


def export_layer(program: torch.nn.Module, inputs: LayerInputs, path: str | Path, dynamic_batch: bool = True,
                 max_batch: int = 64):
    """Export one layer program to `path` (ONNX, weights not embedded: they are graph inputs), its batch
    dynamic up to `max_batch` (the example inputs' batch must be above 1: torch.export specialises 1).
    Returns the onnx ModelProto."""
    import onnx
    h, pos, ids, table, caches, weights = inputs.args
    names_in, names_out = io_names(caches, weights)
    wrapper = Functional(program, list(caches))
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2)) if dynamic_batch else None
    shapes = None
    if batch is not None:
        shapes = ({0: batch}, {0: batch}, {0: batch}, None, {k: {0: batch} for k in caches},
                  {k: None for k in weights})
    with onnx_friendly():
        exported = torch.export.export(wrapper, (h, pos, ids, table, caches, weights), dynamic_shapes=shapes)
    for node in exported.graph.nodes:            # E8M0 scales become FP8-typed bytes (see plugin_specs)
        if node.op == "placeholder" and node.meta["val"].dtype in _SCALE_BYTES:
            node.meta["val"] = node.meta["val"].view(torch.float8_e4m3fn)
    onnx_program = torch.onnx.export(exported, (), dynamo=True, custom_translation_table=_translations(),
                                     opset_version=OPSET, optimize=True, verbose=False)
    _type_plugin_outputs(onnx_program.model)
    model = onnx_program.model_proto
    _rename(model, names_in, names_out)
    model.opset_import.append(onnx.helper.make_opsetid(ps.DOMAIN, int(ps.VERSION)))
    model = _dedupe_opsets(model)
    onnx.save(model, str(path))
    return model


def _type_plugin_outputs(model) -> None:
    """The exporter leaves custom nodes' outputs untyped; type them by the plugin's rule."""
    import onnx_ir as ir
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        if node.domain == ps.DOMAIN:
            fields = {a.name: a.value for a in node.attributes.values()}
            spec = ps.SPECS[node.op_type]
            node.outputs[0].dtype = ir.DataType(spec.output_type([int(v.dtype) for v in node.inputs], fields))


def _rename(model, names_in: list[str], names_out: list[str]) -> None:
    """Give graph inputs and outputs the contract's names (the exporter's follow the FX graph)."""
    graph = model.graph
    assert len(graph.input) == len(names_in) and len(graph.output) == len(names_out), \
        (len(graph.input), len(names_in), len(graph.output), len(names_out))
    mapping = {v.name: n for v, n in zip([*graph.input, *graph.output], [*names_in, *names_out])}
    for v in [*graph.input, *graph.output]:
        v.name = mapping[v.name]
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for vi in graph.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    for v in [*graph.input, *graph.output]:     # the exporter names the dynamic dim after a symbol (s11)
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = "batch"


def _dedupe_opsets(model):
    seen, keep = set(), []
    for o in model.opset_import:
        if o.domain not in seen:
            seen.add(o.domain)
            keep.append(o)
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model
