"""Where a decode step's time goes: GPU kernel time per kernel family for one step of a built artifact,
against the step's replayed-graph time and its bytes / copy bandwidth (the floor); with --prefill N, the
same for a prompt of N tokens through the prefill programs (chunks of the recipe's prefill_chunk).

Kernels are recorded by torch.profiler on plain launches (no graph: the kernels are the same, the host
gaps are not); the graph time comes from replays. Families: our `dsv4_*` kernels by name, Inductor's
generated Triton kernels, and everything else (aten, cuBLAS) by name.

    python bench/profile_decode.py /tmp/art/flash4-bfloat16 [--prefill 1024] --json bench/results/profile-decode-flash4-h200.json
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plugins import fp8_linear, hc_pre, moe_experts, streams  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import bytes_per_token, copy_bandwidth  # noqa: E402


def family(kernel: str) -> str:
    """A readable bucket for a kernel name."""
    if kernel.startswith("dsv4_"):
        return kernel.split("<")[0]
    if kernel.startswith("triton_"):
        return "inductor:" + re.sub(r"_\d+$", "", kernel)[7:70]     # the fused ops, without the serial
    if "gemm" in kernel or "gemv" in kernel or "xmma" in kernel or "cutlass" in kernel:
        return "cublas-gemm"
    return "other:" + kernel.split("<")[0].split("(")[0][:60]


def kernel_times(run, reps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds of GPU time per family per call of `run(i)`, and launches per call, over `reps` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            run(i)
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us[family(e.name)] += e.time_range.elapsed_us() / reps
            count[family(e.name)] += 1
    return dict(us), {k: v // reps for k, v in count.items()}


def kernel_sources(run, reps: int) -> dict[str, int]:
    """Launches per call of `run(i)` of each kernel that is neither ours nor Inductor's ("other:" families:
    torch's elementwise and reduction kernels, copies), keyed by the host ops that launched it, innermost
    first: what Python inside the ops or the runtime still launches on its own."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            run(i)
        torch.cuda.synchronize()
    found: dict[str, int] = defaultdict(int)
    for e in prof.events():
        for k in e.kernels:
            if not family(k.name).startswith("other:"):
                continue
            chain, parent = [e.name], e.cpu_parent
            while parent is not None and len(chain) < 5:
                chain.append(parent.name)
                parent = parent.cpu_parent
            found[f"{family(k.name)} <- {' <- '.join(chain)}"] += 1
    return {k: v // reps for k, v in sorted(found.items(), key=lambda kv: -kv[1])}


def host_times(run, reps: int, top: int = 15) -> dict[str, float]:
    """Microseconds of host (CPU) time per call of `run(i)` spent in each op itself, the `top` largest: where a
    step without the graph goes besides its kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(reps):
            run(i)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {e.key: e.self_cpu_time_total / reps for e in rows}


def print_families(us: dict[str, float], launches: dict[str, int]) -> None:
    total = sum(us.values())
    for name, t in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"  {t:9.1f} us  {100 * t / total:5.1f}%  x{launches[name]:<4d} {name}")


def prefill_report(model: ArtifactModel, tokens: int, reps: int = 3) -> dict:
    """A prompt of `tokens` tokens from empty caches: wall time and GPU time per kernel family."""
    prompt = torch.arange(tokens)[None] % 1000 + 2

    def run(_):
        model.reset(1)
        model.forward(prompt)
    run(0)                                          # first use: modules load, handles are made
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(reps):
        run(i)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / reps
    us, launches = kernel_times(run, reps)
    return {"prompt_tokens": tokens, "prefill_ms": ms, "prefill_tok_s": tokens / ms * 1e3,
            "kernel_ms": sum(us.values()) / 1e3, "kernel_us": dict(sorted(us.items(), key=lambda kv: -kv[1])),
            "launches": launches}


def step_ms(model: ArtifactModel, steps: int, pos: int, repeats: int = 5) -> float:
    """Wall time per decode step (graph replay if the model captured one, else plain launches): the median
    of `repeats` runs of `steps` steps from the same position (one run of 20 steps moved by 2-4% between
    two profiles of one tree, more than the changes it was to tell apart)."""
    token, runs = torch.tensor([5]), []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            model.step(token, torch.tensor([pos + i]))
        torch.cuda.synchronize()
        runs.append(1e3 * (time.perf_counter() - t0) / steps)
    return sorted(runs)[len(runs) // 2]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per timed run (5 runs, the median)")
    ap.add_argument("--context", type=int, default=64, help="tokens fed before measuring")
    ap.add_argument("--prefill", type=int, default=0, help="also profile a prompt of this many tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "copy_bandwidth_gb_s": bandwidth / 1e9}
    # the step with the defaults, and with one switch turned the other way each: the shared expert after the
    # gate (beside the routed experts only: moe_experts.SHARED_BEFORE_GATE) and in line after them
    # (SHARED_BESIDE_ROUTED too); the compressors in line after the query path, not beside it
    # (streams.SIDE_BRANCHES, which also keeps comb's Sinkhorn iterations in line); comb's Sinkhorn iterations
    # in line (hc_pre.SINKHORN_BESIDE; artifacts built from session 27 on run them beside the chain); the FP8
    # GEMVs planned as before session 29 (fp8_linear.SHARED_STATIC_BYTES: wo_b with two ring stages, not three)
    switches = {"shared_after_gate": [(moe_experts, "SHARED_BEFORE_GATE", False)],
                "shared_in_line": [(moe_experts, "SHARED_BEFORE_GATE", False),
                                   (moe_experts, "SHARED_BESIDE_ROUTED", False)],
                "compressors_in_line": [(streams, "SIDE_BRANCHES", False)],
                "sinkhorn_in_line": [(hc_pre, "SINKHORN_BESIDE", False)],
                "wo_b_two_stages": [(fp8_linear, "SHARED_STATIC_BYTES", 4096)]}
    for name, turned in {"default": [], **switches}.items():
        kept = [(module, attr, getattr(module, attr)) for module, attr, _ in turned]
        for module, attr, value in turned:
            setattr(module, attr, value)
        fp8_linear.gemv_plan.cache_clear()             # plans are cached per shape
        graphed = ArtifactModel(args.artifact, "cuda", graphs=True)
        graphed.forward(torch.arange(args.context)[None] % 1000 + 2)
        report["graph_step_ms" + ("" if name == "default" else "_" + name)] = step_ms(graphed, args.steps,
                                                                                       args.context)
        if name == "default":
            report["bytes_per_token"] = per_token = bytes_per_token(graphed)
            report["floor_step_ms"] = 1e3 * per_token / bandwidth
        del graphed
        for module, attr, value in kept:
            setattr(module, attr, value)
    plain = ArtifactModel(args.artifact, "cuda", graphs=False)
    plain.forward(torch.arange(args.context)[None] % 1000 + 2)
    report["plain_step_ms"] = step_ms(plain, args.steps, args.context)
    token, pos = torch.tensor([5]), args.context + args.steps
    us, launches = kernel_times(lambda i: plain.step(token, torch.tensor([pos + i])), args.steps)
    report["kernel_us_per_step"] = dict(sorted(us.items(), key=lambda kv: -kv[1]))
    report["launches_per_step"] = launches
    report["kernel_ms_per_step"] = total = sum(us.values()) / 1e3
    report["other_kernel_sources"] = kernel_sources(lambda i: plain.step(token, torch.tensor([pos + i])), args.steps)
    report["plain_host_us_per_step_by_op"] = host_times(lambda i: plain.step(token, torch.tensor([pos + i])),
                                                        args.steps)
    turned = (f"{name.replace('_', ' ')} {report['graph_step_ms_' + name]:.3f} ms" for name in switches)
    print("step with one switch turned: " + ", ".join(turned))
    print(f"step: graph {report['graph_step_ms']:.3f} ms, plain {report['plain_step_ms']:.3f} ms, kernels "
          f"{total:.3f} ms, floor {report['floor_step_ms']:.3f} ms ({per_token / 1e9:.2f} GB at "
          f"{bandwidth / 1e9:.0f} GB/s); fraction of bandwidth {report['floor_step_ms'] / report['graph_step_ms']:.2f}")
    print_families(us, launches)
    for source, n in report["other_kernel_sources"].items():
        print(f"  x{n:<3d} {source}")
    if args.prefill:
        if plain.prefill_runs is None:
            print("this artifact has no prefill programs: its prompts run as decode steps")
        report["prefill"] = pre = prefill_report(plain, args.prefill)
        print(f"prefill of {args.prefill} tokens: {pre['prefill_ms']:.1f} ms ({pre['prefill_tok_s']:.0f} tok/s), "
              f"kernels {pre['kernel_ms']:.1f} ms")
        print_families(pre["kernel_us"], pre["launches"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
