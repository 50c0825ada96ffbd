// How the MXFP4 expert kernels stream weights: each warp copies 16-row x UB-block steps (UB 32-K blocks of
// packed E2M1 codes, 2 KB, and their E8M0 scale bytes) through its own ring of shared-memory stages with
// cp.async, and turns codes into e4m3 for the tensor cores. Shared by the mma.sync kernels (moe_experts.cu)
// and the decode kernels on Hopper's warpgroup MMA (moe_decode_wgmma.cu).
#pragma once
#include "common.cuh"

namespace {

using dsv4::smem_addr;

constexpr int UB = 8;        // 32-K blocks per warp step
constexpr int MAX_TOPK = 16;  // experts per token

__device__ __forceinline__ uint32_t e2m1_even(uint32_t v) {      // low nibbles -> e4m3 (x 2^-6)
  return ((v << 2) & 0x1C1C1C1Cu) | ((v << 4) & 0x80808080u);
}
__device__ __forceinline__ uint32_t e2m1_odd(uint32_t v) {       // high nibbles -> e4m3 (x 2^-6)
  return ((v >> 2) & 0x1C1C1C1Cu) | (v & 0x80808080u);
}

// One warp's step: 16 weight rows (row stride ld bytes) x up to UB blocks from the job's first block, with
// their E8M0 scales (row stride sld bytes).
struct Fp4Job {
  const uint8_t* w;           // row 0 of the group, first block of the step
  const uint8_t* s;
  int ld, sld, blocks;        // blocks in this step (0: nothing to do)
};

// Matrix m (0: w1, 1: w3, 2: w2) of the expert at `e`, in the bank layout
//   [w1 F x D/2 | w3 F x D/2 | w2 D x F/2 | s1 F x D/32 | s3 F x D/32 | s2 D x F/32]   (bytes):
// the step from row `row0` and 32-K block `blk`, with `blocks` blocks.
__device__ __forceinline__ Fp4Job bank_job(const uint8_t* e, int m, int row0, int blk, int blocks, int D, int F) {
  const size_t wbytes = size_t(F) * D / 2;
  const int k = m < 2 ? D : F;                  // the matrix's K
  Fp4Job jb;
  jb.ld = k / 2;
  jb.sld = k / 32;
  jb.w = e + m * wbytes + size_t(row0) * jb.ld + blk * 16;
  jb.s = e + 3 * wbytes + m * size_t(F) * (D / 32) + size_t(row0) * jb.sld + blk;
  jb.blocks = blocks;
  return jb;
}

// Each warp streams its steps through its own ring of STAGES shared-memory stages with cp.async (16-byte
// global reads, STAGES - 1 steps in flight without holding registers); ldmatrix then hands lane (r, q)
// word q of each 16-byte block row, the MMA fragment. Block slots are XOR-swizzled by row so the eight
// rows an ldmatrix phase reads sit in distinct banks.
#ifndef DSV4_FP4_STAGES
#define DSV4_FP4_STAGES 4  // a build macro for A/B timing (plugins.moe_experts sizes shared memory for 4)
#endif
constexpr int STAGES = DSV4_FP4_STAGES;
static_assert(STAGES >= 2 && STAGES <= 4, "plugins.moe_experts gives the rings shared memory for 4 stages");
constexpr int STAGE_W = 16 * UB * 16;               // weights: 16 rows x UB blocks x 16 bytes
constexpr int STAGE_BYTES = STAGE_W + 16 * UB;      // + the scale bytes [16 rows][UB]
constexpr int RING_BYTES = 8 * STAGES * STAGE_BYTES;  // 8 warps

// A step's copies: lane l copies weight chunks i = 0..3 (row l / 8 + 4i, column l % 8 of the step's 16 rows x
// UB blocks) and the scale word of row l / 2, half l % 2. A walk finds each lane's offsets once (LaneCopies:
// from the stage (dst) and from the step's first weight / scale byte (src)); the wgmma decode kernels' walk
// then moves the addresses by increments, the mma.sync kernels' ring finds them per step (issue_step).
struct LaneCopies {
  uint32_t dst[4], src[4], sdst, ssrc;
  int col, half;
};
__device__ __forceinline__ LaneCopies lane_copies(int ld, int sld, int lane) {
  LaneCopies lc;
  lc.col = lane & 7, lc.half = lane & 1;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (lane >> 3) + 4 * i;
    lc.dst[i] = row * 128 + ((lc.col ^ (row & 7)) << 4);
    lc.src[i] = row * ld + lc.col * 16;
  }
  lc.sdst = STAGE_W + (lane >> 1) * UB + lc.half * 4;
  lc.ssrc = (lane >> 1) * sld + lc.half * 4;
  return lc;
}
// Makes the offsets opaque where a walk's loop uses them, so that they stay in registers: ptxas recomputed
// them from the thread index in every step (about 30 instructions) rather than hold them.
__device__ __forceinline__ void keep_in_registers(LaneCopies& lc) {
#pragma unroll
  for (int i = 0; i < 4; ++i) dsv4::keep_in_register(lc.dst[i]), dsv4::keep_in_register(lc.src[i]);
  dsv4::keep_in_register(lc.sdst), dsv4::keep_in_register(lc.ssrc);
  dsv4::keep_in_register(lc.col), dsv4::keep_in_register(lc.half);
}
// Step j's copies into the stage at shared address `stage`, as one group (maybe empty). Scales go through the
// ring too when every step's scale bytes are 4-byte aligned (`async_scales`, true at Flash sizes); otherwise
// the step's MMAs read them from global memory themselves.
__device__ __forceinline__ void issue_copies(const Fp4Job& j, const LaneCopies& lc, uint32_t stage, bool async_scales) {
  if (j.blocks > 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (lc.col < j.blocks)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(stage + lc.dst[i]), "l"(j.w + lc.src[i]));
    if (async_scales && lc.half * 4 < j.blocks)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(stage + lc.sdst), "l"(j.s + lc.ssrc));
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

