// The compressor's decode step (one token per sequence), in one launch where Inductor makes several: the
// token's projections into the partial-block state, and where the token completes a block, the block's
// row: gated pooling, RMSNorm, RoPE, then the indexer keys' Hadamard + FP4 round-trip or the FP8
// round-trip of the other channels, written to the cache. The math of `plugins.oracle.compressor_step`:
//   state[slot] = (kv, score + ape[pos % r])          slot = pos % r (+ r with overlap, ratio 4)
//   row[c] = sum_t kv_t[c] * softmax_t(score_t[c])    over 2r rows with overlap (the previous block's first
//                                                      half of channels, this block's second), else r
//   with overlap, a completed block moves to the previous-block rows
// Float32 sums run in another order than torch's, so a cache row may differ from the oracle's by a bf16 ulp.
// For prefill, the same pooling and row over a chunk of tokens (dsv4_compressor_chunk_rows, then
// dsv4_compressor_chunk_state), and the window row of a decode step (in dsv4_q_heads), share these pieces.
#include "common.cuh"

namespace compressor {
constexpr int MAX_DIM = 512;             // channels of a row: 512 (attention), 128 (indexer)
constexpr int ROPE = 64;                 // V4's qk_rope_head_dim
constexpr int FP8_BLOCK = 64;            // KV_FP8_BLOCK
constexpr int FP4_BLOCK = 32;            // MXFP4_BLOCK


// E2M1 rounding of v in [-6, 6], ties to the even code: the grid 0 .5 1 1.5 2 3 4 6.
__device__ __forceinline__ float round_e2m1(float v) {
  const float a = fabsf(v);
  float r;
  if (a <= 0.25f) r = 0.f;               // ties: 0.25 -> 0 (even), 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
  else if (a < 0.75f) r = 0.5f;          //       2.5 -> 2, 3.5 -> 4, 5 -> 4
  else if (a <= 1.25f) r = 1.f;
  else if (a < 1.75f) r = 1.5f;
  else if (a <= 2.5f) r = 2.f;
  else if (a < 3.5f) r = 3.f;
  else if (a <= 5.f) r = 4.f;
  else r = 6.f;
  return v < 0.f && r > 0.f ? -r : r;     // no -0, as the oracle's codes
}

// The maximum of v over groups of `width` consecutive threads (width 32 or 64), through shared memory.
__device__ __forceinline__ float group_max(float v, int width, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (width == 32) return v;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  v = fmaxf(scratch[warp & ~1], scratch[warp | 1]);
  __syncthreads();
  return v;
}

// RMSNorm of a bf16 row, channel c of `dim` per thread (its weight in float32), back to bf16; every thread
// of the CTA calls it.
__device__ __forceinline__ float rms_norm_channel(float x, int c, int dim, float weight, float eps, float* scratch) {
  return dsv4::bf16_round(weight * (x * rsqrtf(dsv4::block_sum(x * x, c, dim, scratch) / dim + eps)));
}

// RoPE of channel c of `dim` (one per thread; every lane of the warp calls it: pairs meet by a shuffle) on
// the last 64 channels, interleaved pairs, at row `at` of rot [.., 32, 2] (cos, sin); bf16 results.
__device__ __forceinline__ float rope_channel(float y, int c, int dim, const float* __restrict__ rot, long long at) {
  const float other = __shfl_xor_sync(0xffffffffu, y, 1);
  if (c < dim - ROPE) return y;
  const int pair = (c - (dim - ROPE)) / 2;
  const float cs = rot[(size_t(at) * (ROPE / 2) + pair) * 2], sn = rot[(size_t(at) * (ROPE / 2) + pair) * 2 + 1];
  // products rounded apart, as torch's (a * cos - b * sin, a * sin + b * cos), not fused
  return dsv4::bf16_round(c % 2 == 0 ? __fsub_rn(__fmul_rn(y, cs), __fmul_rn(other, sn))
                                     : __fadd_rn(__fmul_rn(other, sn), __fmul_rn(y, cs)));
}

// The last steps of a cache row, channel c of `dim` per thread, every thread of the CTA calling (it
// synchronises): x (a bf16 value) through RMSNorm (none when `norm` is null: the indexer's queries), RoPE at
// row `at` of `rot`, then Hadamard + FP4 (`rotate`: the indexer's keys and queries) or the FP8 round-trip
// of the channels before the RoPE ones; the bf16 result. plugins.oracle.finish_rows. vals: `dim` floats,
// scratch: dim / 32 floats of shared memory.
__device__ float finish_row(float x, int c, int dim, const float* __restrict__ norm, const float* __restrict__ rot,
                            long long at, bool rotate, float hadamard_scale, float eps, float* vals, float* scratch) {
  float y = x;
  if (norm != nullptr) y = rms_norm_channel(x, c, dim, norm[c], eps, scratch);
  y = rope_channel(y, c, dim, rot, at);
  if (rotate) {                              // Hadamard (Sylvester, scaled by dim^-0.5), then FP4 block 32
    __syncthreads();                         // scratch read above before vals is written
    vals[c] = y;
    __syncthreads();
    float h = 0.f;
    for (int j = 0; j < dim; ++j) h += (__popc(c & j) & 1) ? -vals[j] : vals[j];
    h = dsv4::bf16_round(h * hadamard_scale);
    const float amax = fmaxf(group_max(fabsf(h), FP4_BLOCK, scratch), 6.f * 1.1754943508222875e-38f);
    const float scale = dsv4::pow2_ceil_scale(amax, 1.f / 6.f);
    y = dsv4::bf16_round(round_e2m1(fminf(fmaxf(h / scale, -6.f), 6.f)) * scale);
  } else {                                   // FP8 round-trip of the channels before the RoPE ones, block 64
    __syncthreads();                         // scratch read above before group_max writes it
    const float amax = fmaxf(group_max(c < dim - ROPE ? fabsf(y) : 0.f, FP8_BLOCK, scratch), 1e-4f);
    if (c < dim - ROPE) {
      const float scale = dsv4::pow2_ceil_scale(amax, 1.f / 448.f);
      const __nv_fp8_e4m3 q(fminf(fmaxf(y / scale, -448.f), 448.f));
      y = dsv4::bf16_round(float(q) * scale);
    }
  }
  return y;
}

// The gated pooling of channel c over a block's rows t in [0, coff * r): with overlap (ratio 4), rows [0, r)
// read channel c (the previous block), rows [r, 2r) channel dim + c. row(t, ch, score) gives row t's kv
// (score false) or score (true) of channel ch. Three passes as torch's softmax (max, normaliser, weighted
// sum), unrolled so that the loads of a ratio-128 block (128 rows) are in flight together.
template <class Row>
__device__ __forceinline__ float pool_channel(int ratio, bool overlap, int dim, int c, Row row) {
  const int rows = overlap ? 2 * ratio : ratio;
  float m = -INFINITY;
#pragma unroll 8
  for (int t = 0; t < rows; ++t) m = fmaxf(m, row(t, c + (overlap && t >= ratio ? dim : 0), true));
  float total = 0.f;
#pragma unroll 8
  for (int t = 0; t < rows; ++t) total += expf(row(t, c + (overlap && t >= ratio ? dim : 0), true) - m);
  float pooled = 0.f;
#pragma unroll 8
  for (int t = 0; t < rows; ++t) {
    const int ch = c + (overlap && t >= ratio ? dim : 0);
    pooled += row(t, ch, false) * (expf(row(t, ch, true) - m) / total);
  }
  return pooled;
}
}  // namespace compressor

