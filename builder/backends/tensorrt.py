"""Backends `tensorrt` (TensorRT 10/11) and `tensorrt-rtx` (TensorRT-RTX 1.7, builds without a GPU for
sm_120/sm_121): one engine per layer program from its ONNX, the dsv4 plugins registered before parsing.

Strongly typed networks (the ONNX graph's dtypes are the engine's); one optimisation profile per decode
batch bucket (min = opt = max, so each bucket's CUDA graph replays a fixed shape); a timing cache file
shared by every layer and every later build (TensorRT-RTX ignores tactic timing but keeps the API).

`python -m builder.backends.tensorrt ONNX ENGINE --backend B --arch A --bucket N --timing-cache F`
builds one engine in its own process (see trt_program: a TensorRT abort must not kill the builder);
a UserError is printed as one `error: ...` line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from plugins import trt_plugins
from runtime.errors import UserError
from runtime.trt_support import load_tensorrt

log = logging.getLogger(__name__)
RTX_ARCHS = {"sm_120a": "SM120", "sm_121a": "SM121"}


@dataclass
class EngineBuild:
    backend: str
    gpu_archs: tuple[str, ...]
    buckets: tuple[int, ...]
    timing_cache: Path

    def __post_init__(self):
        self.trt = load_tensorrt(self.backend)
        trt_plugins.register(self.trt)
        if self.backend == "tensorrt-rtx":
            bad = [a for a in self.gpu_archs if a not in RTX_ARCHS]
            if bad or not self.gpu_archs:
                raise UserError(f"backend 'tensorrt-rtx' builds for {', '.join(RTX_ARCHS)}; recipe asks for "
                                f"{', '.join(self.gpu_archs) or 'no architecture'}")
        # DSV4_TRT_VERBOSE: TensorRT's own verbose log, for debugging a build by hand (not a setting)
        level = self.trt.Logger.VERBOSE if os.environ.get("DSV4_TRT_VERBOSE") else self.trt.Logger.WARNING
        self.logger = self.trt.Logger(level)

    def _network(self, builder, onnx_path: Path):
        trt = self.trt
        flags = 0
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly is not None:                # TensorRT 11 networks are strongly typed without the flag
            flags |= 1 << int(strongly)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        trt_plugins.check_registered(trt)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            first = errors[0] if errors else "unknown error"
            if "Plugin not found" in first:
                raise UserError(f"{onnx_path.name}: TensorRT found no plugin for a dsv4 node: {first}")
            raise UserError(f"TensorRT could not parse {onnx_path.name}: {first}")
        return network, parser

    def _config(self, builder, network):
        trt = self.trt
        config = builder.create_builder_config()
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)
        if self.backend == "tensorrt-rtx":
            config.num_compute_capabilities = len(self.gpu_archs)
            for i, arch in enumerate(self.gpu_archs):
                config.set_compute_capability(getattr(trt.ComputeCapability, RTX_ARCHS[arch]), i)
        for bucket in self.buckets:
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                tensor = network.get_input(i)
                shape = list(tensor.shape)
                if -1 in shape:
                    fixed = [bucket if d == -1 else d for d in shape]
                    profile.set_shape(tensor.name, fixed, fixed, fixed)
            config.add_optimization_profile(profile)
        return config

    def build(self, onnx_path: Path, engine_path: Path) -> dict:
        """Build one engine; return its I/O table (name -> [shape with -1 for batch, dtype, 'input'/'output'])."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network, _parser = self._network(builder, onnx_path)
        config = self._config(builder, network)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above)")
        tmp = engine_path.with_suffix(".partial")
        tmp.write_bytes(memoryview(plan))
        tmp.replace(engine_path)
        cache_tmp = self.timing_cache.with_name(f".{self.timing_cache.name}.{os.getpid()}")
        cache_tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        cache_tmp.replace(self.timing_cache)       # atomic: a concurrent build reads a whole cache or none
        io = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            io[t.name] = [list(t.shape), str(t.dtype).split(".")[-1], "input"]
        for i in range(network.num_outputs):
            t = network.get_output(i)
            io[t.name] = [list(t.shape), str(t.dtype).split(".")[-1], "output"]
        return io


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build one TensorRT engine from a dsv4 layer ONNX")
    parser.add_argument("onnx", type=Path)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--backend", required=True, choices=("tensorrt", "tensorrt-rtx"))
    parser.add_argument("--arch", action="append", default=[])
    parser.add_argument("--bucket", type=int, action="append", required=True)
    parser.add_argument("--timing-cache", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        EngineBuild(args.backend, tuple(args.arch), tuple(args.bucket), args.timing_cache).build(args.onnx, args.engine)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
