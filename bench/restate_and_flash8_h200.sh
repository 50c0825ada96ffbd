#!/usr/bin/env bash
# A device batch for a session's end: on an H200 only, the kernel issue lines restated at the 40-call harness
# (PROBES=0 bench/graph_calls_h200.sh, about 2.5 min); then, on any GPU, a Flash-8 bf16 artifact built and
# benchmarked against eager (bench/artifact_h200.sh without the reference gate, the paged run or the profile:
# about 7 min; cut off at LIMIT_S seconds from the start, 570 by default). Everything into $OUT/final.tgz,
# rewritten after each part; DONE in it when all ran.
set -u
T0=$(date +%s)
W=$(mktemp -d)
pack() { tar czf "${OUT:-.}/final.tgz" -C "$W" .; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$W/gpu.txt" 2>&1
if grep -q H200 "$W/gpu.txt"; then
  PROBES=0 OUT="$W" bash bench/graph_calls_h200.sh > "$W/graph-calls.txt" 2>&1
  echo "graph_calls rc=$? $(( $(date +%s) - T0 ))s" >> "$W/progress.txt"
  pack
fi
mkdir -p "$W/flash8"
LEFT=$(( ${LIMIT_S:-570} - ($(date +%s) - T0) ))
LAYERS=8 CKPT=/dev/shm/flash8 SKIP_FORCED=1 SKIP_PAGED=1 SKIP_PROFILE=1 OUT="$W/flash8" timeout $LEFT bash bench/artifact_h200.sh \
  > "$W/flash8/run.txt" 2>&1
echo "flash8 rc=$? $(( $(date +%s) - T0 ))s" >> "$W/progress.txt"
touch "$W/DONE"
pack
cat "$W/progress.txt"; tail -15 "$W/flash8/run.txt"
