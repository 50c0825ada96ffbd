"""Cases of a benchmark timed in turn, each in a process of its own (a process loads one kernel image), for
several rounds, so that drift of the machine falls on every case alike (bench/fatbin_ab.py,
bench/attention_pairs.py)."""
from __future__ import annotations

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
