"""GB10 decode projections for the full DeepSeek V4 Flash from figures measured on the H200. Nothing here has
run on a GB10 (docs/design.md: GB10 figures are projections from ratios measured elsewhere, labelled so).

    python bench/project_gb10.py [--measured bench/results/artifact-flash8-h200.json] [--bandwidth-gbs 273]
        [--profile bench/results/profile-decode-flash8-h200.json] [--measured-layers 8]

- bytes per token: the full model's weights one decode step reads (builder/sizes.py, from the config alone);
- ceiling: the GB10's memory bandwidth (its published figure, an input here, not a measurement) divided by
  those bytes;
- at the H200's fraction: that ceiling times the fraction of copy bandwidth a Flash-size artifact's decode
  reached on the H200 (`dsv4 bench` JSON). The H200 streams 15x faster, so fixed costs per launch weigh
  more there than they would on a GB10: read it as a floor for kernels that stream as well as they do on
  the H200, with every routed expert resident (paging is not modelled);
- fixed-cost model: the H200 step's time beyond its bytes at the copy bandwidth, spread over its launches
  (the decode profile's count), as a cost per launch; the GB10 step then takes its bytes at the full
  bandwidth plus that cost for every launch, launches scaled by layer count. Optimistic where the kernels
  stream below the bandwidth, pessimistic where a launch costs less on the GB10.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builder.presets import preset  # noqa: E402
from builder.sizes import model_sizes  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def project(measured: dict, launches: int, measured_layers: int, bandwidth_gbs: float, model: str = "flash") -> dict:
    cfg = preset(model)
    per_token = model_sizes(cfg).bytes_per_token
    ceiling = bandwidth_gbs * 1e9 / per_token
    compiled = measured["modes"]["compiled"]
    fraction = compiled["fraction_of_copy_bandwidth"]
    streaming_ms = measured["bytes_per_token"] / (measured["copy_bandwidth_gb_s"] * 1e9) * 1e3
    fixed_us = (compiled["decode_step_ms"] - streaming_ms) / launches * 1e3
    gb10_launches = launches * cfg.num_hidden_layers / measured_layers
    model_ms = per_token / (bandwidth_gbs * 1e9) * 1e3 + gb10_launches * fixed_us / 1e3
    return {"model": model, "bytes_per_token": per_token, "gb10_bandwidth_gbs_assumed": bandwidth_gbs,
            "ceiling_tok_s": ceiling, "h200_decode_fraction_of_copy_bw": fraction,
            "projected_tok_s_at_h200_fraction": ceiling * fraction,
            "h200_fixed_us_per_launch": fixed_us, "gb10_launches_per_step": gb10_launches,
            "projected_tok_s_fixed_cost_model": 1e3 / model_ms,
            "measured_on": measured.get("gpu"), "measured_bytes_per_token": measured["bytes_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", type=Path, default=RESULTS / "artifact-flash8-h200.json")
    ap.add_argument("--bandwidth-gbs", type=float, default=273.0, help="GB10 memory bandwidth (published)")
    ap.add_argument("--profile", type=Path, default=RESULTS / "profile-decode-flash8-h200.json",
                    help="decode profile of the same artifact kind: its launches per step")
    ap.add_argument("--measured-layers", type=int, default=8, help="layers of the measured artifact")
    ap.add_argument("--json", type=Path, default=RESULTS / "projection-gb10.json")
    args = ap.parse_args()
    launches = sum(json.loads(args.profile.read_text())["launches_per_step"].values())
    report = {"command": "python " + " ".join(sys.argv), "kind": "projection, not a measurement",
              **project(json.loads(args.measured.read_text()), launches, args.measured_layers, args.bandwidth_gbs),
              "measured_file": args.measured.name, "profile_file": args.profile.name}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"{report['bytes_per_token'] / 1e9:.2f} GB per token; GB10 ceiling {report['ceiling_tok_s']:.1f} tok/s; "
          f"at the H200's fraction {report['h200_decode_fraction_of_copy_bw']:.2f}: "
          f"{report['projected_tok_s_at_h200_fraction']:.1f} tok/s; fixed-cost model "
          f"({report['h200_fixed_us_per_launch']:.2f} us x {report['gb10_launches_per_step']:.0f} launches): "
          f"{report['projected_tok_s_fixed_cost_model']:.1f} tok/s (projections)")


if __name__ == "__main__":
    main()
