"""Where a decode step's time goes: GPU kernel time per kernel family for one step of a built artifact,
against the step's replayed-graph time and its bytes / copy bandwidth (the floor).

Kernels are recorded by torch.profiler on plain launches (no graph: the kernels are the same, the host
gaps are not); the graph time comes from replays. Families: our `dsv4_*` kernels by name, Inductor's
generated Triton kernels, and everything else (aten, cuBLAS) by name.

    python bench/profile_decode.py /tmp/art/flash4-bfloat16 --json bench/results/profile-decode-flash4-h200.json
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


def kernel_times(model: ArtifactModel, steps: int, pos: int) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds of GPU time per family per step, and launches per step, over `steps` plain steps."""
    token = torch.tensor([5])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            model.step(token, torch.tensor([pos + i]))
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us[family(e.name)] += e.time_range.elapsed_us() / steps
            count[family(e.name)] += 1
    return dict(us), {k: v // steps for k, v in count.items()}


def step_ms(model: ArtifactModel, steps: int, pos: int) -> float:
    """Wall time per decode step (graph replay if the model captured one, else plain launches)."""
    token = torch.tensor([5])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        model.step(token, torch.tensor([pos + i]))
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=64, help="tokens fed before measuring")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "copy_bandwidth_gb_s": bandwidth / 1e9}
    graphed = ArtifactModel(args.artifact, "cuda", graphs=True)
    graphed.forward(torch.arange(args.context)[None] % 1000 + 2)
    report["graph_step_ms"] = step_ms(graphed, args.steps, args.context)
    report["bytes_per_token"] = per_token = bytes_per_token(graphed)
    report["floor_step_ms"] = 1e3 * per_token / bandwidth
    del graphed
    plain = ArtifactModel(args.artifact, "cuda", graphs=False)
    plain.forward(torch.arange(args.context)[None] % 1000 + 2)
    report["plain_step_ms"] = step_ms(plain, args.steps, args.context)
    us, launches = kernel_times(plain, args.steps, args.context + args.steps)
    report["kernel_us_per_step"] = dict(sorted(us.items(), key=lambda kv: -kv[1]))
    report["launches_per_step"] = launches
    report["kernel_ms_per_step"] = total = sum(us.values()) / 1e3
    print(f"step: graph {report['graph_step_ms']:.3f} ms, plain {report['plain_step_ms']:.3f} ms, kernels "
          f"{total:.3f} ms, floor {report['floor_step_ms']:.3f} ms ({per_token / 1e9:.2f} GB at "
          f"{bandwidth / 1e9:.0f} GB/s); fraction of bandwidth {report['floor_step_ms'] / report['graph_step_ms']:.2f}")
    for name, t in report["kernel_us_per_step"].items():
        print(f"  {t:9.1f} us  {100 * t / 1e3 / total:5.1f}%  x{launches[name]:<4d} {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
