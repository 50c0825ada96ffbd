#!/usr/bin/env bash
# Session 52's device batch: the decode lines with the weight kernels' persistent grids capped below what fits
# an SM (plugins.loader.RESIDENT_CAPS), so that the next launch's CTAs can sit beside them and start their
# weight copies while these stream; cases in turn, two rounds. Then, with session 51's patched fat binary
# (plugins/s51_kernels.fatbin, carried), how many of the one-launch shared expert's clusters fit at once.
# Results under $RES (default $OUT).
set -u
export RES=${RES:-$OUT}
mkdir -p "$RES"
F=plugins/dsv4_kernels.fatbin
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$RES/gpu.txt" 2>&1
if [ -f plugins/s51_kernels.fatbin ]; then
  for s in 12:213248 4:82176; do
    python bench/cluster_occupancy.py --fatbin plugins/s51_kernels.fatbin --kernel dsv4_shared_expert_s${s%%:*} \
      --block 256 --shared ${s##*:} --cluster 8 --grid 128 --json "$RES/cluster-occupancy-s${s%%:*}.json" \
      >> "$RES/cluster.txt" 2>&1
  done
fi
CAPS=plugins.loader.RESIDENT_CAPS
bash bench/read_ceiling_in_turn.sh base="$F" gemv1="$F@$CAPS='dsv4_fp8_gemv:1'" moe2="$F@$CAPS='dsv4_moe_:2'" \
  both="$F@$CAPS='dsv4_fp8_gemv:1|dsv4_moe_:2'"
touch "$RES/DONE"
