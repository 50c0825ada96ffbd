// Hyper-connection pre for decode (few rows), DeepSeek's numerics (plugins/oracle.py hc_pre, bf16 model):
//   xf = x [N, HC*D] in float32;  mix = (xf . fn^T) * rsqrt(mean(xf^2) + norm_eps)     fn [M, HC*D], M = (2+HC)*HC
//   pre, post, comb = sinkhorn_split(mix, scale, base)                                (the oracle's order of ops)
//   y = sum_j pre_j * xf_j  -> bf16 [N, D]
// Two launches instead of the dozens a compiler makes of it: `mix` splits HC*D into 256-element slices, one
// CTA each, and writes per slice the M partial dots and the partial sum of squares; `finish` adds the slices
// (a group of lanes per value), runs the Sinkhorn iterations per row (HC*HC lanes per row, a value each) in
// some warps while the others write its share of y (and, CTA 0, post and comb). Launches never allocate or
// synchronise.
#include "common.cuh"
#include "hc_finish.cuh"
#include "rows.cuh"

namespace {

using dsv4_hc::HC, dsv4_hc::M, dsv4_hc::SLICE, dsv4_hc::MAX_ROWS;

// The mixes' partials of one slice (see dsv4_hc_pre_mix). POST: the streams are first made from the
// sub-layer's output, as the hyper-connection post that ends the attention (plugins.oracle.hc_post):
//   x[k] = bf16( post[k] * f + sum_j comb[j][k] * res[j] ),  products and sums rounded one by one (the
// oracle's separate ops, no fused multiply-adds), j in order; warp 0 writes them to x_out (the layer's new
// streams, which the FFN's hc_post reads), every warp uses them. Else x holds the streams.
template <bool POST>
__device__ __forceinline__ void mix_slice(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ x_out,
                                          const float* __restrict__ fn, float* __restrict__ part, int N, int K,
                                          const __nv_bfloat16* __restrict__ f,
                                          const __nv_bfloat16* __restrict__ res, const float* __restrict__ post,
                                          const float* __restrict__ comb) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, slice = blockIdx.x;
  const int k = slice * SLICE + lane * 8;
  float w[M / 8][8];                              // this lane's 8 elements of its warp's three fn rows
#pragma unroll
  for (int i = 0; i < M / 8; ++i) {
    const float4* src = reinterpret_cast<const float4*>(fn + size_t(warp + 8 * i) * K + k);
    const float4 a = __ldg(src), b = __ldg(src + 1);
    w[i][0] = a.x, w[i][1] = a.y, w[i][2] = a.z, w[i][3] = a.w;
    w[i][4] = b.x, w[i][5] = b.y, w[i][6] = b.z, w[i][7] = b.w;
  }
  dsv4::pdl_wait();                               // x (POST: f, res, post, comb) come from the kernels before
  dsv4::pdl_launch_dependents();
  auto load8 = [](const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __bfloat1622float2(h[j]);
      v[2 * j] = t.x, v[2 * j + 1] = t.y;
    }
  };
  const int D = K / HC, stream = k / D, col = k % D;   // a slice lies in one stream (D % SLICE == 0)
  for (int n = 0; n < N; ++n) {
    float v[8];
    if (POST) {
      float fv[8], r[HC][8];
      load8(f + size_t(n) * D + col, fv);
#pragma unroll
      for (int j = 0; j < HC; ++j) load8(res + (size_t(n) * HC + j) * D + col, r[j]);
      const float p = post[n * HC + stream];
      __nv_bfloat16 out[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float rj[HC];
#pragma unroll
        for (int j = 0; j < HC; ++j) rj[j] = r[j][e];
        out[e] = dsv4_rows::hc_post_value<HC>(p, fv[e], comb + size_t(n) * HC * HC, stream, rj);
        v[e] = __bfloat162float(out[e]);
      }
      if (warp == 0) *reinterpret_cast<uint4*>(x_out + size_t(n) * K + k) = *reinterpret_cast<uint4*>(out);
    } else {
      load8(x + size_t(n) * K + k, v);
    }
    float dot[M / 8 + 1] = {};                    // three dots, then the sum of squares
#pragma unroll
    for (int e = 0; e < 8; ++e) {
#pragma unroll
      for (int i = 0; i < M / 8; ++i) dot[i] = fmaf(v[e], w[i][e], dot[i]);
      dot[M / 8] = fmaf(v[e], v[e], dot[M / 8]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int i = 0; i <= M / 8; ++i) dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], off);
    if (lane == 0) {
      float* out = part + (size_t(slice) * N + n) * (M + 1);
#pragma unroll
      for (int i = 0; i < M / 8; ++i) out[warp + 8 * i] = dot[i];
      if (warp == 0) out[M] = dot[M / 8];
    }
  }
}

}  // namespace

