// The row transforms of the decode step, by one CTA of 256 threads per row, shared by their own kernels
// (rows.cu) and by the FP8 GEMV that can apply them to its input as it loads it (fp8_linear.cu): one
// source for both, so the two paths give the same bits.
//   rms_norm_row: y = weight * (x * rsqrt(mean(x^2) + eps)) in float32, bf16 out (plugins.oracle.rms_norm)
//   swiglu_row:   y = silu(min(gate, limit)) * clamp(up, -limit, limit) in float32, bf16 out
//                 (plugins.oracle.swiglu, then the program's cast)
//   hc_post_value: one element of the hyper-connection post (plugins.oracle.hc_post), for the kernels that end
//                 a sub-layer with it (hc_pre.cu after the attention, moe_experts.cu after the MoE)
#pragma once
#include "common.cuh"

namespace dsv4_rows {

constexpr int THREADS = 256;

// One row x [K] (bf16) through RMSNorm with the float32 weight into out [K] (bf16, global or shared memory),
// K <= THREADS * PER_THREAD; every thread of the CTA calls it. Thread t holds elements t + i * THREADS and
// adds their squares in that order, then the CTA adds the threads' sums in warp order (block_sum): the same
// bits for any PER_THREAD that holds the row. scratch: THREADS / 32 floats of shared memory.
template <int PER_THREAD>
__device__ __forceinline__ void rms_norm_row(const __nv_bfloat16* __restrict__ x, const float* __restrict__ weight,
                                             __nv_bfloat16* __restrict__ out, int K, float eps, float* scratch) {
  const int t = threadIdx.x;
  float v[PER_THREAD], ss = 0.f;
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int k = t + i * THREADS;
    v[i] = k < K ? __bfloat162float(x[k]) : 0.f;
    ss += v[i] * v[i];
  }
  const float inv = rsqrtf(dsv4::block_sum(ss, t, THREADS, scratch) / float(K) + eps);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int k = t + i * THREADS;
    if (k < K) out[k] = __float2bfloat16(weight[k] * (v[i] * inv));
  }
}

// Value f of a row's clamped SwiGLU: gate y[f], up y[up + f] (bf16); limit <= 0: no clamps.
__device__ __forceinline__ __nv_bfloat16 swiglu_value(const __nv_bfloat16* __restrict__ y, int up, int f, float limit) {
  float g = __bfloat162float(y[f]), u = __bfloat162float(y[up + f]);
  if (limit > 0.f) {
    u = fminf(fmaxf(u, -limit), limit);
    g = fminf(g, limit);
  }
  return __float2bfloat16(g / (1.f + expf(-g)) * u);   // silu as torch's: x / (1 + exp(-x))
}

// One row's F SwiGLU values into out [F] by the CTA's threads (value f by thread f % blockDim).
__device__ __forceinline__ void swiglu_row(const __nv_bfloat16* __restrict__ y, int up, int F, float limit,
                                           __nv_bfloat16* __restrict__ out) {
  for (int f = threadIdx.x; f < F; f += blockDim.x) out[f] = swiglu_value(y, up, f, limit);
}

// Output stream k of one element of the hyper-connection post (plugins.oracle.hc_post), HC streams:
//   bf16( post_k * f + sum_j comb[j][k] * res_j ),  comb the row's [HC][HC] (row j: input stream),
// products and sums rounded one by one, j in order (the oracle's separate ops, no fused multiply-adds).
template <int HC>
__device__ __forceinline__ __nv_bfloat16 hc_post_value(float post_k, float f, const float* __restrict__ comb, int k,
                                                       const float (&res)[HC]) {
  float mixed = __fmul_rn(comb[k], res[0]);
#pragma unroll
  for (int j = 1; j < HC; ++j) mixed = __fadd_rn(mixed, __fmul_rn(comb[j * HC + k], res[j]));
  return __float2bfloat16(__fadd_rn(__fmul_rn(post_k, f), mixed));
}

}  // namespace dsv4_rows
