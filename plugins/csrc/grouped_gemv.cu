// Grouped FP8-weight linear with bf16 activations for decode: DeepSeek's wo_a.
//
//   y[m, g, r] bf16 = sum_d x[m, g, d] * W[g*R + r, d] * S[(g*R + r) / 128, d / 128]
//   x [M, G, D] bf16, W [G*R, D] e4m3, S E8M0 per 128x128 block, M <= 4.
//
// DeepSeek's convert.py dequantises wo_a to bf16 and the model applies it as a bf16 grouped einsum, with no
// activation quantisation. An e4m3 code times a power-of-two scale is exact in bf16, so reading the codes
// computes the same products from half the bytes (32 MB instead of 64 MB per layer at Flash size); sums are
// float32, rounded once, as cuBLAS does (another order). Each lane's 16 codes lie in one 128-block, so its
// partial sum takes the block scale once (exact: a power of two).
// A warp per output row n (rows gw, gw + warps, ...): each lane streams 16-byte code loads, UNROLL at a
// time, and reads the activations of its 16 columns through L1 (every warp of a CTA reads the same group's).
#include "common.cuh"

namespace grouped_gemv {
constexpr int MAX_M = 4;        // decode rows
constexpr int UNROLL = 8;       // 16-byte code loads in flight per lane: one 4 KB Flash row per warp step
}  // namespace grouped_gemv

extern "C" __global__ void __launch_bounds__(256) dsv4_grouped_fp8_gemv(const __nv_bfloat16* __restrict__ x,
                                                                       const uint8_t* __restrict__ w,
                                                                       const uint8_t* __restrict__ w_scale,
                                                                       __nv_bfloat16* __restrict__ y, int M,
                                                                       int G, int R, int D) {
  using grouped_gemv::MAX_M;
  using grouped_gemv::UNROLL;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int gw = int(blockIdx.x) * warps + (threadIdx.x >> 5), all_warps = int(gridDim.x) * warps;
  const int N = G * R, chunks = D / 512, kblocks = D / 128;   // a chunk: 32 lanes x 16 codes
  dsv4::pdl_wait();                             // x comes from the previous kernels
  dsv4::pdl_launch_dependents();
  for (int n = gw; n < N; n += all_warps) {
    const int g = n / R;
    const uint4* row = reinterpret_cast<const uint4*>(w + size_t(n) * D);
    const uint8_t* row_scale = w_scale + size_t(n / 128) * kblocks;
    float acc[MAX_M] = {0.f, 0.f, 0.f, 0.f};
    for (int c0 = 0; c0 < chunks; c0 += UNROLL) {
      uint4 raw[UNROLL];
      dsv4::load_row_chunks(row, c0, chunks, lane, raw);
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (c0 + u >= chunks) break;
        const int d = ((c0 + u) * 32 + lane) * 16;
        const float s = dsv4::e8m0(__ldg(row_scale + d / 128));
        float wf[16];
        const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw[u]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[j], __NV_E4M3)));
          wf[2 * j] = f.x;
          wf[2 * j + 1] = f.y;
        }
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
          if (m >= M) break;
          const uint4* xs = reinterpret_cast<const uint4*>(x + (size_t(m) * G + g) * D + d);
          const uint4 a = __ldg(xs), b = __ldg(xs + 1);
          const __nv_bfloat162* h[2] = {reinterpret_cast<const __nv_bfloat162*>(&a),
                                        reinterpret_cast<const __nv_bfloat162*>(&b)};
          float part = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float2 f = __bfloat1622float2(h[j / 4][j % 4]);
            part = fmaf(wf[2 * j], f.x, part);
            part = fmaf(wf[2 * j + 1], f.y, part);
          }
          acc[m] = fmaf(part, s, acc[m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
      if (m >= M) break;
      const float v = dsv4::warp_sum(acc[m]);
      if (lane == 0) y[size_t(m) * N + n] = __float2bfloat16(v);
    }
  }
}
