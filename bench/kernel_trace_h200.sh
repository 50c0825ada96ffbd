#!/usr/bin/env bash
# A device batch: where the decode weight kernels' warps spend their time (bench/kernel_trace.py on a build with
# -D DSV4_TRACE=1, about 45 s of nvcc): the routed experts, then the GEMVs of the lines short of 0.8 (the shared
# expert's two, wo_b) and wq_b beside them; then the tree's figures of those lines in the same call
# (bench/read_ceiling.py), so that the probe's own cost shows. Results under $RES (default $OUT); DONE when all ran.
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
python -m plugins.build --out /tmp/trace.fatbin -D DSV4_TRACE=1 > "$RES/build.txt" 2>&1
echo "build rc=$?" >> "$RES/progress.txt"
for what in moe shared_w13 shared_w2 wo_b wq_b; do
  python bench/kernel_trace.py /tmp/trace.fatbin $what --json "$RES/trace-$what.json" >> "$RES/traces.txt" 2>&1
  echo "trace $what rc=$?" >> "$RES/progress.txt"
done
python bench/read_ceiling.py --lines moe_decode,shared_expert,wo_b,wq_b --json "$RES/read-ceiling.json" \
  > "$RES/read-ceiling.txt" 2>&1
echo "read_ceiling rc=$?" >> "$RES/progress.txt"
tar czf "$RES/traces.tgz" -C "$RES" $(cd "$RES" && ls trace-*.json read-ceiling.json 2>/dev/null)
touch "$RES/DONE"
