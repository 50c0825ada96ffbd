"""Loads the kernels' fat binary into the current CUDA context and launches its kernels.

The CUDA driver picks the image for the GPU at load time (SASS for sm_90a/100a/120a/121a, else it
JITs the compute_90 PTX), so one file serves every target. Uses cuda-python's driver bindings; nothing
here allocates or synchronises, so launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from runtime.errors import UserError

FATBIN = Path(__file__).parent / "dsv4_kernels.fatbin"


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        from cuda.bindings import driver
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {name.decode() if name else int(err)}")
    return rest[0] if len(rest) == 1 else rest


class KernelImage:
    def __init__(self, path: Path = FATBIN):
        try:
            from cuda.bindings import driver
        except ImportError:
            raise UserError("the CUDA kernels need cuda-python (pip install cuda-python)") from None
        if not path.is_file():
            raise UserError(f"kernel fat binary {path} is missing: build it with `python -m plugins.build`")
        self.driver = driver
        torch.cuda.init()
        torch.empty(1, device="cuda")            # makes the primary context current on this thread
        self.module = _check(driver.cuModuleLoadData(path.read_bytes()))
        self._functions: dict[str, object] = {}

    def function(self, name: str):
        if name not in self._functions:
            self._functions[name] = _check(self.driver.cuModuleGetFunction(self.module, name.encode()))
        return self._functions[name]

    def launch(self, name: str, grid: int, block: int, args: list[tuple[object, type]]) -> None:
        """Launch `name` on the current torch stream; args are (value, ctypes type) pairs."""
        values = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a, _ in args)
        types = tuple(t for _, t in args)
        stream = self.driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(self.driver.cuLaunchKernel(self.function(name), grid, 1, 1, block, 1, 1, 0, stream,
                                          (values, types), 0))


@lru_cache(maxsize=1)
def kernels() -> KernelImage:
    return KernelImage()


PTR, INT = ctypes.c_void_p, ctypes.c_int
