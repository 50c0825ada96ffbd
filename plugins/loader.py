"""Loads the kernels' fat binary into the current CUDA context and launches its kernels.

The CUDA driver picks the image for the GPU at load time (SASS for sm_90a/100a/120a/121a, else it
JITs the compute_90 PTX), so one file serves every target. Uses cuda-python's driver bindings; nothing
here allocates or synchronises, so launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch

from runtime.errors import UserError

FATBIN = Path(__file__).parent / "dsv4_kernels.fatbin"
log = logging.getLogger(__name__)
# A benchmark's switch: "PREFIX:N|PREFIX:N..." sizes the persistent grids of kernels whose names start with
# PREFIX to at most N CTAs an SM (the first prefix that matches), so that the rest of each SM is free for the
# next launch, which programmatic dependent launch starts while this one streams; empty: as many as fit
# (`bench/read_ceiling.py --fatbin "F@plugins.loader.RESIDENT_CAPS='dsv4_fp8_gemv:1'"`).
RESIDENT_CAPS = ""
# A benchmark's switch: how the GPU places a cluster launch's clusters ("spread": over as many SMs as it can;
# "load_balancing"; empty: the driver's default, which may put two CTAs of one cluster on one SM).
CLUSTER_POLICY = ""


def _resident_cap(name: str) -> int | None:
    for rule in filter(None, RESIDENT_CAPS.split("|")):
        prefix, _, n = rule.rpartition(":")
        if name.startswith(prefix):
            return int(n)
    return None


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        from cuda.bindings import driver
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {name.decode() if name else int(err)}")
    return rest[0] if len(rest) == 1 else rest


class KernelImage:
    def __init__(self, path: Path):
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
        self._resident: dict[tuple[str, int, int], int] = {}
        self._shared_allowed: dict[str, int] = {}
        self._shared_memory: dict[int, tuple[int, int]] = {}
        # Programmatic dependent launch needs sm_90+ (the kernels' griddepcontrol is compiled in from sm_90).
        self._pdl = torch.cuda.get_device_capability() >= (9, 0)

    def function(self, name: str):
        if name not in self._functions:
            self._functions[name] = _check(self.driver.cuModuleGetFunction(self.module, name.encode()))
        return self._functions[name]

    def _allow_shared(self, name: str, shared: int) -> None:
        """Kernels whose dynamic plus static shared memory passes 48 KiB must opt in, once per size (dynamic
        48 KiB exactly beside a static array was refused: the head kernel at 3 rows of 4096, H200)."""
        if shared == 0 or self._shared_allowed.get(name, 0) >= shared:
            return
        attr = self.driver.CUfunction_attribute
        static = _check(self.driver.cuFuncGetAttribute(attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.function(name)))
        if shared + static > 48 * 1024:
            _check(self.driver.cuFuncSetAttribute(self.function(name),
                                                  attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared))
        self._shared_allowed[name] = shared

    def resident(self, name: str, block: int, shared: int = 0) -> int:
        """CTAs of `name` that fit on the whole GPU at once (persistent grids are sized by it); cached."""
        key = (name, block, shared)
        if key not in self._resident:
            self._allow_shared(name, shared)
            per_sm = _check(self.driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function(name), block,
                                                                                       shared))
            sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            if (cap := _resident_cap(name)) is not None:
                per_sm = min(per_sm, cap)
            self._resident[key] = max(1, per_sm) * sms
        return self._resident[key]

    def shared_memory(self) -> tuple[int, int]:
        """(bytes of shared memory per SM, the most one CTA may opt in to) of the current GPU; cached."""
        ordinal = torch.cuda.current_device()
        if ordinal not in self._shared_memory:
            d = self.driver
            dev = _check(d.cuDeviceGet(ordinal))
            attr = d.CUdevice_attribute
            self._shared_memory[ordinal] = (
                _check(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, dev)),
                _check(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)))
        return self._shared_memory[ordinal]

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: list[tuple[object, type]],
               shared: int = 0, cluster: int = 1) -> None:
        """Launch `name` on the current torch stream over `grid` (x, or (x, y) or (x, y, z)); args are (value,
        ctypes type) pairs; `shared` bytes of dynamic shared memory; CTAs in clusters of `cluster` along x
        (sm_90 and later)."""
        values = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a, _ in args)
        types = tuple(t for _, t in args)
        gx, gy, gz = (*grid, 1, 1)[:3] if isinstance(grid, tuple) else (grid, 1, 1)
        self._allow_shared(name, shared)
        stream = self.driver.CUstream(torch.cuda.current_stream().cuda_stream)
        if self._pdl or cluster > 1:
            try:
                _check(self.driver.cuLaunchKernelEx(self._config((gx, gy, gz), block, shared, stream, cluster),
                                                    self.function(name), (values, types), 0))
                return
            except (AttributeError, TypeError, RuntimeError) as e:   # older driver or bindings: plain launches
                if cluster > 1 or not self._pdl:
                    raise
                log.warning("programmatic dependent launch unavailable (%s); launching plainly", e)
                self._pdl = False
        _check(self.driver.cuLaunchKernel(self.function(name), gx, gy, gz, block, 1, 1, shared, stream,
                                          (values, types), 0))

    def _config(self, grid: tuple[int, int, int], block: int, shared: int, stream, cluster: int):
        """An extended launch: where PDL works, one that may start while the previous kernel in the stream
        finishes (the kernels call griddepcontrol.wait before touching its outputs; see csrc/common.cuh);
        with `cluster` > 1, CTAs in clusters of that many along x."""
        d = self.driver
        cfg = d.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
        cfg.sharedMemBytes = shared
        cfg.hStream = stream
        attrs = []
        if self._pdl:
            attr = d.CUlaunchAttribute()
            attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            attrs.append(attr)
        if cluster > 1:
            attr = d.CUlaunchAttribute()
            attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster, 1, 1
            attrs.append(attr)
            if CLUSTER_POLICY:
                attr = d.CUlaunchAttribute()
                attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE
                attr.value.clusterSchedulingPolicyPreference = getattr(
                    d.CUclusterSchedulingPolicy, f"CU_CLUSTER_SCHEDULING_POLICY_{CLUSTER_POLICY.upper()}")
                attrs.append(attr)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        return cfg


@lru_cache(maxsize=1)
def kernels() -> KernelImage:
    """The process's one kernel image, loaded from FATBIN at first use (a benchmark comparing two builds of the
    kernels sets FATBIN before that: bench/fatbin_ab.py)."""
    return KernelImage(FATBIN)


PTR, INT, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of `device` (the current one where it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def on_sm90(x: torch.Tensor) -> bool:
    """Whether x lives on an sm_90 GPU, where the warpgroup-MMA kernels run (asked once per device: the check
    sits on decode calls' paths)."""
    return x.is_cuda and _sm90(device_index(x.device))


@lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def balanced_grid(items: int, resident: int) -> int:
    """CTAs for `items` equal work items on a persistent grid: as many rounds as needed, then as few CTAs as
    keep that number of rounds, so that no CTA has more items than another by more than one."""
    rounds = -(-items // resident)
    return max(1, -(-items // rounds))
