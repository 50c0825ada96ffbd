"""The programs stage of `dsv4 build` for the TensorRT backends: per layer kind, the decode program
exported to ONNX (weights are graph inputs, as for aoti: every layer of the kind shares it) and built
into one engine with one optimisation profile per decode batch bucket.

Each engine is built by a child Python process (`python -m builder.backends.tensorrt`): TensorRT aborts
its process on some graphs (TensorRT-RTX 1.7 corrupted its heap on uint8 plugin inputs), and a build
must then fail with a message naming the layer kind instead of taking the builder down with it.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import torch

from runtime.errors import UserError

from ..programs import decode
from . import onnx_export

log = logging.getLogger(__name__)
EXAMPLE_BATCH = 2           # torch.export specialises a batch of 1; any larger example keeps it dynamic
# ONNX element type -> the dtype name the runtime binds (torch's); FP8 tensors are bytes to TensorRT
_DTYPES = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 16: "bfloat16",
           17: "float8_e4m3fn"}


def code_digest() -> str:
    """Digest of the export and engine code (builder/backends): a change there remakes ONNX and engines."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def export_kind(cfg, get, layer: int, act: torch.dtype, max_len: int, buckets: tuple[int, ...], path: Path) -> None:
    """ONNX of `layer`'s program kind, traced with that layer's weights, batch dynamic up to the largest bucket."""
    program = decode.make_program(cfg, layer, act, max_len)
    inputs = onnx_export.example_inputs(cfg, get, layer, act, max_len, EXAMPLE_BATCH)
    onnx_export.export_layer(program, inputs, path, max_batch=max(buckets))


def build_engine(backend: str, archs: tuple[str, ...], buckets: tuple[int, ...], onnx_path: Path,
                 engine_path: Path, timing_cache: Path) -> None:
    """Build `engine_path` from `onnx_path` in a child process; UserError with TensorRT's reason on failure."""
    cmd = [sys.executable, "-m", "builder.backends.tensorrt", str(onnx_path), str(engine_path),
           "--backend", backend, "--timing-cache", str(timing_cache)]
    cmd += [a for arch in archs for a in ("--arch", arch)] + [a for b in buckets for a in ("--bucket", str(b))]
    root = Path(__file__).resolve().parents[2]         # the child imports builder/, plugins/, runtime/ from here
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=root)
    if done.returncode == 0 and engine_path.is_file():
        return
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    log.debug("TensorRT build of %s:\n%s", onnx_path.name, done.stderr[-20000:])
    reason = next((ln.removeprefix("error: ") for ln in reversed(lines) if ln.startswith("error: ")), None)
    if reason is None:
        reason = f"the TensorRT process ended with status {done.returncode}: {lines[-1] if lines else 'no output'}"
    raise UserError(f"{backend} engine for {onnx_path.stem}: {reason}")


def engine_io(onnx_path: Path) -> dict:
    """The engine's tensors in binding order, read from its ONNX: {"inputs"|"outputs": [[name, shape, dtype]]},
    -1 for the batch dimension."""
    import onnx
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def table(values) -> list:
        return [[v.name, [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
                 _DTYPES[v.type.tensor_type.elem_type]] for v in values]
    return {"inputs": table(graph.input), "outputs": table(graph.output)}
