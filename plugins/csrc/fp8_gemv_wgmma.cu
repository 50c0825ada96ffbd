// FP8 block-scaled GEMV for decode on Hopper's warpgroup MMA (sm_90a only): y [M, N] bf16 = act_quant(x) .
// W^T, W e4m3 [N, K] with E8M0 scales per 128 x 128 block, M <= 16 rows. Written in session 32 after the
// device time ran out: NOT YET RUN on a GPU, so off by default (plugins.fp8_linear.WGMMA_GEMV); its GPU tests
// are tests/test_kernels_fp8.py's wgmma cases.
//
// Why: on sm_90 the GEMV of fp8_linear.cu runs f16 mma.sync (Hopper has no FP8 mma.sync) and turns every
// weight byte into f16 first; its loop issues about 290 warp instructions per 4 KB (session 7's Nsight
// Compute count), and the GEMVs stay at 0.70-0.81 of the copy bandwidth where a plain read of their bytes
// reaches 0.90 (bench/read_ceiling.py). wgmma multiplies e4m3 as it is and reads its B operand from shared
// memory itself: here the weights are B, straight from the cp.async ring, and the activation rows (the
// tokens) are A from registers. Per 128-K block of an item's 16 weight rows that is four MMAs and a few
// copies, with nothing done per weight byte by any thread.
//
// A CTA is one warpgroup; an item is 16 weight rows (the MMA's N) over all of K, so no CTA splits K and no
// partial sums meet; CTA b walks items b, b + grid, ... The MMA's 64 A rows are the tokens: warp 0's lanes
// hold tokens 0-15, the other warps multiply zeros (the tensor cores have room to spare; their results are
// never read). Numerics: per 128-K block four m64n16k32 MMAs into fresh registers, then scaled by the
// weight block's scale times the token's in float32 and added, as DeepSeek's fp8_gemm does on Hopper. Where
// fp8_linear.cu adds exact f16 products in float32, the FP8 MMA adds within 128 K in less than float32.
#include "common.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int GW_ROWS = 16;                          // weight rows per item: the MMA's N
constexpr int GW_BLOCKS = 4;                         // 128-K blocks per ring stage
constexpr int GW_MMAS = GW_BLOCKS * 4;               // k32 MMAs per stage
constexpr int GW_STAGE = GW_ROWS * GW_BLOCKS * 128;  // 8 KB of weights per stage
constexpr int GW_STAGES = 4;
constexpr int GW_PAD = 16;                           // bytes after each activation row (distinct banks per token)

// B of one k32 MMA: 16 rows x 32 bytes as four 8-row x 16-byte core matrices, (row group ng, K half kh) at
// ng * 256 + kh * 128. The descriptor's leading offset is the next core matrix along K (128 bytes), its stride
// offset the next along N (256), no swizzle. MMA m of a stage is at m * 512.
__device__ __forceinline__ uint64_t gw_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(128 >> 4) << 16) | (uint64_t(256 >> 4) << 32);
}
// A weight chunk's place in its stage: row n, 16-byte chunk kc along the stage's 512 bytes of K.
__device__ __forceinline__ uint32_t gw_chunk_offset(int n, int kc) {
  return (kc >> 1) * 512 + (n >> 3) * 256 + (kc & 1) * 128 + (n & 7) * 16;
}

#endif

}  // namespace

namespace {

// Grid: a persistent grid over the ceil(N / 16) items; 128 threads. Dynamic shared memory: the ring
// (GW_STAGES x 8 KB), then the activation's e4m3 codes [rows][K + 16], then its scales [rows][K / 128].
// WIDE: rows 9-16 (A's rows g + 8 in warp 0); otherwise at most 8 rows, and those registers hold zeros.
template <bool WIDE>
__device__ __forceinline__ void fp8_gemv_wgmma(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                               const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                               int rows, int N, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem);
  uint8_t* act = ring + GW_STAGES * GW_STAGE;
  const int ldx = K + GW_PAD, kblocks = K / 128;
  float* act_s = reinterpret_cast<float*>(act + rows * ldx);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int steps = (kblocks + GW_BLOCKS - 1) / GW_BLOCKS, items = (N + GW_ROWS - 1) / GW_ROWS;
  const int mine = (items - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x), total = mine * steps;

  // The copies: thread (warp, lane) copies chunk i = 0..3 of each stage, row n = lane % 8 + 8 (warp % 2),
  // chunk kc = lane / 8 + 4 (warp / 2 + 2i): a warp's lanes read 64 contiguous bytes of 8 rows, and write 8
  // distinct bank groups of shared memory.
  const int n = (lane & 7) + 8 * (warp & 1);
  uint32_t dst[4], src[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int kc = (lane >> 3) + 4 * ((warp >> 1) + 2 * i);
    dst[i] = gw_chunk_offset(n, kc);
    src[i] = uint32_t(n) * K + kc * 16;
  }
  const uint32_t ring_s = dsv4::smem_addr(ring);
  int next_it = 0, next_s = 0;                   // the step the copies are at
  const auto issue = [&](int slot) {             // its copies into ring slot `slot`, as one group
    if (next_it < mine) {
      const int n0 = (int(blockIdx.x) + next_it * int(gridDim.x)) * GW_ROWS, kb0 = next_s * GW_BLOCKS;
      const int blocks = min(GW_BLOCKS, kblocks - kb0);
      const uint8_t* base = w + size_t(n0) * K + kb0 * 128;
#pragma unroll
      for (int i = 0; i < 4; ++i) {              // chunk i lies in the stage's 128-K block i
        const bool live = i < blocks && n0 + n < N;         // zeros past K's blocks and past the last row
        dsv4::cp_async16(ring + slot * GW_STAGE + dst[i], live ? base + src[i] : w, live ? 16 : 0);
      }
      if (++next_s == steps) next_s = 0, ++next_it;
    }
    dsv4::cp_async_commit();
  };
#pragma unroll
  for (int p = 0; p < GW_STAGES - 1; ++p) issue(p);   // the weights do not wait for the kernel before
  dsv4::pdl_wait();                                    // x comes from it
  dsv4::pdl_launch_dependents();
  dsv4::quantise_to_smem<false>(x, rows * K, K, GW_PAD, act, act_s);
  __syncthreads();

