// The shared expert of 1-2 decode rows in one launch: y = w2 . act_quant(swiglu(w1 . x', w3 . x')), with the
// numerics of its two-launch form (the stacked w1 | w3 GEMV, then w2's GEMV with the SwiGLU in its prologue,
// csrc/fp8_linear.cu): g, u and h rounded to bf16, h quantised per 128-block, every product per 128-K block
// scaled in float32. Only the order of the float32 sums over K differs (so outputs may differ by a bf16 unit).
//
// Why one launch: at Flash size (25 MB) the two launches took 10.9 us on the H200, 0.55 of the copy
// bandwidth, where a plain read of their bytes in two launches reaches 0.85 (bench/read_ceiling.py): each
// launch starts cold and drains, and w2's could load only its first ring steps before its wait for h. Here
// every CTA requests all its weight bytes (w1, w3 and w2 rows) at once before it waits for x, so the read
// streams through both products without a gap.
//
// How, without a grid-wide barrier: w2's input is quantised per 128-block of h, so the 128 h values of a block
// are made by one thread-block cluster of 8 CTAs (16 each, through distributed shared memory), and the K of w2
// is split by those blocks: cluster c multiplies h block c by w2's columns [128c, 128c + 128), CTA i of it the
// output rows [iD/8, (i+1)D/8), into float32 partials [F/128][rows][D]. The last CTA to finish an output slice
// (an arrival counter per slice, set back to zero by it) adds the F/128 partials in block order and writes y.
//
// A CTA: 8 warps. Phase 1, rows [128c + 16i, +16) of w1 and of w3 (two 16-row MMA tiles), each warp an eighth
// of K. Phase 2, each warp D/64 output rows in 16-row groups. A warp's jobs (16 rows x one 128-K block, 2 KB:
// phase 1's (w1, w3) per block, then phase 2's groups) stream through a ring of STAGES 2 KB slots per warp;
// with STAGES at least the job count (12 at Flash size), every byte is requested before the wait. The MMAs are
// f16 m16n8k16 over the e4m3 codes' exact f16 values on every GPU (as the fused GEMV's sm_90 path). Launches
// never allocate or synchronise.
#include <cooperative_groups.h>

#include "common.cuh"
#include "rows.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int SE_WARPS = 8;
constexpr int SE_CLUSTER = 8;           // CTAs a cluster: 16 h values each make one 128-block
constexpr int SE_MAX_ROWS = 2;
constexpr int SE_JOB_BYTES = 16 * 128;  // 16 rows x one 128-K block
constexpr int SE_ROW_PAD = 64;          // values after each shared activation row (banks)

