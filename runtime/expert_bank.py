"""Reads an expert bank (builder/expert_bank.py): one memory-mapped file per layer, one aligned,
contiguous expert per stride, checked against its sha256 on request."""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
from pathlib import Path

import torch

from .errors import UserError


class ExpertBank:
    def __init__(self, folder: str | Path, entries: list[dict]):
        """`entries`: the bank entries written by the builder, one per layer."""
        self.folder = Path(folder)
        self.entries = {e["layer"]: e for e in entries}
        self._maps: dict[int, mmap.mmap] = {}
        for layer, e in self.entries.items():
            path = self.folder / e["file"]
            if not path.is_file():
                raise UserError(f"expert bank file {path} is missing")
            need = e["experts"] * e["stride"]
            if path.stat().st_size < need:
                raise UserError(f"expert bank file {path} is truncated: {path.stat().st_size} bytes, needs {need}")

    def _map(self, layer: int) -> mmap.mmap:
        if layer not in self._maps:
            # Copy-on-write: tensors over the map are writable, and a stray write never reaches the file.
            with (self.folder / self.entries[layer]["file"]).open("rb") as f:
                self._maps[layer] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[layer]

    def expert(self, layer: int, e: int) -> torch.Tensor:
        """The bytes of one expert (uint8), a zero-copy view of the mapped file (copy-on-write)."""
        entry = self.entries[layer]
        start = e * entry["stride"]
        view = memoryview(self._map(layer))[start:start + entry["expert_bytes"]]
        return torch.frombuffer(view, dtype=torch.uint8)

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """Every byte of a layer's bank (uint8), a zero-copy view of the mapped file."""
        entry = self.entries[layer]
        return torch.frombuffer(memoryview(self._map(layer))[:entry["experts"] * entry["stride"]], dtype=torch.uint8)

    def release(self, layer: int) -> None:
        """Drop a layer's bank from this process and from the page cache once its bytes were copied
        elsewhere (device memory, pinned memory): on a unified-memory GB10 the page cache competes with
        the GPU for the same memory. Later reads fault the pages back in from the file."""
        if layer in self._maps:
            self._maps[layer].madvise(mmap.MADV_DONTNEED)
        with (self.folder / self.entries[layer]["file"]).open("rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def drop_cached(self, layer: int, experts: list[int]) -> None:
        """Drop these experts' pages from this process and from the page cache once their bytes live in
        device slots: on a unified-memory GB10 a cached page beside its slot copy holds the same bytes
        twice in the one memory. Later reads fault them back in from the file."""
        entry, m = self.entries[layer], self._map(layer)
        n = entry["expert_bytes"]
        with (self.folder / entry["file"]).open("rb") as f:
            for e in experts:
                start = e * entry["stride"]
                if start % mmap.PAGESIZE == 0:           # the builder aligns experts to 4096 bytes
                    m.madvise(mmap.MADV_DONTNEED, start, n)
                os.posix_fadvise(f.fileno(), start, n, os.POSIX_FADV_DONTNEED)

    def will_need(self, layer: int, experts: list[int]) -> None:
        """Start reading these experts' pages from the file ahead of use (the kernel's readahead runs while the
        caller goes on): where the GPU reads the mapped bank itself (a GB10), a predicted expert left cold is
        then read from the page cache rather than faulted in from storage mid-kernel."""
        entry, m = self.entries[layer], self._map(layer)
        n = entry["expert_bytes"]
        for e in experts:
            start = e * entry["stride"]
            if start % mmap.PAGESIZE == 0:               # the builder aligns experts to 4096 bytes
                m.madvise(mmap.MADV_WILLNEED, start, n)

    def addresses(self, layer: int) -> torch.Tensor:
        """int64 addresses of every expert of `layer` in the mapped file: an expert table for the kernels."""
        return expert_addresses(ctypes.addressof(ctypes.c_char.from_buffer(self._map(layer))), self.entries[layer])

    def verify(self, layer: int | None = None) -> None:
        """Check every expert's sha256 (of one layer, or all); the error names the file and the expert."""
        for lay in ([layer] if layer is not None else sorted(self.entries)):
            entry = self.entries[lay]
            m = self._map(lay)
            for e, digest in enumerate(entry["sha256"]):
                start = e * entry["stride"]
                if hashlib.sha256(m[start:start + entry["expert_bytes"]]).hexdigest() != digest:
                    raise UserError(f"expert bank {entry['file']}: expert {e} is corrupted (sha256 mismatch)")


def expert_addresses(base: int, entry: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The expert table of a bank laid out from address `base` (file map, device slab, pinned copy)."""
    return base + entry["stride"] * torch.arange(entry["experts"], dtype=torch.int64, device=device)
