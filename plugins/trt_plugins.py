"""TensorRT IPluginV3 plugins (core, build and runtime capabilities) for the dsv4 plugin nodes, and
their creators. Works with the `tensorrt` module (TensorRT 10/11) and TensorRT-RTX's bindings alike:
the classes are made per module by `creators(trt)` and registered by `register(trt)` before parsing.

`enqueue` runs exactly what the torch ops run on CUDA: `fp8_linear_decode` and `moe_experts_decode`
(the one fat binary's kernels, plugins/loader.py), given zero-copy torch views of TensorRT's buffers and
TensorRT's stream made current, with outputs and workspaces preallocated by TensorRT: nothing
allocates, nothing synchronises. SparseAttention runs its bf16 kernel (int64 indices); float32 engines and
int32 indices run the torch oracle (which allocates from torch's pool). BitCast is an async device copy.
"""
from __future__ import annotations

from functools import cache

import numpy as np

from runtime.errors import UserError

from . import plugin_specs as ps

# TensorRT DataType member name <-> ONNX element type
_TRT_NAMES = {"FLOAT": ps.FLOAT, "HALF": ps.FLOAT16, "BF16": ps.BFLOAT16, "UINT8": ps.UINT8, "INT32": ps.INT32,
              "INT64": ps.INT64, "FP8": ps.FLOAT8E4M3FN, "E8M0": ps.FLOAT8E8M0}
# Accepted ONNX element types per input position (the kernels' dtypes; None = same as input 0)
_ACCEPT = {
    "Fp8Linear": [(ps.BFLOAT16,), (ps.FLOAT8E4M3FN,), (ps.FLOAT8E4M3FN,)],
    "MoeRouted": [(ps.BFLOAT16,), (ps.INT32,), (ps.FLOAT,), (ps.INT64,)],
    "SparseAttention": [(ps.BFLOAT16, ps.FLOAT), None, (ps.FLOAT,), (ps.INT64, ps.INT32)],
    "BitCast": [(ps.FLOAT, ps.INT32)],
}


def to_onnx_type(trt, dtype) -> int:
    for name, elem in _TRT_NAMES.items():
        if dtype == getattr(trt.DataType, name):
            return elem
    raise ValueError(f"unsupported TensorRT dtype {dtype}")


def to_trt_type(trt, elem: int):
    return getattr(trt.DataType, {v: k for k, v in _TRT_NAMES.items()}[elem])


def fields_from_collection(spec: ps.PluginSpec, collection) -> dict:
    """Plugin fields (a PluginFieldCollection, from the parser or a serialised engine) -> python values."""
    kinds = {f.name: f.kind for f in spec.fields}
    values = {}
    for f in collection:
        if f.name in kinds:
            data = np.asarray(f.data).reshape(-1)
            values[f.name] = int(data[0]) if kinds[f.name] == "int" else float(data[0])
    missing = [n for n in kinds if n not in values]
    if missing:
        raise ValueError(f"plugin {spec.name}: missing field(s) {', '.join(missing)}")
    return values


def field_collection(trt, spec: ps.PluginSpec, values: dict):
    """(PluginFieldCollection, the arrays it points into): TensorRT keeps raw pointers to the arrays, so
    the caller holds both for as long as TensorRT may read them."""
    kind = {"int": (np.int32, trt.PluginFieldType.INT32), "float": (np.float32, trt.PluginFieldType.FLOAT32)}
    arrays = [np.array([values[f.name]], dtype=kind[f.kind][0]) for f in spec.fields]
    fields = [trt.PluginField(f.name, a, kind[f.kind][1]) for f, a in zip(spec.fields, arrays)]
    return trt.PluginFieldCollection(fields), (arrays, fields)


