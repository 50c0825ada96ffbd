#!/usr/bin/env bash
# A device batch: the decode MoE's warps' timelines (bench/moe_trace.py on a build with -D DSV4_MOE_TRACE=1, about
# 45 s of nvcc), beside the tree's MoE line in the same call (bench/read_ceiling.py --lines moe_decode), so that the
# probe's own cost shows. Results under $RES (default $OUT); DONE when all ran.
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
python -m plugins.build --out /tmp/trace.fatbin -D DSV4_MOE_TRACE=1 > "$RES/build.txt" 2>&1
echo "build rc=$?" >> "$RES/progress.txt"
python bench/moe_trace.py /tmp/trace.fatbin --json "$RES/moe-trace.json" > "$RES/moe-trace.txt" 2>&1
echo "moe_trace rc=$?" >> "$RES/progress.txt"
python bench/read_ceiling.py --lines moe_decode --json "$RES/read-ceiling-moe.json" > "$RES/read-ceiling-moe.txt" 2>&1
echo "read_ceiling rc=$?" >> "$RES/progress.txt"
touch "$RES/DONE"
