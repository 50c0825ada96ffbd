#!/usr/bin/env bash
# bench/read_ceiling.py over several cases in turn, for several rounds, so that drift of the machine falls on
# every case alike; each case a --fatbin spec (FILE[@MODULE.NAME=VALUE,...], bench/in_turn.py):
#   RES=DIR LINES=wq_b,decode_layer ROUNDS="1 2" bash bench/read_ceiling_in_turn.sh NAME=SPEC [NAME=SPEC ...]
# Writes DIR/read-ceiling-NAME-ROUND.json and .log, and a line per run to DIR/progress.txt. With no case it runs
# nothing and only prints the lines of the logs already in DIR (for a batch that ran its cases its own way).
set -u
RES=${RES:-$OUT}
mkdir -p "$RES"
for round in $([ $# -gt 0 ] && echo ${ROUNDS:-1 2}); do
  for case in "$@"; do
    name=${case%%=*} spec=${case#*=}
    start=$(date +%s)
    python bench/read_ceiling.py --lines "${LINES:-wq_b,wo_a,wo_b,shared_expert,moe_decode,decode_layer}" \
      --fatbin "$spec" --json "$RES/read-ceiling-$name-$round.json" > "$RES/read-ceiling-$name-$round.log" 2>&1
    echo "$name $round rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
  done
done
# A line a run and line: its kernels' time and fraction of the copy bandwidth (the JSON lines in each log).
for log in "$RES"/read-ceiling-*.log; do
  python -c "
import json, sys
for l in open(sys.argv[1]):
    if l.startswith('{\"line\"'):
        d = json.loads(l); print(sys.argv[1].rsplit('/', 1)[-1], d['line'], round(d['kernel_us'], 2), round(d['kernel_fraction'], 3))
" "$log"
done
