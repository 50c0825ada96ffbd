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
#include "rows.cuh"

namespace {

constexpr int HC = 4;
constexpr int M = (2 + HC) * HC;     // 24 mixes per row
constexpr int SLICE = 256;           // elements of HC*D per CTA of `mix`: 8 per lane
constexpr int MAX_ROWS = 16;
constexpr int GROUP = 8;             // lanes of `finish` that add one value's slice partials
constexpr int NORM_STEPS = 8;        // with the norm, 4-element steps per thread: D <= 8192 (Flash 4096, Pro 7168)
static_assert(MAX_ROWS * HC * HC == 256, "finish: one lane per (row, comb value) in its 256 threads");

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// Row n's comb logits (lane e of its 16: c[j][k], j = e / 4, k = e % 4) from its mixes, as the oracle's
// sinkhorn_split begins: mix * rsqrt(mean square + norm_eps) * scale[2] + base.
__device__ __forceinline__ float comb_logit(const float (*mix)[M + 1], const float* __restrict__ scale,
                                            const float* __restrict__ base, int n, int D, float norm_eps) {
  const int e = threadIdx.x % (HC * HC);
  const float r = rsqrtf(mix[n][M] / float(HC * D) + norm_eps);
  return mix[n][2 * HC + e] * r * scale[2] + base[2 * HC + e];
}

// comb of rows n < N (comb_out [N, HC, HC]) from the lanes' logits c: softmax over each row + eps, then
// `iters` column normalisations with a row normalisation before all but the first. 16 lanes per row, lane
// e holding c[j][k], run by whole warps (at least threads 0 .. 16 N - 1; lanes of rows past N work on any
// finite values and write nothing). Each lane gathers its row's (column's) four values by shuffles and adds
// them in index order, as the oracle: the same operations as one thread holding the whole matrix, whose 20
// iterations of 32 dependent divisions took ~20 us. `write`: this lane writes its value.
__device__ __forceinline__ void sinkhorn(float c, float* __restrict__ comb_out, int N, float hc_eps, int iters,
                                         bool write) {
  const int n = threadIdx.x / (HC * HC), e = threadIdx.x % (HC * HC), j = e / HC, k = e % HC;
  const int lane = threadIdx.x & 31, row0 = lane & ~(HC * HC - 1);   // first lane of this row's 16
  auto row_value = [&](float v, int kk) { return __shfl_sync(0xffffffffu, v, row0 + j * HC + kk); };
  auto col_value = [&](float v, int jj) { return __shfl_sync(0xffffffffu, v, row0 + jj * HC + k); };
  {                                               // softmax over each row, + eps
    float top = row_value(c, 0);
#pragma unroll
    for (int kk = 1; kk < HC; ++kk) top = fmaxf(top, row_value(c, kk));
    c = expf(c - top);
    float total = row_value(c, 0);
#pragma unroll
    for (int kk = 1; kk < HC; ++kk) total += row_value(c, kk);
    c = c / total + hc_eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it) {                                     // the first iteration normalises columns only
      float sum = row_value(c, 0);
#pragma unroll
      for (int kk = 1; kk < HC; ++kk) sum += row_value(c, kk);
      c /= sum + hc_eps;
    }
    float sum = col_value(c, 0);
#pragma unroll
    for (int jj = 1; jj < HC; ++jj) sum += col_value(c, jj);
    c /= sum + hc_eps;
  }
  if (write && n < N) comb_out[n * HC * HC + e] = c;
}

}  // namespace

