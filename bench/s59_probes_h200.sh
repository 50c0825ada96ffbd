#!/usr/bin/env bash
# Session 59's device batch: the MoE with and without its sum (bench/moe_chain_ab.py), node priorities in the
# decode layer's graph (bench/node_priority_ab.py), then the trace batch (bench/kernel_trace_h200.sh, which
# writes $OUT/kernel-trace.tgz). The first two's output goes into $OUT/probes.tgz (the device tool returns at
# most 8 files); DONE in it when they ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
python bench/moe_chain_ab.py --rounds 3 --json "$W/moe-chain-ab.json" > "$W/moe-chain-ab.txt" 2>&1
echo "moe_chain_ab rc=$?" >> "$W/progress.txt"
python bench/node_priority_ab.py --rounds 2 --json "$W/node-priority-ab.json" > "$W/node-priority-ab.txt" 2>&1
echo "node_priority_ab rc=$?" >> "$W/progress.txt"
touch "$W/DONE"
tar czf "${OUT:-.}/probes.tgz" -C "$W" .
cat "$W/progress.txt" "$W/moe-chain-ab.txt" "$W/node-priority-ab.txt"
bash bench/kernel_trace_h200.sh
