#!/usr/bin/env bash
# Session 61's device batch (not kept: run it on a tree with bench/results/down-sums-s61-h100/down-sums-s61.patch
# applied and built): the wgmma down kernel adding each token's pairs itself (plugins.moe_experts DOWN_SUMS),
# against the tree before it, whose sources are made with
#   git archive --format=tar HEAD $(git ls-tree --name-only HEAD | grep -v '^bench$') \
#     $(git ls-files bench | grep -v '^bench/results/') | gzip > bench/head-tree.tar.gz
# (session 61's own archive left out bench/results_json.py, so its `before` runs failed). The routed-expert
# and MoE op GPU tests on the tree (without the preload that AOTInductor packages need: the two package
# tests there failed); then
# bench/read_ceiling.py's moe_decode and decode_layer lines (LINES) in turn, three rounds: the tree (sums), the
# tree with the switch off (apart: the kernel's y null, a launch adds the pairs), and the session's starting
# tree (before: its sources unpacked from bench/head-tree.tar.gz, a `git archive` of that commit, with its own
# build carried as plugins/probe_before.fatbin). All into $OUT/down-sums.tgz; DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
python -m pytest -q tests/test_kernels_moe.py tests/test_kernels_moe_wgmma.py tests/test_ops.py tests/test_programs.py \
  > "$W/tests.txt" 2>&1
echo "gpu tests rc=$? $(tail -1 "$W/tests.txt")" >> "$W/progress.txt"
B=/tmp/before; mkdir -p $B && tar xzf bench/head-tree.tar.gz -C $B && cp plugins/probe_before.fatbin $B/plugins/dsv4_kernels.fatbin
LINES=${LINES:-moe_decode,decode_layer}
for round in 0 1 2; do
  for case in sums apart before; do
    start=$(date +%s)
    case $case in
      sums) python bench/read_ceiling.py --lines $LINES --json "$W/read-ceiling-$case-$round.json" ;;
      apart) python bench/read_ceiling.py --lines $LINES --fatbin plugins/dsv4_kernels.fatbin@plugins.moe_experts.DOWN_SUMS=False \
        --json "$W/read-ceiling-$case-$round.json" ;;
      before) (cd $B && python bench/read_ceiling.py --lines $LINES --json "$W/read-ceiling-$case-$round.json") ;;
    esac > "$W/read-ceiling-$case-$round.log" 2>&1
    echo "$case $round rc=$? $(( $(date +%s) - start ))s" >> "$W/progress.txt"
  done
done
RES=$W bash bench/read_ceiling_in_turn.sh > "$W/summary.txt"
touch "$W/DONE"
tar czf "${OUT:-.}/down-sums.tgz" -C "$W" .
cat "$W/progress.txt"; sort -k2,2 -k1,1 "$W/summary.txt"
