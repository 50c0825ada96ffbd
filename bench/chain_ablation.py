"""The replayed decode step with families of kernels left out: what removing each link could save at most.

Loads an artifact once and re-captures its decode graph per variant, with the named kernels not launched
(their readers get whatever their buffers hold: the step's output is garbage, only its time counts). The
router is left out of every ablation (and of the baseline they are compared with), so the experts stay those
of the last real step: a left-out producer upstream of the gate leaves its logits uninitialised, and the
router would then name an expert past the table and fault the step (session 29's probe did, twice). Also
the step with only the weight kernels (the FP8 and bf16 GEMVs, the MoE's) and with none of them.

    python bench/chain_ablation.py /tmp/art/flash8-bfloat16 [--json bench/results/chain-ablation-h200.json]

Session 29's probe of this (bench/results/chain-ablation-flash4-s29-h200.json) found the Flash-4 step at
0.77 ms, 0.65 with the weight kernels alone, 0.19 with everything but them; leaving out the router, the
query heads or the attention's combine changed nothing, its split about 20 us.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.profile_decode import step_ms  # noqa: E402
from bench.results_json import run_header, write_json  # noqa: E402
from plugins import loader, route  # noqa: E402
from runtime.artifact import ArtifactModel  # noqa: E402
from runtime.bench import bytes_per_token, copy_bandwidth  # noqa: E402

ROUTER = {f"dsv4_route_topk_s{slots}" for slots in route.SLOTS}      # its builds (csrc/route.cu)
WEIGHT_KERNELS = {"dsv4_fp8_gemv_fused_m8", "dsv4_fp8_gemv_fused_m16", "dsv4_fp8_gemv_m8", "dsv4_fp8_gemv_m16",
                  "dsv4_fp8_gemv_fused_norm_m8", "dsv4_fp8_gemv_fused_swiglu_m8", "dsv4_fp8_gemv_fused_grouped_m8",
                  "dsv4_moe_gate_up_decode_wgmma", "dsv4_moe_down_decode_wgmma", "dsv4_moe_gate_up",
                  "dsv4_moe_down", "dsv4_head_gemv_bf16_rows", "dsv4_head_gemv"}
FAMILIES = {
    "hc_pre_mix": {"dsv4_hc_pre_mix"},
    "hc_post_pre_mix": {"dsv4_hc_post_pre_mix"},
    "hc_pre_finish": {"dsv4_hc_pre_finish", "dsv4_hc_pre_finish_beside"},
    "sinkhorn_beside": {"dsv4_hc_pre_sinkhorn"},
    "q_heads": {"dsv4_q_heads"},
    "index_query": {"dsv4_index_query"},
    "indexer_picks": {"dsv4_indexer_scores", "dsv4_indexer_topk"},
    "compressor_step": {"dsv4_compressor_step"},
    "attention_split": {"dsv4_sparse_attention_split_d1", "dsv4_sparse_attention_split_d2",
                        "dsv4_sparse_attention_split_d4"},
    "attention_combine": {"dsv4_sparse_attention_combine"},
    "moe_sum_pairs_post": {"dsv4_moe_sum_pairs_post"},
    "bf16_gemvs": {"dsv4_head_gemv_bf16_rows", "dsv4_head_gemv"},
    "fp8_gemv_plain": {"dsv4_fp8_gemv_fused_m8"},
    "fp8_gemv_norm": {"dsv4_fp8_gemv_fused_norm_m8"},
    "fp8_gemv_swiglu": {"dsv4_fp8_gemv_fused_swiglu_m8"},
    "wo_a": {"dsv4_fp8_gemv_fused_grouped_m8"},
    "moe_gate_up": {"dsv4_moe_gate_up_decode_wgmma", "dsv4_moe_gate_up"},
    "moe_down": {"dsv4_moe_down_decode_wgmma", "dsv4_moe_down"},
}


def variants(launched: set[str]) -> dict[str, set[str]]:
    """The kernels each variant leaves out, given those the step launches: none; the router alone (the
    ablations' baseline); then every ablation with the router too, restricted to what the step launches."""
    others = launched - WEIGHT_KERNELS - ROUTER
    ablations = {"only_weight_kernels": others, "no_weight_kernels": WEIGHT_KERNELS, **FAMILIES}
    return {"default": set(), "router_held": set(ROUTER),
            **{label: (names & launched) | ROUTER for label, names in ablations.items()},
            "router_held_again": set(ROUTER)}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per timed run (5 runs, the median)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = torch.arange(64)[None] % 1000 + 2
    bandwidth = copy_bandwidth("cuda")
    model = ArtifactModel(args.artifact, "cuda", graphs=True)
    image = loader.kernels()
    plain_launch, launched, left_out = image.launch, set(), set()

    def launch(name, *a, **kw):               # every launch of the process goes through the one image
        launched.add(name)
        if name not in left_out:
            plain_launch(name, *a, **kw)
    image.launch = launch
    report = {**run_header(), "artifact": str(args.artifact), "copy_bandwidth_gb_s": bandwidth / 1e9,
              "bytes_per_token": bytes_per_token(model), "step_ms": {}}

    def step(label: str, names: set[str]) -> None:
        left_out.clear()
        left_out.update(names)
        model._capture()                        # the graph without those launches
        model.forward(prompt)
        report["step_ms"][label] = times = [step_ms(model, args.steps, len(prompt[0])) for _ in range(2)]
        print(f"{label:28s} {' / '.join(f'{t:.3f}' for t in times)} ms", flush=True)
        if args.json:                           # after every variant: a fault later keeps what was measured
            write_json(args.json, report)
    step("default", set())                      # records what the step launches
    for label, names in variants(set(launched)).items():
        if label != "default":
            step(label, names)
    base = report["step_ms"]["router_held"] + report["step_ms"]["router_held_again"]
    report["floor_ms"] = 1e3 * report["bytes_per_token"] / bandwidth
    report["saved_us_vs_router_held"] = {k: 1e3 * (sum(base) / len(base) - sum(v) / len(v))
                                         for k, v in report["step_ms"].items()}
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
