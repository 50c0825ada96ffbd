// Sparse attention with a sink, for decode (few queries), DeepSeek's numerics (plugins/oracle.py):
//   s_k = scale * q_h . kv[idx_k]   (float32; idx_k = -1: no row)
//   o_h = sum_k bf16(exp(s_k - m)) * kv[idx_k] / (sum_k exp(s_k - m) + exp(sink_h - m)),   m = max_k s_k
// One shared K = V row per index (MQA over the latent), so a CTA takes a group of heads (a warp each) over
// a split of at most ROWS indices: it gathers those rows into shared memory once, every warp scores them
// against its head and sums its split's rows with its split's maximum. A second launch combines the splits
// (rescaling each by exp(m_split - m)); the probabilities are rounded to bf16 against their split's maximum
// instead of the global one, a difference at bf16 rounding level.
// Launches never allocate or synchronise (the workspace is passed in), so they can be captured in graphs.
#include "common.cuh"

namespace {

constexpr int ROWS = 64;          // indices per split (64 rows x 512 x 2 bytes = 64 KB of shared memory)
constexpr int MAX_CHUNKS = 4;     // head_dim / 128 <= 4
constexpr int MAX_SPLITS = 1024;  // indices <= 64K (sparse_attention.py checks)

// Lane l holds elements c * 128 + l * 4 + j (c < D/128, j < 4) of a head: 8-byte pieces, so a warp reading
// one row touches consecutive shared-memory words.
template <int CHUNKS>
__device__ __forceinline__ float dot_row(const float (&q)[MAX_CHUNKS][4], const __nv_bfloat16* row, int lane) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + c * 128 + lane * 4);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    s = fmaf(q[c][0], a.x, s);
    s = fmaf(q[c][1], a.y, s);
    s = fmaf(q[c][2], b.x, s);
    s = fmaf(q[c][3], b.y, s);
  }
  return s;                                       // this lane's part; the warp sums the parts
}

// grid (splits * head groups, queries), block 32 * heads per group. Writes per (query, split, head) the
// split's maximum score and normaliser (ml) and its unnormalised output row (acc).
template <int CHUNKS>
__device__ __forceinline__ void attend_split(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                                             const int64_t* __restrict__ idx, float* __restrict__ acc,
                                             float* __restrict__ ml, int s_per_b, int heads, int T, int K,
                                             float scale) {
  extern __shared__ uint4 smem[];                 // the split's rows [ROWS][D], then scores [warps][ROWS]
  constexpr int D = CHUNKS * 128;
  __nv_bfloat16* rows = reinterpret_cast<__nv_bfloat16*>(smem);
  float* scores = reinterpret_cast<float*>(rows + ROWS * D);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups = heads / warps, splits = (K + ROWS - 1) / ROWS;
  const int split = blockIdx.x / groups, head = (blockIdx.x % groups) * warps + warp;
  const int query = blockIdx.y, b = query / s_per_b;
  const int k0 = split * ROWS, n = min(ROWS, K - k0);

  dsv4::pdl_wait();                               // q, kv and idx come from the kernels before
  dsv4::pdl_launch_dependents();
  // gather the split's rows: their indices first (one load each), then every 16-byte piece at once with
  // cp.async (one memory round trip; invalid indices zero-filled, never read below)
  __shared__ int64_t at[ROWS];
  for (int r = threadIdx.x; r < n; r += blockDim.x) {
    const int64_t row = idx[size_t(query) * K + k0 + r];
    at[r] = row >= 0 && row < T ? row : -1;
  }
  __syncthreads();
  const int pieces = D / 8;
  for (int i = threadIdx.x; i < n * pieces; i += blockDim.x) {
    const int r = i / pieces, p = i % pieces;
    const int64_t row = at[r];
    dsv4::cp_async16(rows + r * D + p * 8, kv + (size_t(b) * T + (row >= 0 ? row : 0)) * D + p * 8, row >= 0 ? 16 : 0);
  }
  float qr[MAX_CHUNKS][4];                        // loaded while the rows land
  const __nv_bfloat16* qh = q + (size_t(query) * heads + head) * D;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int j = 0; j < 4; ++j) qr[c][j] = __bfloat162float(qh[c * 128 + lane * 4 + j]);
  dsv4::cp_async_wait_all();
  __syncthreads();

  float* my_scores = scores + warp * ROWS;
  float m = -INFINITY;
  constexpr int U = 4;                           // rows scored together: their shuffles overlap
  for (int r0 = 0; r0 < n; r0 += U) {
    float part[U];
#pragma unroll
    for (int u = 0; u < U; ++u) part[u] = dot_row<CHUNKS>(qr, rows + min(r0 + u, n - 1) * D, lane);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u) part[u] += __shfl_xor_sync(0xffffffffu, part[u], off);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = r0 + u;
      if (r >= n) break;
      // lane 0's sum in every lane: one value per score
      const float s = at[r] >= 0 ? __shfl_sync(0xffffffffu, part[u], 0) * scale : -INFINITY;
      if (lane == 0) my_scores[r] = s;
      m = fmaxf(m, s);
    }
  }
  __syncwarp();
  float o[MAX_CHUNKS][4] = {};
  float l = 0.f;
  if (m != -INFINITY) {
    for (int r = 0; r < n; ++r) {
      const float s = my_scores[r];
      if (s == -INFINITY) continue;
      const float p = expf(s - m);
      l += p;
      const float pb = __bfloat162float(__float2bfloat16(p));            // the probabilities in bf16
      const __nv_bfloat16* row = rows + r * D;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const uint2 raw = *reinterpret_cast<const uint2*>(row + c * 128 + lane * 4);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
        const float2 a = __bfloat1622float2(h[0]), bb = __bfloat1622float2(h[1]);
        o[c][0] = fmaf(pb, a.x, o[c][0]);
        o[c][1] = fmaf(pb, a.y, o[c][1]);
        o[c][2] = fmaf(pb, bb.x, o[c][2]);
        o[c][3] = fmaf(pb, bb.y, o[c][3]);
      }
    }
  }
  const size_t part = (size_t(query) * splits + split) * heads + head;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
    *reinterpret_cast<float4*>(acc + part * D + c * 128 + lane * 4) = make_float4(o[c][0], o[c][1], o[c][2], o[c][3]);
  if (lane == 0) {
    ml[part * 2] = m;
    ml[part * 2 + 1] = l;
  }
}

}  // namespace

