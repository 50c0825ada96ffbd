// Two row kernels of the decode step whose point is as much the launch that follows as their own: written
// with programmatic dependent launch, they let the FP8 GEMV after them (wq_b after the query latent's norm,
// the shared expert's w2 after its SwiGLU) start and stream its weights while they run, where the compiler's
// kernels in their place could not.
// The transforms themselves are in rows.cuh, shared with the FP8 GEMV, which can apply them to its input as
// it loads it (one launch fewer where a GEMV is their only reader).
#include "rows.cuh"

namespace rows {
constexpr int MAX_PER_THREAD = 32;       // rms_norm_rows: K <= 8192
}  // namespace rows

// Grid R (one CTA per row), 256 threads: row r of x (bf16, row stride ld, K values) through RMSNorm with the
// float32 weight, into out [R, K] bf16.
extern "C" __global__ void __launch_bounds__(dsv4_rows::THREADS) dsv4_rms_norm_rows(
    const __nv_bfloat16* __restrict__ x, int ld, const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
    int K, float eps) {
  __shared__ float scratch[dsv4_rows::THREADS / 32];
  const int r = blockIdx.x;
  dsv4::pdl_wait();                          // x comes from the kernel before
  dsv4::pdl_launch_dependents();
  dsv4_rows::rms_norm_row<rows::MAX_PER_THREAD>(x + size_t(r) * ld, weight, out + size_t(r) * K, K, eps, scratch);
}

// Grid (R, ceil(F / 1024)), 256 threads, 4 values each: row r's gate (columns [0, F) of y, bf16 with row stride
// ld) and up (columns [up, up + F)) through the clamped SwiGLU, into out [R, F] bf16. limit <= 0: no clamps.
extern "C" __global__ void __launch_bounds__(dsv4_rows::THREADS) dsv4_swiglu_rows(
    const __nv_bfloat16* __restrict__ y, int ld, int up, int F, float limit, __nv_bfloat16* __restrict__ out) {
  const int r = blockIdx.x, f0 = (blockIdx.y * dsv4_rows::THREADS + threadIdx.x) * 4;
  dsv4::pdl_wait();                          // y comes from the kernel before
  dsv4::pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int f = f0 + i;
    if (f >= F) break;
    out[size_t(r) * F + f] = dsv4_rows::swiglu_value(y + size_t(r) * ld, up, f, limit);
  }
}
