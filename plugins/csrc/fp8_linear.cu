// FP8 block-scaled linear for decode (1-16 rows): DeepSeek's act_quant + fp8_gemm numerics.
//
//   act_quant:  x [M, K] bf16 -> e4m3 codes [M, K] and fp32 scales [M, K/128], the scale of each 128-block
//               2^ceil(log2(amax * (1/448))) (amax floored at 1e-4), codes rounded to nearest even.
//   gemv:       y [M, N] bf16 = (codes * scales) . W[N, K]^T, W e4m3 with E8M0 scales per 128x128 block,
//               on FP8 tensor cores per 128-K block, scaled and summed in fp32, rounded once. W is read once.
//
// Decode is bound by the weight read, so the GEMV is built to keep HBM busy: a persistent grid sized to the
// resident CTAs, each warp streaming 16-byte weight loads one step (4 KB per warp) ahead of its MMAs, across
// row groups without a bubble. The fused form quantises the activation rows itself (each CTA, into shared
// memory, while its first weight loads are in flight): one launch. For many rows x long K the separate
// act_quant kernel writes the codes once instead (dsv4_fp8_gemv_m*), read through L1 by every CTA.
// Launch paths never allocate or synchronise, so they can be captured in CUDA graphs.
#include "common.cuh"

using dsv4::e8m0;
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
  const float inv = dsv4::pow2_inverse(scale);
  *reinterpret_cast<uint32_t*>(codes + base) = dsv4::fp8x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
  if (lane == 0) scales[warp] = scale;
}

