"""Warp instructions and stall samples by SASS opcode, from Nsight Compute's per-instruction page:
    ncu --set full --import-source no -o moe_down -k regex:dsv4_moe_down -s 2 -c 1 python bench/ncu_target.py moe
    ncu -i moe_down.ncu-rep --page source --csv --print-source sass > down.csv
    python bench/ncu_sass_summary.py down.csv [more.csv ...]
Also the stall samples by reason (where the page has them) and the share of samples in the hot loop: the
instructions executed at least half as often as the most executed one (a kernel's step loop), the rest
being its prologue and epilogues (session 44 found 43% of the decode MoE down kernel's samples there).
"""
import collections
import csv
import sys

HOT = 0.5                                          # of the most executed instruction's count: the hot loop


def summary(path: str, top: int = 16) -> str:
    rows = list(csv.reader(open(path)))
    kernel, header, data = rows[0][1], rows[1], rows[2:]
    address, src, executed = header.index("Address"), header.index("Source"), header.index("Instructions Executed")
    sampled = header.index("Warp Stall Sampling (All Samples)")
    reasons = [i for i, name in enumerate(header) if name.startswith("stall_") and "Not Issued" not in name]
    count, stalls, by_reason, seen, kept = (collections.Counter(), collections.Counter(), collections.Counter(),
                                            set(), [])
    for row in data:
        if len(row) <= max(src, executed, sampled) or not row[executed].isdigit() or not row[src].split():
            continue                               # blank lines, repeated headers
        if row[address] in seen:                   # some ncu versions list each instruction twice
            continue
        seen.add(row[address])
        words = row[src].split()
        opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]   # predicate, modifiers off
        count[opcode] += int(row[executed])
        stalls[opcode] += int(row[sampled] or 0)
        for i in reasons:
            by_reason[header[i][len("stall_"):]] += int(row[i] or 0)
        kept.append((int(row[executed]), int(row[sampled] or 0)))
    total, samples = sum(count.values()), sum(stalls.values())
    mmas = count["QGMMA"] + count["HMMA"]          # tensor-core instructions, to read the rest per MMA
    most = max((n for n, _ in kept), default=0)
    hot = sum(s for n, s in kept if n >= HOT * most)
    lines = [f"{kernel}: {total} warp instructions, {samples} stall samples ({path})"
             + (f"; {total / mmas:.1f} per tensor-core instruction" if mmas else "")
             + (f"; {hot / samples:.2f} of the samples in the hot loop" if samples else ""),
             "  opcode      instructions  share  stall share" + ("  per MMA" if mmas else "")]
    for opcode, n in count.most_common(top):
        lines.append(f"  {opcode:10s} {n:13d}  {n / total:5.3f}  {stalls[opcode] / max(samples, 1):5.3f}"
                     + (f"  {n / mmas:7.2f}" if mmas else ""))
    if by_reason:
        reason_total = max(sum(by_reason.values()), 1)
        lines.append("  stall reason share: " + ", ".join(f"{name} {n / reason_total:.3f}"
                                                        for name, n in by_reason.most_common() if n))
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summary(p) for p in sys.argv[1:]))
