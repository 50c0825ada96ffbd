"""Two branches of work on two CUDA streams: a fork and a join, which a CUDA graph captures as two parallel
branches. Decode kernels each stream a weight that takes a few microseconds to read, and each spends part
of that ramping up and draining: two independent ones side by side can fill each other's ramps (the shared
expert beside the routed experts: `dsv4::moe_with_shared`).
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


def beside(main: Callable[[], A], side: Callable[[], B], device: torch.device) -> tuple[A, B]:
    """main() on the current stream and side() on a second stream of `device`, started after everything
    queued so far; returns both results once the current stream has waited for the second. What side()
    allocates belongs to the second stream, and may be handed back to the current one without
    record_stream (which graph capture forbids): the second stream's next work, and so any reuse of those
    blocks, waits for everything the current stream has queued by then."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    current, other = torch.cuda.current_stream(index), _side_stream(index)
    other.wait_stream(current)
    with torch.cuda.stream(other):
        b = side()
    a = main()
    current.wait_stream(other)
    return a, b