// Grid B (one CTA per sequence), dim threads (128 or 512; thread c owns channel c and, with overlap, dim + c).
// proj [B, 2 * C] float32 (the stacked wkv | wgate products, C = coff * dim), ape [r, C], pos [B] int64,
// kv_state / score_state [B, coff * r, C] float32, norm [dim] float32, rot [max_len, 32, 2] float32 (cos, sin),
// cache [B, cache_rows, dim] bf16 whose block j lives at row first_row + j; rotate: the indexer's keys
// (Hadamard scaled by hadamard_scale, FP4), else FP8.
extern "C" __global__ void __launch_bounds__(compressor::MAX_DIM) dsv4_compressor_step(
    const float* __restrict__ proj, const float* __restrict__ ape, const long long* __restrict__ pos_of,
    float* __restrict__ kv_state, float* __restrict__ score_state, const float* __restrict__ norm,
    const float* __restrict__ rot, __nv_bfloat16* __restrict__ cache, int dim, int ratio, int cache_rows,
    int first_row, int rotate, float hadamard_scale, float eps) {
  using namespace compressor;
  __shared__ float vals[MAX_DIM];
  __shared__ float scratch[MAX_DIM / 32];
  const int b = blockIdx.x, c = threadIdx.x;
  const bool overlap = ratio == 4;
  const int coff = overlap ? 2 : 1, C = coff * dim, rows = coff * ratio;
  dsv4::pdl_wait();                          // the projections come from the previous kernel
  dsv4::pdl_launch_dependents();
  const long long pos = pos_of[b];
  const int slot = int(pos % ratio) + (overlap ? ratio : 0);
  float* kvs = kv_state + size_t(b) * rows * C;
  float* scs = score_state + size_t(b) * rows * C;
  for (int h = 0; h < coff; ++h) {
    const int ch = c + h * dim;
    kvs[size_t(slot) * C + ch] = proj[size_t(b) * 2 * C + ch];
    scs[size_t(slot) * C + ch] = proj[size_t(b) * 2 * C + C + ch] + ape[size_t(pos % ratio) * C + ch];
  }
  if ((pos + 1) % ratio != 0) return;        // the block is not complete: nothing more (uniform per CTA)
  const float pooled = pool_channel(ratio, overlap, dim, c, [&](int t, int ch, bool score) {
    return (score ? scs : kvs)[size_t(t) * C + ch];
  });
  if (overlap)                               // this block becomes the previous one (after it was pooled)
    for (int t = 0; t < ratio; ++t)
      for (int h = 0; h < 2; ++h) {
        const int ch = c + h * dim;
        kvs[size_t(t) * C + ch] = kvs[size_t(t + ratio) * C + ch];
        scs[size_t(t) * C + ch] = scs[size_t(t + ratio) * C + ch];
      }
  const float y = finish_row(dsv4::bf16_round(pooled), c, dim, norm, rot, max(0LL, pos + 1 - ratio), rotate,
                             hadamard_scale, eps, vals, scratch);
  cache[(size_t(b) * cache_rows + first_row + pos / ratio) * dim + c] = __float2bfloat16(y);
}

