#!/usr/bin/env bash
# The one-launch shared expert (plugins/shared_expert.py) on the H200, in one background run (session 51):
# its GPU tests and the MoE ops' with it on, the read ceiling's shared expert and decode layer lines with it off
# and on (and on the GB10's 4-slot ring), then a Flash-8 artifact's replayed decode step with it off and on,
# alternating (bench/fatbin_ab.py, which also compares the greedy tokens).
#   cp -r . /root/snap && cd /root/snap && (RES=/root/res setsid nohup bash bench/shared_expert_h200.sh > /dev/null 2>&1 &)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
RES=${RES:-/tmp/res} F=plugins/dsv4_kernels.fatbin ON=plugins.shared_expert.ONE_LAUNCH=True
mkdir -p "$RES"
step() { local name=$1; shift; echo "$(date +%T) start $name" >> "$RES/steps.log"; "$@" > "$RES/$name.log" 2>&1;
         echo "$(date +%T) rc $? $name" >> "$RES/steps.log"; }
[ -f $F ] || step plugins python -m plugins.build
step tests timeout 300 python -c "import sys, pytest, plugins.shared_expert as s; s.ONE_LAUNCH = True; sys.exit(pytest.main(
    ['-q', '-rA', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests/test_kernels_shared_expert.py', 'tests/test_kernels_moe.py']))"
step ceiling-off timeout 200 python bench/read_ceiling.py --lines shared_expert,shared_expert_one_launch,decode_layer \
    --json "$RES/read-ceiling-shared-off.json"
step ceiling-on timeout 200 python bench/read_ceiling.py --lines decode_layer --fatbin "$F@$ON" --json "$RES/read-ceiling-shared-on.json"
step ceiling-ring4 timeout 200 python bench/read_ceiling.py --lines shared_expert_one_launch,decode_layer \
    --fatbin "$F@$ON,plugins.shared_expert.STAGE_CHOICES=[4]" --json "$RES/read-ceiling-shared-ring4.json"
step flash8-build env OUT="$RES" LAYERS=8 CKPT=/dev/shm/flash8 SKIP_FORCED=1 BUILD_ONLY=1 bash bench/artifact_h200.sh
step fatbin-ab timeout 400 python bench/fatbin_ab.py /tmp/art/flash8-bfloat16 $F "$F@$ON" --rounds 2 \
    --json "$RES/fatbin-ab-shared-one-launch-h200.json"
touch "$RES/DONE"
