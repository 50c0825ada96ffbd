// MXFP4 routed experts for prefill on Hopper's warpgroup MMA (sm_90a only; elsewhere the grouped
// mma.sync kernels of moe_experts.cu serve, and also below 12 pairs per expert, where they are faster).
//
// The host sorts a chunk's (token, slot) pairs by expert and cuts each expert's run into groups of at most
// 64 pairs (plugins/moe_experts.py group_pairs); the activations are quantised once per row by the
// act_quant kernel (e4m3 codes, one float scale per 128 K). A CTA (one warpgroup, 128 threads) computes
// one (group, 128-column tile) of one GEMM, 128 K at a time:
//   - A: the group's 64 rows of codes, copied into shared memory in the 128-byte swizzle wgmma reads;
//   - B: 128 weight rows x 128 K: each thread converts one row's 64 MXFP4 bytes to e4m3 into the same
//     swizzle. Of the row's four 32-K scales, the largest becomes the row's scale for these 128 K and the
//     others are folded into the codes: an E2M1 value times 2^t (t <= 0) is exactly an e4m3 value for
//     t >= -8 (the smallest, 0.5 * 2^-8, is e4m3's smallest subnormal); beyond, it is rounded to nearest
//     (LUT below). So each 128-K step is four wgmma m64n128k32 into fresh accumulators, then
//     acc += step * a_scale[row] * b_scale[col] in float32 (DeepSeek's promotion every 128 K).
// Numerics: the FP8 MMA adds within 128 K in less than float32, so a gate or up value can differ from the
// decode kernels' by a bf16 unit; h's e4m3 requantisation before down can turn that into one code step of
// one element. Measured: h within cosine 0.999996 of the oracle per pair, outputs >= 0.9999 per token at
// Flash size, one token in 64 at 0.99990 in a small case (bench/results/wgmma-diag-h200.txt).
// Measured on the H200 (ncu, bench/results/ncu-gate-up-wgmma-h200.txt): issue-bound, ~700 instructions
// per warp per 128-K step (the E2M1 -> e4m3 conversion and the per-column scales) against 256 cycles of
// tensor work, 42% of issue slots busy with 2 CTAs per SM (241 registers then, 237 now); a producer/
// consumer split with fewer registers for the converting warps would be the next step.
// gate_up: the tile's columns are 64 rows of w1 and the same 64 rows of w3; the CTA forms
//   h = bf16(route_w * silu(min(bf16(g), L)) * clamp(bf16(u), -L, L)) for them. down: 128 rows of w2,
//   ypart = float(bf16(y)) per pair; the host adds a token's pairs in ascending expert id order.
// Bank layout per expert as in moe_experts.cu: [w1 F x D/2 | w3 | w2 D x F/2 | s1 F x D/32 | s3 | s2].
#include "common.cuh"
#include "wgmma.cuh"

using dsv4::smem_addr;

