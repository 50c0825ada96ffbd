"""Build the project's CUDA kernels into one fat binary: SASS for sm_90a, sm_100a, sm_120a and sm_121a,
plus compute_90 PTX that newer GPUs JIT. Needs only nvcc (no GPU):

    python -m plugins.build [--out plugins/dsv4_kernels.fatbin] [-D NAME=VALUE ...]

-D sets a macro of the sources, for a second build to time against the first (a probe's switch, as in
bench/results/moe-decode-dependencies-probe-s38.patch).

At run time the CUDA driver picks the image matching the GPU (see plugins/loader.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
DEFAULT_OUT = Path(__file__).parent / "dsv4_kernels.fatbin"
ARCHS = ("90a", "100a", "120a", "121a")


def nvcc_command(sources: list[Path], out: Path, defines: tuple[str, ...] = ()) -> list[str]:
    cmd = ["nvcc", "-fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-I{CSRC}", "-o", str(out)]
    cmd += [f"-D{d}" for d in defines]
    for arch in ARCHS:
        cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    cmd.append("-gencode=arch=compute_90,code=compute_90")
    return cmd + [str(s) for s in sources]


def build(out: Path = DEFAULT_OUT, defines: tuple[str, ...] = ()) -> Path:
    if shutil.which("nvcc") is None:
        raise SystemExit("error: nvcc is not on PATH; install the CUDA toolkit (13.0 or newer)")
    sources = sorted(CSRC.glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        # nvcc makes one fat binary per translation unit: link them into one through a single TU.
        unit = Path(tmp) / "all_kernels.cu"
        unit.write_text("".join(f'#include "{s.resolve()}"\n' for s in sources))
        partial = Path(tmp) / out.name
        result = subprocess.run(nvcc_command([unit], partial, defines), capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            raise SystemExit(f"error: nvcc failed building {out.name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        # copy next to the target, then rename: a reader never sees a half-written fat binary (a move
        # from /tmp across filesystems is a copy), and a failed build leaves the previous one intact
        staged = out.with_name(out.name + ".partial")
        shutil.copyfile(partial, staged)
        os.replace(staged, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                    help="a macro for the sources (repeatable)")
    args = ap.parse_args()
    out = build(args.out, tuple(args.defines))
    print(f"built {out} ({out.stat().st_size} bytes) for {', '.join('sm_' + a for a in ARCHS)} + compute_90 PTX")


if __name__ == "__main__":
    main()
