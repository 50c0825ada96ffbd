#!/usr/bin/env bash
# Session 61's probe batch: the decode MoE's warps asking L2 for the rest of their item some steps before its
# end (build macros DSV4_LATE_AT_GU / _DOWN and DSV4_LATE_SHARE in csrc/moe_decode_wgmma.cu). Build the cases
# where nvcc is and carry them, e.g.
#   python -m plugins.build --out plugins/probe_u8.fatbin -D DSV4_LATE_AT_GU=8
# On an H200 it first restates the lines at the 40-call harness (PROBES=0 bench/graph_calls_h200.sh). Then the
# routed experts' GPU tests on the probe $TEST_PROBE (plugins/probe_$TEST_PROBE.fatbin), then
# bench/read_ceiling.py's moe_decode and decode_layer lines on the tree's build and each probe, in turn, three
# rounds (bench/read_ceiling_in_turn.sh). All into $OUT/late-prefetch.tgz; DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
if grep -q H200 "$W/gpu.txt"; then
  mkdir -p "$W/graph-calls"
  PROBES=0 OUT="$W/graph-calls" bash bench/graph_calls_h200.sh > "$W/graph-calls.txt" 2>&1
  echo "graph_calls rc=$?" >> "$W/progress.txt"
fi
cp plugins/dsv4_kernels.fatbin /tmp/tree.fatbin
cp "plugins/probe_$TEST_PROBE.fatbin" plugins/dsv4_kernels.fatbin
python -m pytest -q tests/test_kernels_moe.py -k "moe_decode_matches or captures_in_a_cuda_graph" > "$W/tests.txt" 2>&1
echo "tests on $TEST_PROBE rc=$? $(tail -1 "$W/tests.txt")" >> "$W/progress.txt"
cp /tmp/tree.fatbin plugins/dsv4_kernels.fatbin
cases="tree=/tmp/tree.fatbin"
for f in plugins/probe_*.fatbin; do n=${f#plugins/probe_}; cases="$cases ${n%.fatbin}=$f"; done
RES=$W ROUNDS="0 1 2" LINES=moe_decode,decode_layer bash bench/read_ceiling_in_turn.sh $cases > "$W/summary.txt" 2>&1
touch "$W/DONE"
tar czf "${OUT:-.}/late-prefetch.tgz" -C "$W" .
cat "$W/progress.txt"; sort -k2,2 -k1,1 "$W/summary.txt"