#define DSV4_SPARSE_ATTENTION(CHUNKS)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) dsv4_sparse_attention_split_d##CHUNKS(                  \
      const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,                             \
      const int64_t* __restrict__ idx, float* __restrict__ acc, float* __restrict__ ml, int s_per_b,         \
      int heads, int T, int K, float scale) {                                                                \
    attend_split<CHUNKS>(q, kv, idx, acc, ml, s_per_b, heads, T, K, scale);                                  \
  }
DSV4_SPARSE_ATTENTION(1)
DSV4_SPARSE_ATTENTION(2)
DSV4_SPARSE_ATTENTION(4)

// grid (heads, queries), block 128: o = sum_i acc_i * w_i / (sum_i l_i * w_i + exp(sink - M)),
// w_i = exp(m_i - M), M = max_i m_i (splits without a row weigh nothing).
extern "C" __global__ void __launch_bounds__(128) dsv4_sparse_attention_combine(
    const float* __restrict__ acc, const float* __restrict__ ml, const float* __restrict__ sink,
    __nv_bfloat16* __restrict__ out, int heads, int D, int splits) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  __shared__ float w[MAX_SPLITS], l[MAX_SPLITS];   // each split's maximum, then weight; its normaliser
  const int head = blockIdx.x, query = blockIdx.y;
  const float* part_ml = ml + size_t(query) * splits * heads * 2;
  for (int i = threadIdx.x; i < splits; i += blockDim.x) {
    w[i] = part_ml[(size_t(i) * heads + head) * 2];
    l[i] = part_ml[(size_t(i) * heads + head) * 2 + 1];
  }
  __syncthreads();
  if (threadIdx.x == 0) {                        // few splits: one thread, in split order
    float M = -INFINITY;
    for (int i = 0; i < splits; ++i) M = fmaxf(M, w[i]);
    const float sink_h = sink[head];
    if (M == -INFINITY) M = sink_h;              // no row at all: the output is 0
    float den = expf(sink_h - M);
    for (int i = 0; i < splits; ++i) {
      const float m = w[i];
      w[i] = m == -INFINITY ? 0.f : expf(m - M);
      den += w[i] == 0.f ? 0.f : l[i] * w[i];
    }
    for (int i = 0; i < splits; ++i) w[i] /= den;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    float o = 0.f;
#pragma unroll 4
    for (int i = 0; i < splits; ++i) o = fmaf(acc[((size_t(query) * splits + i) * heads + head) * D + e], w[i], o);
    out[(size_t(query) * heads + head) * D + e] = __float2bfloat16(o);
  }
}