// ---------------------------------------------------------------------------------------------------------
// The compressor fed a chunk of T tokens per sequence (prefill), in two launches: every block the chunk's
// real tokens complete, pooled and finished into its cache row; then the states as the decode step leaves
// them after the same tokens. The math of `plugins.oracle.compressor_chunk`. Sequence b's tokens i < n[b]
// sit at positions start[b] + i. Its timeline: the state's rows before the chunk's first token (with overlap
// the previous block, then the current block's s = start % r tokens), then the chunk's tokens; block k
// pools timeline rows k r .. k r + coff r - 1 and is complete once (k + 1) r <= s + n.
namespace compressor {
// Timeline row u of sequence b, channel ch: kv (score false) or score plus the APE of its slot (true).
struct Timeline {
  const float* proj;                     // [B, T, 2C] the stacked wkv | wgate products
  const float* ape;                      // [r, C]
  const float* kv_state;                 // [B, coff r, C]
  const float* score_state;
  int T, C, rows, ratio, filled;         // filled: timeline rows taken from the state (off + s)
  long long start;
  int b;
  __device__ float operator()(int u, int ch, bool score) const {
    if (u < filled) return (score ? score_state : kv_state)[(size_t(b) * rows + u) * C + ch];
    const int i = u - filled;
    const float* p = proj + (size_t(b) * T + i) * 2 * C + ch;
    return score ? p[C] + ape[size_t((start + i) % ratio) * C + ch] : p[0];
  }
};
}  // namespace compressor

