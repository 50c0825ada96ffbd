// Sparse attention with a sink, for decode (few queries), DeepSeek's numerics (plugins/oracle.py):
//   s_k = scale * q_h . kv[idx_k]   (float32; idx_k = -1: no row)
//   o_h = sum_k bf16(exp(s_k - m)) * kv[idx_k] / (sum_k exp(s_k - m) + exp(sink_h - m)),   m = max_k s_k
// One shared K = V row per index (MQA over the latent): a CTA takes a split of ROWS indices for its heads (a
// warp per 16 heads: every head, or in decode a share of them, since writing its float32 partial rows is
// what a CTA spends longest on: plugins.sparse_attention.warps_per_cta), gathers those rows into shared
// memory, and runs both products on bf16 tensor cores (mma m16n8k16, fp32 sums): scores S = Q . K^T with
// the heads as the 16-row A operand, then the split's softmax in registers, then P . V with S's accumulators
// reused as P's A fragments (bf16). A second launch combines the splits (rescaling each by exp(m_split - m));
// the probabilities are rounded to bf16 against their split's maximum instead of the global one, a difference
// at bf16 rounding level.
// (Session 6's scalar kernel took 27 us at Flash size, 640 rows: one warp per head, a serial chain of
// shuffles per row.)
// ROWS (indices per split) is 32 for decode and 64 for prefill chunks (the `_r64` kernels). Session 25 on the
// H200, Flash ratio 4 (640 rows, 64 heads x 512; bench/results/attention-split-rows-s25-h200.txt): decode
// 13.3 us at 32 rows, 15.4 at 64, 13.1 at 16 (one query's splits must fill the GPU); a 256-query chunk's
// split kernels 352-353 us of GPU time at 32 rows, 308-309 at 64, and half the splits for the combine to read.
// Launches never allocate or synchronise (the workspace is passed in), so they can be captured in graphs.
#include "common.cuh"

namespace {

constexpr int MAX_SPLITS = 2048;  // indices <= 2048 ROWS (sparse_attention.py checks)
constexpr int KV_ROW_PAD = 8;        // bf16 values after each shared row: rows 4 banks apart, ldmatrix conflict-free

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], const void* p, bool trans) {
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(dsv4::smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(dsv4::smem_addr(p)));
}

