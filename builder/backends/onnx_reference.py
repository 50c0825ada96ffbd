"""Run an exported layer with onnxruntime on CPU, the dsv4 plugin nodes served by Python implementations
that call the project's CPU ops (the oracles), through onnxruntime-extensions' PyOp.

PyOp serves only its own domain and fixes each op's input types, so a copy of the model is run with
each plugin node moved to that domain under a name that carries its input types (`Fp8Linear_1_2_2`).
bfloat16 graphs cannot run here (numpy has no bfloat16): the numerics are checked on float32 programs.
"""
from __future__ import annotations

import numpy as np
import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins import plugin_specs as ps
from plugins.oracle import sparse_attention

_NP = {ps.FLOAT: np.float32, ps.DOUBLE: np.float64, ps.UINT8: np.uint8, ps.INT32: np.int32, ps.INT64: np.int64}
_registered: set[str] = set()


def _compute(op: str, inputs: list[np.ndarray], fields: dict) -> np.ndarray:
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    if op == "Fp8Linear":
        y = torch.ops.dsv4.fp8_linear(t[0], t[1].view(torch.float8_e4m3fn), t[2].view(torch.float8_e8m0fnu))
    elif op == "MoeRouted":
        y = torch.ops.dsv4.moe_routed(t[0], t[1], t[2], t[3], int(fields["inter"]), float(fields["limit"]))
    elif op == "SparseAttention":
        y = sparse_attention(t[0], t[1], t[2], t[3], float(fields["scale"]))
    elif op == "BitCast":
        return inputs[0].view(_NP[int(fields["to"])])
    else:
        raise KeyError(op)
    return y.numpy()


def _register(op: str, in_types: list[int], out_type: int) -> str:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op
    name = "_".join([op, *map(str, in_types)])
    if name in _registered:
        return name
    dt = {ps.FLOAT: PyCustomOpDef.dt_float, ps.DOUBLE: PyCustomOpDef.dt_double, ps.UINT8: PyCustomOpDef.dt_uint8,
          ps.INT32: PyCustomOpDef.dt_int32, ps.INT64: PyCustomOpDef.dt_int64}
    attrs = {f.name: PyCustomOpDef.dt_int64 if f.kind == "int" else PyCustomOpDef.dt_float
             for f in ps.SPECS[op].fields}
    attrs |= {"plugin_version": PyCustomOpDef.dt_string, "plugin_namespace": PyCustomOpDef.dt_string}

    def run(*arrays, **fields):
        return _compute(op, list(arrays), fields)
    onnx_op(op_type=name, inputs=[dt[t] for t in in_types], outputs=[dt[out_type]], attrs=attrs)(run)
    _registered.add(name)
    return name


def session(model):
    """An onnxruntime session for a (float32/float64) exported layer, plugin nodes run by the oracles."""
    import onnx
    import onnxruntime as ort
    from onnxruntime_extensions import default_opset_domain, get_library_path
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info,
                                                             *model.graph.output]}
    run_model = onnx.ModelProto()
    run_model.CopyFrom(model)
    for v in run_model.graph.input:             # FP8 weights/scales only feed plugin nodes: run them as bytes
        if v.type.tensor_type.elem_type == ps.FLOAT8E4M3FN:
            v.type.tensor_type.elem_type = ps.UINT8
            types[v.name] = ps.UINT8
    for node in run_model.graph.node:
        if node.domain != ps.DOMAIN:
            continue
        in_types = [types[n] for n in node.input]
        fields = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out_type = ps.SPECS[node.op_type].output_type(in_types, fields)
        node.op_type, node.domain = _register(node.op_type, in_types, out_type), default_opset_domain()
    run_model.opset_import.append(onnx.helper.make_opsetid(default_opset_domain(), 1))
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    # the graph as exported, unfused (its Clip + float8 QuantizeLinear fusion rejects a float8 zero point)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(run_model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    arrays = {k: v.contiguous().numpy() for k, v in feeds.items()}
    names = [o.name for o in sess.get_outputs()]
    return {n: torch.from_numpy(a) for n, a in zip(names, sess.run(names, arrays))}
