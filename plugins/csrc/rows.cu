// Two row kernels of the decode step whose point is as much the launch that follows as their own: written
// with programmatic dependent launch, they let the FP8 GEMV after them (wq_b after the query latent's norm,
// the shared expert's w2 after its SwiGLU) start and stream its weights while they run, where the compiler's
// kernels in their place could not.
//   dsv4_rms_norm_rows:  y = weight * (x * rsqrt(mean(x^2) + eps)) in float32, bf16 out (plugins.oracle.rms_norm)
//   dsv4_swiglu_rows:    y = silu(min(gate, limit)) * clamp(up, -limit, limit) in float32, bf16 out
//                        (plugins.oracle.swiglu, then the program's cast)
#include "common.cuh"

namespace rows {
constexpr int THREADS = 256;
constexpr int MAX_PER_THREAD = 32;       // rms_norm_rows: K <= 8192
}  // namespace rows

// Grid R (one CTA per row), 256 threads: row r of x (bf16, row stride ld, K values) through RMSNorm with the
// float32 weight, into out [R, K] bf16.
extern "C" __global__ void __launch_bounds__(rows::THREADS) dsv4_rms_norm_rows(
    const __nv_bfloat16* __restrict__ x, int ld, const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
    int K, float eps) {
  __shared__ float scratch[rows::THREADS / 32];
  const int r = blockIdx.x, t = threadIdx.x;
  dsv4::pdl_wait();                          // x comes from the kernel before
  dsv4::pdl_launch_dependents();
  float v[rows::MAX_PER_THREAD], ss = 0.f;
#pragma unroll
  for (int i = 0; i < rows::MAX_PER_THREAD; ++i) {
    const int k = t + i * rows::THREADS;
    v[i] = k < K ? __bfloat162float(x[size_t(r) * ld + k]) : 0.f;
    ss += v[i] * v[i];
  }
  const float inv = rsqrtf(dsv4::block_sum(ss, t, rows::THREADS, scratch) / float(K) + eps);
#pragma unroll
  for (int i = 0; i < rows::MAX_PER_THREAD; ++i) {
    const int k = t + i * rows::THREADS;
    if (k < K) out[size_t(r) * K + k] = __float2bfloat16(weight[k] * (v[i] * inv));
  }
}

// Grid (R, ceil(F / 1024)), 256 threads, 4 values each: row r's gate (columns [0, F) of y, bf16 with row stride
// ld) and up (columns [up, up + F)) through the clamped SwiGLU, into out [R, F] bf16. limit <= 0: no clamps.
extern "C" __global__ void __launch_bounds__(rows::THREADS) dsv4_swiglu_rows(
    const __nv_bfloat16* __restrict__ y, int ld, int up, int F, float limit, __nv_bfloat16* __restrict__ out) {
  const int r = blockIdx.x, f0 = (blockIdx.y * rows::THREADS + threadIdx.x) * 4;
  dsv4::pdl_wait();                          // y comes from the kernel before
  dsv4::pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int f = f0 + i;
    if (f >= F) break;
    float g = __bfloat162float(y[size_t(r) * ld + f]), u = __bfloat162float(y[size_t(r) * ld + up + f]);
    if (limit > 0.f) {
      u = fminf(fmaxf(u, -limit), limit);
      g = fminf(g, limit);
    }
    out[size_t(r) * F + f] = __float2bfloat16(g / (1.f + expf(-g)) * u);   // silu as torch's: x / (1 + exp(-x))
  }
}
