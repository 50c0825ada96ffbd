"""TensorRT plugins on CPU, through TensorRT-RTX's bindings: field serialisation round-trips, and TensorRT's
own parser infers each plugin's output shape and dtype from ours; engines with each plugin build for sm_121."""
import numpy as np
import pytest

from plugins import plugin_specs as ps

trt_support = pytest.importorskip("runtime.trt_support")


@pytest.fixture(scope="module")
def trt():
    if "tensorrt-rtx" not in trt_support.available_backends():
        pytest.skip("TensorRT-RTX is not installed (pip install -e '.[test]')")
    from plugins import trt_plugins
    module = trt_support.load_tensorrt("tensorrt-rtx")
    trt_plugins.register(module)
    return module


FIELDS = {"Fp8Linear": {}, "MoeRouted": {"inter": 128, "limit": 10.0}, "SparseAttention": {"scale": 0.0883883},
          "BitCast": {"to": ps.INT32}}


@pytest.mark.parametrize("name", list(ps.SPECS))
def test_fields_round_trip(trt, name):
    from plugins import trt_plugins
    creator = trt.get_plugin_registry().get_creator(name, ps.VERSION, ps.NAMESPACE)
    assert creator is not None and creator.plugin_namespace == ps.NAMESPACE
    collection, _keep = trt_plugins.field_collection(trt, ps.SPECS[name], FIELDS[name])
    plugin = creator.create_plugin(name, collection, trt.TensorRTPhase.BUILD)
    again = creator.create_plugin(name, plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.fields == plugin.fields
    assert again.fields == pytest.approx(FIELDS[name], rel=1e-7)
    assert (again.plugin_name, again.plugin_version, again.plugin_namespace) == (name, ps.VERSION, ps.NAMESPACE)


def test_missing_field_is_refused(trt):
    from plugins import trt_plugins
    with pytest.raises(ValueError, match="missing field"):
        trt_plugins.fields_from_collection(ps.SPECS["MoeRouted"], [])


def _one_node(onnx, name, inputs, fields, out_type):
    from onnx import helper as oh
    node = oh.make_node(name, [n for n, _, _ in inputs], ["y"], domain=ps.DOMAIN, plugin_version=ps.VERSION,
                        plugin_namespace=ps.NAMESPACE, **fields)
    graph = oh.make_graph([node], name, [oh.make_tensor_value_info(*i) for i in inputs],
                          [oh.make_tensor_value_info("y", out_type, None)])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid(ps.DOMAIN, 1)])


CASES = [
    pytest.param("Fp8Linear", [("x", ps.BFLOAT16, ["b", 1, 512]), ("w", ps.FLOAT8E4M3FN, [384, 512]),
                               ("s", ps.FLOAT8E4M3FN, [3, 4])], (-1, 1, 384), "BF16", id="fp8-linear"),
    pytest.param("MoeRouted", [("x", ps.BFLOAT16, ["b", 256]), ("e", ps.INT32, ["b", 6]), ("w", ps.FLOAT, ["b", 6]),
                               ("t", ps.INT64, [16])], (-1, 256), "FLOAT", id="moe-routed"),
    pytest.param("SparseAttention", [("q", ps.BFLOAT16, ["b", 1, 4, 128]), ("kv", ps.BFLOAT16, ["b", 80, 128]),
                                     ("s", ps.FLOAT, [4]), ("i", ps.INT64, ["b", 1, 24])], (-1, 1, 4, 128), "BF16",
                 id="sparse-attention"),
    pytest.param("BitCast", [("x", ps.FLOAT, ["b", 4])], (-1, 4), "INT32", id="bitcast"),
]


@pytest.mark.parametrize("name, inputs, shape, dtype", CASES)
def test_parser_infers_shape_and_dtype_and_engine_builds(trt, name, inputs, shape, dtype):
    onnx = pytest.importorskip("onnx")
    elem = {"BF16": ps.BFLOAT16, "FLOAT": ps.FLOAT, "INT32": ps.INT32}[dtype]
    model = _one_node(onnx, name, inputs, FIELDS[name], elem)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    out = network.get_output(0)
    assert tuple(out.shape) == shape and out.dtype == getattr(trt.DataType, dtype)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM121, 0)
    profile = builder.create_optimization_profile()
    for n, _, dims in inputs:
        if "b" in dims:
            fixed = [2 if d == "b" else d for d in dims]
            profile.set_shape(n, fixed, fixed, fixed)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and plan.nbytes > 0


def test_workspace_matches_the_kernels_scratch():
    import torch

    from plugins import moe_experts
    from plugins.trt_enqueue import workspace_layout
    layout = workspace_layout(ps.SPECS["MoeRouted"], [[3, 256], [3, 6], [3, 6], [16]], {"inter": 128})
    expect = moe_experts.make_workspace(3, 6, 256, 128, "meta")
    assert {k: (list(t.shape), t.dtype) for k, t in expect.items()} == {k: (s, d) for k, (s, d, _) in layout.items()}
    assert all(n >= t.numel() * t.element_size() for (_, _, n), t in zip(layout.values(), expect.values()))
    fp8 = workspace_layout(ps.SPECS["Fp8Linear"], [[2, 1, 512], [384, 512], [3, 4]])
    assert fp8["codes"][:2] == ([2, 512], torch.uint8) and fp8["scales"][:2] == ([2, 4], torch.float32)
    assert all(n % 256 == 0 for _, _, n in fp8.values())


def test_missing_registration_is_one_clear_error(trt):
    from plugins import trt_plugins
    from runtime.errors import UserError
    registry = trt.get_plugin_registry()
    creator = registry.get_creator("SparseAttention", ps.VERSION, ps.NAMESPACE)
    registry.deregister_creator(creator)
    try:
        with pytest.raises(UserError, match="dsv4::SparseAttention v1 not registered"):
            trt_plugins.check_registered(trt)
    finally:
        registry.register_creator(creator, ps.NAMESPACE)
    trt_plugins.check_registered(trt)


def test_no_tensorrt_is_one_clear_error(monkeypatch):
    from runtime.errors import UserError
    monkeypatch.setattr(trt_support, "_has", lambda name: False)
    with pytest.raises(UserError, match="needs TensorRT, which is not installed here.*can run: eager, aoti$"):
        trt_support.load_tensorrt("tensorrt")
    assert np is not None
