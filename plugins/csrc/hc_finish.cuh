// Hyper-connection pre's finish for decode rows (see csrc/hc_pre.cu for the math and its launches): the mixes'
// slice partials added, pre and post, comb's logits or its Sinkhorn iterations, and y = the streams weighted by
// pre, optionally through the layer's RMSNorm. Shared by hc_pre.cu's finish launches and the FP8 GEMV's kHc
// prologue (csrc/fp8_linear.cu), which runs it in every CTA in place of the finish's own launch.
#pragma once
#include "common.cuh"

namespace dsv4_hc {

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

// The finish's shared scratch: the rows' mixes, their pre weights and the norm's per-warp sums (1888 bytes).
struct FinishScratch {
  float (*mix)[M + 1];
  float (*pre)[HC];
  float* warp_ss;
};
constexpr int FINISH_SCRATCH_BYTES = MAX_ROWS * (M + 1) * 4 + MAX_ROWS * HC * 4 + 8 * 4;

// Scratch carved from `base` (16-byte aligned, FINISH_SCRATCH_BYTES long).
__device__ __forceinline__ FinishScratch scratch_at(void* base) {
  float* f = static_cast<float*>(base);
  return {reinterpret_cast<float(*)[M + 1]>(f), reinterpret_cast<float(*)[HC]>(f + MAX_ROWS * (M + 1)),
          f + MAX_ROWS * (M + 1) + MAX_ROWS * HC};
}

// The finish (see dsv4_hc_pre_finish). LATER (dsv4_hc_pre_finish_beside): comb's logits only, for
// dsv4_hc_pre_sinkhorn to finish on a side branch; then the stream sums are the launch's critical path, so
// it reads its weights (scale, base, the norm's) before the wait and the norm path's row 0 of the streams
// beside the slices' partials after it: one round trip after the wait instead of three in turn (session 27,
// bench/results/decode-chain-links-s27-h200.json: 4.5 against 5.8 us for the mix and finish pair). Without
// LATER, the code of sessions 16-26. Not OWN_LAUNCH (a prologue of a kernel that has waited for its inputs:
// the FP8 GEMV's kHc): no wait, and nothing loaded ahead, which would hold too many registers beside the
// GEMV's (ptxas: 856 bytes of spills).
template <bool LATER, bool OWN_LAUNCH = true>
__device__ __forceinline__ void finish(const __nv_bfloat16* __restrict__ x, const float* __restrict__ part,
                                       const float* __restrict__ scale, const float* __restrict__ base,
                                       const float* __restrict__ norm, __nv_bfloat16* __restrict__ y,
                                       __nv_bfloat16* __restrict__ y_copy, float* __restrict__ post_out,
                                       float* __restrict__ comb_out, int N, int D, int slices, float norm_eps,
                                       float hc_eps, int iters, const FinishScratch& scratch) {
  constexpr bool AHEAD = LATER && OWN_LAUNCH;      // the norm's weights and row 0's streams loaded early
  float(*mix)[M + 1] = scratch.mix;
  float(*pre)[HC] = scratch.pre;
  // Which warps do what: the Sinkhorn warps (16 lanes per row) and the warps that sum the streams (y) run side
  // by side where both fit: the iterations are a chain of ~40 dependent shuffles and divisions per row that
  // the stream sums need not wait for (a Flash-8 decode step's 16 launches took 132 us in the H200 profile
  // with every warp doing both in turn, 104 us so; session 16). Otherwise (many rows, or a norm row too long
  // for the y warps' registers) every warp does both in turn. `ahead`: this thread loads row 0 early (LATER).
  const int warp = threadIdx.x / 32, sink_warps = (N * HC * HC + 31) / 32;
  const int y_warps_split = int(blockDim.x) / 32 - sink_warps;
  const bool split = y_warps_split > 0 && (norm == nullptr || D <= NORM_STEPS * 4 * 32 * y_warps_split);
  const int y_first = split ? sink_warps * 32 : 0, y_threads = int(blockDim.x) - y_first;
  const bool sums_y = !split || warp >= sink_warps, ahead = AHEAD && norm != nullptr && sums_y;
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
  if constexpr (OWN_LAUNCH) {
    dsv4::pdl_wait();
    dsv4::pdl_launch_dependents();
  }
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
    if (y_copy != nullptr) *reinterpret_cast<uint2*>(y_copy + size_t(n) * D + e) = out;
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
  float* warp_ss = scratch.warp_ss;
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
        if constexpr (AHEAD) {
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

}  // namespace dsv4_hc
