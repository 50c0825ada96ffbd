"""Lazy, memory-mapped reading of an official-format checkpoint, checked before any tensor is used.

A checkpoint is a folder with `config.json` and either one `*.safetensors` file or shards listed by
`model.safetensors.index.json`. Opening it reads only the shard headers: every tensor the config
implies must be present with its exact shape and dtype, nothing else may be, and every shard must
hold all the bytes its header promises. Errors name the tensor and the shard at fault.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.errors import UserError

from .config import ModelConfig, load_config
from .layout import TensorSpec, checkpoint_specs

INDEX_FILE = "model.safetensors.index.json"
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match its config or is damaged; the message names the place."""


@dataclass(frozen=True)
class TensorEntry:
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int     # absolute byte offsets in the shard file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check that the file holds every byte it promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {path.name} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"shard {path.name} is truncated or corrupt: header of {n} bytes, file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"shard {path.name} has a corrupt safetensors header") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {path.name}: tensor '{name}' has a malformed header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"shard {path.name}: tensor '{name}' has unsupported dtype {dtype}")
        if e - b != numel * ITEMSIZE[dtype]:
            raise CheckpointError(f"shard {path.name}: tensor '{name}' spans {e - b} bytes, "
                                  f"its shape {list(shape)} {dtype} needs {numel * ITEMSIZE[dtype]}")
        start, end = 8 + n + b, 8 + n + e
        if end > size:
            raise CheckpointError(f"shard {path.name} is truncated: tensor '{name}' ends at byte {end}, "
                                  f"the file has {size}")
        entries[name] = TensorEntry(path.name, dtype, shape, start, end)
    return entries


def _shard_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or from the single safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{INDEX_FILE} in {folder} is not a valid index (no 'weight_map')") from None
        return dict(weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{folder} has {len(files)} .safetensors files and no {INDEX_FILE}")
    return {name: files[0].name for name in read_header(files[0])}


class Checkpoint:
    """An opened, validated checkpoint. `get(name)` reads one tensor through a memory map."""

    def __init__(self, folder: str | Path, config: ModelConfig | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self.config = config or load_config(self.folder)
        shard_of = _shard_map(self.folder)
        self.entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(shard_of.values())):
            path = self.folder / shard
            if not path.is_file():
                first = next(n for n, s in shard_of.items() if s == shard)
                raise CheckpointError(f"shard {shard} (holding '{first}') is missing from {self.folder}")
            header = read_header(path)
            for name, s in shard_of.items():
                if s == shard and name not in header:
                    raise CheckpointError(f"tensor '{name}' is listed in {INDEX_FILE} for shard {shard}, "
                                          f"which does not hold it")
            self.entries.update({n: e for n, e in header.items() if shard_of.get(n) == shard})
        self.specs = {s.name: s for s in checkpoint_specs(self.config)}
        self._check_against(self.specs)
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}              # read_bytes' descriptors, one per shard, kept open
        self._fd_lock = threading.Lock()

    def _check_against(self, specs: dict[str, TensorSpec]) -> None:
        missing = [n for n in specs if n not in self.entries]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"tensor '{missing[0]}' is missing from the checkpoint{more}")
        unexpected = [n for n in self.entries if n not in specs]
        if unexpected:
            e = self.entries[unexpected[0]]
            raise CheckpointError(f"unexpected tensor '{unexpected[0]}' in shard {e.shard}: "
                                  f"the config does not define it")
        for name, spec in specs.items():
            e = self.entries[name]
            if e.dtype != spec.dtype:
                raise CheckpointError(f"tensor '{name}' in shard {e.shard} has dtype {e.dtype}, expected {spec.dtype}")
            if e.shape != spec.shape:
                raise CheckpointError(f"tensor '{name}' in shard {e.shard} has shape {list(e.shape)}, "
                                      f"expected {list(spec.shape)}")

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read_bytes(self, name: str) -> bytes:
        """One tensor's stored bytes, read with pread (no memory map, no copy into a tensor; safe from several
        threads at once, and they run while the GIL is released): how the expert bank is packed."""
        entry = self.entries[name]
        with self._fd_lock:
            fd = self._fds.get(entry.shard)
            if fd is None:
                fd = self._fds[entry.shard] = os.open(self.folder / entry.shard, os.O_RDONLY)
        data = os.pread(fd, entry.end - entry.start, entry.start)
        if len(data) != entry.end - entry.start:
            raise CheckpointError(f"shard {entry.shard} is truncated: tensor '{name}' reads {len(data)} of "
                                  f"{entry.end - entry.start} bytes")
        return data

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard's memory map (the checkpoint is never loaded whole)."""
        entry = self.entries[name]
        handle = self._handles.get(entry.shard)
        if handle is None:
            handle = self._handles[entry.shard] = safe_open(str(self.folder / entry.shard), framework="pt")
        return handle.get_tensor(name)
