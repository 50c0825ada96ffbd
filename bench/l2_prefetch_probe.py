"""Does pulling a GEMV's weights into L2 while short kernels run shorten the decode step? (H200)

A decode layer alternates short latency-bound kernels (hyper-connections, norms, routing, attention over
a few hundred rows), during which the memory is nearly idle, with weight-streaming GEMVs. This probe
measures, per Flash weight, with L2 flushed before every replay of a CUDA graph:
  - the GEMV alone, cold and after its weights were prefetched (`l2_prefetch`, then a pause): L2's gain;
  - a chain of `--chain` short kernels (`rms_norm_rows` on one row) and then the GEMV: without prefetch,
    with the prefetch launched first on the same stream, on a second stream beside the chain, and with
    one prefetch per 128-byte line instead of TMA bulk prefetches.

    python bench/l2_prefetch_probe.py [--json bench/results/l2-prefetch-probe-h200.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import random_fp8  # noqa: E402
from plugins.fp8_linear import fp8_linear_decode, make_workspace  # noqa: E402
from plugins.grouped_linear import grouped_fp8_gemv  # noqa: E402
from plugins.l2_prefetch import l2_prefetch  # noqa: E402
from plugins.rows import rms_norm_rows  # noqa: E402
from plugins.streams import beside  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

FLUSH_BYTES = 512 << 20


def replay_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor, iters: int = 30) -> float:
    """Median time of one replay, L2 flushed (by writing `flush`) before each."""
    times = []
    for _ in range(iters):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def captured(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def probe(name: str, gemv, weights: list[torch.Tensor], chain, flush: torch.Tensor) -> dict:
    def prefetch(lines=False):
        for t in weights:
            l2_prefetch(t, lines)

    def then_pause(fn):            # the GEMV after the prefetch has had time to land (30 us of spinning)
        def run():
            fn()
            torch.cuda._sleep(60_000)
        return run

    cases = {
        "gemv_cold": gemv,
        "prefetch_alone": prefetch,
        "chain_alone": chain,
        "chain_then_gemv": lambda: (chain(), gemv()),
        "prefetch_chain_gemv": lambda: (prefetch(), chain(), gemv()),
        "prefetch_beside_chain_gemv": lambda: (beside(chain, prefetch, weights[0].device), gemv()),
        "prefetch_lines_chain_gemv": lambda: (prefetch(True), chain(), gemv()),
    }
    out = {"weight": name, "weight_mb": sum(t.numel() * t.element_size() for t in weights) / 1e6}
    out |= {k: replay_us(captured(fn), flush) for k, fn in cases.items()}
    pause = replay_us(captured(then_pause(lambda: None)), flush)
    out["gemv_after_prefetch"] = replay_us(captured(lambda: (then_pause(prefetch)(), gemv())), flush) - pause
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=int, default=8, help="short kernels before the GEMV")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "l2_bytes": props.L2_cache_size,
              "copy_bandwidth_gb_s": copy_bandwidth("cuda") / 1e9, "results": []}
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    row, norm = torch.randn(1, 4096, device="cuda").to(torch.bfloat16), torch.ones(4096, device="cuda")

    def chain():
        y = row
        for _ in range(args.chain):
            y = rms_norm_rows(y, norm, 1e-6)

    for name, (n, k) in {"wq_b": (32768, 1024), "wo_b": (4096, 8192), "shared_w13": (4096, 4096),
                         "wq_a_wkv": (1536, 4096)}.items():
        w, s = random_fp8(n, k)
        x, y, work = torch.randn(1, k, device="cuda").to(torch.bfloat16), torch.empty(1, n, device="cuda",
                                                                                     dtype=torch.bfloat16), make_workspace(1, k, "cuda")
        report["results"].append(probe(name, lambda: fp8_linear_decode(x, w, s, y, work), [w, s], chain, flush))
    w, s = random_fp8(8 * 1024, 4096)
    o, y = torch.randn(1, 1, 8, 4096, device="cuda").to(torch.bfloat16), torch.empty(1, 1, 8, 1024, device="cuda",
                                                                                  dtype=torch.bfloat16)
    report["results"].append(probe("wo_a", lambda: grouped_fp8_gemv(o, w, s, y), [w, s], chain, flush))
    for r in report["results"]:
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