// grid (HC*D / SLICE), block 256 (8 warps; warp w: mixes w, w+8, w+16). part [slices][N][M+1].
extern "C" __global__ void __launch_bounds__(256) dsv4_hc_pre_mix(const __nv_bfloat16* __restrict__ x,
                                                                  const float* __restrict__ fn,
                                                                  float* __restrict__ part, int N, int K) {
  mix_slice<false>(x, nullptr, fn, part, N, K, nullptr, nullptr, nullptr, nullptr);
}

// The same, the streams x [N, HC, D] first written as the attention's hyper-connection post of f [N, D],
// res [N, HC, D] (bf16), post [N, HC], comb [N, HC, HC] (float32): one launch where two ran.
extern "C" __global__ void __launch_bounds__(256) dsv4_hc_post_pre_mix(
    __nv_bfloat16* __restrict__ x, const float* __restrict__ fn, float* __restrict__ part, int N, int K,
    const __nv_bfloat16* __restrict__ f, const __nv_bfloat16* __restrict__ res, const float* __restrict__ post,
    const float* __restrict__ comb) {
  mix_slice<true>(nullptr, x, fn, part, N, K, f, res, post, comb);
}

// grid (ceil(D / 1024)), block 256. y [N, D] bf16; post [N, HC], comb [N, HC, HC] float32 (CTA 0 writes them).
// With `norm` (grid 1, D <= NORM_D): y through RMSNorm with that float32 weight and norm_eps, as
// plugins.oracle.rms_norm of the bf16 y, where a separate kernel did it (the layer's attn_norm / ffn_norm).
// The _beside form writes comb's logits instead, for dsv4_hc_pre_sinkhorn on a side branch: the iterations,
// a chain of about 1.4 us on the H200, then run off the decode step's chain.
#define DSV4_HC_PRE_FINISH(NAME, LATER)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                                     \
      const __nv_bfloat16* __restrict__ x, const float* __restrict__ part, const float* __restrict__ scale,   \
      const float* __restrict__ base, const float* __restrict__ norm, __nv_bfloat16* __restrict__ y,          \
      float* __restrict__ post_out, float* __restrict__ comb_out, int N, int D, int slices, float norm_eps,   \
      float hc_eps, int iters) {                                                                              \
    __shared__ uint4 scratch[dsv4_hc::FINISH_SCRATCH_BYTES / 16];                                              \
    dsv4_hc::finish<LATER>(x, part, scale, base, norm, y, nullptr, post_out, comb_out, N, D, slices, norm_eps,   \
                           hc_eps, iters, dsv4_hc::scratch_at(scratch));                                           \
  }
DSV4_HC_PRE_FINISH(dsv4_hc_pre_finish, false)
DSV4_HC_PRE_FINISH(dsv4_hc_pre_finish_beside, true)

// grid 1, block 256: comb [N, HC, HC] float32 (N <= 16) in place from the logits dsv4_hc_pre_finish_beside
// wrote there: the softmax and the Sinkhorn iterations, the same operations as the finish's own.
extern "C" __global__ void __launch_bounds__(256) dsv4_hc_pre_sinkhorn(float* __restrict__ comb, int N,
                                                                       float hc_eps, int iters) {
  dsv4::pdl_wait();                               // the logits come from the finish before
  dsv4::pdl_launch_dependents();
  const int n = threadIdx.x / (HC * HC);
  const float c = comb[min(n, N - 1) * HC * HC + threadIdx.x % (HC * HC)];
  dsv4_hc::sinkhorn(c, comb, N, hc_eps, iters, true);
}
