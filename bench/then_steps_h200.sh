#!/usr/bin/env bash
# Session 53's device batch, in a copy of the tree, which it patches with bench/results/then-steps-s53.patch and
# whose fat binary it then builds (nvcc, about 35 s): the FP8 GEMVs asking L2 for the
# next GEMV's first ring steps once their own copies are issued (plugins.fp8_linear.THEN_STEPS; csrc/fp8_linear.cu
# Then). The FP8 GPU tests, then the decode lines with it off, at 2 steps and at 4 (the next launch's whole K
# slice per warp on the Flash GEMVs), in turn, two rounds. Results under $RES (default $OUT).
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
{ git apply bench/results/then-steps-s53.patch && python -m plugins.build > "$RES/build.txt" 2>&1; } \
  || { echo "patch or build failed" >> "$RES/progress.txt"; touch "$RES/DONE"; exit 1; }
F=plugins/dsv4_kernels.fatbin
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
timeout 300 python -m pytest -q -rfE -m gpu tests/test_kernels_fp8.py > "$RES/gpu-tests-fp8.txt" 2>&1
echo "tests rc=$?" >> "$RES/progress.txt"
T=plugins.fp8_linear.THEN_STEPS
LINES=${LINES:-wq_b,wo_a,wo_b,shared_expert,decode_layer} \
  bash bench/read_ceiling_in_turn.sh base="$F" then2="$F@$T=2" then4="$F@$T=4"
touch "$RES/DONE"
