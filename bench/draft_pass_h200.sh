#!/usr/bin/env bash
# A device batch for speculative decoding: the GPU tests of drafting (tests/test_artifact_gpu.py: drafting, pairs, graphs)
# beside a Flash-8 synth and build (bench/artifact_h200.sh, BUILD_ONLY, with 2-token prefill programs beside the
# verification programs); then `dsv4 forced --pairs` against the artifact's decode steps, where a drafted pass's
# time goes (bench/draft_pass.py), the verification on its programs against the 2-token prefill programs
# (bench/verify_ab.py), greedy's pass on the device against the host's in turn (bench/drafted_decode_ab.py) and
# `dsv4 bench --compare none` on the same artifact. Results under $RES (default $OUT); DONE when all ran.
set -u
RES=${RES:-$OUT}
mkdir -p "$RES"
export OUT=$RES
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
start=$(date +%s)
# GPU_TESTS: the tests run beside the build (default: drafting, forced pairs, graphs)
( LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 python -m pytest -q -p no:cacheprovider \
    ${GPU_TESTS:-tests/test_artifact_gpu.py -k "speculative or pairs or graph"} > "$RES/gpu-tests.txt" 2>&1
  echo "gpu tests rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt" ) &
tests=$!
LAYERS=8 CKPT=/dev/shm/flash8 BUILD_ONLY=1 PREFILL_BUCKETS=2 bash bench/artifact_h200.sh > "$RES/build.log" 2>&1
echo "build rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
export PYTHONPATH=$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
ART=/tmp/art/flash8-bfloat16
start=$(date +%s)
# the verification of drafts on its programs (the forced tokens two at a time) against the decode steps
PROMPT=$(python -c "print(','.join(str((7 * i + 3) % 1000 + 2) for i in range(136)))")
python -m dsv4.cli forced --artifact $ART --prompt-ids $PROMPT --forced-ids 11,12,13,14,15,16,17,18 \
    --out /tmp/steps.safetensors > "$RES/forced-steps.txt" 2>&1
python -m dsv4.cli forced --artifact $ART --pairs --prompt-ids $PROMPT --forced-ids 11,12,13,14,15,16,17,18 \
    --compare /tmp/steps.safetensors --min-cosine 0.9999 > "$RES/forced-pairs.txt" 2>&1
echo "forced pairs rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
wait $tests                                     # nothing timed beside them
start=$(date +%s)
python bench/draft_pass.py $ART --json "$RES/draft-pass-flash8.json" > "$RES/draft-pass.txt" 2>&1
echo "draft_pass rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
start=$(date +%s)
python bench/verify_ab.py $ART --json "$RES/verify-ab-flash8.json" > "$RES/verify-ab.txt" 2>&1
echo "verify_ab rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
start=$(date +%s)
python bench/drafted_decode_ab.py $ART --json "$RES/drafted-decode-ab-flash8.json" > "$RES/drafted-decode-ab.txt" 2>&1
echo "drafted_decode_ab rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
start=$(date +%s)
python -m dsv4.cli bench $ART --compare none --prompt-len 32 --json "$RES/artifact-flash8.json" > "$RES/bench.txt" 2>&1
echo "bench rc=$? $(( $(date +%s) - start ))s" >> "$RES/progress.txt"
touch "$RES/DONE"