// The same, with the lane's offsets found anew (the mma.sync kernels' ring).
__device__ __forceinline__ void issue_step(const Fp4Job& j, uint8_t* stage, int lane, bool async_scales) {
  issue_copies(j, lane_copies(j.ld, j.sld, lane), smem_addr(stage), async_scales);
}

__device__ __forceinline__ void wait_stage() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
  __syncwarp();
}

// The ring's pipeline over a walk of steps: prime_ring() issues the first STAGES - 1 steps from the `ahead`
// cursor; next_stage(g) issues the step STAGES - 1 ahead of step g and waits for step g's stage, which it
// returns. job(cursor) -> Fp4Job; advance(cursor) moves a cursor one step on.
template <class Job, class Cursor, class Advance>
__device__ __forceinline__ void prime_ring(uint8_t* ring, const Job& job, Cursor& ahead, const Advance& advance,
                                           int lane, bool async_scales) {
#pragma unroll
  for (int g = 0; g < STAGES - 1; ++g) {
    issue_step(job(ahead), ring + g * STAGE_BYTES, lane, async_scales);
    advance(ahead);
  }
}
template <class Job, class Cursor, class Advance>
__device__ __forceinline__ const uint8_t* next_stage(uint8_t* ring, int g, const Job& job, Cursor& ahead,
                                                     const Advance& advance, int lane, bool async_scales) {
  issue_step(job(ahead), ring + ((g + STAGES - 1) % STAGES) * STAGE_BYTES, lane, async_scales);
  advance(ahead);
  wait_stage();
  return ring + (g % STAGES) * STAGE_BYTES;
}

// The step's E8M0 scale bytes of the warp's rows r and r + 8 (h = 0, 1): block u's is byte u % 4 of
// sc[h][u / 4]. From the ring, or from global memory where the scales were not copied (`async_scales`).
__device__ __forceinline__ void step_scales(const uint8_t* stage, const Fp4Job& j, bool async_scales, int r,
                                            uint32_t (&sc)[2][2]) {
  if (async_scales) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint2 v = *reinterpret_cast<const uint2*>(stage + STAGE_W + (r + 8 * h) * UB);
      sc[h][0] = v.x;
      sc[h][1] = v.y;
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sc[h][0] = sc[h][1] = 0u;
#pragma unroll
      for (int u = 0; u < UB; ++u)
        if (u < j.blocks) sc[h][u / 4] |= uint32_t(__ldg(j.s + size_t(r + 8 * h) * j.sld + u)) << (8 * (u % 4));
    }
  }
}

// Lane (r, q)'s codes of the step's blocks u and u + 1 (ldmatrix): d[0], d[1] = word q of rows r, r + 8 of
// block u (elements 8q .. 8q + 7), d[2], d[3] = the same of block u + 1.
__device__ __forceinline__ void load_block_pair(const uint8_t* stage, int u, int lane, uint32_t (&d)[4]) {
  const int mi = lane >> 3, i = lane & 7, row = i + 8 * (mi & 1), col = u + (mi >> 1);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(smem_addr(stage + row * 128 + ((col ^ i) << 4))));
}

__device__ __forceinline__ int my_items(int items) {
  return (items - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
}

// Where a warp is in its walk over steps, advanced by counters: the divisions that located step g took a
// good share of each step's instructions (the kernels are bound by instructions, not by DRAM, on the H200).
// gate_up: step s of the CTA's it-th item, item = blockIdx.x + it * gridDim.x = j * groups + rg.
struct GateUpCursor {
  int it, s, j, rg;
  __device__ __forceinline__ explicit GateUpCursor(int groups)
      : it(0), s(0), j(int(blockIdx.x) / groups), rg(int(blockIdx.x) % groups) {}
  __device__ __forceinline__ void advance(int steps, int groups) {
    if (++s < steps) return;
    s = 0, ++it, rg += int(gridDim.x);
    while (rg >= groups) rg -= groups, ++j;
  }
};

// The blocks of the step a walk's cursor is at (c.it: which of the CTA's items, c.s: which step of it): none
// past the CTA's `mine` items, fewer than UB in the last step of a K that is not a whole number of steps.
template <class Cursor>
__device__ __forceinline__ int step_blocks(const Cursor& c, int mine, int nb) {
  return c.it < mine ? min(UB, nb - c.s * UB) : 0;
}

}  // namespace
