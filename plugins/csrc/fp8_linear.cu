// FP8 block-scaled linear for decode (1-16 rows): DeepSeek's act_quant + fp8_gemm numerics.
//
//   act_quant_fp8: x [M, K] bf16 -> x' [M, K] bf16, each 128-block round-tripped through e4m3 with the
//                  scale 2^ceil(log2(amax * (1/448))) (amax floored at 1e-4). x' is exact in bf16: an
//                  e4m3 value (3 mantissa bits) times a power of two.
//   fp8_gemv:      y [M, N] bf16 = x' [M, K] . W[N, K]^T, W e4m3 with E8M0 scales per 128x128 block,
//                  accumulated in fp32, rounded once. W is read exactly once.
//
// Launch paths never allocate or synchronise, so they can be captured in CUDA graphs.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float pow2_ceil_scale(float amax, float inv_qmax) {
  // 2^ceil(log2(amax * inv_qmax)) by exponent bits, as DeepSeek's fast_round_scale.
  uint32_t bits = __float_as_uint(amax * inv_qmax);
  int exp = int((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0);
  return __uint_as_float(uint32_t(exp + 127) << 23);
}

__device__ __forceinline__ float e8m0(uint8_t b) { return __uint_as_float(uint32_t(b) << 23); }

}  // namespace

// One warp per (row, 128-block): 32 lanes x 4 elements.
extern "C" __global__ void dsv4_act_quant_fp8(const __nv_bfloat16* __restrict__ x,
                                              __nv_bfloat16* __restrict__ out, int rows, int K) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int blocks_per_row = K / 128;
  if (warp >= rows * blocks_per_row) return;
  const size_t base = size_t(warp / blocks_per_row) * K + size_t(warp % blocks_per_row) * 128 + lane * 4;
  float v[4], amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = __bfloat162float(x[base + i]);
    amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float q = fminf(fmaxf(v[i] / scale, -448.f), 448.f);
    const __nv_fp8_e4m3 f8(q);                       // round to nearest even
    out[base + i] = __float2bfloat16(float(f8) * scale);
  }
}

// y[m, n] for m < M: `wpr` warps share one output row, each taking a contiguous slice of K in 16-byte
// chunks (two chunks in flight per lane); partial sums meet in shared memory. Block = 256 threads =
// 8 / wpr rows. M is a compile-time bucket so the accumulators stay in registers.
template <int M>
__device__ __forceinline__ void fp8_gemv(const __nv_bfloat16* __restrict__ xq, const uint8_t* __restrict__ w,
                                         const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                         int rows, int N, int K, int wpr) {
  __shared__ float partial[8][M];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % wpr;
  const int kblocks = (K + 127) / 128;
  const int groups = (N + 8 / wpr - 1) / (8 / wpr);
  // Grid-stride over row groups: a few resident blocks per SM stream the whole weight.
  for (int group = blockIdx.x; group < groups; group += gridDim.x) {
  const int n = group * (8 / wpr) + warp / wpr;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  if (n < N) {
    const uint8_t* row = w + size_t(n) * K;
    const uint8_t* srow = w_scale + size_t(n / 128) * kblocks;
    const int slice = K / wpr;                                  // multiple of 16 (K % 128 == 0, wpr | 8)
    const int begin = part * slice, end = begin + slice;
    for (int k0 = begin + lane * 16; k0 < end; k0 += 1024) {
      uint4 chunk[2];
      const bool second = k0 + 512 < end;
      chunk[0] = __ldg(reinterpret_cast<const uint4*>(row + k0));
      if (second) chunk[1] = __ldg(reinterpret_cast<const uint4*>(row + k0 + 512));
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (c == 1 && !second) break;
        const int k = k0 + c * 512;
        const uint8_t* b = reinterpret_cast<const uint8_t*>(&chunk[c]);
        float wf[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          __nv_fp8_e4m3 f8;
          f8.__x = b[i];
          wf[i] = float(f8);
        }
        const float s = e8m0(srow[k / 128]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m >= rows) break;
          const uint4* xp = reinterpret_cast<const uint4*>(xq + size_t(m) * K + k);
          const uint4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
          const __nv_bfloat16* xa = reinterpret_cast<const __nv_bfloat16*>(&x0);
          const __nv_bfloat16* xb = reinterpret_cast<const __nv_bfloat16*>(&x1);
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) dot = fmaf(wf[i], __bfloat162float(xa[i]), dot);
#pragma unroll
          for (int i = 0; i < 8; ++i) dot = fmaf(wf[8 + i], __bfloat162float(xb[i]), dot);
          acc[m] = fmaf(dot, s, acc[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[warp][m] = v;
  }
  __syncthreads();
  if (part == 0 && lane < M && lane < rows && n < N) {
    float v = 0.f;
    for (int p = 0; p < wpr; ++p) v += partial[warp + p][lane];
    y[size_t(lane) * N + n] = __float2bfloat16(v);
  }
  __syncthreads();                                               // partial[] is reused by the next group
  }
}

#define DSV4_FP8_GEMV(M)                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) dsv4_fp8_gemv_m##M(                                    \
      const __nv_bfloat16* __restrict__ xq, const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws, \
      __nv_bfloat16* __restrict__ y, int rows, int N, int K, int wpr) {                                    \
    fp8_gemv<M>(xq, w, ws, y, rows, N, K, wpr);                                                            \
  }
DSV4_FP8_GEMV(1)
DSV4_FP8_GEMV(2)
DSV4_FP8_GEMV(4)
DSV4_FP8_GEMV(8)
DSV4_FP8_GEMV(16)
