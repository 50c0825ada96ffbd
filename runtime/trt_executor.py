"""Runs one layer's TensorRT / TensorRT-RTX engine with the layer programs' contract, so the decode chain
(runtime/artifact.py) can call it where it calls a compiled program:

    engine_layer(h, pos, ids, table, caches, weights) -> h'     (caches updated in place)

Each engine file is deserialised once (the dsv4 plugins registered first) and shared by the layers of
its kind; each layer gets an execution context on its decode bucket's optimisation profile, and every call binds the given tensors' and
the layer's own output buffers with `set_tensor_address` and enqueues with `execute_async_v3` on torch's
current stream: no allocation, no synchronisation, so the call is captured by the decode CUDA graph like
any kernel (addresses are fixed at capture; the chain passes the same static buffers every step).

ONNX has no in-place writes, so the engine returns each cache whole (`new_cache_*`, see
builder/backends/onnx_export.py) into a second buffer; it is copied back into the runtime's cache after
the engine (a device copy per cache per step, captured with it). Swapping two cache sets between steps
would save those copies but needs two captured graphs (one per parity): not done yet.
"""
from __future__ import annotations

import torch

from .errors import UserError
from .trt_support import load_tensorrt


def check_target(backend: str, archs: list[str], capability: tuple[int, int] | None, device_name: str = "") -> None:
    """One clear error, before any engine is deserialised, when the engines were built for another GPU."""
    if capability is None:
        raise UserError(f"{backend} engines run on a CUDA GPU; this machine has none")
    here = f"sm_{capability[0]}{capability[1]}"
    if not any(a.rstrip("a") == here for a in archs):
        gpu = f" ({device_name})" if device_name else ""
        raise UserError(f"this artifact's {backend} engines are built for {', '.join(archs) or 'no GPU'}; "
                        f"this GPU is {here}{gpu}: rebuild it with build.gpu_archs = [\"{here}a\"]")


def bindings(h, pos, ids, table, caches: dict, weights: dict) -> dict:
    """The engine's input names (onnx_export's contract) -> what the chain passes a layer program."""
    return {"h": h, "pos": pos, "ids": ids, "table": table, **{f"cache_{k}": v for k, v in caches.items()},
            **{"w_" + k.replace(".", "_"): v for k, v in weights.items()}}


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class EngineLayer:
    """One layer's execution context of its kind's engine, for one decode batch bucket. `entry` is the
    manifest's layer entry (entry["engine"]: file, profiles, inputs, outputs)."""

    def __init__(self, loader: EngineLoader, entry: dict, batch: int, device: torch.device):
        spec = entry["engine"]
        stream = torch.cuda.current_stream(device).cuda_stream
        profile = spec["profiles"][str(batch)]
        self.context = loader.engine(spec["file"]).create_execution_context()
        if not self.context.set_optimization_profile_async(profile, stream):
            # a TensorRT that lets only one context use a profile at a time: this layer gets its own engine
            self.context = loader.engine(spec["file"], private=True).create_execution_context()
            if not self.context.set_optimization_profile_async(profile, stream):
                raise UserError(f"{spec['file']}: TensorRT refused optimisation profile {profile} (batch {batch})")
        self.inputs = [n for n, _, _ in spec["inputs"]]
        for name, shape, _ in spec["inputs"]:
            if -1 in shape:
                self.context.set_input_shape(name, [batch if d == -1 else d for d in shape])
        # the layer's own outputs: h' (or MTP logits) and the whole updated caches
        self.outputs = {name: torch.empty([batch if d == -1 else d for d in shape], dtype=_torch_dtype(dtype),
                                          device=device) for name, shape, dtype in spec["outputs"]}

    def __call__(self, h, pos, ids, table, caches: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
        given = bindings(h, pos, ids, table, caches, weights)
        for name in self.inputs:
            t = given[name]
            assert t.is_contiguous(), name
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in self.outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(h.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        for name, cache in caches.items():
            cache.copy_(self.outputs[f"new_cache_{name}"])
        return self.outputs["out"]


class EngineLoader:
    """Deserialises an artifact's engines (each file once per bucket) for `backend`, after checking that
    they target this GPU and registering the dsv4 plugins."""

    def __init__(self, manifest: dict, root, device: torch.device):
        backend = manifest["backend"]
        if device.type != "cuda" or not torch.cuda.is_available():
            check_target(backend, manifest["gpu_archs"], None)
        check_target(backend, manifest["gpu_archs"], torch.cuda.get_device_capability(device),
                     torch.cuda.get_device_name(device))
        from plugins import trt_plugins
        self.trt = load_tensorrt(backend)
        trt_plugins.register(self.trt)
        trt_plugins.check_registered(self.trt)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.root, self.device = root, device
        self._engines: dict[str, object] = {}
        self._private: list = []                    # engines of layers that could not share (kept alive)

    def engine(self, path: str, private: bool = False):
        """The deserialised engine of `path`, shared by every layer of its kind (one copy of its kernels)."""
        if path in self._engines and not private:
            return self._engines[path]
        engine = self.runtime.deserialize_cuda_engine((self.root / path).read_bytes())
        if engine is None:
            raise UserError(f"TensorRT could not deserialise {path} (see its log above)")
        if private:
            self._private.append(engine)
        else:
            self._engines[path] = engine
        return engine

    def layer(self, entry: dict, batch: int) -> EngineLayer:
        return EngineLayer(self, entry, batch, self.device)
