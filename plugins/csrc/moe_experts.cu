// MXFP4 routed experts for decode (few tokens), DeepSeek's numerics:
//   g = bf16(W1 x'), u = bf16(W3 x')                       x' = FP8 act_quant(x), W MXFP4 (E8M0 per 32 K)
//   h = bf16(weight * silu(min(g, L)) * clamp(u, -L, L))   in fp32
//   y[t] += float(bf16(W2 h'))  over the token's experts in ascending id order, h' = FP8 act_quant(h)
// Five launches: act_quant(x), gate_up (w1 and w3 rows spread over warps), swiglu_quant, down, sum.
// Experts are reached through a table of pointers, one per expert, each to one contiguous expert:
//   [w1 F x D/2 | w3 F x D/2 | w2 D x F/2 | s1 F x D/32 | s3 F x D/32 | s2 D x F/32]   (bytes)
// Any pointer may point into mapped pinned host memory. Launches never allocate or synchronise.
//
// Products run on FP8 tensor cores (mma m16n8k32 e4m3): E2M1 codes are widened to e4m3 exactly. One MMA
// covers exactly one 32-K scale block: lane (r, q) holds bytes [q*4, q*4+4) of the block for weight row
// n0 + r, i.e. elements q*8 .. q*8+7; the activation fragment uses the same K order.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// Four E2M1 codes (16 bits, element order from the low nibble) -> four e4m3 bytes.
__device__ __forceinline__ uint32_t e2m1x4_to_e4m3x4(uint32_t v) {
  // e4m3 codes of the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
  const uint32_t lut_lo = 0x3C383000u, lut_hi = 0x4C484440u;
  const uint32_t mags = __byte_perm(lut_lo, lut_hi, v & 0x7777u);
  const uint32_t s = v & 0x8888u;
  const uint32_t signs = ((s & 0x8u) << 4) | ((s & 0x80u) << 8) | ((s & 0x800u) << 12) | ((s & 0x8000u) << 16);
  return mags | signs;
}

__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  const uint32_t zero = 0;
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(zero), "r"(a2), "r"(zero), "r"(b0), "r"(b1));
}

// Dot products of weight rows n0 .. n0+7 (row stride `ld` bytes, K = 2 * ld) with one activation row
// (e4m3 codes `xc`, fp32 scales `xs` per 128 K). Lanes with r == 0 return the sums of rows n0 + 2q
// and n0 + 2q + 1 in out[0], out[1].
__device__ __forceinline__ void mxfp4_dot8(const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws,
                                           int rows_valid, int ld, const uint8_t* __restrict__ xc,
                                           const float* __restrict__ xs, int lane, float (&out)[2]) {
  const int r = lane >> 2, q = lane & 3;
  const int K = ld * 2, blocks = K / 32;
  const uint8_t* wrow = w + size_t(min(r, rows_valid - 1)) * ld + q * 4;
  const uint8_t* s0 = ws + size_t(min(2 * q, rows_valid - 1)) * blocks;
  const uint8_t* s1 = ws + size_t(min(2 * q + 1, rows_valid - 1)) * blocks;
  out[0] = out[1] = 0.f;
  constexpr int UNROLL = 8;
  for (int b0 = 0; b0 < blocks; b0 += UNROLL) {
    uint32_t wv[UNROLL];
    uint2 xv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (b0 + u >= blocks) break;
      wv[u] = __ldg(reinterpret_cast<const uint32_t*>(wrow + (b0 + u) * 16));
      xv[u] = r == 0 ? __ldg(reinterpret_cast<const uint2*>(xc + (b0 + u) * 32 + q * 8)) : make_uint2(0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (b0 + u >= blocks) break;
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      mma_e4m3(c, xv[u].x, xv[u].y, e2m1x4_to_e4m3x4(wv[u] & 0xFFFFu), e2m1x4_to_e4m3x4(wv[u] >> 16));
      const int blk = b0 + u;
      const float sx = xs[blk / 4];
      out[0] = fmaf(c[0], dsv4::e8m0(s0[blk]) * sx, out[0]);
      out[1] = fmaf(c[1], dsv4::e8m0(s1[blk]) * sx, out[1]);
    }
  }
}

}  // namespace

