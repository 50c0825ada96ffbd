"""Warp instructions and stall samples by SASS opcode, from Nsight Compute's per-instruction page:
    ncu --set full --import-source no -o moe_down -k regex:dsv4_moe_down -s 2 -c 1 python bench/ncu_target.py moe
    ncu -i moe_down.ncu-rep --page source --csv --print-source sass > down.csv
    python bench/ncu_sass_summary.py down.csv [more.csv ...]
"""
import collections
import csv
import sys


def summary(path: str, top: int = 16) -> str:
    rows = list(csv.reader(open(path)))
    kernel, header, data = rows[0][1], rows[1], rows[2:]
    src, executed = header.index("Source"), header.index("Instructions Executed")
    sampled = header.index("Warp Stall Sampling (All Samples)")
    count, stalls = collections.Counter(), collections.Counter()
    for row in data:
        if len(row) <= max(src, executed, sampled) or not row[executed].isdigit() or not row[src].split():
            continue                               # blank lines, repeated headers
        words = row[src].split()
        opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]   # predicate, modifiers off
        count[opcode] += int(row[executed])
        stalls[opcode] += int(row[sampled])
    total, samples = sum(count.values()), sum(stalls.values())
    mmas = count["QGMMA"] + count["HMMA"]          # tensor-core instructions, to read the rest per MMA
    lines = [f"{kernel}: {total} warp instructions, {samples} stall samples ({path})"
             + (f"; {total / mmas:.1f} per tensor-core instruction" if mmas else ""),
             "  opcode      instructions  share  stall share" + ("  per MMA" if mmas else "")]
    for opcode, n in count.most_common(top):
        lines.append(f"  {opcode:10s} {n:13d}  {n / total:5.3f}  {stalls[opcode] / samples:5.3f}"
                     + (f"  {n / mmas:7.2f}" if mmas else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summary(p) for p in sys.argv[1:]))
