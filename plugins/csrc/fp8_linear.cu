// FP8 block-scaled linear for decode (1-16 rows): DeepSeek's act_quant + fp8_gemm numerics.
//
//   act_quant:  x [M, K] bf16 -> e4m3 codes [M, K] and fp32 scales [M, K/128], the scale of each 128-block
//               2^ceil(log2(amax * (1/448))) (amax floored at 1e-4), codes rounded to nearest even.
//   gemv:       y [M, N] bf16 = (codes * scales) . W[N, K]^T, W e4m3 with E8M0 scales per 128x128 block,
//               on FP8 tensor cores per 128-K block, scaled and summed in fp32, rounded once. W is read once.
//
// Decode is bound by the weight read, so the GEMV is built to keep HBM busy. Each warp owns whole groups of 8
// weight rows (all of K, so no partial sums cross warps) and streams them through its own ring of shared-
// memory stages with bulk asynchronous copies (csrc/common.cuh): its lane 0 keeps STAGES chunks of 8 rows x
// `kc` bytes requested, tens of kilobytes per warp, where register loads held 4 KB; the first requests go
// out before the kernel waits for the previous one (programmatic dependent launch), as weights never
// depend on it. A persistent grid: warp w of all takes row groups w, w + warps, ... The fused form
// quantises the activation rows itself (each CTA, into shared memory, while its first stages land): one
// launch. For many rows x long K the separate act_quant kernel writes the codes once instead
// (dsv4_fp8_gemv_m*), read through L1 by every CTA.
// Launch paths never allocate or synchronise, so they can be captured in CUDA graphs.
#include "common.cuh"

using dsv4::bulk_copy_to_smem;
using dsv4::e8m0;
using dsv4::mbar_expect_bytes;
using dsv4::mbar_init;
using dsv4::mma_e4m3;

// One warp per (row, 128-block): 32 lanes x 4 elements. Writes the e4m3 codes and the block's scale.
extern "C" __global__ void dsv4_act_quant_fp8(const __nv_bfloat16* __restrict__ x, uint8_t* __restrict__ codes,
                                              float* __restrict__ scales, int rows, int K) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
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
  const float scale = dsv4::pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
  const float inv = 1.0f / scale;
  *reinterpret_cast<uint32_t*>(codes + base) = dsv4::fp8x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
  if (lane == 0) scales[warp] = scale;
}

namespace {

constexpr int MAX_STAGES = 4;   // per warp; the host picks 2..4 by the shared memory it has
constexpr int MAX_WARPS = 8;    // per CTA
constexpr int ROW_PAD = 64;     // bytes after each shared row (activations and weight stages): rows alternate
                                // 128-byte bank halves, so a warp's 16-byte reads of 8 rows do not collide

// y[m, n] for m < rows on FP8 tensor cores (mma m16n8k32). Lane t = (r, q) = (t / 4, t % 4) reads 16
// contiguous bytes of weight row n0 + r at k + q * 16 per 64-byte half block; the activation fragments use
// the same permutation of K, so every product pairs the right elements. Per 128-K block the MMA sums are
// scaled by w_scale * x_scale in fp32 and added, as DeepSeek's fp8_gemm.
// Shared memory: FUSED activation codes [rows][K + ROW_PAD] and scales [rows][K/128], then (128-aligned at
// `ring_at`) each warp's stages of 8 x (kc + ROW_PAD) bytes.
template <int M, bool FUSED>
__device__ __forceinline__ void fp8_gemv(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq,
                                         const float* __restrict__ xs, const uint8_t* __restrict__ w,
                                         const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                         int rows, int N, int K, int kc, int stages, int ring_at) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ uint64_t bars[MAX_WARPS][MAX_STAGES];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int warps = blockDim.x >> 5, all_warps = int(gridDim.x) * warps;
  const int gw = int(blockIdx.x) * warps + warp;
  const int groups = (N + 7) / 8, chunks = K / kc, kblocks = K / 128, stride = kc + ROW_PAD;
  const int my_groups = gw < groups ? (groups - 1 - gw) / all_warps + 1 : 0;
  const int total = my_groups * chunks;         // this warp's steps: (row group, K chunk) pairs
  uint8_t* ring = smem + ring_at + size_t(warp) * stages * 8 * stride;