__device__ __forceinline__ uint32_t ld_weak(const uint32_t* p) {
  uint32_t v;
  asm("ld.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The cache row index k of `query` attends to (-1 = none, as a row past T). Without `pos`, idx [queries, K]
// lists them. With `pos` (each query's position), the decode step's rows (plugins.oracle.decode_rows): the
// window ring's slots already written (slot k <= pos, k < window), then ratio 4: the picked compressed blocks
// idx [queries, K - window] (-1 = none), ratio 128: every complete block ((pos + 1) / ratio of them), where
// a separate launch built the list.
__device__ __forceinline__ int64_t attended_row(const int64_t* __restrict__ idx, const int64_t* __restrict__ pos,
                                                int query, int k, int K, int window, int ratio) {
  if (pos == nullptr) return idx[size_t(query) * K + k];
  const int64_t p = pos[query];
  if (k < window) return k <= p ? k : -1;
  const int block = k - window;
  if (ratio == 4) {
    const int64_t picked = idx[size_t(query) * (K - window) + block];
    return picked >= 0 ? picked + window : -1;
  }
  return block < (p + 1) / ratio ? k : -1;
}

// The pieces of a split: lane (g, t) of a warp holds heads 16 * hg + g and 16 * hg + g + 8 of head group hg
// (clamped to a valid head past `heads`, never written) and, per 8 rows or dims of an MMA tile, columns 2t
// and 2t + 1.

// The head group's Q as A fragments, all of them in registers, loaded before the rows land: one round trip
// (plain loads are not moved past the barrier after the gather; read-only loads were sunk next to their use in
// the MMA loop, a round trip each).
template <int D>
__device__ __forceinline__ void load_q(uint32_t (&qa)[D / 16][4], const __nv_bfloat16* __restrict__ q, int query,
                                       int hg, int heads, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int h0 = min(16 * hg + g, heads - 1), h8 = min(16 * hg + g + 8, heads - 1);
  const uint32_t* q0 = reinterpret_cast<const uint32_t*>(q + (size_t(query) * heads + h0) * D) + t;
  const uint32_t* q8 = reinterpret_cast<const uint32_t*>(q + (size_t(query) * heads + h8) * D) + t;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qa[kk][0] = ld_weak(q0 + kk * 8), qa[kk][1] = ld_weak(q8 + kk * 8);
    qa[kk][2] = ld_weak(q0 + kk * 8 + 4), qa[kk][3] = ld_weak(q8 + kk * 8 + 4);
  }
}

// Gathers the ROWS rows from index k0 on into `rows` ([ROWS][D + KV_ROW_PAD]) and their cache rows into `at`
// (-1: none): the indices first (one load each), then every 16-byte piece at once with cp.async (one memory
// round trip); missing rows (index -1, or past K) zero-filled. Done by the CTA's threads (then its barrier).
template <int D, int ROWS>
__device__ __forceinline__ void gather_rows(__nv_bfloat16* rows, int64_t* at, const __nv_bfloat16* __restrict__ kv,
                                            const int64_t* __restrict__ idx, const int64_t* __restrict__ pos,
                                            int query, int b, int k0, int T, int K, int window, int ratio) {
  constexpr int LD = D + KV_ROW_PAD, PIECES = D / 8;
  const int n = min(ROWS, K - k0);
  for (int r = threadIdx.x; r < ROWS; r += blockDim.x) {
    const int64_t row = r < n ? attended_row(idx, pos, query, k0 + r, K, window, ratio) : -1;
    at[r] = row >= 0 && row < T ? row : -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ROWS * PIECES; i += blockDim.x) {
    const int r = i / PIECES, p = i % PIECES;
    const int64_t row = at[r];
    dsv4::cp_async16(rows + r * LD + p * 8, kv + (size_t(b) * T + (row >= 0 ? row : 0)) * D + p * 8, row >= 0 ? 16 : 0);
  }
  dsv4::cp_async_wait_all();
  __syncthreads();
}

// S = Q . K^T over the gathered rows, then their softmax per head: m (maximum score), l (normaliser) of heads
// g (index 0) and g + 8 (1), shared by the 4 lanes of a head, and P's A fragments (16 rows each, bf16 against
// m), -INFINITY / 0 / zeros where no row is valid.
template <int D, int ROWS>
__device__ __forceinline__ void scores_softmax(const uint32_t (&qa)[D / 16][4], const __nv_bfloat16* rows,
                                               const int64_t* at, float scale, int lane, float (&m)[2],
                                               float (&l)[2], uint32_t (&p)[ROWS / 16][4]) {
  constexpr int LD = D + KV_ROW_PAD, NT = ROWS / 8;   // 4 tiles of 8 rows; ldmatrix x4 hands two tiles' B
  const int t = lane & 3, mi = lane >> 3, mr = lane & 7;   // the matrix and row this lane addresses in an ldmatrix
  float s[NT][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t bfr[4];                           // matrices: (tile nt, dims lo), (nt, hi), (nt + 1, lo), (nt + 1, hi)
      ldmatrix_x4(bfr, rows + ((nt + (mi >> 1)) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8, false);
      dsv4::mma_bf16(s[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], bfr[0], bfr[1]);
      dsv4::mma_bf16(s[nt + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], bfr[2], bfr[3]);
    }
  }
  // rows g: s[.][0..1], g + 8: s[.][2..3]
  m[0] = m[1] = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = nt * 8 + 2 * t + (i & 1);
      s[nt][i] = at[r] >= 0 ? s[nt][i] * scale : -INFINITY;
      m[i >> 1] = fmaxf(m[i >> 1], s[nt][i]);
    }
  l[0] = l[1] = 0.f;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    m[j] = fmaxf(m[j], __shfl_xor_sync(0xffffffffu, m[j], 1));
    m[j] = fmaxf(m[j], __shfl_xor_sync(0xffffffffu, m[j], 2));
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      e[i] = m[i >> 1] == -INFINITY ? 0.f : expf(s[nt][i] - m[i >> 1]);
      l[i >> 1] += e[i];
    }
    p[nt >> 1][(nt & 1) * 2] = bf16x2(e[0], e[1]);
    p[nt >> 1][(nt & 1) * 2 + 1] = bf16x2(e[2], e[3]);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 1);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 2);
  }
}

// O = P . V over the 128 dims from d0 (16 tiles of 8 dims): o[dt] holds heads g (0..1) and g + 8 (2..3) at
// dims d0 + 8 dt + 2t, + 1. ldmatrix.trans hands V's B fragments for two tiles (16 rows) at once.
template <int D, int ROWS>
__device__ __forceinline__ void values_pass(const uint32_t (&p)[ROWS / 16][4], const __nv_bfloat16* rows, int d0,
                                            int lane, float (&o)[16][4]) {
  constexpr int LD = D + KV_ROW_PAD;
  const int mi = lane >> 3, mr = lane & 7;
#pragma unroll
  for (int dt = 0; dt < 16; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < ROWS / 16; ++kk)
#pragma unroll
    for (int dt = 0; dt < 16; dt += 2) {
      uint32_t bfr[4];                           // matrices: (rows lo, tile dt), (hi, dt), (lo, dt + 1), (hi, dt + 1)
      ldmatrix_x4(bfr, rows + (kk * 16 + (mi & 1) * 8 + mr) * LD + d0 + (dt + (mi >> 1)) * 8, true);
      dsv4::mma_bf16(o[dt], p[kk][0], p[kk][1], p[kk][2], p[kk][3], bfr[0], bfr[1]);
      dsv4::mma_bf16(o[dt + 1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], bfr[2], bfr[3]);
    }
}