namespace {

constexpr int TILE_M = 64, TILE_N = 128, TILE_K = 128, SHIFTS = 17;   // folded shifts 0 .. -16
constexpr int WG_A_BYTES = TILE_M * TILE_K, WG_STAGE_BYTES = WG_A_BYTES + TILE_N * TILE_K;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A shared-memory matrix of 8-row, 128-byte swizzled atoms (K-major): start address, leading byte offset
// (unused for this layout), stride between 8-row atoms (1024 bytes), swizzle mode 1 (128 B).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// Byte (row, 16-byte chunk) of a 128-byte swizzled tile.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Eight E2M1 codes (nibble i = element i) -> eight e4m3 bytes (byte i = element i; .x: 0-3, .y: 4-7), each
// value times 2^t, from the e4m3 bytes of the eight magnitudes times 2^t (lut_lo: 0 .. 1.5, lut_hi: 2 .. 6).
// The sign of element i is bit 7 of byte i / 2 of w << 4 (i even) or of w (i odd): one byte_perm gathers
// four of them. Nine operations for eight codes (session 10's first version took about thirteen); checked
// equal to it bit for bit by emulation (every code in every position, 400k random words).
__device__ __forceinline__ uint2 e2m1x8_to_e4m3(uint32_t w, uint32_t lut_lo, uint32_t lut_hi) {
  const uint32_t mags = w & 0x77777777u, w4 = w << 4;      // byte_perm reads a selector's low 16 bits
  return make_uint2(__byte_perm(lut_lo, lut_hi, mags) | (__byte_perm(w, w4, 0x1504u) & 0x80808080u),
                    __byte_perm(lut_lo, lut_hi, mags >> 16) | (__byte_perm(w, w4, 0x3726u) & 0x80808080u));
}

// One (group, 128-column tile) of a grouped GEMM by one warpgroup into acc (64 per thread: for its
// 8-column block j, rows r and r + 8 of its warp's 16, columns 2q and 2q + 1). Two stages in dynamic shared
// memory, WG_STAGE_BYTES each: while the tensor cores multiply one, the threads fill the other (A by cp.async,
// B converted from registers loaded one more step ahead). b_row(n, w, s): B row n's codes and scales (K/2
// and K/32 bytes). (Two warpgroups over 128 rows, sharing each B tile, measured slower at every chunk size
// in bench/results/wgmma-two-warpgroups-h200.txt: one CTA per SM instead of two.)
template <class BRow>
__device__ __forceinline__ void tile_gemm(const uint8_t* __restrict__ codes, const float* __restrict__ code_scales,
                                          const int* a_rows, int count, int K, BRow b_row, float (&acc)[64]) {
  constexpr int THREADS = 128;
  // the stages start on 1024-byte boundaries, where the swizzle pattern starts (the launch adds 1 KiB)
  extern __shared__ uint8_t dynamic_smem[];
  uint8_t* stages = dynamic_smem + ((1024 - (smem_addr(dynamic_smem) & 1023)) & 1023);
  __shared__ float a_scale[2][TILE_M], b_scale[2][TILE_N];
  __shared__ uint32_t lut[SHIFTS][2];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, r = lane >> 2, q = lane & 3;
  for (int at = tid; at < SHIFTS * 8; at += THREADS) {   // e4m3 of each magnitude times 2^-shift, rounded
    const int shift = at / 8, m = at % 8;      // magnitude m: 0, 0.5, then (1 + (m & 1) / 2) 2^(m / 2 - 1)
    const float mag = m < 2 ? 0.5f * m : ldexpf(1.f + 0.5f * (m & 1), (m >> 1) - 1);
    const auto byte = __nv_cvt_float_to_fp8(ldexpf(mag, -shift), __NV_SATFINITE, __NV_E4M3);
    reinterpret_cast<uint8_t*>(lut)[at] = uint8_t(byte);
  }
  const uint8_t *w_row, *s_row;                // this thread's B row
  b_row(tid, w_row, s_row);
  const int nk = K / TILE_K;
  uint4 raw[4];
  uint32_t sc = 0;
  auto fetch = [&](int kb) {                   // registers, one step ahead of their conversion
    const uint4* wq = reinterpret_cast<const uint4*>(w_row + kb * (TILE_K / 2));
#pragma unroll
    for (int j = 0; j < 4; ++j) raw[j] = __ldg(wq + j);
    sc = __ldg(reinterpret_cast<const uint32_t*>(s_row + kb * (TILE_K / 32)));
  };
  auto fill = [&](int kb, int stage) {
    uint8_t* a_tile = stages + stage * WG_STAGE_BYTES;
    uint8_t* b_tile = a_tile + WG_A_BYTES;
#pragma unroll
    for (int i = 0; i < WG_A_BYTES / 16 / THREADS; ++i) {   // A: TILE_M rows x 8 chunks; past the count, zeros
      const int c = tid + THREADS * i, row = c >> 3, chunk = c & 7;
      const bool live = row < count;
      const uint8_t* src = codes + size_t(a_rows[live ? row : 0]) * K + kb * TILE_K + chunk * 16;
      dsv4::cp_async16(a_tile + swizzled(row, chunk), src, live ? 16u : 0u);
    }
    if (tid < TILE_M) {
      const bool live = tid < count;
      dsv4::cp_async4(&a_scale[stage][tid], code_scales + size_t(a_rows[live ? tid : 0]) * nk + kb, live ? 4u : 0u);
    }
    dsv4::cp_async_commit();
    // B: of the row's four 32-K scales the largest is the row's for these 128 K; the others fold into codes
    const uint32_t top = max(max(sc & 0xFFu, (sc >> 8) & 0xFFu), max((sc >> 16) & 0xFFu, sc >> 24));
    b_scale[stage][tid] = dsv4::e8m0(top);
#pragma unroll
    for (int j = 0; j < 4; ++j) {               // 32-K block j: 16 bytes of codes -> 32 bytes of e4m3
      const int shift = min(int(top - ((sc >> (8 * j)) & 0xFFu)), SHIFTS - 1);
      const uint32_t lo = lut[shift][0], hi = lut[shift][1];
      const uint2 e0 = e2m1x8_to_e4m3(raw[j].x, lo, hi), e1 = e2m1x8_to_e4m3(raw[j].y, lo, hi);
      const uint2 e2 = e2m1x8_to_e4m3(raw[j].z, lo, hi), e3 = e2m1x8_to_e4m3(raw[j].w, lo, hi);
      *reinterpret_cast<uint4*>(b_tile + swizzled(tid, 2 * j)) = make_uint4(e0.x, e0.y, e1.x, e1.y);
      *reinterpret_cast<uint4*>(b_tile + swizzled(tid, 2 * j + 1)) = make_uint4(e2.x, e2.y, e3.x, e3.y);
    }
  };
  float step[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  fetch(0);
  __syncthreads();                              // the LUT
  fill(0, 0);
  if (nk > 1) fetch(1);
  for (int kb = 0; kb < nk; ++kb) {
    const int stage = kb & 1;
    uint8_t* a_tile = stages + stage * WG_STAGE_BYTES;
    uint8_t* b_tile = a_tile + WG_A_BYTES;
    dsv4::cp_async_wait_all();
    fence_async_shared();
    __syncthreads();                            // stage `stage` complete; the other one free (step kb - 1 done)
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < TILE_K / 32; ++k)
      wgmma_m64n128k32_e4m3(step, smem_desc(a_tile + 32 * k), smem_desc(b_tile + 32 * k), k);
    wgmma_commit();
    if (kb + 1 < nk) {                          // the next stage, while the tensor cores work on this one
      fill(kb + 1, stage ^ 1);
      if (kb + 2 < nk) fetch(kb + 2);
    }
    wgmma_wait_all();
    const float a0 = a_scale[stage][16 * warp + r], a1 = a_scale[stage][16 * warp + r + 8];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float2 b = *reinterpret_cast<const float2*>(&b_scale[stage][8 * j + 2 * q]);
      acc[4 * j] = fmaf(step[4 * j], a0 * b.x, acc[4 * j]);
      acc[4 * j + 1] = fmaf(step[4 * j + 1], a0 * b.y, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(step[4 * j + 2], a1 * b.x, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(step[4 * j + 3], a1 * b.y, acc[4 * j + 3]);
    }
  }
}

// The group's rows: each pair's id, and its row of the activations (its token's for gate_up).
__device__ __forceinline__ void group_rows(const int* pairs, int start, int count, int per_row, int* pair_of,
                                           int* rows) {
  if (threadIdx.x < TILE_M) {
    const int p = pairs[start + min(int(threadIdx.x), count - 1)];
    pair_of[threadIdx.x] = p;
    rows[threadIdx.x] = p / per_row;
  }
  __syncthreads();
}

// Tile row of accumulators 4 j + 2 h and 4 j + 2 h + 1 of thread `tid` (its warp's 16 rows, then r).
__device__ __forceinline__ int acc_row(int tid, int h) { return 16 * (tid / 32) + (tid & 31) / 4 + 8 * h; }
#endif

}  // namespace

// gate_up. Grid: groups x (F / 64). x_codes [T, D] e4m3 and x_scales [T, D / 128] (act_quant of x); h
// [T * topk, F] bf16, pair-indexed.
__device__ __forceinline__ void gate_up_wgmma(const uint8_t* __restrict__ x_codes, const float* __restrict__ x_scales,
                                              const int* __restrict__ pairs, const int* __restrict__ g_expert,
                                              const int* __restrict__ g_start, const int* __restrict__ g_count,
                                              const float* __restrict__ route_w, const uint64_t* __restrict__ table,
                                              __nv_bfloat16* __restrict__ h, int topk, int D, int F, float limit) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  dsv4::pdl_wait();                             // the codes come from the act_quant launch before
  dsv4::pdl_launch_dependents();
  const int tiles = F / 64, g = blockIdx.x / tiles, tile = blockIdx.x % tiles, count = g_count[g];
  __shared__ int pair_of[TILE_M], rows[TILE_M];
  group_rows(pairs, g_start[g], count, topk, pair_of, rows);
  const uint8_t* e = reinterpret_cast<const uint8_t*>(table[g_expert[g]]);
  const size_t wbytes = size_t(F) * D / 2;
  auto b_row = [&](int n, const uint8_t*& w, const uint8_t*& s) {   // columns 0-63: w1, 64-127: w3
    const int which = n / 64, row = tile * 64 + n % 64;
    w = e + which * wbytes + size_t(row) * (D / 2);
    s = e + 3 * wbytes + which * size_t(F) * (D / 32) + size_t(row) * (D / 32);
  };
  float acc[64];
  tile_gemm(x_codes, x_scales, rows, count, D, b_row, acc);
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 32; ++i) {                // gate column c (i < 32) and its up column c + 64 (i + 32)
    const int row = acc_row(threadIdx.x, (i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
    if (row >= count) continue;
    float gate = __bfloat162float(__float2bfloat16(acc[i]));
    float up = __bfloat162float(__float2bfloat16(acc[i + 32]));
    if (limit > 0.f) {
      up = fminf(fmaxf(up, -limit), limit);
      gate = fminf(gate, limit);
    }
    const int pair = pair_of[row];
    h[size_t(pair) * F + tile * 64 + col] = __float2bfloat16(route_w[pair] * (gate / (1.f + __expf(-gate)) * up));
  }
#endif
}

// down. Grid: groups x (D / 128). h_codes [T * topk, F] e4m3 and h_scales [T * topk, F / 128] (act_quant of
// h); ypart [T * topk, D] float32, each pair's output rounded to bf16 as the decode kernel rounds each expert's.
__device__ __forceinline__ void down_wgmma(const uint8_t* __restrict__ h_codes, const float* __restrict__ h_scales,
                                           const int* __restrict__ pairs, const int* __restrict__ g_expert,
                                           const int* __restrict__ g_start, const int* __restrict__ g_count,
                                           const uint64_t* __restrict__ table, float* __restrict__ ypart, int D, int F) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  dsv4::pdl_wait();                             // the codes come from the act_quant launch before
  dsv4::pdl_launch_dependents();
  const int tiles = D / TILE_N, g = blockIdx.x / tiles, tile = blockIdx.x % tiles, count = g_count[g];
  __shared__ int pair_of[TILE_M], rows[TILE_M];
  group_rows(pairs, g_start[g], count, 1, pair_of, rows);
  const uint8_t* e = reinterpret_cast<const uint8_t*>(table[g_expert[g]]);
  const size_t wbytes = size_t(F) * D / 2;
  auto b_row = [&](int n, const uint8_t*& w, const uint8_t*& s) {
    const int row = tile * TILE_N + n;
    w = e + 2 * wbytes + size_t(row) * (F / 2);
    s = e + 3 * wbytes + 2 * size_t(F) * (D / 32) + size_t(row) * (F / 32);
  };
  float acc[64];
  tile_gemm(h_codes, h_scales, rows, count, F, b_row, acc);
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int row = acc_row(threadIdx.x, (i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
    if (row < count) ypart[size_t(pair_of[row]) * D + tile * TILE_N + col] = __bfloat162float(__float2bfloat16(acc[i]));
  }
#endif
}

// The launches: one warpgroup, dynamic shared memory 2 * WG_STAGE_BYTES + 1024 (plugins/moe_experts.py
// WGMMA_SHARED_BYTES).
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_gate_up_wgmma(
    const uint8_t* x_codes, const float* x_scales, const int* pairs, const int* g_expert, const int* g_start,
    const int* g_count, const float* route_w, const uint64_t* table, __nv_bfloat16* h, int topk, int D, int F,
    float limit) {
  gate_up_wgmma(x_codes, x_scales, pairs, g_expert, g_start, g_count, route_w, table, h, topk, D, F, limit);
}

extern "C" __global__ void __launch_bounds__(128) dsv4_moe_down_wgmma(
    const uint8_t* h_codes, const float* h_scales, const int* pairs, const int* g_expert, const int* g_start,
    const int* g_count, const uint64_t* table, float* ypart, int D, int F) {
  down_wgmma(h_codes, h_scales, pairs, g_expert, g_start, g_count, table, ypart, D, F);
}
