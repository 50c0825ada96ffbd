#!/usr/bin/env bash
# Every H200 check of the project in one background run, in order of what it decides (a device call lasts
# at most 10 minutes, and the machine is given back after 30 s without a call, killing whatever runs there:
# start this from a copy of the tree, then keep calling back to back, each call waiting for $RES/DONE):
#   kernel tests -> kernel benchmarks -> Flash-4 float32 exact gate -> Flash-8 bf16 bench, paged bench and
#   profile -> tiny CUDA artifact tests -> the wgmma MoE paths' model-level check and the pager sweep on the
#   Flash-8 artifact.
#   cp -r . /root/snap && cd /root/snap && (RES=/root/res setsid nohup bash bench/h200_all.sh > /dev/null 2>&1 &)
#   for i in $(seq 115); do [ -f /root/res/DONE ] && break; sleep 5; done; cat /root/res/steps.log   # repeat
#   tar czf $OUT/h200.tgz -C /root res                                      # one file back (the tool's cap is 8)
# A failing step is logged ($RES/NAME.log, rc in steps.log) and the next one runs; the kernel tests and benchmarks
# are bounded (timeout: a kernel that hangs, as a new one may, ends its step, rc 124). STEPS names the steps to
# run (default: all but wgmma-crossover): plugins patch kernel-tests kernels chain-links wgmma-crossover gemv-probe gemv-split moe-grid
# gate-flash4-f32 flash8 tiny-artifacts wgmma-gate prefill-wgmma pager-sweep (the last three on the Flash-8 artifact:
# each wgmma MoE path switched on, bench/wgmma_gate.py; prefill times with and without the wgmma prefill MoE,
# bench/prefill_wgmma.py; the pager's settings, bench/pager_sweep.py). OVERLAP=1 runs the tiny artifact tests beside the Flash-8 build (the
# device time of a session is short); TESTS overrides the kernel test files; TRY_PATCH names a patch (git diff) that the patch step builds, tests (PATCH_TESTS) and
# benchmarks in its own copy of the tree, first (session 10 tried the wgmma prefill MoE so).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
RES=${RES:-/tmp/res}
mkdir -p "$RES"
STEPS=${STEPS:-plugins patch kernel-tests kernels chain-links gemv-probe gemv-split moe-grid gate-flash4-f32 flash8 tiny-artifacts wgmma-gate prefill-wgmma pager-sweep}
step() {
  local name=$1
  shift
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "$(date +%T) start $name" >> "$RES/steps.log"
  "$@" > "$RES/$name.log" 2>&1
  local rc=$?                                   # before $(date ...), which sets $? itself
  echo "$(date +%T) rc $rc $name" >> "$RES/steps.log"
}
step plugins python -m plugins.build
try_patch() (   # a draft's patch, tried in its own copy of the tree so a fault cannot touch the rest
  rm -rf /tmp/snap-patch && cp -r . /tmp/snap-patch && cd /tmp/snap-patch \
    && (git apply "$TRY_PATCH" || patch -p1 < "$TRY_PATCH") && python -m plugins.build \
    && timeout 300 python -m pytest -q -rA -m gpu ${PATCH_TESTS:-} \
    && timeout 300 python bench/kernels.py --json "$RES/kernels-patch-h200.json"   # a draft may hang: bounded
)
[ -n "${TRY_PATCH:-}" ] && step patch try_patch
step kernel-tests timeout 900 python -m pytest -q -rA -m gpu ${TESTS:-tests/test_kernels_fp8.py tests/test_kernels_moe.py \
    tests/test_kernels_attention.py tests/test_kernels_hc.py tests/test_kernels_route.py tests/test_trt_executor.py \
    tests/test_kernels_moe_wgmma.py tests/test_kernels_indexer.py tests/test_kernels_compressor.py tests/test_kernels_rows.py \
    tests/test_kernels_head.py}
step kernels timeout 600 python bench/kernels.py --json "$RES/kernels-h200.json"
step chain-links timeout 120 python bench/chain_links.py --json "$RES/chain-links-h200.json"
step wgmma-crossover python bench/wgmma_diag.py crossover
step gemv-probe python bench/gemv_probe.py --json "$RES/gemv-probe-h200.json"
step gemv-split python bench/gemv_split_sweep.py --json "$RES/gemv-split-sweep-h200.json"
step moe-grid python bench/moe_grid_sweep.py --json "$RES/moe-grid-sweep-h200.json"
step gate-flash4-f32 env OUT="$RES" LAYERS=4 DTYPE=float32 bash bench/artifact_h200.sh
# the disk holds one Flash artifact at a time: the Flash-4 gate's goes before the Flash-8 build (only then:
# a later call reusing a Flash-8 artifact's expert bank needs it kept; session 16's second call lost it here)
case " $STEPS " in *" gate-flash4-f32 "*) rm -rf /tmp/flash4 /tmp/art /tmp/ref-* ;; esac
tiny_artifacts() { step tiny-artifacts python -m pytest -q -rA -m gpu tests/test_artifact_gpu.py; }
if [ -n "${OVERLAP:-}" ]; then
  # the tiny artifact tests (mostly CPU compile) run beside the Flash-8 synth and build; its timing waits for them
  tiny_artifacts &
  step flash8 env OUT="$RES" LAYERS=8 CKPT=/dev/shm/flash8 SKIP_FORCED=1 WAIT_FOR=$! bash bench/artifact_h200.sh
  wait
else
  step flash8 env OUT="$RES" LAYERS=8 CKPT=/dev/shm/flash8 SKIP_FORCED=1 bash bench/artifact_h200.sh
  tiny_artifacts
fi
step wgmma-gate python bench/wgmma_gate.py /tmp/art/flash8-bfloat16 --json "$RES/wgmma-gate-flash8-h200.json"
step prefill-wgmma python bench/prefill_wgmma.py /tmp/art/flash8-bfloat16 --json "$RES/prefill-wgmma-flash8-h200.json"
step pager-sweep python bench/pager_sweep.py /tmp/art/flash8-bfloat16 --slots 1536 --json "$RES/pager-sweep-flash8-h200.json"
touch "$RES/DONE"
