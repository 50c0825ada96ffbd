#!/usr/bin/env bash
# Session 58's device batch, in a copy of the tree, which it patches with bench/results/beside-plan-s58.patch (the
# switch below, not kept): the shared expert's two GEMVs beside the routed experts with room made for each
# other on every SM (the decode layer line), against the tree. Today the routed gate_up holds three CTAs an SM
# (208 KB of shared memory) and a shared-expert GEMV CTA takes 105 KB, so the two hardly share an SM. Cases:
#   base     the tree
#   plan     the GEMVs on the second stream at one CTA an SM and two ring stages (74 KB: plugins.fp8_linear.BESIDE_PLAN)
#   g2       gate_up capped at two CTAs an SM (plugins.loader.RESIDENT_CAPS), the GEMVs as the tree plans them
#   plan_g2  both: two gate_up CTAs and one GEMV CTA fit an SM (139 + 75 KB)
#   plan_m2  the GEMVs so, and both MoE kernels capped at two CTAs an SM (w2 may run beside down)
# in turn, two rounds (bench/read_ceiling_in_turn.sh, LINES below). First, the drafter ring's A/B
# (bench/recent_ring_ab.py) and the GPU tests of the shared expert beside the routed experts. Results under
# $RES (default $OUT); DONE when all ran.
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
git apply bench/results/beside-plan-s58.patch || { echo "patch failed" >> "$RES/progress.txt"; touch "$RES/DONE"; exit 1; }
F=plugins/dsv4_kernels.fatbin
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
python bench/recent_ring_ab.py --json "$RES/recent-ring-ab.json" > "$RES/recent-ring-ab.txt" 2>&1
echo "recent_ring_ab rc=$?" >> "$RES/progress.txt"
PLAN=plugins.fp8_linear.BESIDE_PLAN CAPS=plugins.loader.RESIDENT_CAPS
python -m pytest -q -p no:cacheprovider tests/test_kernels_moe.py -k "beside" > "$RES/gpu-tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$RES/progress.txt"
LINES=${LINES:-decode_layer,moe_decode,shared_expert} bash bench/read_ceiling_in_turn.sh base="$F" \
  plan="$F@$PLAN='1:2'" g2="$F@$CAPS='dsv4_moe_gate_up:2'" plan_g2="$F@$PLAN='1:2',$CAPS='dsv4_moe_gate_up:2'" \
  plan_m2="$F@$PLAN='1:2',$CAPS='dsv4_moe_:2'"
touch "$RES/DONE"
