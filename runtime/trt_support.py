"""Optional TensorRT: which backends this machine can run, and importing TensorRT or TensorRT-RTX with
one clear error when it is missing.

TensorRT-RTX 1.7's ONNX parser dlopens `libtensorrt_rtx.so`, a name its wheel does not ship (only
`.so.1`), and finds libraries through its own RPATH ($ORIGIN). So before the bindings load, the parser
and the library are linked under those names in a user cache folder and loaded from there: its
$ORIGIN is then that folder, where `libtensorrt_rtx.so` resolves to the already-loaded library.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import UserError

INSTALL = {"tensorrt": "pip install -e '.[tensorrt]' (TensorRT 10/11 for CUDA 13), or NVIDIA's packages",
           "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings (x86_64 Linux)"}
_RTX_LIBS = ("libtensorrt_rtx.so.1", "libtensorrt_onnxparser_rtx.so.1")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends whose artifacts this machine can load (TensorRT ones only where the module imports)."""
    out = ["eager", "aoti"]
    if _has("tensorrt"):
        out.append("tensorrt")
    if _has("tensorrt_rtx") or _has("tensorrt_rtx_bindings"):
        out.append("tensorrt-rtx")
    return out


_DISTRIBUTIONS = {"tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings"),
                  "tensorrt-rtx": ("tensorrt-rtx", "tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu12-bindings")}


def installed_versions() -> dict[str, str]:
    """backend -> installed TensorRT version, from package metadata (nothing imported: the manifest check
    must not load TensorRT, and TensorRT-RTX must be imported through load_tensorrt)."""
    from importlib import metadata
    out = {}
    for backend, names in _DISTRIBUTIONS.items():
        for name in names:
            try:
                out[backend] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


_rtx_linked = False          # this process already loaded the libraries from the link folder


def _link_rtx_parser() -> None:
    global _rtx_linked
    if _rtx_linked:
        return
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = Path(next(iter(spec.submodule_search_locations)))
    if (libs / "libtensorrt_rtx.so").exists():
        return
    if "tensorrt_rtx_libs" in sys.modules:
        raise UserError("TensorRT-RTX was imported before dsv4 could link libtensorrt_rtx.so for its ONNX parser; "
                        "import it through runtime.trt_support.load_tensorrt('tensorrt-rtx')")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsv4-aot" / "tensorrt-rtx-libs"
    cache.mkdir(parents=True, exist_ok=True)
    links = {"libtensorrt_rtx.so": libs / _RTX_LIBS[0], **{n: libs / n for n in _RTX_LIBS}}
    for name, target in links.items():
        link = cache / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = cache / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)                       # atomic: concurrent builds never see a missing link
    for name in _RTX_LIBS:                      # loaded from the cache folder: their $ORIGIN is that folder
        ctypes.CDLL(str(cache / name), mode=ctypes.RTLD_GLOBAL)
    _rtx_linked = True


def load_tensorrt(backend: str):
    """The TensorRT module of a backend ('tensorrt' or 'tensorrt-rtx'); UserError if not installed."""
    if backend == "tensorrt-rtx":
        _link_rtx_parser()
        names = ("tensorrt_rtx", "tensorrt_rtx_bindings")
    elif backend == "tensorrt":
        names = ("tensorrt",)
    else:
        raise ValueError(backend)
    for name in names:
        if _has(name):
            return importlib.import_module(name)
    raise UserError(f"backend {backend!r} needs {'TensorRT-RTX' if backend == 'tensorrt-rtx' else 'TensorRT'}, "
                    f"which is not installed here ({INSTALL[backend]}); this machine can run: "
                    f"{', '.join(available_backends())}")
