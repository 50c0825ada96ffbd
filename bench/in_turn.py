"""Cases of a benchmark timed in turn, each in a process of its own (a process loads one kernel image), for
several rounds, so that drift of the machine falls on every case alike (bench/fatbin_ab.py,
bench/attention_pairs.py). A case may turn runtime switches in its process, as CASE@MODULE.NAME=VALUE[,...]
(VALUE a Python literal): one build timed with a switch each way."""
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