// Grid-stride over (pair p = t * topk + j, matrix w1 | w3, group of 8 rows of F); one warp each.
// gu[p][0 | 1][n] = bf16(W1 x' | W3 x').
extern "C" __global__ void __launch_bounds__(256) dsv4_moe_gate_up(
    const uint8_t* __restrict__ xc, const float* __restrict__ xs, const int* __restrict__ experts,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ gu, int pairs, int topk, int D, int F) {
  const int lane = threadIdx.x & 31;
  const int groups = F / 8;
  const int total = pairs * 2 * groups;
  const size_t wbytes = size_t(F) * D / 2;
  for (int item = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; item < total; item += (gridDim.x * blockDim.x) >> 5) {
    const int p = item / (2 * groups), which = (item / groups) % 2, n0 = (item % groups) * 8;
    const uint8_t* e = reinterpret_cast<const uint8_t*>(table[experts[p]]);
    const uint8_t* w = e + which * wbytes + size_t(n0) * (D / 2);
    const uint8_t* ws = e + 3 * wbytes + which * size_t(F) * (D / 32) + size_t(n0) * (D / 32);
    const int token = p / topk;
    float o[2];
    mxfp4_dot8(w, ws, 8, D / 2, xc + size_t(token) * D, xs + size_t(token) * (D / 128), lane, o);
    if ((lane >> 2) == 0) {
      __nv_bfloat16* dst = gu + (size_t(p) * 2 + which) * F + n0 + (lane & 3) * 2;
      dst[0] = __float2bfloat16(o[0]);
      dst[1] = __float2bfloat16(o[1]);
    }
  }
}

// One warp per (pair, 128-block of F): h = bf16(weight * silu(min(g, L)) * clamp(u, -L, L)), then
// DeepSeek's FP8 act_quant of h (codes + one scale per 128).
extern "C" __global__ void dsv4_moe_swiglu_quant(const __nv_bfloat16* __restrict__ gu, const float* __restrict__ route_w,
                                                 uint8_t* __restrict__ hc, float* __restrict__ hs, int pairs, int F,
                                                 float limit) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int blocks = F / 128;
  if (warp >= pairs * blocks) return;
  const int p = warp / blocks;
  const int k0 = (warp % blocks) * 128 + lane * 4;
  const float wgt = route_w[p];
  float h[4], amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float g = __bfloat162float(gu[(size_t(p) * 2) * F + k0 + i]);
    float u = __bfloat162float(gu[(size_t(p) * 2 + 1) * F + k0 + i]);
    if (limit > 0.f) {
      u = fminf(fmaxf(u, -limit), limit);
      g = fminf(g, limit);
    }
    h[i] = __bfloat162float(__float2bfloat16(wgt * (g / (1.f + __expf(-g)) * u)));
    amax = fmaxf(amax, fabsf(h[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = dsv4::pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8_e4m3 f8(fminf(fmaxf(h[i] / scale, -448.f), 448.f));
    packed |= uint32_t(f8.__x) << (8 * i);
  }
  *reinterpret_cast<uint32_t*>(hc + size_t(p) * F + k0) = packed;
  if (lane == 0) hs[warp] = scale;
}

// Grid-stride over (pair, group of 8 rows of D): o[p][n] = bf16(W2 h'), one warp each.
extern "C" __global__ void __launch_bounds__(256) dsv4_moe_down(
    const uint8_t* __restrict__ hc, const float* __restrict__ hs, const int* __restrict__ experts,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ o, int pairs, int D, int F) {
  const int lane = threadIdx.x & 31;
  const int groups = (D + 7) / 8;
  const int total = pairs * groups;
  const size_t wbytes = size_t(F) * D / 2;
  for (int item = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; item < total; item += (gridDim.x * blockDim.x) >> 5) {
    const int p = item / groups, n0 = (item % groups) * 8;
    const uint8_t* e = reinterpret_cast<const uint8_t*>(table[experts[p]]);
    const uint8_t* w2 = e + 2 * wbytes + size_t(n0) * (F / 2);
    const uint8_t* s2 = e + 3 * wbytes + 2 * size_t(F) * (D / 32) + size_t(n0) * (F / 32);
    float r[2];
    mxfp4_dot8(w2, s2, min(8, D - n0), F / 2, hc + size_t(p) * F, hs + size_t(p) * (F / 128), lane, r);
    if ((lane >> 2) == 0) {
      const int n = n0 + (lane & 3) * 2;
      if (n < D) o[size_t(p) * D + n] = __float2bfloat16(r[0]);
      if (n + 1 < D) o[size_t(p) * D + n + 1] = __float2bfloat16(r[1]);
    }
  }
}

// y[t][n] = sum over the token's experts in ascending id order of float(o[t*topk + j][n]) (fp32).
extern "C" __global__ void dsv4_moe_sum(const __nv_bfloat16* __restrict__ o, const int* __restrict__ experts,
                                        float* __restrict__ y, int tokens, int topk, int D) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= tokens * D) return;
  const int t = i / D, n = i % D;
  float acc = 0.f;
  int last = -1;
  for (int step = 0; step < topk; ++step) {
    int best = -1, best_id = 0x7fffffff;
    for (int j = 0; j < topk; ++j) {
      const int id = experts[t * topk + j];
      if (id > last && id < best_id) { best_id = id; best = j; }
    }
    if (best < 0) break;
    last = best_id;
    acc += __bfloat162float(o[size_t(t * topk + best) * D + n]);
  }
  y[i] = acc;
}
