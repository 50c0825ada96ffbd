"""What the ONNX graphs and the TensorRT plugins agree on for each project op: plugin name, version,
namespace, fields (ONNX node attributes = TensorRT plugin fields) and the output dtype/shape rules.

Pure Python, no onnx or TensorRT import: the exporter (builder/backends), the onnxruntime reference and
the IPluginV3 plugins (plugins/trt_plugins.py) all read these tables, so a name cannot drift between them.

    Fp8Linear(x [..., K], weight f8 [N, K], scale f8-typed E8M0 bytes [ceil(N/128), K/128]) -> [..., N]
    MoeRouted(x [T, D], experts i32 [T, k], weights f32 [T, k], table i64 [E]; inter, limit)
                                                                                      -> [T, D] wide(x)
    SparseAttention(q [b, s, h, d], kv [b, n, d], sink [h], idx i64 [b, s, k]; scale) -> like q
    BitCast(x; to)                                                                    -> x's shape, `to`

E8M0 scales cross the ONNX/TensorRT boundary as their bytes typed float8e4m3fn: neither torch's ONNX
exporter nor TensorRT's ONNX parser knows E8M0, TensorRT's plugins take no uint8, and the kernels only
read the bytes (nothing in the engine computes on them).
BitCast is ONNX's own op since opset 26; TensorRT's parsers have no importer for it, so it is exported
in our domain and served by a plugin (a device-to-device copy).
"""
from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "dsv4"             # ONNX domain of the custom nodes
NAMESPACE = "dsv4"          # TensorRT plugin namespace
VERSION = "1"

# ONNX TensorProto element types used here (numbers from onnx.proto, fixed forever)
FLOAT, UINT8, INT32, INT64, FLOAT16, DOUBLE, BFLOAT16, FLOAT8E4M3FN, FLOAT8E8M0 = 1, 2, 6, 7, 10, 11, 16, 17, 24


def wide_type(elem: int) -> int:
    """ONNX element type of the working precision (plugins.oracle.wide_dtype)."""
    return FLOAT if elem in (BFLOAT16, FLOAT16) else DOUBLE


@dataclass(frozen=True)
class Field:
    name: str
    kind: str              # "int" | "float"


@dataclass(frozen=True)
class PluginSpec:
    name: str
    inputs: tuple[str, ...]
    fields: tuple[Field, ...] = ()

    def output_type(self, input_types: list[int], fields: dict) -> int:
        if self.name == "MoeRouted":
            return wide_type(input_types[0])
        if self.name == "BitCast":
            return int(fields["to"])
        return input_types[0]

    def output_shape(self, shapes: list[list[int]], fields: dict) -> list[int]:
        """The output's shape from the inputs' shapes (the rule each plugin gives TensorRT symbolically)."""
        if self.name == "Fp8Linear":
            return [*shapes[0][:-1], shapes[1][0]]
        return list(shapes[0])


SPECS = {s.name: s for s in (
    PluginSpec("Fp8Linear", ("x", "weight", "scale")),
    PluginSpec("MoeRouted", ("x", "experts", "weights", "table"), (Field("inter", "int"), Field("limit", "float"))),
    PluginSpec("SparseAttention", ("q", "kv", "sink", "idx"), (Field("scale", "float"),)),
    PluginSpec("BitCast", ("x",), (Field("to", "int"),)),
)}
