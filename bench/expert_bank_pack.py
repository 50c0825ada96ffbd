"""Time of packing the expert bank (`builder.expert_bank.write_layer_bank`, the build's `experts` stage) on a
checkpoint: the given layers one after another and side by side in threads, as `dsv4 build` runs them.

    dsv4 synth --model flash --layers 4 --out /tmp/flash4ck
    python bench/expert_bank_pack.py /tmp/flash4ck --layers 2 3 --threads 1 2 --json bench/results/expert-bank-pack-cpu.json

Each file is written to a scratch folder and deleted after its run (the page cache then holds the
checkpoint, not the banks). Figures: seconds, and GB of bank written per second.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_json import run_header, write_json  # noqa: E402
from builder.checkpoint import Checkpoint  # noqa: E402
from builder.expert_bank import write_layer_bank  # noqa: E402


def pack_seconds(ckpt: Checkpoint, layers: list[int], threads: int, scratch: Path) -> tuple[float, int]:
    """Seconds to write `layers`' banks with `threads` at once, and the bytes written."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        paths = list(pool.map(lambda layer: (write_layer_bank(ckpt, layer, scratch / f"{layer}.experts"),
                                             scratch / f"{layer}.experts")[1], layers))
    seconds = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in paths)
    for p in paths:
        p.unlink()
    return seconds, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ckpt = Checkpoint(args.checkpoint)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.checkpoint.parent) as scratch:
        for r in range(args.rounds):
            for threads in args.threads:
                seconds, nbytes = pack_seconds(ckpt, args.layers, threads, Path(scratch))
                rows.append({"round": r, "layers": args.layers, "threads": threads, "seconds": seconds,
                             "gb_per_s": nbytes / seconds / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        write_json(args.json, run_header() | {"cpus": os.cpu_count(),
                                              "checkpoint_layers": ckpt.config.num_hidden_layers, "results": rows})


if __name__ == "__main__":
    main()
