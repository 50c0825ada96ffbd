"""Cases of a benchmark timed in turn, each in a process of its own (a process loads one kernel image), for
several rounds, so that drift of the machine falls on every case alike (bench/fatbin_ab.py,
bench/attention_pairs.py). A case may turn runtime switches in its process, as CASE@MODULE.NAME=VALUE[,...]
(VALUE a Python literal): one build timed with a switch each way. Probes whose cases need no process of their
own (switches that take effect at once) run them in one process: `cases_in_one_process`."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from typing import Callable


def runs_in_turn(cases: list[str], rounds: int, child_argv: Callable[[str], list[str]],
                 describe: Callable[[dict], str]) -> list[dict]:
    """For each round, each case: runs `python child_argv(case)`, whose last stdout line is its figures as
    JSON, prints `round R CASE: describe(figures)`, and returns every run as {"round": R, **figures}. A child
    that fails ends the whole run with its stderr and one error line."""
    runs = []
    for r in range(rounds):
        for case in cases:
            child = subprocess.run([sys.executable, *child_argv(case)], capture_output=True, text=True)
            if child.returncode != 0:
                sys.stderr.write(child.stderr)
                raise SystemExit(f"error: the run with {case} failed (exit {child.returncode})")
            run = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append({"round": r, **run})
            print(f"round {r} {case}: {describe(run)}", flush=True)
    return runs


def parse_case(case: str) -> tuple[str, list[tuple[str, str, object]]]:
    """CASE[@MODULE.NAME=VALUE,...] -> (CASE, [(module, name, value)])."""
    head, _, turned = case.partition("@")
    switches = []
    for item in filter(None, turned.split(",")):
        target, eq, value = item.partition("=")
        module, _, name = target.rpartition(".")
        if not (eq and module and name):
            raise SystemExit(f"error: {item!r} is not MODULE.NAME=VALUE")
        try:
            switches.append((module, name, ast.literal_eval(value)))
        except (ValueError, SyntaxError):
            raise SystemExit(f"error: {value!r} in {item!r} is not a Python literal") from None
    return head, switches


def turn_switches(switches: list[tuple[str, str, object]]) -> None:
    """Sets each (module, name, value) of `parse_case`: in a child, before the model or kernels load."""
    for module, name, value in switches:
        target = importlib.import_module(module)
        if not hasattr(target, name):
            raise SystemExit(f"error: {module} has no {name}")
        setattr(target, name, value)


def cases_in_one_process(doc: str, cases: tuple[str, ...], run_case: Callable[[str, float], dict], default_json: str,
                         rounds: int = 3, note: Callable[[], str] | None = None) -> None:
    """The main of a probe whose cases turn switches within one process (one kernel image) and time a line of
    bench/kernels.py: `--rounds` rounds of each case in turn, run_case(case, copy bandwidth) -> that bench's
    figures (time_us, fraction_of_copy_bw); prints each, and writes them all with the run's header to
    `--json` (default `default_json`). `note()`: a line printed after the copy bandwidth."""
    import argparse
    from pathlib import Path

    import torch

    from bench.results_json import run_header, write_json
    from runtime.bench import copy_bandwidth
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--json", type=Path, default=Path(default_json))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"error: {Path(sys.argv[0]).name} needs a CUDA GPU")
    with torch.inference_mode():
        bandwidth = copy_bandwidth()
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s" + (f"; {note()}" if note else ""), flush=True)
        rows = []
        for r in range(args.rounds):
            for case in cases:
                row = {"round": r, "case": case, **run_case(case, bandwidth)}
                rows.append(row)
                print(f"round {r} {case}: {row['time_us']:.1f} us, {row['fraction_of_copy_bw']:.3f} of the copy "
                      "bandwidth", flush=True)
    write_json(args.json, {**run_header(), "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows})
