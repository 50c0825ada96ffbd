// The indexer's block picks for decode rows (ratio-4 layers), two launches where torch makes about eight
// (a bf16 GEMM, relu, the weighting, the sum over heads, the mask, a full stable sort of the cache):
//   score[t] = bf16( sum_h bf16( relu(bf16(q_h . key_t)) * w_h ) )   for the visible blocks t < count
// with the head weights w_h = bf16( bf16(raw_h) * w_scale ) of the raw weights_proj product and
// count = (pos + 1) / ratio of the query's position: the program's glue, here where it made two launches.
//   picks    = the first k of those blocks in descending score, ties to the lower block, -1 past them
// which is the oracle's math (the program's pick_blocks: a bf16 einsum accumulated in float32, the product
// with the bf16 weights rounded to bf16, the sum over heads in float32, oracle.top_k's stable sort). The
// float32 sums run in another order than torch's, so a score may differ from it by one bf16 ulp.
#include "common.cuh"

namespace indexer {
constexpr int HEADS = 64, DIM = 128;      // V4's index_n_heads and index_head_dim (Flash and Pro)
constexpr int SCORE_WARPS = 8;            // dsv4_indexer_scores: 256 threads
constexpr int BATCH = 8;                  // keys a warp copies into shared memory at a time
constexpr int QROW = DIM + 8;             // a query row in shared memory, padded: 16-byte reads of two
                                          // lanes' rows start 272 B apart, in different banks
constexpr int PICK_THREADS = 512;
constexpr int MAX_SORT = 2048;            // picks: k <= 2048 (V4's index_topk: 512 Flash, 1024 Pro)

// bf16 bits -> an unsigned key of the same order (negative values flipped whole, positive ones above them).
__device__ __forceinline__ uint32_t ordered(uint16_t bits) {
  return (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
}
}  // namespace indexer

// Grid (ctas, rows), 256 threads. q [rows, 64, 128] bf16, raw [rows, 64] float32, keys [rows / queries, T, 128]
// bf16, pos [rows] -> scores [rows, T] as bf16 bits (only t < count written). Query row r reads the keys of
// sequence r / queries (queries: rows per sequence, 1 in decode).
// Warp w of CTA c is warp g = 8c + w of the grid's W and scores the visible keys g, g + W, g + 2W, ...: a short
// context's few keys spread one per warp over as many CTAs as they fill, a long one's over the whole grid.
// The CTA copies the queries, and each warp a batch of up to 8 of its keys, into shared memory with every
// copy in flight at once (cp.async), then multiplies from there: the H200 showed the kernel that loaded the
// keys 16 bytes per lane per dependent step take 11 us for 128 keys
// (bench/results/graph-timeline-flash8-before-s21-h200.json), most of it waiting on those loads one after another.
extern "C" __global__ void __launch_bounds__(256) dsv4_indexer_scores(
    const __nv_bfloat16* __restrict__ q, const float* __restrict__ raw, float w_scale,
    const __nv_bfloat16* __restrict__ keys, const long long* __restrict__ pos, int ratio,
    uint16_t* __restrict__ scores, int T, int queries) {
  using namespace indexer;
  __shared__ __align__(16) __nv_bfloat16 qs[HEADS * QROW];
  __shared__ __align__(16) __nv_bfloat16 ks[SCORE_WARPS][BATCH][DIM];
  __shared__ float ws[HEADS];
  const int row = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int W = int(gridDim.x) * SCORE_WARPS, first = int(blockIdx.x) * SCORE_WARPS + warp;
  dsv4::pdl_wait();                          // q, w and the new key come from this step's kernels
  dsv4::pdl_launch_dependents();
  const int visible = int(min((long long)T, (pos[row] + 1) / ratio));
  if (int(blockIdx.x) * SCORE_WARPS >= visible) return;   // CTA-uniform: no key of this CTA is visible
  for (int i = threadIdx.x; i < HEADS * DIM / 8; i += blockDim.x) {   // 16 bytes at a time
    const int h = i / (DIM / 8), c = i % (DIM / 8);
    dsv4::cp_async16(&qs[h * QROW + c * 8], q + (size_t(row) * HEADS + h) * DIM + c * 8, 16);
  }
  const __nv_bfloat16* kbase = keys + size_t(row / queries) * T * DIM;
  // the warp's keys in batches; lane l copies 16-byte pieces l, l + 32, ... of the batch's rows
  auto copy_batch = [&](int t0) {
    for (int p = lane; p < BATCH * DIM / 8; p += 32) {
      const int kk = p / (DIM / 8), t = t0 + kk * W;
      const int c = (p % (DIM / 8)) * 8;
      dsv4::cp_async16(&ks[warp][kk][c], kbase + size_t(min(t, visible - 1)) * DIM + c, t < visible ? 16 : 0);
    }
  };
  if (first < visible) copy_batch(first);
  dsv4::cp_async_commit();
  if (threadIdx.x < HEADS)   // the program's bf16 weights: the product rounded, then scaled and rounded again
    ws[threadIdx.x] = dsv4::bf16_round(dsv4::bf16_round(raw[size_t(row) * HEADS + threadIdx.x]) * w_scale);
  dsv4::cp_async_wait_all();
  __syncthreads();                           // the queries and weights (every warp's copies) have landed
  // Lane l owns heads l and l + 32; each key is read whole by every lane (one broadcast per 16 bytes).
  for (int t0 = first; t0 < visible; t0 += BATCH * W) {
    const int n = min(BATCH, (visible - t0 + W - 1) / W);    // the batch's visible keys
    if (t0 != first) {
      __syncwarp();                          // every lane is done with the previous batch
      copy_batch(t0);
      dsv4::cp_async_commit();
      dsv4::cp_async_wait_all();
      __syncwarp();
    }
    for (int kk = 0; kk < n; ++kk) {
      float acc[2] = {0.f, 0.f};
#pragma unroll 4
      for (int c = 0; c < DIM / 8; ++c) {
        const uint4 kraw = *reinterpret_cast<const uint4*>(&ks[warp][kk][c * 8]);
        const __nv_bfloat162* kp = reinterpret_cast<const __nv_bfloat162*>(&kraw);
#pragma unroll
        for (int g = 0; g < 2; ++g) {
          const uint4 qraw = *reinterpret_cast<const uint4*>(&qs[(lane + 32 * g) * QROW + c * 8]);
          const __nv_bfloat162* qp = reinterpret_cast<const __nv_bfloat162*>(&qraw);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 qf = __bfloat1622float2(qp[j]), kf = __bfloat1622float2(kp[j]);
            acc[g] = fmaf(qf.y, kf.y, fmaf(qf.x, kf.x, acc[g]));
          }
        }
      }
      float s = 0.f;
#pragma unroll
      for (int g = 0; g < 2; ++g) s += dsv4::bf16_round(fmaxf(dsv4::bf16_round(acc[g]), 0.f) * ws[lane + 32 * g]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) scores[size_t(row) * T + t0 + kk * W] = __bfloat16_as_ushort(__float2bfloat16(s));
    }
  }
}

