"""The kernels' machine code, read without a GPU: for each kernel of the fat binary, its registers and the
innermost loop around its first tensor-core instruction, with that loop's instructions by opcode and per
MMA. Static counts (every path of the loop body, taken or not), so they compare versions of one kernel; ncu
on a GPU gives the executed counts (bench/ncu_sass_summary.py).

    python bench/sass_loop.py [--fatbin plugins/dsv4_kernels.fatbin] [--arch sm_90a] [--kernel REGEX]

Needs cuobjdump and nvdisasm: CUDA's own, or NVIDIA's wheels (`pip install -e '.[sass]'`, found through the
`nvidia` package). Session 12 used it to find that a wgmma decode step spent about 155 of its 390
instructions on issuing the next step's copies (README, kernel status). Each kernel's line also says whether
its first global read comes before its wait for the kernel before it (programmatic dependent launch; the
check tests/test_pdl_prefetch_sass.py makes of the weight kernels).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMA = re.compile(r"\b(QGMMA|HGMMA|HMMA|IMMA|QMMA|OMMA|UTCQMMA|UTCHMMA)\b")
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:\S+,\s*)?0x([0-9a-f]+)")


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
        for base in nvidia.__path__:
            for candidate in Path(base).glob("*/bin/cuobjdump"):
                return str(candidate)
    except ImportError:
        pass
    raise SystemExit("error: no cuobjdump: install CUDA's, or `pip install -e '.[sass]'`")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass text -> {kernel: [(address, instruction)]}."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = INSTRUCTION.match(line)
        if current is not None and m:
            current.append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


GLOBAL_READS = ("LDG", "LDGSTS", "UBLKCP", "UTMALDG")


def reads_before_wait(code: list[tuple[int, str]]) -> bool | None:
    """Whether the kernel's first global read comes before its first wait for the kernel before it (ACQBULK,
    PTX griddepcontrol.wait) in code order; None where it has no wait or no global read."""
    ops = [opcode(ins) for _, ins in code]
    wait = next((k for k, op in enumerate(ops) if op == "ACQBULK"), None)
    read = next((k for k, op in enumerate(ops) if op in GLOBAL_READS), None)
    return None if wait is None or read is None else read < wait


def innermost_mma_loop(code: list[tuple[int, str]]) -> list[tuple[int, str]] | None:
    """The instructions of the smallest backward-branch range that holds the kernel's first MMA."""
    mmas = [a for a, ins in code if MMA.search(ins)]
    if not mmas:
        return None
    loops = []
    for a, ins in code:
        m = BRANCH.search(ins)
        if m and int(m.group(1), 16) <= mmas[0] <= a:
            loops.append((a - int(m.group(1), 16), int(m.group(1), 16), a))
    if not loops:
        return None
    _, lo, hi = min(loops)
    return [(a, ins) for a, ins in code if lo <= a <= hi]


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:       # cuobjdump -sass without nvdisasm beside it fails here
        raise SystemExit(f"error: {' '.join(cmd)} failed: {result.stderr.strip() or result.stdout[-300:]}")
    return result.stdout


def registers(cuobjdump: str, fatbin: Path, arch: str) -> dict[str, int]:
    text = run([cuobjdump, "-res-usage", "-arch", arch, str(fatbin)])
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+)", text)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fatbin", type=Path, default=ROOT / "plugins" / "dsv4_kernels.fatbin",
                    help="built by python -m plugins.build")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--kernel", default=".", help="regular expression on kernel names")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    args = ap.parse_args()
    if not args.fatbin.exists():
        raise SystemExit(f"error: no {args.fatbin}: build it with `python -m plugins.build`")
    cuobjdump = find_cuobjdump()
    sass = run([cuobjdump, "-sass", "-arch", args.arch, str(args.fatbin)])
    regs = registers(cuobjdump, args.fatbin, args.arch)
    for name, code in sorted(functions(sass).items()):
        if not re.search(args.kernel, name):
            continue
        loop = innermost_mma_loop(code)
        early = reads_before_wait(code)
        order = "" if early is None else ", reads before its wait" if early else ", waits before its first read"
        head = f"{name}: {len(code)} instructions, {regs.get(name, '?')} registers{order}"
        if loop is None:
            print(head + "; no tensor-core loop")
            continue
        ops = collections.Counter(opcode(ins) for _, ins in loop)
        mmas = sum(n for op, n in ops.items() if MMA.search(op))
        print(f"{head}; MMA loop {loop[0][0]:#x}-{loop[-1][0]:#x}: {len(loop)} instructions, {mmas} MMAs, "
              f"{len(loop) / mmas:.1f} per MMA")
        print("  " + "  ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    sys.exit(main())