namespace {

constexpr int U = 4;            // 128-K blocks per warp step: 8 x 16-byte loads per lane in flight
constexpr int ROW_PAD = 64;     // bytes after each shared activation row: rows alternate 128-byte bank halves

struct Fp8Step {
  uint4 w[U][2];                // lane (r, q): weight row n0 + r, bytes kb * 128 + h * 64 + q * 16 .. + 16
  uint32_t ws[U];               // the E8M0 scale byte of each block
};

// y[m, n] for m < rows on FP8 tensor cores (mma m16n8k32): a warp owns 8 weight rows (a row group) and a
// slice of K; `wpr` warps of a CTA split K for the same row group and add their sums in shared memory.
// Per 128-K block the MMA sums are scaled by w_scale * x_scale in fp32, as DeepSeek's fp8_gemm. Lane t
// loads 16 contiguous weight bytes at k0 + (t%4)*16; the activation fragments use the same permutation of
// K, so every product pairs the right elements. An item is the CTA's 8 / wpr row groups over all of K;
// CTA b runs items b, b + grid, ...
template <int M, bool FUSED>
__device__ __forceinline__ void fp8_gemv(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq,
                                         const float* __restrict__ xs, const uint8_t* __restrict__ w,
                                         const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                         int rows, int N, int K, int wpr, int items) {
  // FUSED: the activation codes [rows][K + ROW_PAD] (room for 2 bytes each: f16 values where the FP8 MMA
  // is emulated, see below; else e4m3 bytes), then their scales [rows][K/128]
  extern __shared__ uint4 smem[];
  __shared__ float partial[8][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int kblocks = K / 128, nkb = kblocks / wpr, part = warp % wpr, kb_begin = part * nkb;
  const int steps = (nkb + U - 1) / U;
  const int my_items = (items - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
  const int total = my_items * steps;

  const uint8_t* codes = FUSED ? reinterpret_cast<const uint8_t*>(smem) : xq;
  const float* scales = FUSED ? reinterpret_cast<const float*>(reinterpret_cast<uint8_t*>(smem) + 2 * rows * (K + ROW_PAD)) : xs;
  // Hopper emulates the FP8 MMA by converting both operands to f16 for every MMA; the fused form keeps the
  // activation's f16 values in shared memory instead and converts only the weights (exact either way).
  constexpr bool f16_path = FUSED && dsv4::kEmulatedFp8Mma;
  const int ldx = FUSED ? K + ROW_PAD : K;

  // Steps are walked as (item, step) pairs by counters: a division per step was a good part of the loop's
  // instructions, and this kernel is bound by its instructions, not by DRAM (bench/results/ncu-fp8-gemv-*).
  const int groups_per_item = 8 / wpr, my_group = warp / wpr;
  auto first_row = [&](int item) { return ((int(blockIdx.x) + item * int(gridDim.x)) * groups_per_item + my_group) * 8; };
  auto advance = [&](int& item, int& s) {
    if (++s == steps) s = 0, ++item;
  };
  auto load = [&](int item, int s, Fp8Step& st) {
    const int n0 = first_row(item), kb0 = kb_begin + s * U;
    const bool live = item < my_items && n0 < N;
    const uint8_t* wrow = w + size_t(min(n0 + r, N - 1)) * K + q * 16;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = live && kb0 + u < kb_begin + nkb;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        st.w[u][h] = ok ? __ldg(reinterpret_cast<const uint4*>(wrow + (kb0 + u) * 128 + h * 64)) : make_uint4(0, 0, 0, 0);
      st.ws[u] = ok ? __ldg(w_scale + size_t(n0 / 128) * kblocks + kb0 + u) : 0u;
    }
  };

  Fp8Step cur;
  int item = 0, step = 0, next_item = 0, next_step = 0;     // the step in hand, and the one after it
  load(item, step, cur);                         // in flight while the activations are quantised
  advance(next_item, next_step);
  dsv4::pdl_wait();                              // x (or its codes) come from the previous kernels
  dsv4::pdl_launch_dependents();
  if (FUSED) {
    dsv4::quantise_to_smem<false, f16_path>(x, rows * K, K, ROW_PAD, reinterpret_cast<uint8_t*>(smem),
                                            const_cast<float*>(scales));
    __syncthreads();
  }
  float total_c[4] = {0.f, 0.f, 0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    Fp8Step nxt;
    load(next_item, next_step, nxt);             // the next step's weights stream while this one multiplies
    const int kb0 = kb_begin + step * U;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u;
      if (kb >= kb_begin + nkb) break;
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = kb * 128 + h * 64 + q * 16;
        if (f16_path) {
          // f16 MMA i (of 4) takes bytes 4i .. 4i+3 of this lane's 16 weight bytes: k-slots 2q, 2q+1 <- bytes
          // 4i, 4i+1 and 2q+8, 2q+9 <- 4i+2, 4i+3; the activation's f16 values in the same order (words 2i,
          // 2i+1 of its 16 values at k), so every product pairs the right elements.
          const uint4* a = reinterpret_cast<const uint4*>(codes + 2 * (size_t(r) * ldx + k));
          const uint4* b = reinterpret_cast<const uint4*>(codes + 2 * (size_t(r + 8) * ldx + k));
          const uint4 z = make_uint4(0, 0, 0, 0);
          const uint4 a_lo = r < rows ? a[0] : z, a_hi = r < rows ? a[1] : z;
          const uint4 b_lo = M > 8 && r + 8 < rows ? b[0] : z, b_hi = M > 8 && r + 8 < rows ? b[1] : z;
          const uint32_t f[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
          const uint32_t g[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
          const uint32_t wv[4] = {cur.w[u][h].x, cur.w[u][h].y, cur.w[u][h].z, cur.w[u][h].w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
            dsv4::mma_f16(c, f[2 * i], g[2 * i], f[2 * i + 1], g[2 * i + 1], dsv4::e4m3x2_to_f16x2(wv[i]),
                          dsv4::e4m3x2_to_f16x2(wv[i] >> 16));
          continue;
        }
        const uint4 a0 = r < rows ? *reinterpret_cast<const uint4*>(codes + size_t(r) * ldx + k) : make_uint4(0, 0, 0, 0);
        const uint4 a1 = M > 8 && r + 8 < rows ? *reinterpret_cast<const uint4*>(codes + size_t(r + 8) * ldx + k)
                                               : make_uint4(0, 0, 0, 0);
        mma_e4m3(c, a0.x, a1.x, a0.y, a1.y, cur.w[u][h].x, cur.w[u][h].y);
        mma_e4m3(c, a0.z, a1.z, a0.w, a1.w, cur.w[u][h].z, cur.w[u][h].w);
      }
      const float sw = e8m0(cur.ws[u]);
      const float sx0 = r < rows ? scales[r * kblocks + kb] : 0.f;
      const float sx1 = M > 8 && r + 8 < rows ? scales[(r + 8) * kblocks + kb] : 0.f;
      total_c[0] = fmaf(c[0], sw * sx0, total_c[0]);
      total_c[1] = fmaf(c[1], sw * sx0, total_c[1]);
      total_c[2] = fmaf(c[2], sw * sx1, total_c[2]);
      total_c[3] = fmaf(c[3], sw * sx1, total_c[3]);
    }
    if (step == steps - 1) {                     // the item's last step: add the K slices, write y
      const int n0 = first_row(item);
      if (wpr > 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][i][lane] = total_c[i];
        __syncthreads();
      }
      if (part == 0 && n0 < N) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v = total_c[i];
          for (int p = 1; p < wpr; ++p) v += partial[warp + p][i][lane];
          const int m = r + (i >= 2 ? 8 : 0), n = n0 + q * 2 + (i & 1);
          if (m < rows && n < N) y[size_t(m) * N + n] = __float2bfloat16(v);
        }
      }
      if (wpr > 1) __syncthreads();
#pragma unroll
      for (int i = 0; i < 4; ++i) total_c[i] = 0.f;
    }
    cur = nxt;
    item = next_item, step = next_step;
    advance(next_item, next_step);
  }
}

}  // namespace

#define DSV4_FP8_GEMV(NAME, M, FUSED)                                                                        \
  extern "C" __global__ void __launch_bounds__(256, 2) NAME(                                                 \
      const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq, const float* __restrict__ xs,     \
      const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws, __nv_bfloat16* __restrict__ y, int rows, \
      int N, int K, int wpr, int items) {                                                                    \
    fp8_gemv<M, FUSED>(x, xq, xs, w, ws, y, rows, N, K, wpr, items);                                         \
  }
DSV4_FP8_GEMV(dsv4_fp8_gemv_m8, 8, false)
DSV4_FP8_GEMV(dsv4_fp8_gemv_m16, 16, false)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m8, 8, true)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m16, 16, true)