// One 16-row x 128-K block on the f16 MMAs: lane (g, t)'s four 16-byte weight chunks (rows g, g + 8 at t * 16
// and t * 16 + 64) from its ring slot, the activation's f16 values of token `tok` at the same K from `act`
// (shared, the block's first value). Returns c[4] (rows g, g + 8 x tokens 2t, 2t + 1), the two 64-K halves
// added (as the fused GEMV does before scaling).
__device__ __forceinline__ void block_mma(uint32_t slot, uint32_t act, int t, float (&out)[4]) {
  float c[2][4] = {};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4 w0 = dsv4::lds128(slot + (2 * h) * 512), w8 = dsv4::lds128(slot + (2 * h + 1) * 512);
    const uint4 lo = dsv4::lds128(act + 2 * (h * 64 + t * 16)), hi = dsv4::lds128(act + 2 * (h * 64 + t * 16) + 16);
    const uint32_t a[2][4] = {{w0.x, w0.y, w0.z, w0.w}, {w8.x, w8.y, w8.z, w8.w}};
    const uint32_t b[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t a0 = dsv4::e4m3x2_to_f16x2(a[0][i]), a1 = dsv4::e4m3x2_to_f16x2(a[1][i]);
      const uint32_t a2 = dsv4::e4m3x2_to_f16x2<true>(a[0][i]), a3 = dsv4::e4m3x2_to_f16x2<true>(a[1][i]);
      dsv4::mma_f16(c[h], a0, a1, a2, a3, b[2 * i], b[2 * i + 1]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = c[0][i] + c[1][i];
}

}  // namespace

// Grid: (F / 128) * 8 CTAs in clusters of 8, 256 threads. x [rows, D] bf16; w13 [2 * up-stacked rows, D] e4m3
// (w1 rows [0, F), w3 rows [up, up + F)) with s13 [rows / 128, D / 128] E8M0; w2 [D, F] e4m3 with s2
// [D / 128, F / 128]; y [rows, D] bf16; partial [F / 128][rows][D] float32; counter [8] zeros. Needs D % 1024
// == 0, F % 128 == 0, up % 128 == 0, rows <= 2. Dynamic shared memory: the ring (8 warps x STAGES x 2 KB),
// x's f16 codes [rows][D + 64] and scales [rows][D / 128], phase 1's warp sums [8][2][4][32] floats.
template <int STAGES>
__device__ __forceinline__ void shared_expert_decode(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w13,
                                              const uint8_t* __restrict__ s13, const uint8_t* __restrict__ w2,
                                              const uint8_t* __restrict__ s2, __nv_bfloat16* __restrict__ y,
                                              float* __restrict__ partial, unsigned* __restrict__ counter, int rows,
                                              int D, int F, int up, float limit) {
  extern __shared__ uint4 smem[];
  __shared__ __nv_bfloat16 h_mine[SE_MAX_ROWS][16];                 // this CTA's h values, read by the cluster
  __shared__ __align__(16) __nv_bfloat16 h_codes[SE_MAX_ROWS][128 + SE_ROW_PAD];   // the block's f16 codes
  __shared__ float h_scale[SE_MAX_ROWS];
  __shared__ bool last;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), c = int(blockIdx.x) / SE_CLUSTER;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kblocks = D / 128, fblocks = F / 128;
  const int jobs1 = 2 * kblocks / SE_WARPS, jobs2 = D / 1024, jobs = jobs1 + jobs2;
  const int kb0 = warp * (kblocks / SE_WARPS);                      // the warp's first 128-K block of phase 1
  const int f0 = c * 128 + rank * 16;                               // the CTA's rows of w1 (and of w3 from up)
  const int out0 = rank * (D / 8) + warp * (D / 64);                // the warp's first output row of phase 2

  uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + size_t(warp) * STAGES * SE_JOB_BYTES;
  uint8_t* xcodes = reinterpret_cast<uint8_t*>(smem) + size_t(SE_WARPS) * STAGES * SE_JOB_BYTES;
  float* xscales = reinterpret_cast<float*>(xcodes + 2 * rows * (D + SE_ROW_PAD));
  float* sums = xscales + rows * kblocks;                           // [warp][tile][i][lane]

  // Job j's weight rows (16, from `base`, `ld` bytes apart) and its E8M0 scale's address.
  auto job_rows = [&](int j, const uint8_t*& base, int& ld, const uint8_t*& scale) {
    if (j < jobs1) {
      const int tile = j & 1, kb = kb0 + (j >> 1), row = (tile ? up : 0) + f0;
      base = w13 + size_t(row) * D + kb * 128, ld = D, scale = s13 + size_t(row / 128) * kblocks + kb;
    } else {
      const int row = out0 + (j - jobs1) * 16;
      base = w2 + size_t(row) * F + c * 128, ld = F, scale = s2 + size_t(row / 128) * fblocks + c;
    }
  };
  // Lane j's scale, for the warp's job j (read from its lane when the job is multiplied)
  float my_scale = 0.f;
  if (lane < jobs) {
    const uint8_t *base, *scale;
    int ld;
    job_rows(lane, base, ld, scale);
    my_scale = dsv4::e8m0(__ldg(scale));
  }
  auto issue = [&](int j) {                     // job j into its slot, one commit group (maybe empty)
    if (j < jobs) {
      const uint8_t* base;
      const uint8_t* scale;
      int ld;
      job_rows(j, base, ld, scale);
      uint8_t* slot = ring + (j % STAGES) * SE_JOB_BYTES + lane * 16;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        dsv4::cp_async16(slot + (2 * h) * 512, base + size_t(g) * ld + h * 64 + t * 16, 16);
        dsv4::cp_async16(slot + (2 * h + 1) * 512, base + size_t(g + 8) * ld + h * 64 + t * 16, 16);
      }
    }
    dsv4::cp_async_commit();
  };
  for (int j = 0; j < STAGES; ++j) issue(j);    // weights only: before the wait for x
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  dsv4::quantise_to_smem<false, true>(x, rows * D, D, SE_ROW_PAD, xcodes, xscales);
  __syncthreads();

  const uint32_t ring_at = dsv4::smem_addr(ring) + lane * 16;
  const int tok0 = min(2 * t, rows - 1);        // this lane's B column is token g (clamped); its sums' tokens 2t, 2t + 1
  const int tok_b = min(g, rows - 1);
  float acc[2][4] = {};                         // phase 1: [tile][i]
  for (int j = 0; j < jobs; ++j) {
    // job j is commit group j of STAGES + j (the empty groups past the last job included)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1) : "memory");
    const float sw = __shfl_sync(0xffffffffu, my_scale, j);
    const uint32_t slot = ring_at + (j % STAGES) * SE_JOB_BYTES;
    float p[4];
    if (j < jobs1) {
      const int kb = kb0 + (j >> 1);
      block_mma(slot, dsv4::smem_addr(xcodes + 2 * (size_t(tok_b) * (D + SE_ROW_PAD) + kb * 128)), t, p);
      const float sx0 = xscales[tok0 * kblocks + kb], sx1 = 2 * t + 1 < rows ? xscales[(2 * t + 1) * kblocks + kb] : 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {            // (a select, not acc[j & 1]: that would put acc in local memory)
        const float s = sw * (i & 1 ? sx1 : sx0);
        if (j & 1) acc[1][i] = fmaf(p[i], s, acc[1][i]); else acc[0][i] = fmaf(p[i], s, acc[0][i]);
      }
      if (j == jobs1 - 1) {                     // phase 1 done in this warp: its sums, then h by the CTA
#pragma unroll
        for (int tile = 0; tile < 2; ++tile)
#pragma unroll
          for (int i = 0; i < 4; ++i) sums[((warp * 2 + tile) * 4 + i) * 32 + lane] = acc[tile][i];
        __syncthreads();
        if (threadIdx.x < 16 * rows) {          // row r of the tiles, token m: lane (r % 8, m / 2), i below
          const int r = threadIdx.x % 16, m = threadIdx.x / 16, at = (r % 8) * 4 + m / 2, i = (r >= 8 ? 2 : 0) + (m & 1);
          float gu[2] = {0.f, 0.f};
          for (int w = 0; w < SE_WARPS; ++w)    // K in order
#pragma unroll
            for (int tile = 0; tile < 2; ++tile) gu[tile] += sums[((w * 2 + tile) * 4 + i) * 32 + at];
          const __nv_bfloat16 pair[2] = {__float2bfloat16(gu[0]), __float2bfloat16(gu[1])};
          h_mine[m][r] = dsv4_rows::swiglu_value(pair, 1, 0, limit);
        }
        cluster.sync();                         // every CTA's h of the block is in its shared memory
        if (warp < rows) {                      // warp m: token m's 128 values, 4 a lane, quantised
          const __nv_bfloat16* theirs = cluster.map_shared_rank(&h_mine[warp][0], lane / 4);
          float v[4], amax = 0.f;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            v[e] = __bfloat162float(theirs[(lane % 4) * 4 + e]);
            amax = fmaxf(amax, fabsf(v[e]));
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
          const float scale = dsv4::pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f), inv = dsv4::pow2_inverse(scale);
          const uint32_t q = dsv4::fp8x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
          *reinterpret_cast<uint2*>(&h_codes[warp][lane * 4]) = make_uint2(dsv4::e4m3x2_to_f16x2(q), dsv4::e4m3x2_to_f16x2<true>(q));
          if (lane == 0) h_scale[warp] = scale;
        }
        // no CTA leaves while another reads its h_mine: arrive now, wait before leaving
        asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
        __syncthreads();
      }
    } else {
      block_mma(slot, dsv4::smem_addr(&h_codes[tok_b][0]), t, p);
      const float sx0 = h_scale[tok0], sx1 = 2 * t + 1 < rows ? h_scale[2 * t + 1] : 0.f;
      const int row = out0 + (j - jobs1) * 16 + g;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 2 * t + (i & 1);
        if (m < rows) partial[(size_t(c) * rows + m) * D + row + (i & 2 ? 8 : 0)] = p[i] * (sw * (i & 1 ? sx1 : sx0));
      }
    }
    __syncwarp();                               // the slot is read before the next copy into it
    issue(j + STAGES);
  }
  // The slice's last CTA adds the clusters' partials in block order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter + rank, 1u) == unsigned(fblocks - 1);
  __syncthreads();
  if (last) {
    __threadfence();
    const int slice = D / 8;
    for (int e = threadIdx.x; e < rows * slice; e += blockDim.x) {
      const int m = e / slice, row = rank * slice + e % slice;
      float v = 0.f;
#pragma unroll 4
      for (int b = 0; b < fblocks; ++b) v += __ldcg(partial + (size_t(b) * rows + m) * D + row);
      y[size_t(m) * D + row] = __float2bfloat16(v);
    }
    if (threadIdx.x == 0) counter[rank] = 0;
  }
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

#define DSV4_SHARED_EXPERT(NAME, STAGES)                                                                      \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(                                                 \
      const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w13, const uint8_t* __restrict__ s13,  \
      const uint8_t* __restrict__ w2, const uint8_t* __restrict__ s2, __nv_bfloat16* __restrict__ y,          \
      float* __restrict__ partial, unsigned* __restrict__ counter, int rows, int D, int F, int up, float limit) { \
    shared_expert_decode<STAGES>(x, w13, s13, w2, s2, y, partial, counter, rows, D, F, up, limit);                  \
  }
DSV4_SHARED_EXPERT(dsv4_shared_expert_s12, 12)   // every byte in flight at once at Flash size (H100/H200 shared memory)
DSV4_SHARED_EXPERT(dsv4_shared_expert_s4, 4)     // GPUs with about 100 KB a CTA (sm_120, sm_121)
