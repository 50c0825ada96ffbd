// The indexer's block picks for decode rows (ratio-4 layers), two launches where torch makes about eight
// (a bf16 GEMM, relu, the weighting, the sum over heads, the mask, a full stable sort of the cache):
//   score[t] = bf16( sum_h bf16( relu(bf16(q_h . key_t)) * w_h ) )   for the visible blocks t < count
//   picks    = the first k of those blocks in descending score, ties to the lower block, -1 past them
// which is the oracle's math (the program's pick_blocks: a bf16 einsum accumulated in float32, the product
// with the bf16 weights rounded to bf16, the sum over heads in float32, oracle.top_k's stable sort). The
// float32 sums run in another order than torch's, so a score may differ from it by one bf16 ulp.
#include "common.cuh"

namespace indexer {
constexpr int HEADS = 64, DIM = 128;      // V4's index_n_heads and index_head_dim (Flash and Pro)
constexpr int KEYS_PER_CTA = 64;          // 8 warps x 8 keys
constexpr int QROW = DIM + 8;             // a query row in shared memory, padded: 16-byte reads of two
                                          // lanes' rows start 272 B apart, in different banks
constexpr int TOPK_THREADS = 1024;
constexpr int MAX_SORT = 2048;            // k <= 2048 (V4's index_topk: 512 Flash, 1024 Pro)

// bf16 bits -> an unsigned key of the same order (negative values flipped whole, positive ones above them).
__device__ __forceinline__ uint32_t ordered(uint16_t bits) {
  return (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
}
__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }
}  // namespace indexer

// Grid (ceil(T / 64), rows), 256 threads. q [rows, 64, 128] bf16, w [rows, 64] bf16, keys [rows / per_key_row
// ... see below] -> scores [rows, T] as bf16 bits (only t < count[row] written). Query row r reads the keys
// of sequence r / queries (queries: rows per sequence, 1 in decode).
extern "C" __global__ void __launch_bounds__(256) dsv4_indexer_scores(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ keys,
    const long long* __restrict__ count, uint16_t* __restrict__ scores, int T, int queries) {
  using namespace indexer;
  __shared__ __align__(16) __nv_bfloat16 qs[HEADS * QROW];
  __shared__ float ws[HEADS];
  const int row = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t0 = blockIdx.x * KEYS_PER_CTA + warp * 8;
  dsv4::pdl_wait();                          // q, w and the new key come from this step's kernels
  dsv4::pdl_launch_dependents();
  const long long visible = min((long long)T, count[row]);
  if (blockIdx.x * KEYS_PER_CTA >= visible) return;
  for (int i = threadIdx.x; i < HEADS * DIM / 8; i += blockDim.x) {   // 16 bytes at a time
    const int h = i / (DIM / 8), c = i % (DIM / 8);
    *reinterpret_cast<uint4*>(&qs[h * QROW + c * 8]) =
        reinterpret_cast<const uint4*>(q + (size_t(row) * HEADS + h) * DIM)[c];
  }
  if (threadIdx.x < HEADS) ws[threadIdx.x] = __bfloat162float(w[size_t(row) * HEADS + threadIdx.x]);
  __syncthreads();
  // Lane l owns heads l and l + 32; the warp's 8 keys are read whole by every lane (one broadcast each).
  const __nv_bfloat16* kbase = keys + size_t(row / queries) * T * DIM;
  float acc[2][8] = {};
#pragma unroll 2
  for (int c = 0; c < DIM / 8; ++c) {
    float qa[2][8];
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const uint4 raw = *reinterpret_cast<const uint4*>(&qs[(lane + 32 * g) * QROW + c * 8]);
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(p[j]);
        qa[g][2 * j] = f.x, qa[g][2 * j + 1] = f.y;
      }
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const int t = min(t0 + kk, T - 1);     // keys past T: any valid row, never written out
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(kbase + size_t(t) * DIM) + c);
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(p[j]);
#pragma unroll
        for (int g = 0; g < 2; ++g) acc[g][kk] = fmaf(qa[g][2 * j + 1], f.y, fmaf(qa[g][2 * j], f.x, acc[g][kk]));
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    float s = 0.f;
#pragma unroll
    for (int g = 0; g < 2; ++g)
      s += bf16_round(fmaxf(bf16_round(acc[g][kk]), 0.f) * ws[lane + 32 * g]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const int t = t0 + kk;
    if (lane == 0 && t < visible) scores[size_t(row) * T + t] = __bfloat16_as_ushort(__float2bfloat16(s));
  }
}

