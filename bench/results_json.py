"""What every benchmark's JSON under bench/results/ starts with, and how it is written."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch


def run_header() -> dict:
    """The exact command, the GPU ("cpu" without one) and the versions of this run."""
    return {"command": "python " + " ".join(sys.argv),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def write_json(path: Path, report: dict) -> None:
    """`report` to `path` (its folder made if missing), indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
