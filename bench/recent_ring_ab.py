"""The drafter's ring of inputs (`ArtifactModel.recent`: the main model's last streams at the last
`sliding_window` positions) as a verification writes its two rows, at Flash size on a GPU: the whole ring
rewritten through `plugins.oracle.ring_update` (the verification until session 57) against the two rows put in
place by one `index_copy_` (`ArtifactModel._keep_recent`), each in a CUDA graph, the same ring bit for bit.

    python bench/recent_ring_ab.py [--json bench/results/recent-ring-ab.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import graph_time_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from builder.config import parse_config  # noqa: E402
from builder.presets import preset_json  # noqa: E402
from plugins.oracle import ring_update  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/recent-ring-ab.json"))
    args = ap.parse_args()
    cfg = parse_config(preset_json("flash"))
    dev = "cuda"
    ring = torch.randn(1, cfg.sliding_window, cfg.hc_mult, cfg.hidden_size, device=dev).bfloat16()
    h = torch.randn(2, cfg.hc_mult, cfg.hidden_size, device=dev).bfloat16()
    start = torch.tensor([cfg.sliding_window - 1], device=dev)      # the two rows wrap around the ring's end
    two = torch.full((1,), 2, device=dev)
    pos = start + torch.arange(2, device=dev)
    forms = {"ring_update": lambda: ring.copy_(ring_update(ring, h[None], start, two)),
             "index_copy": lambda: ring[0].index_copy_(0, pos % ring.size(1), h)}
    base, rings = ring.clone(), []
    for fn in forms.values():                   # each form once from the same ring: the same rows must result
        ring.copy_(base)
        fn()
        rings.append(ring.clone())
    same = torch.equal(*rings)
    report = run_header() | {"copy_bandwidth_gb_s": copy_bandwidth() / 1e9, "ring_bytes": ring.numel() * 2,
                             "same_ring": same, "us": {}}
    for _ in range(2):                          # two rounds, the forms in turn
        for name, fn in forms.items():
            report["us"].setdefault(name, []).append(graph_time_ms(fn, launches=50) * 1e3)
    for name, times in report["us"].items():
        print(f"{name}: {', '.join(f'{t:.2f}' for t in times)} us a verification")
    print(f"the same ring: {same}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
