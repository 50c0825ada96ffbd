// FP8 block-scaled GEMV for decode on Hopper's warpgroup MMA (sm_90a only): y [M, N] bf16 = act_quant(x) .
// W^T, W e4m3 [N, K] with E8M0 scales per 128 x 128 block, M <= 16 rows.
//
// Why: on sm_90 the GEMV of fp8_linear.cu runs f16 mma.sync (Hopper has no FP8 mma.sync) and turns every
// weight byte into f16 first; its loop issues about 290 warp instructions per 4 KB (session 7's Nsight
// Compute count), and the GEMVs stay at 0.70-0.81 of the copy bandwidth where a plain read of their bytes
// reaches 0.89 (bench/read_ceiling.py). Here no thread touches a weight byte: the weights are wgmma's A
// operand (64 rows, the MMA's M), copied by cp.async straight into the 8-row x 16-byte core matrices the
// MMA reads from shared memory, and the tokens are its B operand (N = 8 or 16 columns), quantised once per
// CTA into the same layout. A 128-K block of 64 rows (8 KB) is four m64nNk32 MMAs and about a hundred SASS
// instructions per warp. (Session 32's first form had the tokens as A from registers and 16 weight rows per
// MMA: it loaded A for every MMA and ran at half the f16 kernel's speed.)
//
// Measured (H200, session 33): correct (tests/test_kernels_fp8.py), but no faster than the first form and
// slower than the f16 GEMV (wq_b 17.8 us against 10.1), so off by default (plugins.fp8_linear.WGMMA_GEMV).
// It is bound by latency, not by the tensor cores or its instructions: its CTAs live one item each and start
// cold (their first loads wait behind every CTA's prefetch), the second wave leaves a tail, the clusters'
// reduction costs 1.5 us, and while streaming two CTAs an SM draw 2.5-2.9 TB/s
// (bench/results/gemv-wgmma-s33-h200.txt). A persistent grid streaming across items, as the f16 GEMV's, is
// what is left to try.
//
// An item is 64 weight rows; a cluster of P CTAs (P = 1, 2, 4 or 8, the launch's cluster size) shares one,
// CTA rank r taking the r-th of P equal slices of K, so that shapes with few row blocks (wo_b: 64) still fill
// the GPU. Each CTA is one warpgroup and quantises only its slice of the tokens. At the end the ranks' sums
// meet in rank 0's registers through distributed shared memory, in rank order (deterministic), and rank 0
// writes the item. Numerics: per 128-K block four MMAs into fresh registers, then scaled by the weight
// block's scale times the token's in float32 and added, as DeepSeek's fp8_gemm does on Hopper: within a
// block the FP8 MMA adds in less than float32, where fp8_linear.cu adds exact f16 products in float32.
#include <cooperative_groups.h>

#include "common.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int GW_ROWS = 64;                  // weight rows per item: the MMA's M
// A 128-K block of an item's rows (8 KB, four k32 MMAs) in shared memory: MMA j's 64 x 32 bytes at
// j * GW_REGION, as 8-row x 16-byte core matrices, the second K half GW_LBO bytes on from the first, row group
// rg at rg * GW_SBO. The 16-byte gaps put a row's eight chunks of the block in distinct banks (below).
constexpr int GW_LBO = 144, GW_SBO = 272;
constexpr int GW_REGION = 8 * GW_SBO + 32;
constexpr int GW_STAGE = 4 * GW_REGION;      // 8832 bytes
constexpr int GW_STAGES = 8;                 // ring slots (a power of two); all but two in flight

#endif

// Grid: ceil(N / 64) items x P CTAs in clusters of P; 128 threads. Dynamic shared memory: the ring
// (GW_STAGES x GW_STAGE), then the slice's token codes [NT / 8][K / P / 16][8 tokens][16 bytes], then their scales
// [rows][K / P / 128] and the weight blocks' [K / P / 128], in float32.
template <int NT>
__device__ __forceinline__ void fp8_gemv_wgmma(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                               const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                               int rows, int N, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace cg = cooperative_groups;
  extern __shared__ uint4 smem[];
  const cg::cluster_group cluster = cg::this_cluster();
  const int parts = int(cluster.num_blocks()), part = int(cluster.block_rank());
  const int kblocks = K / 128, kbp = kblocks / parts, kb0 = part * kbp, kp = kbp * 128;
  const int n0 = int(blockIdx.x) / parts * GW_ROWS;
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem);
  uint8_t* act = ring + GW_STAGES * GW_STAGE;
  float* act_s = reinterpret_cast<float*>(act + NT * kp);
  float* w_s = act_s + rows * kbp;                     // the weight blocks' scales
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;

  // The copies: a block is 512 16-byte chunks; thread chunk i (0..3) is row 16 warp + 4i + lane / 8, chunk
  // lane % 8 along the block's 128 bytes. A 16-byte copy is coalesced over 8 lanes at a time: those read one
  // row's whole 128-byte line (8 rows' 16 bytes, or 4 rows' 32, ran no slower: session 33), and write its 8
  // chunks to distinct banks: chunk kc = 2j + h lands at j * GW_REGION + h * GW_LBO, i.e. 32 j + 16 h mod 128.
  uint32_t dst[4];
  const uint8_t* src[4];
  uint32_t bytes[4];
  const int kc = lane & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 16 * warp + 4 * i + (lane >> 3);
    dst[i] = (kc >> 1) * GW_REGION + (kc & 1) * GW_LBO + (r >> 3) * GW_SBO + (r & 7) * 16;
    bytes[i] = n0 + r < N ? 16u : 0u;                  // rows past N: zeros, read from row n0
    src[i] = w + size_t(n0 + (bytes[i] ? r : 0)) * K + kb0 * 128 + kc * 16;
  }
  const auto issue = [&](int q) {                      // block q of the slice into its slot, as one group
    if (q < kbp) {
#pragma unroll
      for (int i = 0; i < 4; ++i) dsv4::cp_async16(ring + (q & (GW_STAGES - 1)) * GW_STAGE + dst[i], src[i] + q * 128, bytes[i]);
    }
    dsv4::cp_async_commit();
  };
  // The loads the CTA waits on (the scales, then x) go out ahead of most of the weight copies: behind all of
  // them, every CTA's, the scales' load waited 4 us (session 33's timestamps). So ordered, x's quantisation
  // still waited 3.6-3.8 us, and the kernel took as long.
  if (tid < kbp) w_s[tid] = dsv4::e8m0(w_scale[size_t(n0 / 128) * kblocks + kb0 + tid]);   // 64 rows: one scale row
  issue(0);                                            // the weights do not wait for the kernel before
  issue(1);
  dsv4::pdl_wait();                                    // x comes from it
  dsv4::pdl_launch_dependents();
  for (int r = 0; r < rows; ++r)                       // token r at its row of core-matrix row group r / 8
    dsv4::quantise_to_smem<false, false, false, true>(x + size_t(r) * K + kb0 * 128, kp, kp, 0,
                                                      act + (r >> 3) * (kp * 8) + (r & 7) * 16, act_s + r * kbp);