// Grid (B, (r + T - 1) / r: the blocks a chunk can complete), dim threads: block k's row
// where it is complete, into cache[b, first_row + (start / r + k) % (cache_rows - first_row)].
extern "C" __global__ void __launch_bounds__(compressor::MAX_DIM) dsv4_compressor_chunk_rows(
    const float* __restrict__ proj, int T, const float* __restrict__ ape, const long long* __restrict__ start_of,
    const long long* __restrict__ n_of, const float* __restrict__ kv_state, const float* __restrict__ score_state,
    const float* __restrict__ norm, const float* __restrict__ rot, __nv_bfloat16* __restrict__ cache, int dim,
    int ratio, int cache_rows, int first_row, int rotate, float hadamard_scale, float eps) {
  using namespace compressor;
  __shared__ float vals[MAX_DIM];
  __shared__ float scratch[MAX_DIM / 32];
  const int b = blockIdx.x, k = blockIdx.y, c = threadIdx.x;
  const bool overlap = ratio == 4;
  const int coff = overlap ? 2 : 1;
  dsv4::pdl_wait();                          // the projections come from the previous kernel
  dsv4::pdl_launch_dependents();
  const long long start = start_of[b];
  const int s = int(start % ratio), n = int(n_of[b]);
  if ((k + 1) * ratio > s + n) return;       // not completed by a real token (uniform per CTA)
  const Timeline line{proj, ape, kv_state, score_state, T, coff * dim, coff * ratio, ratio,
                      (overlap ? ratio : 0) + s, start, b};
  const float pooled = pool_channel(ratio, overlap, dim, c, [&](int t, int ch, bool score) {
    return line(k * ratio + t, ch, score);
  });
  const long long block = start / ratio + k;
  const float y = finish_row(dsv4::bf16_round(pooled), c, dim, norm, rot, block * ratio, rotate, hadamard_scale, eps,
                             vals, scratch);
  cache[(size_t(b) * cache_rows + first_row + block % (cache_rows - first_row)) * dim + c] = __float2bfloat16(y);
}

// Grid (B, r), dim threads: the states after the chunk, CTA j taking row j of each part (thread c owns
// channel c and, with overlap, dim + c). With overlap, the last block completed (timeline block
// (s + n) / r, if any) becomes the previous block: row j from timeline row last r + j, which lies in the
// chunk or, when last = 1, is state row r + j (read here before this CTA overwrites it below: no other CTA
// touches it). Ring slot j takes the last real token i with (start + i) % r == j, if any. Runs after
// dsv4_compressor_chunk_rows, which reads the old states.
extern "C" __global__ void __launch_bounds__(compressor::MAX_DIM) dsv4_compressor_chunk_state(
    const float* __restrict__ proj, int T, const float* __restrict__ ape, const long long* __restrict__ start_of,
    const long long* __restrict__ n_of, float* __restrict__ kv_state, float* __restrict__ score_state, int dim,
    int ratio) {
  using namespace compressor;
  const int b = blockIdx.x, j = blockIdx.y, c = threadIdx.x;
  const bool overlap = ratio == 4;
  const int coff = overlap ? 2 : 1, C = coff * dim, rows = coff * ratio, off = overlap ? ratio : 0;
  dsv4::pdl_wait();                          // the rows kernel has read the old states
  dsv4::pdl_launch_dependents();
  const long long start = start_of[b];
  const int s = int(start % ratio), n = int(n_of[b]);
  const Timeline line{proj, ape, kv_state, score_state, T, C, rows, ratio, off + s, start, b};
  float* kvs = kv_state + size_t(b) * rows * C;
  float* scs = score_state + size_t(b) * rows * C;
  const int last = (s + n) / ratio;
  const int first = ((j - s) % ratio + ratio) % ratio;          // the first chunk token landing in slot j
  const int i = first + ratio * ((n - 1 - first) / ratio);       // the last one (if first < n)
  for (int h = 0; h < coff; ++h) {
    const int ch = c + h * dim;
    if (overlap && last > 0) {
      const float kv = line(last * ratio + j, ch, false), sc = line(last * ratio + j, ch, true);
      kvs[size_t(j) * C + ch] = kv;
      scs[size_t(j) * C + ch] = sc;
    }
    if (first < n) {
      kvs[size_t(off + j) * C + ch] = line(off + s + i, ch, false);
      scs[size_t(off + j) * C + ch] = line(off + s + i, ch, true);
    }
  }
}