@cache
def creators(trt) -> tuple:
    """One IPluginCreatorV3One per spec, classes bound to this TensorRT module."""

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: ps.PluginSpec, fields: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec, self.fields = spec, dict(fields)
            self.plugin_name, self.plugin_namespace, self.plugin_version = spec.name, ps.NAMESPACE, ps.VERSION
            self.num_outputs = 1
            self.shapes: list[list[int]] = []
            self.types: list[int] = []

        # core
        def get_capability_interface(self, kind):
            return self

        def clone(self):
            other = Plugin(self.spec, self.fields)
            other.shapes, other.types = list(self.shapes), list(self.types)
            return other

        # build
        def get_output_data_types(self, input_types):
            onnx_types = [to_onnx_type(trt, t) for t in input_types]
            return [to_trt_type(trt, self.spec.output_type(onnx_types, self.fields))]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])
            if self.spec.name == "Fp8Linear":
                out[len(out) - 1] = inputs[1][0]
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            try:
                elem = to_onnx_type(trt, desc.type)
            except ValueError:
                return False
            if pos >= num_inputs:           # the output: what the plugin says for the chosen inputs
                types = [to_onnx_type(trt, in_out[i].desc.type) for i in range(num_inputs)]
                return elem == self.spec.output_type(types, self.fields)
            accept = _ACCEPT[self.spec.name][pos]
            if accept is None:
                return desc.type == in_out[0].desc.type
            return elem in accept

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return plugin_workspace(self.spec, [list(d.max) for d in inputs], self.fields)

        # runtime
        def on_shape_change(self, inputs, outputs):
            self.shapes = [list(d.dims) for d in inputs]
            self.types = [to_onnx_type(trt, d.type) for d in inputs]

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            # TensorRT reads the field buffers after this returns: keep them alive with the plugin
            collection, self._keep = field_collection(trt, self.spec, self.fields)
            self._serialized = collection
            return collection

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from .trt_enqueue import enqueue
            enqueue(self.spec, self.fields, [(list(d.dims), to_onnx_type(trt, d.type)) for d in input_desc],
                    [(list(d.dims), to_onnx_type(trt, d.type)) for d in output_desc], inputs, outputs,
                    workspace, stream)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, spec: ps.PluginSpec):
            trt.IPluginCreatorV3One.__init__(self)
            self.spec = spec
            self.name, self.plugin_namespace, self.plugin_version = spec.name, ps.NAMESPACE, ps.VERSION
            kind = {"int": trt.PluginFieldType.INT32, "float": trt.PluginFieldType.FLOAT32}
            self._empty = np.array([], dtype=np.float32)        # kept alive: TensorRT holds its pointer
            self._names = [trt.PluginField(f.name, self._empty, kind[f.kind]) for f in spec.fields]
            self.field_names = trt.PluginFieldCollection(self._names)

        def create_plugin(self, name, collection, phase):
            return Plugin(self.spec, fields_from_collection(self.spec, collection))

    return tuple(Creator(spec) for spec in ps.SPECS.values())


def plugin_workspace(spec: ps.PluginSpec, shapes: list[list[int]], fields: dict) -> int:
    """Bytes of TensorRT workspace a plugin asks for at these (maximum) input shapes."""
    from .trt_enqueue import workspace_layout
    return sum(nbytes for _, _, nbytes in workspace_layout(spec, shapes, fields).values())


def register(trt) -> None:
    """Register every dsv4 plugin creator with this TensorRT module's registry (idempotent)."""
    registry = trt.get_plugin_registry()
    for creator in creators(trt):
        known = registry.get_creator(creator.name, ps.VERSION, ps.NAMESPACE) is not None
        if not known and not registry.register_creator(creator, ps.NAMESPACE):
            raise UserError(f"TensorRT refused to register plugin {ps.NAMESPACE}::{creator.name}")


def check_registered(trt) -> None:
    """One clear error if any dsv4 plugin is not registered (parsing or deserialising would fail later)."""
    registry = trt.get_plugin_registry()
    missing = [s.name for s in ps.SPECS.values() if registry.get_creator(s.name, ps.VERSION, ps.NAMESPACE) is None]
    if missing:
        raise UserError(f"TensorRT plugin(s) {', '.join(f'{ps.NAMESPACE}::{m} v{ps.VERSION}' for m in missing)} "
                        f"not registered: call plugins.trt_plugins.register(trt) first")