  const int tok0 = min(g, rows - 1), tok1 = min(g + 8, rows - 1);   // past `rows`: a real row, never written
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int it = 0, s = 0;                             // the step being multiplied
  for (int gs = 0; gs < total; ++gs) {
    dsv4::cp_async_wait_pending(GW_STAGES - 2);  // this thread's copies of step gs have landed
    __syncthreads();                             // everyone's have; everyone is through step gs - 1's MMAs
    issue((gs + GW_STAGES - 1) % GW_STAGES);     // into the slot step gs - 1 used
    const int n0 = (int(blockIdx.x) + it * int(gridDim.x)) * GW_ROWS, kb0 = s * GW_BLOCKS;
    const int blocks = min(GW_BLOCKS, kblocks - kb0);
    uint32_t sw[GW_BLOCKS];                      // the weight blocks' scale bytes, read while the MMAs run
#pragma unroll
    for (int b = 0; b < GW_BLOCKS; ++b)
      sw[b] = warp == 0 && b < blocks ? __ldg(w_scale + size_t(n0 / 128) * kblocks + kb0 + b) : 0u;
    // A: warp 0's lane (g, t) holds tokens g and g + 8 at k-slots 4t .. 4t + 3 and 16 + 4t .. (the PTX
    // fragment); the other warps' rows are zeros. Past a short step's blocks, zeros times block 0's B.
    uint32_t a[GW_MMAS][4];
#pragma unroll
    for (int m = 0; m < GW_MMAS; ++m) {
      const int k = (kb0 + m / 4) * 128 + (m % 4) * 32 + 4 * t;
      const bool live = warp == 0 && m / 4 < blocks;
      a[m][0] = live ? *reinterpret_cast<const uint32_t*>(act + tok0 * ldx + k) : 0u;
      a[m][1] = WIDE && live ? *reinterpret_cast<const uint32_t*>(act + tok1 * ldx + k) : 0u;
      a[m][2] = live ? *reinterpret_cast<const uint32_t*>(act + tok0 * ldx + k + 16) : 0u;
      a[m][3] = WIDE && live ? *reinterpret_cast<const uint32_t*>(act + tok1 * ldx + k + 16) : 0u;
    }
#pragma unroll
    for (int m = 0; m < GW_MMAS; ++m)            // loaded before the fence (the compiler would sink them)
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[m][i])::"memory");
    const uint32_t stage = ring_s + (gs % GW_STAGES) * GW_STAGE;
    float c[GW_BLOCKS][8];
    wgmma_fence();
#pragma unroll
    for (int b = 0; b < GW_BLOCKS; ++b) {
      const uint32_t at = stage + (b < blocks ? b : 0) * 4 * 512;
      wgmma_m64n16k32_rs<false>(c[b], a[4 * b], gw_desc(at));
#pragma unroll
      for (int m = 1; m < 4; ++m) wgmma_m64n16k32_rs<true>(c[b], a[4 * b + m], gw_desc(at + m * 512));
    }
    wgmma_commit();
    wgmma_wait_all();
    if (warp == 0) {
#pragma unroll
      for (int b = 0; b < GW_BLOCKS; ++b) {
#pragma unroll
        for (int i = 0; i < 8; ++i) wgmma_pin(c[b][i]);
        if (b < blocks) {
          const float w_s = dsv4::e8m0(sw[b]);
          const float s0 = w_s * act_s[tok0 * kblocks + kb0 + b], s1 = w_s * act_s[tok1 * kblocks + kb0 + b];
#pragma unroll
          for (int i = 0; i < 8; ++i) sum[i] = fmaf(c[b][i], i & 2 ? s1 : s0, sum[i]);
        }
      }
    }
    if (++s == steps) {                          // the item's last step: warp 0 writes its 16 columns
      if (warp == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {            // entry i: token g (+ 8 where i & 2), column 2t + (i & 1) (+ 8 where i & 4)
          const int tok = g + (i & 2 ? 8 : 0), col = n0 + 2 * t + (i & 1) + (i & 4 ? 8 : 0);
          if (tok < rows && col < N) y[size_t(tok) * N + col] = __float2bfloat16(sum[i]);
          sum[i] = 0.f;
        }
      }
      s = 0, ++it;
    }
  }
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) dsv4_fp8_gemv_wgmma_m8(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ w_scale,
    __nv_bfloat16* __restrict__ y, int rows, int N, int K) {
  fp8_gemv_wgmma<false>(x, w, w_scale, y, rows, N, K);
}
extern "C" __global__ void __launch_bounds__(128) dsv4_fp8_gemv_wgmma_m16(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ w_scale,
    __nv_bfloat16* __restrict__ y, int rows, int N, int K) {
  fp8_gemv_wgmma<true>(x, w, w_scale, y, rows, N, K);
}
