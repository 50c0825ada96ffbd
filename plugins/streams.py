"""Two branches of work on two CUDA streams: a fork and a join, which a CUDA graph captures as two parallel
branches. Decode kernels each stream a weight that takes a few microseconds to read, and each spends part
of that ramping up and draining, and a decode step is a chain of such launches, each waiting for the one
before it: independent work run side by side fills those gaps (the shared expert beside the routed
experts: `dsv4::moe_with_shared`; the compressors beside the query path: `dsv4::fork_side`).

Memory rules: what the second stream allocates may be handed back to the current one without
record_stream (which graph capture forbids): the second stream's next work, and so any reuse of those
blocks, waits for everything the current stream has queued by then (the next fork). What the second
stream reads must stay allocated until the join: `beside` holds its callables' inputs itself; a program
that forks (`dsv4::fork_side`) passes them to `dsv4::join_side`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

from .loader import device_index

A = TypeVar("A")
B = TypeVar("B")

# Whether `dsv4::fork_side` starts a second branch: off, the ops given its token run in line on the current
# stream (the same bits). A switch for benchmarks (bench/profile_decode.py).
SIDE_BRANCHES = True


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


def _streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    index = device_index(device)
    return torch.cuda.current_stream(index), _side_stream(index)


def fork(device: torch.device) -> None:
    """The second stream of `device` waits for everything queued on the current one so far."""
    current, other = _streams(device)
    other.wait_stream(current)


def join(device: torch.device) -> None:
    """The current stream of `device` waits for everything queued on the second one so far."""
    current, other = _streams(device)
    current.wait_stream(other)


# Devices whose second stream holds work an op forked for a later op to join (fork_for_later, join_pending):
# where the program has no token to pass between the two (comb's Sinkhorn iterations, plugins/hc_pre.py).
_PENDING: set[int] = set()


def fork_for_later(device: torch.device) -> None:
    """`fork` for work whose reader is a later op that calls `join_pending` first."""
    fork(device)
    _PENDING.add(device_index(device))


def join_pending(device: torch.device) -> None:
    """`join`, where work forked by `fork_for_later` has not been joined yet (else nothing: a join on a stream
    this capture never forked would not be captured)."""
    if device.type == "cuda" and device_index(device) in _PENDING:
        join(device)
        _PENDING.discard(device_index(device))


def on_side(device: torch.device, enabled: bool = True):
    """A context in which torch's launches and allocations go to the second stream of `device` (after a
    `fork`); a no-op where not enabled."""
    return torch.cuda.stream(_streams(device)[1]) if enabled else contextlib.nullcontext()


def beside(main: Callable[[], A], side: Callable[[], B], device: torch.device) -> tuple[A, B]:
    """main() on the current stream and side() on a second stream of `device`, started after everything
    queued so far; returns both results once the current stream has waited for the second."""
    fork(device)
    with on_side(device):
        b = side()
    a = main()
    join(device)
    return a, b
