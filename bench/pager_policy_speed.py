"""Host time of the expert pager's policy per decode step (CPU only): what `follow()` and `begin_step` spend
deciding admissions and victims while a step runs on the GPU, at Flash-8 (8 layers, 1536 slots) and full
Flash (43 layers, 8256 slots: a GB10's three quarters of 11,008 experts) sizes, on a skewed synthetic trace.

    python bench/pager_policy_speed.py [--json bench/results/pager-policy-speed-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.pager_policy import SlotPool  # noqa: E402


def policy_ms_per_step(layers: int, slots: int, steps: int = 50, experts: int = 256, k: int = 6) -> dict:
    """Each layer: prefetch 6 predicted experts (victims from layers already run), then record 6 uses; after
    the step, admit its misses. Routing drawn from a Zipf-like law (exponent 0.8) per layer."""
    pool = SlotPool(slots)
    pool.fill([(layer, e) for e in range(experts) for layer in range(layers)])
    rng = random.Random(0)
    law = [1.0 / (i + 1) ** 0.8 for i in range(experts)]
    t0 = time.perf_counter()
    for _ in range(steps):
        missed = []
        for layer in range(layers):
            pool.prefetch([(layer, e) for e in rng.choices(range(experts), law, k=k)], layers=range(max(layer - 1, 0)))
            used = [(layer, e) for e in rng.choices(range(experts), law, k=k)]
            missed += pool.record(used, [key in pool.resident for key in used])
        pool.admit(missed)
    ms = (time.perf_counter() - t0) / steps * 1e3
    return {"layers": layers, "slots": slots, "steps": steps, "policy_ms_per_step": ms,
            "hit_rate": pool.stats.hit_rate, "evictions_per_step": pool.stats.evictions / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pager-policy-speed-cpu.json")
    args = ap.parse_args()
    rows = [policy_ms_per_step(8, 1536), policy_ms_per_step(43, 8256)]
    for row in rows:
        print(json.dumps(row))
    report = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
