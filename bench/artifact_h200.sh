#!/usr/bin/env bash
# Builds a synthetic DeepSeek V4 Flash-size checkpoint cut to LAYERS layers with aoti for CUDA, checks the
# artifact against the reference through `dsv4 forced`, and benchmarks it against eager (`dsv4 bench`).
#   LAYERS=8 OUT=/some/dir bash bench/artifact_h200.sh       (on the H200; results land in $OUT)
# Then the same artifact with a quarter of its routed experts off the GPU, expert prefetch on and off, over
# PAGED_NEW (96) greedy tokens: 31 left the modes' time lost within the run-to-run spread (session 11). The
# checkpoint's routing is skewed (SKEW, `dsv4 synth --routing-skew`; results up to session 6 had none): random
# weights alone route near uniformly, which no expert cache can beat.
# DTYPE=float32 builds the exact gate instead: the artifact runs the ops' oracles and must equal the float32
# reference (argmax identical, cosine >= 0.999999); no benchmark (oracles are not the fast path).
# PREFILL_CHUNK overrides the recipe's prefill chunk (256; the user recipe dsv4-flash-h200 takes 2048, where the
# wgmma prefill MoE pays: bench/wgmma_gate.py then measures it on the artifact); PREFILL_BUCKETS=16,256 adds smaller
# prefill programs for a prompt's last chunk (bench/prefill_buckets.py times them). A rebuild into the same folder
# relinks the expert bank. SKIP_FORCED=1 skips the reference comparison; COMPARE=none leaves eager out of the benchmark; SKIP_PROFILE=1 the
# decode profile; SKIP_PAGED=1 the paged bench; BUILD_ONLY=1 stops after the build (then, e.g., bench/fatbin_ab.py on
# /tmp/art/flash$LAYERS-$DTYPE); PROMPT_LEN sets the benchmark's prompt (default 32 tokens). CKPT=/dev/shm/flash8 keeps a large checkpoint in memory when
# checkpoint + artifact would not fit the disk (8 layers: about 30 + 36 GB against 64 GB). AOTInductor packages on the H200 image need libstdc++
# preloaded (see docs/design.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
LAYERS=${LAYERS:-4} DTYPE=${DTYPE:-bfloat16} SKEW=${SKEW:-0.1}
CKPT=${CKPT:-/tmp/flash$LAYERS} ART=/tmp/art/flash$LAYERS-$DTYPE RECIPE=/tmp/bench-flash-$DTYPE.toml
sed -e "s/^dtype = .*/dtype = \"$DTYPE\"/" ${PREFILL_CHUNK:+-e "s/^prefill_chunk = .*/prefill_chunk = $PREFILL_CHUNK/"} \
    ${PREFILL_BUCKETS:+-e "/^prefill_chunk = /a prefill_buckets = [$PREFILL_BUCKETS]"} recipes/bench-flash-h200.toml > $RECIPE
dsv4() { python -m dsv4.cli "$@"; }
[ -f plugins/dsv4_kernels.fatbin ] || python -m plugins.build
[ -f $CKPT/config.json ] || { time dsv4 synth --model flash --layers $LAYERS --device cuda --routing-skew $SKEW \
    --out $CKPT; } 2>&1 | tail -3
{ time dsv4 build $RECIPE --checkpoint $CKPT --out $ART; } 2>&1 | tail -12 | tee $OUT/build-flash$LAYERS-$DTYPE.txt
[ -z "${BUILD_ONLY:-}" ] || exit 0
if [ -z "${SKIP_FORCED:-}" ]; then
  PROMPT=$(python -c "print(','.join(str((7 * i + 3) % 1000 + 2) for i in range(136)))")
  dsv4 forced --checkpoint $CKPT --device cuda --dtype $DTYPE --prompt-ids $PROMPT --forced-ids 11,12,13,14,15,16,17,18 \
      --out /tmp/ref-flash$LAYERS-$DTYPE.safetensors
  # bfloat16 on random weights: the reference's own decode-vs-prefill gap reaches cosine 0.977 at 4 layers
  # (bench/results/reference_consistency-flash4-h200.json) and 0.945 at 8 (session 26's gate, README), so that
  # comparison is reported, not gated: the line only catches what lies far outside that noise. float32 runs the
  # ops' oracles and is gated.
  MIN_COSINE=$([ $DTYPE = float32 ] && echo 0.999999 || { [ $LAYERS -ge 8 ] && echo 0.93 || echo 0.97; })
  STEPS=/tmp/steps-flash$LAYERS-$DTYPE.safetensors
  dsv4 forced --artifact $ART --prompt-ids $PROMPT --forced-ids 11,12,13,14,15,16,17,18 --out $STEPS \
      --compare /tmp/ref-flash$LAYERS-$DTYPE.safetensors --min-cosine $MIN_COSINE 2>&1 | tee $OUT/forced-flash$LAYERS-$DTYPE.txt
  # the verification of drafts (speculative decoding's pass: the forced tokens two at a time) against the
  # artifact's own decode steps, which it must give (reported; the run goes on either way)
  dsv4 forced --artifact $ART --pairs --prompt-ids $PROMPT --forced-ids 11,12,13,14,15,16,17,18 --compare $STEPS \
      --min-cosine 0.9999 2>&1 | tee $OUT/forced-pairs-flash$LAYERS-$DTYPE.txt || true
  [ $DTYPE != float32 ] || exit 0
fi
# another job sharing the machine (WAIT_FOR=pid, e.g. GPU tests run during this build) ends before timing
while [ -n "${WAIT_FOR:-}" ] && kill -0 "$WAIT_FOR" 2>/dev/null; do sleep 2; done
dsv4 bench $ART --compare ${COMPARE:-eager} --prompt-len ${PROMPT_LEN:-32} --json $OUT/artifact-flash$LAYERS-h200.json 2>&1 | tee $OUT/bench-flash$LAYERS.txt
SLOTS=$(( LAYERS * 256 * 3 / 4 ))
[ -n "${SKIP_PAGED:-}" ] || dsv4 bench $ART --compare none --expert-slots $SLOTS --new ${PAGED_NEW:-96} \
    --json $OUT/artifact-flash$LAYERS-paged-h200.json 2>&1 | tee $OUT/bench-flash$LAYERS-paged.txt
[ -n "${SKIP_PROFILE:-}" ] || python bench/profile_decode.py $ART --prefill 512 --json $OUT/profile-decode-flash$LAYERS-h200.json 2>&1 | tee $OUT/profile-flash$LAYERS.txt
