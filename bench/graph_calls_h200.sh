#!/usr/bin/env bash
# A device batch: how much of the decode lines' figures is their own graph's launch (bench/graph_overhead.py:
# the MoE at 1, 2, 3 and 6 times its 10 calls a graph, and 4 replays back to back; wq_b and the layer back to
# back; skipped with PROBES=0), then bench/read_ceiling.py's lines at the calls a graph of sessions before 59
# (bench.kernels.MIN_GRAPH_CALLS=1) and at 40 or more (the default since), in turn, twice
# (bench/read_ceiling_in_turn.sh; session 59's own runs named their files rc-CALLS-ROUND). All into
# $OUT/graph-calls.tgz; DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
if [ "${PROBES:-1}" = 1 ]; then
  python bench/graph_overhead.py --lines moe_decode --factors 1,2,3,6 --together 4 --rounds 2 \
    --json "$W/graph-overhead-moe.json" > "$W/graph-overhead.txt" 2>&1
  echo "graph_overhead moe rc=$?" >> "$W/progress.txt"
  python bench/graph_overhead.py --lines wq_b,decode_layer --factors 1 --together 4 --rounds 1 \
    --json "$W/graph-overhead-others.json" >> "$W/graph-overhead.txt" 2>&1
  echo "graph_overhead others rc=$?" >> "$W/progress.txt"
fi
RES=$W ROUNDS="0 1" LINES=moe_decode,shared_expert,wq_b,wo_a,wo_b,decode_layer bash bench/read_ceiling_in_turn.sh \
  calls1=plugins/dsv4_kernels.fatbin@bench.kernels.MIN_GRAPH_CALLS=1 \
  calls40=plugins/dsv4_kernels.fatbin@bench.kernels.MIN_GRAPH_CALLS=40
touch "$W/DONE"
tar czf "${OUT:-.}/graph-calls.tgz" -C "$W" .
cat "$W/progress.txt"; [ -f "$W/graph-overhead.txt" ] && grep -v "^ " "$W/graph-overhead.txt" | grep -v "^copy"
