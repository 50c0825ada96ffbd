"""bench/ncu_sass_summary.py on a small page in Nsight Compute's per-instruction CSV form (CPU)."""
import csv

from bench.ncu_sass_summary import summary


def test_summary_counts_each_instruction_once_and_splits_the_hot_loop(tmp_path):
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
              "stall_long_sb", "stall_wait (Not Issued)"]
    body = [["0x10", "LDG.E.128 R4, desc[UR4][R2.64]", "30", "8", "0", "30", "99"],     # prologue
            ["0x20", "@P0 IMAD R5, R5, 0x4, RZ", "6", "64", "6", "0", "99"],             # loop
            ["0x30", "QGMMA.64x8x32.F32.E4M3.E4M3 R24, R56, gdesc[UR16], RZ", "4", "64", "4", "0", "99"],
            ["0x20", "@P0 IMAD R5, R5, 0x4, RZ", "6", "64", "6", "0", "99"],             # listed twice
            [], ["Address", "Source"]]                                                      # blank, header again
    page = tmp_path / "page.csv"
    with open(page, "w", newline="") as f:
        csv.writer(f).writerows([["Kernel Name", "k"], header, *body])
    text = summary(str(page))
    assert text.startswith("k: 136 warp instructions, 40 stall samples")
    assert "2.1 per tensor-core instruction" in text
    assert "0.25 of the samples in the hot loop" in text                  # (6 + 4) of 40
    assert "IMAD" in text and "stall reason share: long_sb 0.750, wait 0.250" in text