namespace {

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

namespace {

// The finish (see dsv4_hc_pre_finish). LATER (dsv4_hc_pre_finish_beside): comb's logits only, for
// dsv4_hc_pre_sinkhorn to finish on a side branch; then the stream sums are the launch's critical path, so
// it reads its weights (scale, base, the norm's) before the wait and the norm path's row 0 of the streams
// beside the slices' partials after it: one round trip after the wait instead of three in turn (session 27,
// bench/results/decode-chain-links-s27-h200.json: 4.5 against 5.8 us for the mix and finish pair). Without
// LATER, the code of sessions 16-26.
template <bool LATER>
__device__ __forceinline__ void finish(const __nv_bfloat16* __restrict__ x, const float* __restrict__ part,
                                       const float* __restrict__ scale, const float* __restrict__ base,
                                       const float* __restrict__ norm, __nv_bfloat16* __restrict__ y,
                                       float* __restrict__ post_out, float* __restrict__ comb_out, int N, int D,
                                       int slices, float norm_eps, float hc_eps, int iters) {
  __shared__ float mix[MAX_ROWS][M + 1];
  __shared__ float pre[MAX_ROWS][HC];
  // Which warps do what: the Sinkhorn warps (16 lanes per row) and the warps that sum the streams (y) run side
  // by side where both fit: the iterations are a chain of ~40 dependent shuffles and divisions per row that
  // the stream sums need not wait for (a Flash-8 decode step's 16 launches took 132 us in the H200 profile
  // with every warp doing both in turn, 104 us so; session 16). Otherwise (many rows, or a norm row too long
  // for the y warps' registers) every warp does both in turn. `ahead`: this thread loads row 0 early (LATER).
  const int warp = threadIdx.x / 32, sink_warps = (N * HC * HC + 31) / 32;
  const int y_warps_split = int(blockDim.x) / 32 - sink_warps;
  const bool split = y_warps_split > 0 && (norm == nullptr || D <= NORM_STEPS * 4 * 32 * y_warps_split);
  const int y_first = split ? sink_warps * 32 : 0, y_threads = int(blockDim.x) - y_first;
  const bool sums_y = !split || warp >= sink_warps, ahead = LATER && norm != nullptr && sums_y;
  const int yt = threadIdx.x - y_first;           // this thread's index among the y threads
  float pre_scale = 0.f, post_scale = 0.f, pre_base = 0.f, post_base = 0.f;
  float4 norm_w[NORM_STEPS];
  uint2 row0[NORM_STEPS][HC];                     // LATER: 4 values of each stream of row 0 per step
  if constexpr (LATER) {                          // the weights before the wait
    pre_scale = scale[0], post_scale = scale[1];
    pre_base = base[threadIdx.x % HC], post_base = base[HC + threadIdx.x % HC];
  }
  if (ahead) {
#pragma unroll
    for (int i = 0; i < NORM_STEPS; ++i) {
      const int at = (i * y_threads + yt) * 4;
      norm_w[i] = at < D ? *reinterpret_cast<const float4*>(norm + at) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  if (ahead) {                                    // row 0 of the streams beside the slices' partials
#pragma unroll
    for (int i = 0; i < NORM_STEPS; ++i) {
      const int at = (i * y_threads + yt) * 4;
#pragma unroll
      for (int j = 0; j < HC; ++j)
        row0[i][j] = at < D ? *reinterpret_cast<const uint2*>(x + size_t(j) * D + at) : make_uint2(0u, 0u);
    }
  }
  // the slices' partials of each value v = n*(M+1) + m, summed by a group of lanes with several loads in
  // flight each: all of Flash's 64 slices in one round trip (8 a lane; unrolled by 4 until session 29, two
  // round trips on the chain), added in the same order
  const int values = N * (M + 1), g = threadIdx.x % GROUP;
  for (int first = 0; first < values; first += blockDim.x / GROUP) {   // uniform: the shuffles see every lane
    const int v = first + threadIdx.x / GROUP;
    float s = 0.f;
    if (v < values) {
      for (int i0 = g; i0 < slices; i0 += 8 * GROUP) {
        float p[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) p[u] = i0 + u * GROUP < slices ? part[size_t(i0 + u * GROUP) * values + v] : 0.f;
#pragma unroll
        for (int u = 0; u < 8; ++u)
          if (i0 + u * GROUP < slices) s += p[u];
      }
    }
#pragma unroll
    for (int off = GROUP / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (g == 0 && v < values) mix[v / (M + 1)][v % (M + 1)] = s;
  }
  __syncthreads();
  // pre and post per row (y needs only pre), before the Sinkhorn iterations
  if (threadIdx.x < N * HC) {
    const int n = threadIdx.x / HC, j = threadIdx.x % HC;
    const float r = rsqrtf(mix[n][M] / float(HC * D) + norm_eps);
    if constexpr (LATER) {
      pre[n][j] = sigmoid(mix[n][j] * r * pre_scale + pre_base) + hc_eps;
      if (blockIdx.x == 0) post_out[n * HC + j] = 2.f * sigmoid(mix[n][HC + j] * r * post_scale + post_base);
    } else {
      pre[n][j] = sigmoid(mix[n][j] * r * scale[0] + base[j]) + hc_eps;
      if (blockIdx.x == 0) post_out[n * HC + j] = 2.f * sigmoid(mix[n][HC + j] * r * scale[1] + base[HC + j]);
    }
  }
  __syncthreads();
  if (!sums_y || !split) {
    const int n = threadIdx.x / (HC * HC);
    const float c = comb_logit(mix, scale, base, n < N ? n : 0, D, norm_eps);
    if constexpr (LATER) {
      if (blockIdx.x == 0 && n < N) comb_out[threadIdx.x] = c;
    } else {
      sinkhorn(c, comb_out, N, hc_eps, iters, blockIdx.x == 0);
    }
  }
  if (!sums_y) return;
  // y: 4 consecutive elements per thread per row, rounded to bf16 (LATER, the norm path's row 0: from the
  // values loaded ahead, raw = row0[i])
  auto add_stream = [&](int n, int j, const uint2& raw, float (&acc)[4]) {   // acc += pre_j * stream j
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    const float p = pre[n][j];
    acc[0] += p * a.x, acc[1] += p * a.y, acc[2] += p * b.x, acc[3] += p * b.y;
  };
  auto add_streams = [&](int n, const uint2* raw, float (&acc)[4]) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
    for (int j = 0; j < HC; ++j) add_stream(n, j, raw[j], acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = dsv4::bf16_round(acc[i]);
  };
  auto sum_streams = [&](int n, int e, float (&acc)[4]) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const uint2 raw = *reinterpret_cast<const uint2*>(x + (size_t(n) * HC + j) * D + e);
      add_stream(n, j, raw, acc);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = dsv4::bf16_round(acc[i]);
  };
  auto store = [&](int n, int e, const float (&v)[4]) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 out;
    out.x = *reinterpret_cast<uint32_t*>(&lo);
    out.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(y + size_t(n) * D + e) = out;
  };
  if (norm == nullptr) {
    for (int e = (blockIdx.x * y_threads + yt) * 4; e < D; e += gridDim.x * y_threads * 4)
      for (int n = 0; n < N; ++n) {
        float acc[4];
        sum_streams(n, e, acc);
        store(n, e, acc);
      }
    return;
  }
  // RMSNorm (one CTA): each row's y stays in registers while the y warps add its squares in a fixed order
  // (named barrier 1: the Sinkhorn warps may have left).
  __shared__ float warp_ss[256 / 32];
  const int y_warps = y_threads / 32;
  for (int n = 0; n < N; ++n) {
    float v[NORM_STEPS][4];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_STEPS; ++i) {
      const int e = (i * y_threads + yt) * 4;
      if (e < D) {
        if (ahead && n == 0)
          add_streams(0, row0[i], v[i]);
        else
          sum_streams(n, e, v[i]);
        ss += v[i][0] * v[i][0] + v[i][1] * v[i][1] + v[i][2] * v[i][2] + v[i][3] * v[i][3];
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (yt % 32 == 0) warp_ss[yt / 32] = ss;
    dsv4::named_barrier(1, y_threads);
    float total = 0.f;
    for (int w = 0; w < y_warps; ++w) total += warp_ss[w];
    const float r = rsqrtf(total / float(D) + norm_eps);
#pragma unroll
    for (int i = 0; i < NORM_STEPS; ++i) {
      const int e = (i * y_threads + yt) * 4;
      if (e < D) {
        float out[4];
        if constexpr (LATER) {
          const float w[4] = {norm_w[i].x, norm_w[i].y, norm_w[i].z, norm_w[i].w};
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = w[k] * (v[i][k] * r);   // weight * (x * rsqrt), as the oracle
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = norm[e + k] * (v[i][k] * r);   // weight * (x * rsqrt), as the oracle
        }
        store(n, e, out);
      }
    }
    dsv4::named_barrier(1, y_threads);            // warp_ss is the next row's
  }
}

}  // namespace

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
    finish<LATER>(x, part, scale, base, norm, y, post_out, comb_out, N, D, slices, norm_eps, hc_eps, iters);  \
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
  sinkhorn(c, comb, N, hc_eps, iters, true);
}
