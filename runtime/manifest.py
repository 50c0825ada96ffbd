"""The artifact manifest (`manifest.json` at the artifact's root) and the checks made before loading.

The builder writes it (`write_manifest`); the runtime and `dsv4 verify` read it (`check_artifact`):
every file's size and sha256, the GPU architecture, and the versions the backend needs. Problems are
collected and reported one line each, naming the file or the mismatch; nothing is loaded before
they are all clear.

Every load used to hash the whole artifact on one core (34 GB for 8 Flash layers, several times that for
all 43; `bench/artifact_h200.sh` loads its Flash-8 artifact nine times). Files are hashed side by side
now, and a clean check leaves `.verified.json` in the artifact: each file's size, modification time and
inode with the hash it matched, so later loads on this machine hash only what changed since (a copied
artifact has other inodes and is hashed in full). `dsv4 verify` always hashes everything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError, read_json
from .trt_support import installed_versions

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"          # path -> [bytes, mtime_ns, inode, sha256] of files hashed clean here
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class ArtifactError(UserError):
    pass


# What long steps report as they go (build, load, verify): progress(stage, done, total), e.g. bytes hashed.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A Progress that reports to no one."""


def sha256_file(path: Path, chunk: int = 1 << 24, advance: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            advance(len(block))
    return digest.hexdigest()


def sha256_files(paths: list[Path], progress: Progress | None = None) -> list[str]:
    """Each file's sha256, in order, hashed side by side (hashlib lets go of the GIL on large blocks);
    `progress("verifying", bytes hashed, bytes in all)` as it goes (a Flash artifact: about 160 GB)."""
    if not paths:
        return []
    total, done, lock = sum(p.stat().st_size for p in paths), [0], threading.Lock()

    def advance(n: int) -> None:
        with lock:
            done[0] += n
            if progress:
                progress("verifying", done[0], total)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(lambda p: sha256_file(p, advance=advance), paths))


def _signature(path: Path, sha256: str) -> list:
    """What must not have changed for a file's earlier hash to stand."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]


def _read_verified(root: Path) -> dict:
    try:
        return json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def _write_verified(root: Path, files: list[dict]) -> None:
    """Best effort: an artifact on a read-only mount is simply hashed in full at every load."""
    try:
        tmp = root / f"{VERIFIED}.{os.getpid()}.partial"           # loads may run side by side
        tmp.write_text(json.dumps({f["path"]: _signature(root / f["path"], f["sha256"]) for f in files}))
        tmp.replace(root / VERIFIED)
    except OSError as e:
        log.debug("could not record the verified hashes in %s: %s", root, e)


def write_manifest(root: str | Path, fields: dict[str, Any]) -> Path:
    """Write manifest.json listing every other file under `root` with its size and sha256."""
    root = Path(root)
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST, VERIFIED)]
    files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, sha256_files(paths))]
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": files}
    tmp = root / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / MANIFEST)
    return root / MANIFEST


@dataclass
class Machine:
    """What this machine offers: GPU architecture (None without a GPU) and versions."""
    gpu_arch: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def this() -> "Machine":
        arch = None
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = f"sm_{major}{minor}"
        versions = {"torch": torch.__version__.split("+")[0], "python": platform.python_version()}
        versions |= installed_versions()        # 'tensorrt' / 'tensorrt-rtx', the keys builds write
        return Machine(arch, versions)


def arch_targeted(archs, gpu_arch: str | None) -> bool:
    """Whether a GPU of `gpu_arch` ("sm_90") is one of the build targets `archs` ("sm_90a", ...)."""
    return any(a.rstrip("a") == gpu_arch for a in archs)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_artifact(root: str | Path, machine: Machine | None = None, hashes: bool = True,
                   trust_verified: bool = True, progress: Progress | None = None) -> tuple[dict, list[str]]:
    """Read the manifest and check the artifact against its files and this machine; with `trust_verified`,
    files unchanged since they last hashed clean here (`.verified.json`) are not hashed again.

    Returns (manifest, problems); `problems` is empty when the artifact can be loaded here.
    """
    root = Path(root)
    path = root / MANIFEST
    manifest = read_json(path, ArtifactError,
                         f"{root} is not an artifact: no {MANIFEST} (build one with `dsv4 build RECIPE`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')!r}, this runtime reads "
                            f"{FORMAT_VERSION}; rebuild the artifact")
    entries = manifest.get("files", [])
    verified = _read_verified(root) if hashes and trust_verified else {}
    found: dict[str, str] = {}                 # path -> its problem
    to_hash = []
    for entry in entries:
        f = root / entry["path"]
        if not f.is_file():
            found[entry["path"]] = f"file {entry['path']} is missing"
        elif f.stat().st_size != entry["bytes"]:
            found[entry["path"]] = f"file {entry['path']} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}"
        elif hashes and verified.get(entry["path"]) != _signature(f, entry["sha256"]):
            to_hash.append(entry)
    for entry, digest in zip(to_hash, sha256_files([root / e["path"] for e in to_hash], progress)):
        if digest != entry["sha256"]:
            found[entry["path"]] = f"file {entry['path']} is corrupted (sha256 mismatch)"
    problems = [found[e["path"]] for e in entries if found.get(e["path"])]
    if hashes and not problems and to_hash:
        _write_verified(root, entries)
    machine = machine or Machine.this()
    archs = manifest.get("gpu_archs", [])
    if manifest.get("device") == "cuda":
        if machine.gpu_arch is None:
            problems.append(f"the artifact is built for {', '.join(archs)}; this machine has no CUDA GPU")
        elif not arch_targeted(archs, machine.gpu_arch):
            problems.append(f"the artifact is built for {', '.join(archs)}; this GPU is {machine.gpu_arch}")
    for name, needed in manifest.get("versions", {}).items():
        have = machine.versions.get(name)
        if have is None:
            problems.append(f"the artifact needs {name} {needed}; it is not installed here")
        elif _major_minor(have) != _major_minor(needed):
            problems.append(f"the artifact needs {name} {_major_minor(needed)}.x; this machine has {have}")
    return manifest, problems


def load_manifest(root: str | Path, machine: Machine | None = None, hashes: bool = True,
                  progress: Progress | None = None) -> dict:
    """The manifest of an artifact that passes every check; otherwise one error naming the first problem."""
    manifest, problems = check_artifact(root, machine, hashes, progress=progress)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `dsv4 verify {root}`)" if len(problems) > 1 else ""
        raise ArtifactError(f"artifact {root}: {problems[0]}{more}")
    return manifest
