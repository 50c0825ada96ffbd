"""The artifact manifest (`manifest.json` at the artifact's root) and the checks made before loading.

The builder writes it (`write_manifest`); the runtime and `dsv4 verify` read it (`check_artifact`):
every file's size and sha256, the GPU architecture, and the versions the backend needs. Problems are
collected and reported one line each, naming the file or the mismatch; nothing is loaded before
they are all clear.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, read_json
from .trt_support import installed_versions

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(UserError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: str | Path, fields: dict[str, Any]) -> Path:
    """Write manifest.json listing every other file under `root` with its size and sha256."""
    root = Path(root)
    files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
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


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_artifact(root: str | Path, machine: Machine | None = None, hashes: bool = True) -> tuple[dict, list[str]]:
    """Read the manifest and check the artifact against its files and this machine.

    Returns (manifest, problems); `problems` is empty when the artifact can be loaded here.
    """
    root = Path(root)
    path = root / MANIFEST
    manifest = read_json(path, ArtifactError,
                         f"{root} is not an artifact: no {MANIFEST} (build one with `dsv4 build RECIPE`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')!r}, this runtime reads "
                            f"{FORMAT_VERSION}; rebuild the artifact")
    problems = []
    for entry in manifest.get("files", []):
        f = root / entry["path"]
        if not f.is_file():
            problems.append(f"file {entry['path']} is missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"file {entry['path']} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif hashes and sha256_file(f) != entry["sha256"]:
            problems.append(f"file {entry['path']} is corrupted (sha256 mismatch)")
    machine = machine or Machine.this()
    archs = manifest.get("gpu_archs", [])
    if manifest.get("device") == "cuda":
        if machine.gpu_arch is None:
            problems.append(f"the artifact is built for {', '.join(archs)}; this machine has no CUDA GPU")
        elif not any(a.rstrip("a") == machine.gpu_arch for a in archs):
            problems.append(f"the artifact is built for {', '.join(archs)}; this GPU is {machine.gpu_arch}")
    for name, needed in manifest.get("versions", {}).items():
        have = machine.versions.get(name)
        if have is None:
            problems.append(f"the artifact needs {name} {needed}; it is not installed here")
        elif _major_minor(have) != _major_minor(needed):
            problems.append(f"the artifact needs {name} {_major_minor(needed)}.x; this machine has {have}")
    return manifest, problems


def load_manifest(root: str | Path, machine: Machine | None = None, hashes: bool = True) -> dict:
    """The manifest of an artifact that passes every check; otherwise one error naming the first problem."""
    manifest, problems = check_artifact(root, machine, hashes)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `dsv4 verify {root}`)" if len(problems) > 1 else ""
        raise ArtifactError(f"artifact {root}: {problems[0]}{more}")
    return manifest
