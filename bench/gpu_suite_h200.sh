#!/usr/bin/env bash
# A device batch: every kernel GPU test at the tree (session 37's command, with the libstdc++ preload that
# loading AOTInductor packages needs there), then, on an H200 only, the issue lines restated at the 40-call
# harness (PROBES=0 bench/graph_calls_h200.sh). All into $OUT/gpu-suite.tgz; DONE in it when all ran.
set -u
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
CMD="python -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_*.py tests/test_stream_read.py tests/test_loader.py tests/test_trt_executor.py"
echo "\$ LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 $CMD" > "$W/gpu-tests.txt"
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 timeout ${SUITE_S:-420} $CMD >> "$W/gpu-tests.txt" 2>&1
echo "gpu tests rc=$? $(tail -1 "$W/gpu-tests.txt")" >> "$W/progress.txt"
if grep -q H200 "$W/gpu.txt"; then
  PROBES=0 OUT="$W" bash bench/graph_calls_h200.sh > "$W/graph-calls.txt" 2>&1
  echo "graph_calls rc=$?" >> "$W/progress.txt"
fi
touch "$W/DONE"
tar czf "${OUT:-.}/gpu-suite.tgz" -C "$W" .
cat "$W/progress.txt"