#pragma unroll
  for (int q = 2; q < GW_STAGES - 2; ++q) issue(q);

  int tok[NT / 2];                                     // accumulator i's token: column 2t + i % 2 (+ 8 from i = 4)
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) tok[i] = min(2 * t + (i & 1) + (i >> 2) * 8, rows - 1);   // past rows: unread
  const uint32_t ring_s = dsv4::smem_addr(ring), act_sa = dsv4::smem_addr(act);
  float sum[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) sum[i] = 0.f;
  // Two blocks a round: their eight MMAs into two sets of accumulators, one wait, then both scaled. (A wait
  // for one block while the next block's MMAs run would have ptxas serialise the MMAs: it does not let
  // other instructions read an MMA's accumulators while any group is in flight.)
  const auto scale = [&](float (&c)[NT / 2], int q) {   // block q's products into the sums
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {
      wgmma_pin(c[i]);
      sum[i] = fmaf(c[i], w_s[q] * act_s[tok[i] * kbp + q], sum[i]);
    }
  };
  const auto multiply = [&](float (&c)[NT / 2], int q) {   // block q's four MMAs
    const uint32_t a = ring_s + (q & (GW_STAGES - 1)) * GW_STAGE, b = act_sa + q * 1024;
    wgmma_e4m3_ss<NT, false>(c, kmajor_desc(a, GW_LBO, GW_SBO), kmajor_desc(b, 128, kp * 8));
#pragma unroll
    for (int j = 1; j < 4; ++j)
      wgmma_e4m3_ss<NT, true>(c, kmajor_desc(a + j * GW_REGION, GW_LBO, GW_SBO), kmajor_desc(b + j * 256, 128, kp * 8));
  };
  for (int q = 0; q < kbp; q += 2) {
    dsv4::cp_async_wait_pending(GW_STAGES - 4);       // this thread's copies of blocks q and q + 1 have landed
    fence_async_shared();                              // visible to the MMAs
    __syncthreads();                                   // everyone's; every warp is through the last round's MMAs
    issue(q + GW_STAGES - 2);                          // into the last round's slots
    issue(q + GW_STAGES - 1);
    float c0[NT / 2], c1[NT / 2];
    const bool pair = q + 1 < kbp;
    wgmma_fence();
    multiply(c0, q);
    multiply(c1, pair ? q + 1 : q);                    // (an odd last block: block q again, unread)
    wgmma_commit();
    wgmma_wait_all();
    scale(c0, q);
    if (pair) scale(c1, q + 1);
  }

  if (parts > 1) {                                     // rank 0 adds the other ranks' sums, in rank order
    float* partial = reinterpret_cast<float*>(ring);   // [NT / 2][128 threads]
    __syncthreads();                                   // every warp's MMAs are through the ring
    if (part != 0) {
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) partial[i * 128 + tid] = sum[i];
    }
    cluster.sync();
    if (part == 0) {
      for (int r = 1; r < parts; ++r) {
        const float* theirs = cluster.map_shared_rank(partial, r);
#pragma unroll
        for (int i = 0; i < NT / 2; ++i) sum[i] += theirs[i * 128 + tid];
      }
    }
    cluster.sync();                                    // no rank leaves while rank 0 reads its shared memory
  }
  if (part == 0) {
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {               // accumulator i: row g (+ 8 where i & 2) of the warp's 16
      const int token = 2 * t + (i & 1) + (i >> 2) * 8, row = n0 + 16 * warp + g + ((i & 2) ? 8 : 0);
      if (token < rows && row < N) y[size_t(token) * N + row] = __float2bfloat16(sum[i]);
    }
  }
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) dsv4_fp8_gemv_wgmma_m8(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ w_scale,
    __nv_bfloat16* __restrict__ y, int rows, int N, int K) {
  fp8_gemv_wgmma<8>(x, w, w_scale, y, rows, N, K);
}
extern "C" __global__ void __launch_bounds__(128) dsv4_fp8_gemv_wgmma_m16(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ w_scale,
    __nv_bfloat16* __restrict__ y, int rows, int N, int K) {
  fp8_gemv_wgmma<16>(x, w, w_scale, y, rows, N, K);
}