// Grid rows, 1024 threads. The first k of scores[row, :count] in descending order, ties to the lower block,
// as int64 block numbers, -1 past them: a two-pass radix select of the k-th largest 16-bit key, the ties
// at it taken in block order (a block-wide scan), then a bitonic sort of the picks in shared memory.
extern "C" __global__ void __launch_bounds__(1024) dsv4_indexer_topk(const uint16_t* __restrict__ scores,
                                                                    const long long* __restrict__ count,
                                                                    long long* __restrict__ picks, int T, int k) {
  using namespace indexer;
  __shared__ int hist[256];
  __shared__ int scan[TOPK_THREADS];
  __shared__ uint32_t sorted[MAX_SORT];
  __shared__ int found_bin, above, taken;
  const int row = blockIdx.x, tid = threadIdx.x;
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const int n = int(min((long long)T, max(0LL, count[row])));
  const int want = min(k, n);
  const uint16_t* s = scores + size_t(row) * T;
  // Each thread a contiguous run of blocks, so that the scan below orders ties by block.
  const int per = (n + TOPK_THREADS - 1) / TOPK_THREADS, lo = min(n, tid * per), hi = min(n, lo + per);
  uint32_t prefix = 0, threshold = 0;        // the k-th largest key, one byte at a time
  int greater = 0;                           // keys above the threshold's known high bits, found so far
  for (int pass = 0; pass < 2 && want > 0; ++pass) {
    const int shift = 8 - 8 * pass;
    for (int i = tid; i < 256; i += TOPK_THREADS) hist[i] = 0;
    __syncthreads();
    for (int i = lo; i < hi; ++i) {
      const uint32_t key = ordered(s[i]);
      if (pass == 0 || (key >> 8) == prefix) atomicAdd(&hist[(key >> shift) & 0xFF], 1);
    }
    __syncthreads();
    if (tid == 0) {                          // the highest bin where the running count reaches the rest
      int run = greater, b = 255;
      while (b > 0 && run + hist[b] < want) run += hist[b--];
      found_bin = b, above = run;
    }
    __syncthreads();
    prefix = (prefix << 8) | uint32_t(found_bin);
    greater = above;
    __syncthreads();
  }
  threshold = prefix;
  // Ties at the threshold: the first (want - greater) of them in block order.
  int ties = 0;
  for (int i = lo; i < hi; ++i) ties += want > 0 && ordered(s[i]) == threshold;
  scan[tid] = ties;
  __syncthreads();
  for (int off = 1; off < TOPK_THREADS; off <<= 1) {   // inclusive scan (Hillis-Steele)
    const int v = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += v;
    __syncthreads();
  }
  int tie_rank = scan[tid] - ties;
  if (tid == 0) taken = 0;
  int size = 1;
  while (size < want) size <<= 1;
  for (int i = tid; i < size; i += TOPK_THREADS) sorted[i] = 0;   // sorts below every pick
  __syncthreads();
  for (int i = lo; i < hi && want > 0; ++i) {
    const uint32_t key = ordered(s[i]);
    const bool pick = key > threshold || (key == threshold && tie_rank++ < want - greater);
    if (pick) sorted[atomicAdd(&taken, 1)] = (key << 16) | (0xFFFFu - uint32_t(i));   // key down, block up
  }
  __syncthreads();
  for (int len = 2; len <= size; len <<= 1) {          // bitonic sort, descending
    for (int stride = len / 2; stride > 0; stride >>= 1) {
      for (int i = tid; i < size / 2; i += TOPK_THREADS) {
        const int a = 2 * i - (i & (stride - 1)), b = a + stride;
        const bool down = (a & len) == 0;
        const uint32_t x = sorted[a], y = sorted[b];
        if ((x < y) == down) sorted[a] = y, sorted[b] = x;
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < k; j += TOPK_THREADS)
    picks[size_t(row) * k + j] = j < want ? (long long)(0xFFFFu - (sorted[j] & 0xFFFFu)) : -1LL;
}
