"""The command line of the output A/B scripts (bench/moe_outputs.py, bench/gemv_outputs.py): `save OUT.pt
[--fatbin FATBIN]` runs a build's kernels on fixed inputs and saves their outputs; `cmp A.pt B.pt` prints
what differs between two saves and exits 1 where anything does."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch


def main(doc: str, save: Callable[[Path], None], compare: Callable[[Path, Path], int]) -> None:
    """save(out) writes one build's outputs; compare(a, b) prints the differences and returns how many
    cases (or outputs) differ."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    saving = sub.add_parser("save")
    saving.add_argument("out", type=Path)
    saving.add_argument("--fatbin", type=Path, default=None, help="the kernels' fat binary (default: the tree's)")
    both = sub.add_parser("cmp")
    both.add_argument("a", type=Path)
    both.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.what == "save":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: {ap.prog} save needs a CUDA GPU")
        if args.fatbin is not None:
            from plugins import loader
            loader.FATBIN = args.fatbin.resolve()
        save(args.out)
    else:
        raise SystemExit(1 if compare(args.a, args.b) else 0)
