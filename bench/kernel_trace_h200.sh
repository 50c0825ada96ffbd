#!/usr/bin/env bash
# A device batch: where the decode weight kernels' warps spend their time (bench/kernel_trace.py on a build with
# -D DSV4_TRACE=1, about 45 s of nvcc): the routed experts alone and in a whole decode layer, then the GEMVs of
# the lines short of 0.8 (the shared expert's two, wo_b) and wq_b beside them; then the tree's figures of those
# lines in the same call (bench/read_ceiling.py), so that the probe's own cost shows. Everything goes into one
# file, $OUT/kernel-trace.tgz (the device tool returns at most 8 files); DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
python -m plugins.build --out /tmp/trace.fatbin -D DSV4_TRACE=1 > "$W/build.txt" 2>&1
echo "build rc=$?" >> "$W/progress.txt"
for what in moe layer shared_w13 shared_w2 wo_b wq_b; do
  python bench/kernel_trace.py /tmp/trace.fatbin $what --json "$W/trace-$what.json" >> "$W/traces.txt" 2>&1
  echo "trace $what rc=$?" >> "$W/progress.txt"
done
python bench/read_ceiling.py --lines moe_decode,shared_expert,wo_b,wq_b,decode_layer --json "$W/read-ceiling.json" \
  > "$W/read-ceiling.txt" 2>&1
echo "read_ceiling rc=$?" >> "$W/progress.txt"
touch "$W/DONE"
tar czf "${OUT:-.}/kernel-trace.tgz" -C "$W" .
