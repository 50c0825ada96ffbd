// FP8 block-scaled linear for decode (1-16 rows): DeepSeek's act_quant + fp8_gemm numerics.
//
//   act_quant_fp8: x [M, K] bf16 -> e4m3 codes [M, K] and fp32 scales [M, K/128], the scale of each
//                  128-block 2^ceil(log2(amax * (1/448))) (amax floored at 1e-4), codes rounded to nearest even.
//   fp8_gemv:      y [M, N] bf16 = (codes * scales) . W[N, K]^T, W e4m3 with E8M0 scales per 128x128 block,
//                  on FP8 tensor cores per 128-K block, scaled and summed in fp32, rounded once. W is read once.
//
// Launch paths never allocate or synchronise, so they can be captured in CUDA graphs.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "common.cuh"

using dsv4::e8m0;
using dsv4::pow2_ceil_scale;

// One warp per (row, 128-block): 32 lanes x 4 elements. Writes the e4m3 codes and the block's scale.
extern "C" __global__ void dsv4_act_quant_fp8(const __nv_bfloat16* __restrict__ x, uint8_t* __restrict__ codes,
                                              float* __restrict__ scales, int rows, int K) {
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
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8_e4m3 f8(fminf(fmaxf(v[i] / scale, -448.f), 448.f));   // round to nearest even
    packed |= uint32_t(f8.__x) << (8 * i);
  }
  *reinterpret_cast<uint32_t*>(codes + base) = packed;
  if (lane == 0) scales[warp] = scale;
}

__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// y[m, n] for m < rows (<= 16) on FP8 tensor cores (mma m16n8k32): a warp owns 8 weight rows and a
// slice of K. Per 128-K block the MMA sums are scaled by w_scale * x_scale in fp32, as DeepSeek's
// fp8_gemm. Lane t loads 16 contiguous bytes of weight row n0 + t/4 at k0 + (t%4)*16; the activation
// fragments use the same permutation of K, so every product pairs the right elements.
template <int M>
__device__ __forceinline__ void fp8_gemv(const uint8_t* __restrict__ xq, const float* __restrict__ xs,
                                         const uint8_t* __restrict__ w, const uint8_t* __restrict__ w_scale,
                                         __nv_bfloat16* __restrict__ y, int rows, int N, int K, int wpr) {
  __shared__ float partial[8][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % wpr;
  const int kblocks = K / 128;
  const int r = lane >> 2, q = lane & 3;                         // fragment row / quad
  const int groups = (N + 7) / 8;                                // 8 weight rows per warp
  const int warps_per_block = 8 / wpr;
  // Grid-stride over groups; every warp of a block runs the same iterations (__syncthreads below).
  for (int base = blockIdx.x * warps_per_block; base < groups; base += gridDim.x * warps_per_block) {
    const int n0 = (base + warp / wpr) * 8;
    float total[4] = {0.f, 0.f, 0.f, 0.f};
    if (n0 < N) {
      const uint8_t* wrow = w + size_t(min(n0 + r, N - 1)) * K + q * 16;
      const uint8_t* xrow0 = xq + size_t(r) * K + q * 16;
      const uint8_t* xrow1 = xq + size_t(r + 8) * K + q * 16;
      const int kb_begin = part * (kblocks / wpr), kb_end = kb_begin + kblocks / wpr;
      const uint8_t* wsrow = w_scale + size_t(n0 / 128) * kblocks;
      // UNROLL 128-K blocks per step: all their loads are issued before the first MMA waits on one.
      constexpr int UNROLL = 4;
      for (int kb0 = kb_begin; kb0 < kb_end; kb0 += UNROLL) {
        uint4 b[UNROLL][2], a0[UNROLL][2], a1[UNROLL][2];
        float sw[UNROLL], sx0[UNROLL], sx1[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int kb = kb0 + u;
          if (kb >= kb_end) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {                          // 2 x 64 K per 128-block
            const int k = kb * 128 + h * 64;
            b[u][h] = __ldg(reinterpret_cast<const uint4*>(wrow + k));
            a0[u][h] = r < rows ? __ldg(reinterpret_cast<const uint4*>(xrow0 + k)) : make_uint4(0, 0, 0, 0);
            a1[u][h] = M > 8 && r + 8 < rows ? __ldg(reinterpret_cast<const uint4*>(xrow1 + k))
                                             : make_uint4(0, 0, 0, 0);
          }
          sw[u] = e8m0(wsrow[kb]);
          sx0[u] = r < rows ? xs[size_t(r) * kblocks + kb] : 0.f;
          sx1[u] = r + 8 < rows ? xs[size_t(r + 8) * kblocks + kb] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          if (kb0 + u >= kb_end) break;
          float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t fa[4] = {a0[u][h].x, a1[u][h].x, a0[u][h].y, a1[u][h].y};
            mma_e4m3(c, fa, b[u][h].x, b[u][h].y);
            const uint32_t fb[4] = {a0[u][h].z, a1[u][h].z, a0[u][h].w, a1[u][h].w};
            mma_e4m3(c, fb, b[u][h].z, b[u][h].w);
          }
          total[0] = fmaf(c[0], sw[u] * sx0[u], total[0]);
          total[1] = fmaf(c[1], sw[u] * sx0[u], total[1]);
          total[2] = fmaf(c[2], sw[u] * sx1[u], total[2]);
          total[3] = fmaf(c[3], sw[u] * sx1[u], total[3]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][i][lane] = total[i];
    __syncthreads();
    if (part == 0 && n0 < N) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = 0.f;
        for (int p = 0; p < wpr; ++p) v += partial[warp + p][i][lane];
        const int m = r + (i >= 2 ? 8 : 0), n = n0 + q * 2 + (i & 1);
        if (m < rows && n < N) y[size_t(m) * N + n] = __float2bfloat16(v);
      }
    }
    __syncthreads();
  }
}

#define DSV4_FP8_GEMV(M)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) dsv4_fp8_gemv_m##M(                                  \
      const uint8_t* __restrict__ xq, const float* __restrict__ xs, const uint8_t* __restrict__ w,       \
      const uint8_t* __restrict__ ws, __nv_bfloat16* __restrict__ y, int rows, int N, int K, int wpr) {  \
    fp8_gemv<M>(xq, xs, w, ws, y, rows, N, K, wpr);                                                      \
  }
DSV4_FP8_GEMV(8)
DSV4_FP8_GEMV(16)