// Grid (rows, heads), 128 threads: head h of the indexer's query row r ([rows, heads, 128] bf16) through RoPE
// at that row's position (dsv4::rot_row), the Hadamard and the FP4 round-trip, as the keys without their norm.
// plugins.oracle.index_query.
extern "C" __global__ void __launch_bounds__(128) dsv4_index_query(const __nv_bfloat16* __restrict__ q,
                                                                   const float* __restrict__ rot,
                                                                   __nv_bfloat16* __restrict__ out, int heads,
                                                                   float hadamard_scale,
                                                                   const int64_t* __restrict__ pos) {
  using namespace compressor;
  __shared__ float vals[128];
  __shared__ float scratch[128 / 32];
  const int r = blockIdx.x, c = threadIdx.x;
  const size_t at = (size_t(r) * heads + blockIdx.y) * 128 + c;
  dsv4::pdl_wait();                          // q comes from the projection just before
  dsv4::pdl_launch_dependents();
  const float y = finish_row(__bfloat162float(q[at]), c, 128, nullptr, rot, dsv4::rot_row(pos, r), true,
                             hadamard_scale, 0.f, vals, scratch);
  out[at] = __float2bfloat16(y);
}

// Grid (rows, heads + 1 with kv, else heads), dim threads (512): head h of the attention's query row r
// ([rows, heads, dim] bf16, the wq_b product) through the per-head norm without weight, rounded as the bf16
// ops of plugins.oracle.q_heads (the square, the mean, + eps, rsqrt and the product each rounded to bf16),
// then RoPE at that row's position (dsv4::rot_row). With kv (a decode step: row r is sequence r's token, at
// pos[r]), CTA (r, heads) writes that token's window row as plugins.oracle.kv_row: kv [rows, kv_ld] (bf16,
// the first dim of a row used) through RMSNorm with kv_norm, RoPE and the FP8 round-trip of the channels
// before the RoPE ones, into cache[r, pos % window] ([rows, cache_rows, dim] bf16). The row was a launch of
// its own, a link in the decode step's chain of dependent kernels (3.1-3.8 us exposed on the H200:
// bench/results/graph-timeline-flash8-before-s22-h200.json).
extern "C" __global__ void __launch_bounds__(compressor::MAX_DIM) dsv4_q_heads(
    const __nv_bfloat16* __restrict__ q, const float* __restrict__ rot, __nv_bfloat16* __restrict__ out, int heads,
    int dim, float eps, const int64_t* __restrict__ pos, const __nv_bfloat16* __restrict__ kv, int kv_ld,
    const float* __restrict__ kv_norm, __nv_bfloat16* __restrict__ cache, int cache_rows, int window) {
  using namespace compressor;
  __shared__ float vals[MAX_DIM];
  __shared__ float scratch[MAX_DIM / 32];
  const int r = blockIdx.x, c = threadIdx.x;
  dsv4::pdl_wait();                          // q and kv come from the projections just before
  dsv4::pdl_launch_dependents();
  if (int(blockIdx.y) == heads) {            // the window row (kv given)
    const int64_t p = pos[r];
    const float y = finish_row(__bfloat162float(kv[size_t(r) * kv_ld + c]), c, dim, kv_norm, rot, p, false, 0.f,
                               eps, vals, scratch);
    cache[(size_t(r) * cache_rows + p % window) * dim + c] = __float2bfloat16(y);
    return;
  }
  const size_t at = (size_t(r) * heads + blockIdx.y) * dim + c;
  const float x = __bfloat162float(q[at]);
  const float mean = dsv4::bf16_round(dsv4::block_sum(dsv4::bf16_round(x * x), c, dim, scratch) / float(dim));
  const float inv = dsv4::bf16_round(rsqrtf(dsv4::bf16_round(mean + eps)));
  out[at] = __float2bfloat16(rope_channel(dsv4::bf16_round(x * inv), c, dim, rot, dsv4::rot_row(pos, r)));
}
