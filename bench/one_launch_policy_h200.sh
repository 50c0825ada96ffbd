#!/usr/bin/env bash
# Session 52's second device batch, in a copy of the tree with session 51's one-launch shared expert applied
# (bench/results/shared-expert-one-launch-s51.patch, then bench/results/shared-expert-ring5-s52.patch: a 5-slot
# ring and its test case) and that tree's fat binary (plugins/s51_kernels.fatbin, carried): how many of its clusters fit at once by ring depth and placement policy; its GPU tests; and the
# shared expert and the decode layer in one launch (4, 5 and 12 slots, clusters spread or as the driver
# places them) against two launches, in turn, two rounds. Results under $RES.
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
{ git apply bench/results/shared-expert-one-launch-s51.patch && git apply bench/results/shared-expert-ring5-s52.patch; } || { echo "patch failed" > "$RES/patch.txt"; touch "$RES/DONE"; exit 1; }
cp plugins/s51_kernels.fatbin plugins/dsv4_kernels.fatbin
F=plugins/dsv4_kernels.fatbin
for s in 12:213248 5:98560 4:82176; do
  for policy in "" spread; do
    python bench/cluster_occupancy.py --kernel dsv4_shared_expert_s${s%%:*} --block 256 --shared ${s##*:} \
      --cluster 8 --grid 128 --policy "$policy" --json "$RES/cluster-occupancy-s${s%%:*}-${policy:-default}.json" \
      >> "$RES/cluster.txt" 2>&1
  done
done
timeout 200 python -m pytest -q -rA -m gpu tests/test_kernels_shared_expert.py > "$RES/gpu-tests.txt" 2>&1
echo "tests rc=$?" >> "$RES/progress.txt"
ONE="plugins.shared_expert.ONE_LAUNCH=True" STAGES=plugins.shared_expert.STAGE_CHOICES SPREAD="plugins.loader.CLUSTER_POLICY='spread'"
for round in 1 2; do                     # the two launches' lines differ from the one launch's
  ROUNDS=$round LINES=shared_expert,decode_layer bash bench/read_ceiling_in_turn.sh two="$F"
  ROUNDS=$round LINES=shared_expert_one_launch,decode_layer bash bench/read_ceiling_in_turn.sh \
    one4="$F@$ONE,$STAGES=[4]" one4s="$F@$ONE,$STAGES=[4],$SPREAD" one5s="$F@$ONE,$STAGES=[5],$SPREAD" \
    one12s="$F@$ONE,$STAGES=[12],$SPREAD"
done
touch "$RES/DONE"