// grid (splits, queries, ceil(heads / 16) / W), block 32 * W: W warps a CTA. Writes per (query, split, head)
// the split's maximum score and normaliser (ml) and its unnormalised output row (acc). Warp w of CTA z takes
// head group z * W + w.
template <int D, int ROWS>
__device__ __forceinline__ void attend_split(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                                             const int64_t* __restrict__ idx, float* __restrict__ acc,
                                             float* __restrict__ ml, int s_per_b, int heads, int T, int K,
                                             float scale, const int64_t* __restrict__ pos, int window, int ratio) {
  extern __shared__ uint4 smem[];                // the split's rows [ROWS][D + KV_ROW_PAD]
  __nv_bfloat16* rows = reinterpret_cast<__nv_bfloat16*>(smem);
  __shared__ int64_t at[ROWS];
  const int warp = int(blockIdx.z * (blockDim.x >> 5) + (threadIdx.x >> 5)), lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, splits = gridDim.x, query = blockIdx.y, b = query / s_per_b;

  dsv4::pdl_wait();                              // q, kv and idx come from the kernels before
  dsv4::pdl_launch_dependents();
  uint32_t qa[D / 16][4];
  load_q<D>(qa, q, query, warp, heads, lane);
  gather_rows<D, ROWS>(rows, at, kv, idx, pos, query, b, split * ROWS, T, K, window, ratio);
  float m[2], l[2];
  uint32_t p[ROWS / 16][4];
  scores_softmax<D, ROWS>(qa, rows, at, scale, lane, m, l, p);
  const size_t part = (size_t(query) * splits + split) * heads;
  const int head0 = 16 * warp + g, head8 = head0 + 8;
  if (t == 0) {
    if (head0 < heads) ml[(part + head0) * 2] = m[0], ml[(part + head0) * 2 + 1] = l[0];
    if (head8 < heads) ml[(part + head8) * 2] = m[1], ml[(part + head8) * 2 + 1] = l[1];
  }
  float* out0 = acc + (part + head0) * D;
  float* out8 = acc + (part + head8) * D;
#pragma unroll 1
  for (int d0 = 0; d0 < D; d0 += 128) {
    float o[16][4];
    values_pass<D, ROWS>(p, rows, d0, lane, o);
    // Each pair of tiles leaves the 4 lanes of a head 16 dims, two each a tile; lanes t and t ^ 1 swap a pair
    // so that each holds 4 consecutive dims (t even: tile dt's 2t..2t+3; t odd: tile dt + 1's 2t-2..2t+1) and
    // the 4 lanes store the head's 64 bytes in 16-byte pieces: half the store instructions, each touching
    // 8 rows where 8-byte pieces did too.
#pragma unroll
    for (int dt = 0; dt < 16; dt += 2)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const bool odd = t & 1;
        const float s0 = odd ? o[dt][2 * hh] : o[dt + 1][2 * hh];
        const float s1 = odd ? o[dt][2 * hh + 1] : o[dt + 1][2 * hh + 1];
        const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
        const float4 v = odd ? make_float4(r0, r1, o[dt + 1][2 * hh], o[dt + 1][2 * hh + 1])
                             : make_float4(o[dt][2 * hh], o[dt][2 * hh + 1], r0, r1);
        const int dim = d0 + (dt + (odd ? 1 : 0)) * 8 + 2 * (t & 2);
        if ((hh ? head8 : head0) < heads) *reinterpret_cast<float4*>((hh ? out8 : out0) + dim) = v;
      }
  }
}

// o (4 consecutive output channels from e, already normalised) with the inverse RoPE where e falls in the last
// `rope` channels (rot: see dsv4_sparse_attention_combine), then stored as bf16 at dst.
__device__ __forceinline__ void store_output(float (&v)[4], __nv_bfloat16* dst, int e, int D,
                                             const float* __restrict__ rot, int rope, const int64_t* __restrict__ pos,
                                             int query) {
  if (rot != nullptr && e >= D - rope) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {                // pairs (e, e+1), (e+2, e+3), of the bf16 outputs
      const float a = dsv4::bf16_round(v[2 * p]), b = dsv4::bf16_round(v[2 * p + 1]);
      const float* cs = rot + (size_t(dsv4::rot_row(pos, query)) * (rope / 2) + (e + 2 * p - (D - rope)) / 2) * 2;
      // the oracle's (a * cos - b * -sin, a * -sin + b * cos), products rounded apart
      v[2 * p] = __fadd_rn(__fmul_rn(a, cs[0]), __fmul_rn(b, cs[1]));
      v[2 * p + 1] = __fsub_rn(__fmul_rn(b, cs[0]), __fmul_rn(a, cs[1]));
    }
  }
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v[0], v[1]);
  *reinterpret_cast<__nv_bfloat162*>(dst + 2) = __floats2bfloat162_rn(v[2], v[3]);
}

}  // namespace

