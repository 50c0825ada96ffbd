"""Where a replayed decode step's time goes: the kernels of CUDA graph replays, recorded by torch.profiler
(CUPTI), laid out in time. `bench/profile_decode.py` times kernels on plain launches, where each runs alone
after a host gap; inside the graph, launches overlap (programmatic dependent launch, the side stream) or
leave the GPU idle between them, and their sum need not be the step. Here each kernel is charged only the
time it adds to the step: the part of it that ends after every kernel started before it (its exposed
time); what no kernel covers is idle. Exposed plus idle is the step's span, kernel by kernel.

    python bench/graph_timeline.py /tmp/art/flash8-bfloat16 --json bench/results/graph-timeline-flash8-h200.json
"""
from __future__ import annotations

import argparse
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.profile_decode import family, step_ms  # noqa: E402
from bench.results_json import write_json  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import bytes_per_token, copy_bandwidth  # noqa: E402


def replay_kernels(model: ArtifactModel, steps: int, pos: int) -> list[list[tuple[str, float, float]]]:
    """The kernels (name, start us, end us) of `steps` decode graph replays, one list per replay in start order."""
    token = torch.tensor([5])
    return recorded_replays(lambda i: model.step(token, torch.tensor([pos + i])), steps)


def recorded_replays(replay, steps: int) -> list[list[tuple[str, float, float]]]:
    """The kernels (name, start us, end us) of `replay(i)` for i < steps (each the same launches, e.g. a CUDA
    graph's replay), one list per call in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            replay(i)
            torch.cuda.synchronize()
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[1])
    if not kernels:
        raise SystemExit("the profiler recorded no kernels inside the graph replays (CUPTI without graph tracing?)")
    return split_replays(kernels, steps)


def split_replays(kernels: list[tuple[str, float, float]], steps: int) -> list[list[tuple[str, float, float]]]:
    """Kernels of `steps` replays in start order -> one list per replay: equal chunks, since every replay
    launches the same kernels (and the two copies of its inputs before it). A first version cut at gaps over
    50 us and split one H200 recording of 30 replays into about 40 groups; this one refuses a recording that
    does not divide into replays that start alike."""
    if len(kernels) % steps:
        raise SystemExit(f"recorded {len(kernels)} kernels over {steps} replays: not the same number per replay")
    per = len(kernels) // steps
    chunks = [kernels[i:i + per] for i in range(0, len(kernels), per)]
    if len({c[0][0] for c in chunks}) != 1:
        raise SystemExit("the replays' kernels do not start with the same kernel: the recording is not one per replay")
    return chunks


def exposed_times(step: list[tuple[str, float, float]]) -> tuple[list[tuple[str, float, float, float]], float]:
    """Each kernel of one replay as (name, start offset, duration, exposed), and the idle time: exposed is
    how far the kernel's end moves the furthest end of the kernels started before it."""
    t0, frontier, idle, rows = step[0][1], step[0][1], 0.0, []
    for name, start, end in step:
        idle += max(0.0, start - frontier)
        exposed = max(0.0, end - max(frontier, start))
        rows.append((name, start - t0, end - start, exposed))
        frontier = max(frontier, end)
    return rows, idle


def summarise(steps: list[list[tuple[str, float, float]]]) -> dict:
    """Per family: exposed and raw us per step and launches; idle us per step; span; and one step's rows."""
    exposed, raw, count = defaultdict(float), defaultdict(float), defaultdict(int)
    idle_total = span_total = 0.0
    for step in steps:
        rows, idle = exposed_times(step)
        idle_total += idle
        span_total += max(e for _, _, e in step) - step[0][1]
        for name, _, dur, exp in rows:
            exposed[family(name)] += exp
            raw[family(name)] += dur
            count[family(name)] += 1
    n = len(steps)
    fams = sorted(exposed, key=lambda f: -exposed[f])
    middle, _ = exposed_times(steps[n // 2])
    return {"steps": n, "span_us": span_total / n, "idle_us": idle_total / n,
            "families": {f: {"exposed_us": exposed[f] / n, "raw_us": raw[f] / n, "launches": count[f] // n}
                         for f in fams},
            "one_step": [{"kernel": family(name), "start_us": round(s, 2), "us": round(d, 2),
                          "exposed_us": round(e, 2)} for name, s, d, e in middle]}


def print_families(line: dict) -> None:
    """`summarise`'s families, one a line: exposed and raw us per replay, launches."""
    for f, v in line["families"].items():
        print(f"  {v['exposed_us']:8.1f} us exposed  {v['raw_us']:8.1f} us raw  x{v['launches']:<3d} {f}")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=30, help="graph replays recorded")
    ap.add_argument("--context", type=int, default=512, help="tokens fed before recording")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    model = ArtifactModel(args.artifact, "cuda", graphs=True)
    if model.graph is None:
        raise SystemExit("this artifact's decode step is not captured as a graph (bfloat16 compiled programs only)")
    model.forward(torch.arange(args.context)[None] % 1000 + 2)
    per_token = bytes_per_token(model)
    step = step_ms(model, 50, args.context)
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "copy_bandwidth_gb_s": bandwidth / 1e9,
              "graph_step_ms": step, "floor_step_ms": 1e3 * per_token / bandwidth,
              "fraction_of_copy_bw": 1e3 * per_token / bandwidth / step}
    report |= summarise(replay_kernels(model, args.steps, args.context + 50 * 5))
    print(f"step {step:.3f} ms (replayed), {report['fraction_of_copy_bw']:.2f} of the copy bandwidth; recorded span "
          f"{report['span_us']:.1f} us, idle {report['idle_us']:.1f} us")
    print_families(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