  // lane 0: ask for step t's 8 rows x kc bytes (fewer rows past N) into stage t % stages
  auto request = [&](int t) {
    if (t >= total) return;
    const int n0 = (gw + (t / chunks) * all_warps) * 8, c = t % chunks, valid = min(8, N - n0);
    uint64_t* bar = &bars[warp][t % stages];
    uint8_t* dst = ring + (t % stages) * 8 * stride;
    mbar_expect_bytes(bar, uint32_t(valid * kc));
    for (int i = 0; i < valid; ++i)
      bulk_copy_to_smem(dst + i * stride, w + size_t(n0 + i) * K + size_t(c) * kc, uint32_t(kc), bar);
  };
  if (lane == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[warp][s], 1);
    for (int t = 0; t < stages; ++t) request(t);
  }
  __syncwarp();
  dsv4::pdl_wait();                              // x (or its codes) come from the previous kernels
  dsv4::pdl_launch_dependents();
  const uint8_t* codes = FUSED ? smem : xq;
  const float* scales = FUSED ? reinterpret_cast<const float*>(smem + rows * (K + ROW_PAD)) : xs;
  const int ldx = FUSED ? K + ROW_PAD : K;
  if (FUSED) {
    dsv4::quantise_to_smem<false>(x, rows * K, K, ROW_PAD, smem, const_cast<float*>(scales));
    __syncthreads();
  }

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int t = 0; t < total; ++t) {
    const int n0 = (gw + (t / chunks) * all_warps) * 8, c = t % chunks;
    dsv4::mbar_wait(&bars[warp][t % stages], uint32_t((t / stages) & 1));
    const uint8_t* wrow = ring + (t % stages) * 8 * stride + r * stride + q * 16;
    for (int kbl = 0; kbl < kc / 128; ++kbl) {
      const int kb = c * (kc / 128) + kbl;
      float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = kb * 128 + h * 64 + q * 16;
        const uint4 a0 = r < rows ? *reinterpret_cast<const uint4*>(codes + size_t(r) * ldx + k) : make_uint4(0, 0, 0, 0);
        const uint4 a1 = M > 8 && r + 8 < rows ? *reinterpret_cast<const uint4*>(codes + size_t(r + 8) * ldx + k)
                                               : make_uint4(0, 0, 0, 0);
        const uint4 b = *reinterpret_cast<const uint4*>(wrow + kbl * 128 + h * 64);
        mma_e4m3(part, a0.x, a1.x, a0.y, a1.y, b.x, b.y);
        mma_e4m3(part, a0.z, a1.z, a0.w, a1.w, b.z, b.w);
      }
      const float sw = e8m0(__ldg(w_scale + size_t(n0 / 128) * kblocks + kb));
      const float sx0 = r < rows ? scales[r * kblocks + kb] : 0.f;
      const float sx1 = M > 8 && r + 8 < rows ? scales[(r + 8) * kblocks + kb] : 0.f;
      acc[0] = fmaf(part[0], sw * sx0, acc[0]);
      acc[1] = fmaf(part[1], sw * sx0, acc[1]);
      acc[2] = fmaf(part[2], sw * sx1, acc[2]);
      acc[3] = fmaf(part[3], sw * sx1, acc[3]);
    }
    __syncwarp();                                // every lane has read the stage: lane 0 may refill it
    if (lane == 0) {
      dsv4::fence_async_smem();
      request(t + stages);
    }
    if (c == chunks - 1) {                       // the row group's last chunk: write y, start the next group
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = r + (i >= 2 ? 8 : 0), n = n0 + q * 2 + (i & 1);
        if (m < rows && n < N) y[size_t(m) * N + n] = __float2bfloat16(acc[i]);
        acc[i] = 0.f;
      }
    }
  }
}

}  // namespace

#define DSV4_FP8_GEMV(NAME, M, FUSED)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                                    \
      const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq, const float* __restrict__ xs,     \
      const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws, __nv_bfloat16* __restrict__ y, int rows, \
      int N, int K, int kc, int stages, int ring_at) {                                                       \
    fp8_gemv<M, FUSED>(x, xq, xs, w, ws, y, rows, N, K, kc, stages, ring_at);                                \
  }
DSV4_FP8_GEMV(dsv4_fp8_gemv_m8, 8, false)
DSV4_FP8_GEMV(dsv4_fp8_gemv_m16, 16, false)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m8, 8, true)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m16, 16, true)
