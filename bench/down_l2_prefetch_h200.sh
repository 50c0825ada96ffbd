#!/usr/bin/env bash
# Session 59's probe batch: down's warps asking L2 for their later steps before their wait. Slower, not kept:
# the probe is bench/results/down-l2-prefetch-s59.patch; build it where nvcc is (here, then carry it) with
#   git apply bench/results/down-l2-prefetch-s59.patch && python -m plugins.build --out plugins/probe_l2.fatbin \
#     -D DSV4_DOWN_L2_PREFETCH=1; git apply -R bench/results/down-l2-prefetch-s59.patch
# The routed experts' GPU tests on it, then bench/read_ceiling.py's moe_decode and decode_layer lines on the
# tree's build and on it, in turn, twice (bench/read_ceiling_in_turn.sh; session 59's run named its files rc-BUILD-ROUND). All into $OUT/down-l2.tgz; DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
cp plugins/dsv4_kernels.fatbin /tmp/tree.fatbin
cp plugins/probe_l2.fatbin plugins/dsv4_kernels.fatbin
python -m pytest -q tests/test_kernels_moe.py -k "moe_decode_matches or captures_in_a_cuda_graph" > "$W/tests.txt" 2>&1
echo "tests on the probe rc=$?" >> "$W/progress.txt"
cp /tmp/tree.fatbin plugins/dsv4_kernels.fatbin
RES=$W ROUNDS="0 1" LINES=moe_decode,decode_layer bash bench/read_ceiling_in_turn.sh tree=/tmp/tree.fatbin \
  probe=plugins/probe_l2.fatbin
touch "$W/DONE"
tar czf "${OUT:-.}/down-l2.tgz" -C "$W" .
cat "$W/progress.txt"; tail -2 "$W/tests.txt"
