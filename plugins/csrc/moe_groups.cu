// The prefill MoE's group table on the GPU (plugins/moe_experts.py group_pairs, its torch form the oracle):
// a chunk's (token, slot) pairs counted by expert, each expert's run cut into ceil(count / max_group)
// groups within one pair of each other in size, in expert order; `slots` entries, those past the chunk's
// groups empty (expert n_experts - 1, start at the end of the pairs, size 0), and the number of groups in
// *n_groups, which the grouped kernels read instead of the host. One launch instead of some forty small torch
// ops and no host synchronisation: the host time before the first expert kernel was about a sixth of a
// 4096-token chunk's MoE on the H200, and a launch sequence that never waits for the host is one a CUDA
// graph can capture.
#include "common.cuh"

namespace {

// Exclusive prefix sum over the block of one int per thread (blockDim.x <= 1024); *total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();                              // a scan before may still be reading warp_sums
  int inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += n;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += n;
    }
    if (lane < warps) warp_sums[lane] = w;     // inclusive over warps
    if (lane == 31) *total = w;
  }
  __syncthreads();
  return inclusive - v + (warp > 0 ? warp_sums[warp - 1] : 0);
}

}  // namespace

// One CTA of 1024 threads, n_experts <= 1024. experts [pairs] int32 (a chunk's routing, flattened).
extern "C" __global__ void __launch_bounds__(1024) dsv4_moe_group_table(
    const int* __restrict__ experts, int pairs, int n_experts, int max_group, int slots, int* __restrict__ g_expert,
    int* __restrict__ g_start, int* __restrict__ g_count, int* __restrict__ n_groups) {
  __shared__ int count[1024], warp_sums[32], total_pairs, total_groups;
  dsv4::pdl_wait();                             // the routing comes from the launch before
  dsv4::pdl_launch_dependents();
  const int e = threadIdx.x;
  count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&count[experts[p]], 1);
  __syncthreads();
  const int c = e < n_experts ? count[e] : 0, cut = (c + max_group - 1) / max_group;
  const int first_pair = block_exclusive_scan(c, warp_sums, &total_pairs);
  const int first_group = block_exclusive_scan(cut, warp_sums, &total_groups);
  if (threadIdx.x == 0) *n_groups = total_groups;
  for (int n = 0; n < cut && first_group + n < slots; ++n) {
    const int slot = first_group + n, first = n * c / cut;
    g_expert[slot] = e;
    g_start[slot] = first_pair + first;
    g_count[slot] = (n + 1) * c / cut - first;
  }
  for (int slot = total_groups + threadIdx.x; slot < slots; slot += blockDim.x) {
    g_expert[slot] = n_experts - 1;
    g_start[slot] = total_pairs;
    g_count[slot] = 0;
  }
}
