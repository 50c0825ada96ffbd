"""The TensorRT engine executor's checks (CPU), and the plugins' enqueue path on a GPU: TensorRT's raw
pointers, workspace and stream -> the shared kernels, first without TensorRT (plugins/trt_enqueue.py
called as a plugin's enqueue calls it: runs on the H200), then through a real engine where a TensorRT
that can execute on this GPU is installed (none is reachable in our tests: that one skips)."""
import pytest
import torch
from helpers import random_experts

from plugins import plugin_specs as ps
from runtime.errors import UserError
from runtime.trt_executor import check_target


def test_engine_for_another_gpu_is_one_clear_message():
    with pytest.raises(UserError, match=r"^this artifact's tensorrt-rtx engines are built for sm_121a; this GPU is "
                                        r"sm_90 \(NVIDIA H200\): rebuild it with build.gpu_archs = \[\"sm_90a\"\]$"):
        check_target("tensorrt-rtx", ["sm_121a"], (9, 0), "NVIDIA H200")


def test_engines_need_a_gpu():
    with pytest.raises(UserError, match="^tensorrt engines run on a CUDA GPU; this machine has none$"):
        check_target("tensorrt", ["sm_90a"], None)


def test_matching_gpu_passes():
    check_target("tensorrt-rtx", ["sm_120a", "sm_121a"], (12, 1))


def _ptrs(*tensors):
    return [t.data_ptr() for t in tensors]


def _workspace(spec, shapes, fields):
    from plugins.trt_enqueue import workspace_layout
    nbytes = sum(n for _, _, n in workspace_layout(spec, shapes, fields).values())
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")


@pytest.mark.gpu
def test_fp8_linear_enqueue_is_the_kernel_on_tensorrts_pointers():
    from plugins.formats import fp8_weight_quant
    from plugins.fp8_linear import fp8_linear_decode
    from plugins.trt_enqueue import enqueue
    n, k = 384, 512
    w, s = (t.cuda() for t in fp8_weight_quant(torch.randn(n, k) / k ** 0.5))
    x = torch.randn(2, 1, k, device="cuda").to(torch.bfloat16)
    y = torch.full((2, 1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    spec, scale = ps.SPECS["Fp8Linear"], s.view(torch.uint8)            # E8M0 bytes, as TensorRT passes them
    shapes = [[2, 1, k], [n, k], list(s.shape)]
    ws = _workspace(spec, shapes, {})
    stream = torch.cuda.Stream()
    enqueue(spec, {}, list(zip(shapes, [ps.BFLOAT16, ps.FLOAT8E4M3FN, ps.FLOAT8E4M3FN])), [([2, 1, n], ps.BFLOAT16)],
            _ptrs(x, w, scale), _ptrs(y), ws.data_ptr(), stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(y.view(2, n), fp8_linear_decode(x.view(2, k), w, s))


@pytest.mark.gpu
def test_moe_routed_enqueue_is_the_kernel_on_tensorrts_pointers():
    from plugins.moe_experts import moe_experts_decode, pack_expert
    from plugins.trt_enqueue import enqueue
    d, f, k, t = 256, 128, 6, 3
    store = [pack_expert(*e).cuda() for e in random_experts(10, d, f)]
    table = torch.tensor(_ptrs(*store), dtype=torch.int64, device="cuda")
    x = torch.randn(t, d, device="cuda").to(torch.bfloat16)
    experts = torch.stack([torch.randperm(10)[:k] for _ in range(t)]).to(torch.int32).cuda()
    weights = torch.rand(t, k, device="cuda")
    y = torch.full((t, d), float("nan"), device="cuda")
    spec, fields = ps.SPECS["MoeRouted"], {"inter": f, "limit": 10.0}
    shapes = [[t, d], [t, k], [t, k], [10]]
    ws = _workspace(spec, shapes, fields)
    stream = torch.cuda.Stream()
    enqueue(spec, fields, list(zip(shapes, [ps.BFLOAT16, ps.INT32, ps.FLOAT, ps.INT64])), [([t, d], ps.FLOAT)],
            _ptrs(x, experts, weights, table), _ptrs(y), ws.data_ptr(), stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(y, moe_experts_decode(x, experts, weights, table, f, 10.0))


@pytest.mark.gpu
def test_fp8_linear_plugin_in_a_tensorrt_engine_matches_the_kernel():
    """Needs a TensorRT that executes on this GPU (full TensorRT, or TensorRT-RTX on RTX Blackwell/GB10)."""
    from runtime import trt_support
    backend = "tensorrt" if "tensorrt" in trt_support.available_backends() else "tensorrt-rtx"
    major, minor = torch.cuda.get_device_capability()
    if backend not in trt_support.available_backends() or (backend == "tensorrt-rtx" and major < 12):
        pytest.skip("no TensorRT that can run engines on this GPU")
    onnx = pytest.importorskip("onnx")
    from onnx import helper as oh

    from plugins import trt_plugins
    from plugins.formats import fp8_weight_quant
    from plugins.fp8_linear import fp8_linear_decode
    trt = trt_support.load_tensorrt(backend)
    trt_plugins.register(trt)
    n, k = 384, 512
    node = oh.make_node("Fp8Linear", ["x", "w", "s"], ["y"], domain=ps.DOMAIN, plugin_version=ps.VERSION,
                        plugin_namespace=ps.NAMESPACE)
    graph = oh.make_graph([node], "fp8", [oh.make_tensor_value_info("x", ps.BFLOAT16, [2, k]),
                                          oh.make_tensor_value_info("w", ps.FLOAT8E4M3FN, [n, k]),
                                          oh.make_tensor_value_info("s", ps.FLOAT8E4M3FN, [n // 128, k // 128])],
                          [oh.make_tensor_value_info("y", ps.BFLOAT16, [2, n])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid(ps.DOMAIN, 1)])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())
    config = builder.create_builder_config()
    if backend == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{major}{minor}"), 0)
    plan = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    w, s = (t.cuda() for t in fp8_weight_quant(torch.randn(n, k) / k ** 0.5))
    x = torch.randn(2, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(2, n, device="cuda", dtype=torch.bfloat16)
    for name, t in {"x": x, "w": w, "s": s.view(torch.uint8), "y": y}.items():
        context.set_tensor_address(name, t.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(y, fp8_linear_decode(x, w, s)), onnx.__version__