#define DSV4_SPARSE_ATTENTION(CHUNKS, ROWS, SUFFIX)                                                         \
  extern "C" __global__ void __launch_bounds__(256) dsv4_sparse_attention_split_d##CHUNKS##SUFFIX(          \
      const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,                             \
      const int64_t* __restrict__ idx, float* __restrict__ acc, float* __restrict__ ml, int s_per_b,         \
      int heads, int T, int K, float scale, const int64_t* __restrict__ pos, int window, int ratio) {       \
    attend_split<CHUNKS * 128, ROWS>(q, kv, idx, acc, ml, s_per_b, heads, T, K, scale, pos, window, ratio);  \
  }
DSV4_SPARSE_ATTENTION(1, 32, )
DSV4_SPARSE_ATTENTION(2, 32, )
DSV4_SPARSE_ATTENTION(4, 32, )
DSV4_SPARSE_ATTENTION(1, 64, _r64)
DSV4_SPARSE_ATTENTION(2, 64, _r64)
DSV4_SPARSE_ATTENTION(4, 64, _r64)

// grid (heads, queries), block D / 4: o = sum_i acc_i * w_i / (sum_i l_i * w_i + exp(sink - M)),
// w_i = exp(m_i - M), M = max_i m_i (splits without a row weigh nothing). Each thread owns 4 elements of
// the row (float4 loads) and reads UNROLL splits' partials at once; the maximum and the normaliser are
// block reductions over the splits' (m, l), read once.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();                               // scratch is free (a previous reduction has been read)
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int i = 1; i < warps; ++i) v = is_max ? fmaxf(v, scratch[i]) : v + scratch[i];
  return v;
}

// grid (heads, queries), block 128 (4 elements a thread: D <= 512). With `rot` ([queries, rope / 2, 2] (cos,
// sin) at each query's position; with `pos`, the whole table, row pos[query]), the output's last `rope`
// channels also get the inverse RoPE, where the decode step ran it as a launch of its own between this one
// and wo_a's (plugins.oracle.with_rope), and the rows' gather from the table as another.
extern "C" __global__ void __launch_bounds__(128) dsv4_sparse_attention_combine(
    const float* __restrict__ acc, const float* __restrict__ ml, const float* __restrict__ sink,
    __nv_bfloat16* __restrict__ out, int heads, int D, int splits, const float* __restrict__ rot, int rope,
    const int64_t* __restrict__ pos) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  __shared__ float w[MAX_SPLITS], scratch[4];    // each split's weight
  const int head = blockIdx.x, query = blockIdx.y;
  const float* part_ml = ml + size_t(query) * splits * heads * 2;
  constexpr int PER = MAX_SPLITS / 128;          // splits per thread, in registers
  float2 mine[PER];
  float M = -INFINITY;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    mine[j] = i < splits ? *reinterpret_cast<const float2*>(part_ml + (size_t(i) * heads + head) * 2)
                         : make_float2(-INFINITY, 0.f);
    M = fmaxf(M, mine[j].x);
  }
  M = block_reduce(M, true, scratch);
  const float sink_h = sink[head];
  if (M == -INFINITY) M = sink_h;                // no row at all: the output is 0
  float den = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    const float wi = mine[j].x == -INFINITY ? 0.f : expf(mine[j].x - M);
    if (i < splits) w[i] = wi;
    den += wi == 0.f ? 0.f : mine[j].y * wi;
  }
  den = block_reduce(den, false, scratch) + expf(sink_h - M);   // its barriers also publish w[]
  const float inv = 1.f / den;
  constexpr int UNROLL = 8;
  const int e = threadIdx.x * 4;
  if (e >= D) return;
  const float* a = acc + (size_t(query) * splits * heads + head) * D + e;
  const size_t stride = size_t(heads) * D;       // from one split's row to the next
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i = 0; i < splits; i += UNROLL) {
    float4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      v[u] = i + u < splits ? *reinterpret_cast<const float4*>(a + (i + u) * stride) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const float wu = i + u < splits ? w[i + u] : 0.f;
      o.x = fmaf(v[u].x, wu, o.x), o.y = fmaf(v[u].y, wu, o.y), o.z = fmaf(v[u].z, wu, o.z), o.w = fmaf(v[u].w, wu, o.w);
    }
  }
  float v[4] = {o.x * inv, o.y * inv, o.z * inv, o.w * inv};
  store_output(v, out + (size_t(query) * heads + head) * D + e, e, D, rot, rope, pos, query);
}