// Grid rows, 512 threads. The first k of scores[row, :count] in descending order, ties to the lower block,
// as int64 block numbers, -1 past them. Each block is keyed by 32 distinct bits (its score's 16, then its
// number's complement), so the picks are exactly the k largest keys: a radix select finds the k-th one a
// byte at a time, the picks are gathered, and each pick's place is the number of picks above it.
extern "C" __global__ void __launch_bounds__(indexer::PICK_THREADS) dsv4_indexer_topk(const uint16_t* __restrict__ scores,
                                                                            const long long* __restrict__ pos,
                                                                            int ratio, long long* __restrict__ picks,
                                                                            int T, int k) {
  using namespace indexer;
  __shared__ int hist[256];
  __shared__ uint32_t picked[MAX_SORT];
  __shared__ uint32_t found_prefix;
  __shared__ int found_above, taken;
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid % 32;
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const int n = int(min((long long)T, max(0LL, (pos[row] + 1) / ratio)));
  const int want = min(k, n);
  const uint16_t* s = scores + size_t(row) * T;
  auto key_of = [&](int i) { return (ordered(s[i]) << 16) | (0xFFFFu - uint32_t(i)); };
  uint32_t prefix = 0;                       // the k-th largest key's bytes found so far
  int above = 0;                             // keys above it found so far
  for (int shift = 24; shift >= 0 && want > 0; shift -= 8) {
    for (int i = tid; i < 256; i += PICK_THREADS) hist[i] = 0;
    __syncthreads();
    const uint32_t high = shift == 24 ? 0u : prefix;   // keys whose higher bytes are the prefix
    for (int i = tid; i < n; i += PICK_THREADS) {
      const uint32_t key = key_of(i);
      if (shift == 24 || (key >> (shift + 8)) == high) atomicAdd(&hist[(key >> shift) & 0xFF], 1);
    }
    __syncthreads();
    if (tid < 32) {                          // one warp: lane l sums bins 255-8l down to 248-8l
      int bins[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) bins[j] = hist[255 - 8 * lane - j], sum += bins[j];
      int run = sum;                         // inclusive scan over the lanes, highest bins first
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, run, off);
        if (lane >= off) run += v;
      }
      const int before = above + run - sum;  // keys in higher bins than this lane's
      const bool here = before < want && before + sum >= want;
      if (here) {
        int b = 0, acc = before;
        while (acc + bins[b] < want) acc += bins[b++];
        found_prefix = (prefix << 8) | uint32_t(255 - 8 * lane - b);
        found_above = acc;
      }
    }
    __syncthreads();
    prefix = found_prefix, above = found_above;
    __syncthreads();                         // before the next pass clears the bins
  }
  if (tid == 0) taken = 0;
  __syncthreads();
  for (int i = tid; i < n && want > 0; i += PICK_THREADS) {
    const uint32_t key = key_of(i);
    if (key >= prefix) picked[atomicAdd(&taken, 1)] = key;    // exactly `want` of them
  }
  __syncthreads();
  for (int i = tid; i < want; i += PICK_THREADS) {
    const uint32_t key = picked[i];
    int rank = 0;
    for (int j = 0; j < want; ++j) rank += picked[j] > key;
    picks[size_t(row) * k + rank] = (long long)(0xFFFFu - (key & 0xFFFFu));
  }
  for (int j = want + tid; j < k; j += PICK_THREADS) picks[size_t(row) * k + j] = -1LL;
}
