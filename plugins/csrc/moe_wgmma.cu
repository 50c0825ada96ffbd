// MXFP4 routed experts for prefill on Hopper's warpgroup MMA (sm_90a only; elsewhere the grouped mma.sync
// kernels of moe_experts.cu serve, and also below 6 pairs per expert; plugins/moe_experts.py WgmmaPaths).
//
// The host sorts a chunk's (token, slot) pairs by expert and cuts each expert's run into balanced groups of
// at most 128 pairs, or 64 for the kernels of the second size (Shape below; plugins/moe_experts.py
// group_pairs and wgmma_group); the act_quant kernel quantises the activations
// once per row (e4m3 codes, one float scale per 128 K), writing each 128-K block's 4-byte words in the MMA's
// slot order (below). A CTA (two warpgroups) computes 128 weight rows x one group's pairs, 128 K per step, as
// the transposed product: the weights are the MMA's A operand (64 rows per warpgroup), the pairs its columns
// (N = the group's size rounded up to 32). So each weight value is turned into e4m3 once per group of up to
// 128 pairs, in registers, and one copy of the pairs' codes in shared memory serves 128 weight rows.
// (Session 10's first form had the pairs as the 64 rows of A and converted 128 weight rows into shared
// memory for every 64 pairs: ncu found it bound by issue, ~700 instructions per warp per 128-K step.)
//   - A from registers: lane (g, q) of a warp takes its rows g and g + 8, bytes 16q .. 16q + 15 of the
//     step's 64 bytes of codes: the 32 values of 32-K scale block q. Of a row's four scales in the step the
//     largest becomes the row's scale; the others fold into the codes: an E2M1 value times 2^t (t <= 0) is
//     an e4m3 value exactly for t >= -8 (0.5 * 2^-8 is e4m3's smallest subnormal), beyond it is rounded to
//     nearest (the LUT). Word c of the lane's 16 bytes (values 32q + 8c .. + 7) feeds MMA c of the step:
//     values + 0..3 as slots 4q .. 4q + 3, values + 4..7 as slots 16 + 4q .. 16 + 4q + 3.
//   - B in shared memory: the group's code rows, 128-byte swizzle; within each 128-K block word w of the
//     row (slots 4(w % 8) .. of MMA w / 8) holds values 4 (8 (w % 4) + 2 (w / 8) + (w / 4) % 2) .. + 3, the
//     order that matches A's (act_quant with `mma_slots`).
//   - Per step four wgmma m64nNk32 into fresh accumulators, then acc += step * a_scale[row] * b_scale[col]
//     in float32 (DeepSeek's promotion every 128 K). A ring of STAGES stages (cp.async) carries both
//     operands' bytes; a warpgroup converts step k + 1's A while the tensor cores multiply step k.
// Numerics: the FP8 MMA adds within 128 K in less than float32, so a gate or up value can differ from the
// decode kernels' by a bf16 unit; h's e4m3 requantisation before down can turn that into one code step of
// one element. Measured (session 24, bench/wgmma_diag.py cases): outputs >= 0.9999 per token at Flash size
// (worst 0.999913), one token in 64 at 0.999903 in a small case; session 10's form: 0.999963 and 0.999896.
// gate_up: a CTA's 128 rows are 64 rows of w1 and the same 64 rows of w3 (each warp's fragment rows g and
//   g + 8: w1 and w3 row f), so a lane holds gate and up of its f and forms
//   h = bf16(route_w * silu(min(bf16(g), L)) * clamp(bf16(u), -L, L)). down: 128 rows of w2,
//   ypart = float(bf16(y)) per pair; the host adds a token's pairs in ascending expert id order.
// Bank layout per expert as in moe_experts.cu: [w1 F x D/2 | w3 | w2 D x F/2 | s1 F x D/32 | s3 | s2].
#include "common.cuh"
#include "wgmma.cuh"

#include <type_traits>

namespace moe_prefill {

constexpr int THREADS = 256, ROWS = 128;        // two warpgroups of 64 weight rows
constexpr int STEP_K = 128, SHIFTS = 17;        // folded shifts 0 .. -16

// The kernels' two sizes, by the most pairs a group may have (the MMA's columns): 128 at one CTA an SM (an
// 8-stage ring, about 195 registers a thread), or 64 at two CTAs an SM (6 stages, 128 registers: twice the
// warps per scheduler, for chunks whose experts have few pairs each; plugins/moe_experts.py wgmma_group).
// A ring stage: B (MAX_N rows x 128 codes, swizzled; 1024-byte aligned as the swizzle pattern is), A's packed
// codes (ROWS x 64 bytes), B's scales (MAX_N floats), A's E8M0 scale bytes (ROWS x 4), padded to 1 KiB.
template <int MAX_N_>
struct Shape {
  static constexpr int MAX_N = MAX_N_, STAGES = MAX_N == 128 ? 8 : 6, CTAS_PER_SM = MAX_N == 128 ? 1 : 2;
  static constexpr int W_OFF = MAX_N * STEP_K, TS_OFF = W_OFF + ROWS * STEP_K / 2, WS_OFF = TS_OFF + MAX_N * 4;
  static constexpr int STAGE_BYTES = (WS_OFF + ROWS * 4 + 1023) / 1024 * 1024;
  static constexpr int SHARED_BYTES = STAGES * STAGE_BYTES + 1024;   // plugins/moe_experts.py wgmma_shared_bytes
  static_assert(MAX_N == 128 || MAX_N == 64, "the two sizes built");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using dsv4::smem_addr;

// A shared-memory matrix of 8-row, 128-byte swizzled atoms (K-major): start address, leading byte offset
// (unused for this layout), stride between 8-row atoms (1024 bytes), swizzle mode 1 (128 B).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// d (+)= A (64 x 32 e4m3, registers) . B (32 x N e4m3, descriptor); acc 0: d is only written.
template <int N>
__device__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int acc);
template <> __device__ __forceinline__ void wgmma_rs<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<96>(float (&d)[48], const uint32_t (&a)[4], uint64_t desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47}, {%48,%49,%50,%51}, %52, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}

// Byte (row, 16-byte chunk) of a 128-byte swizzled tile.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Eight E2M1 codes (nibble i = element i) -> eight e4m3 bytes (byte i = element i; .x: 0-3, .y: 4-7), each
// value times 2^t, from the e4m3 bytes of the eight magnitudes times 2^t (lut_lo: 0 .. 1.5, lut_hi: 2 .. 6).
// The sign of element i is bit 7 of byte i / 2 of w << 4 (i even) or of w (i odd): one byte_perm gathers
// four of them. Checked equal bit for bit to a plain conversion by emulation (every code in every position).
__device__ __forceinline__ uint2 e2m1x8_to_e4m3(uint32_t w, uint32_t lut_lo, uint32_t lut_hi) {
  const uint32_t mags = w & 0x77777777u, w4 = w << 4;      // byte_perm reads a selector's low 16 bits
  return make_uint2(__byte_perm(lut_lo, lut_hi, mags) | (__byte_perm(w, w4, 0x1504u) & 0x80808080u),
                    __byte_perm(lut_lo, lut_hi, mags >> 16) | (__byte_perm(w, w4, 0x3726u) & 0x80808080u));
}

// A weight row of the CTA: its packed codes and its E8M0 scales, from K = 0.
struct WeightRow {
  const uint8_t* codes;
  const uint8_t* scales;
};

// The ring's mbarriers: full[s] completes when every thread's copies into stage s have landed (each
// thread's cp.async arrive), empty[s] when the eight warps are done reading it.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_on_copies(uint64_t* bar) {   // when this thread's cp.asyncs land
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
}

// What a CTA shares: the group's pairs and activation rows (MAX_N each, past the count the last repeated),
// the folding LUT (the e4m3 bytes of each E2M1 magnitude times 2^-shift) and the ring's mbarriers.
template <class S>
struct GroupShared {
  int pair_of[S::MAX_N], rows[S::MAX_N];
  uint32_t lut[SHIFTS][2];
  uint64_t full[S::STAGES], empty[S::STAGES];
};

template <class S>
__device__ __forceinline__ void load_group(const int* pairs, int start, int count, int per_row, GroupShared<S>& s) {
  if (threadIdx.x < S::MAX_N) {
    const int p = pairs[start + min(int(threadIdx.x), count - 1)];
    s.pair_of[threadIdx.x] = p;
    s.rows[threadIdx.x] = p / per_row;
  }
  for (int at = threadIdx.x; at < SHIFTS * 8; at += THREADS) {
    const int shift = at / 8, m = at % 8;      // magnitude m: 0, 0.5, then (1 + (m & 1) / 2) 2^(m / 2 - 1)
    const float mag = m < 2 ? 0.5f * m : ldexpf(1.f + 0.5f * (m & 1), (m >> 1) - 1);
    reinterpret_cast<uint8_t*>(s.lut)[at] = uint8_t(__nv_cvt_float_to_fp8(ldexpf(mag, -shift), __NV_SATFINITE, __NV_E4M3));
  }
  if (threadIdx.x < S::STAGES) {
    mbar_init(&s.full[threadIdx.x], THREADS);    // every thread's copies
    mbar_init(&s.empty[threadIdx.x], THREADS / 32);   // every warp done
  }
  __syncthreads();
}

// Thread tid's first fragment row in the CTA (its warp's g; g + 8 is the other).
__device__ __forceinline__ int fragment_row(int tid) { return 64 * (tid >> 7) + 16 * ((tid >> 5) & 3) + ((tid & 31) >> 2); }

// The CTA's product over K: acc (N / 2 per thread: for its 8-column block j, its warp's fragment rows g and
// g + 8, columns 2q and 2q + 1) = sum over 128-K steps of the step's e4m3 product times both scales.
// codes [rows, K] in slot order and scales [rows, K / 128]: the activations; weight_row(n) -> WeightRow of
// the CTA's row n (n = 64 warpgroup + 16 warp + fragment row). Every thread copies its share of a step
// STAGES - 2 steps ahead, once the stage's last readers (step kb - 2) are done with it; a warpgroup takes
// a step once its stage is full. So the warpgroups are held together only within two steps: one adds a
// step's products while the other's MMAs run (a barrier per step, in the first form, held them in step:
// 0.30 of a bf16 matmul at 4096 tokens). (A producer warp of its own would leave the consumers 168
// registers, nine warps sharing four schedulers' register files; they need about 190.)
template <int N, class S, class RowOf>
__device__ __forceinline__ void tile_gemm(const uint8_t* __restrict__ codes, const float* __restrict__ code_scales,
                                          int K, int count, GroupShared<S>& grp, RowOf weight_row, float (&acc)[N / 2]) {
  constexpr int MAX_N = S::MAX_N, STAGES = S::STAGES, STAGE_BYTES = S::STAGE_BYTES;
  constexpr int W_OFF = S::W_OFF, TS_OFF = S::TS_OFF, WS_OFF = S::WS_OFF;
  static_assert(N <= MAX_N, "a group's columns fit the ring's B");
  extern __shared__ uint8_t dynamic_smem[];
  uint8_t* ring = dynamic_smem + ((1024 - (smem_addr(dynamic_smem) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid & 31, nk = K / STEP_K;
  // this thread's copies: 16 bytes of weight rows tid / 4 and 64 + tid / 4, the scale word of row tid
  const WeightRow c0 = weight_row(tid >> 2), c1 = weight_row(64 + (tid >> 2)), cs = weight_row(tid & (ROWS - 1));
  const int chunk = tid & 3;
  auto issue = [&](int kb) {
    if (kb >= nk) return;
    const int s = kb % STAGES;
    if (kb >= STAGES) mbar_wait(&grp.empty[s], (kb / STAGES - 1) & 1);
    uint8_t* st = ring + s * STAGE_BYTES;
    int src[N * 8 / THREADS];                    // read before the copies (each copy's asm orders memory)
#pragma unroll
    for (int i = 0; i < N * 8 / THREADS; ++i) src[i] = grp.rows[(tid + THREADS * i) >> 3];
    const int ts_src = grp.rows[tid & (MAX_N - 1)];
#pragma unroll
    for (int i = 0; i < N * 8 / THREADS; ++i) {   // B: N rows x 8 chunks; past the count, zeros
      const int c = tid + THREADS * i, row = c >> 3;
      dsv4::cp_async16(st + swizzled(row, c & 7), codes + size_t(src[i]) * K + kb * STEP_K + (c & 7) * 16,
                       row < count ? 16u : 0u);
    }
    if (tid < N)
      dsv4::cp_async4(st + TS_OFF + 4 * tid, code_scales + size_t(ts_src) * nk + kb, tid < count ? 4u : 0u);
    dsv4::cp_async16(st + W_OFF + (tid >> 2) * 64 + chunk * 16, c0.codes + kb * 64 + chunk * 16, 16u);
    dsv4::cp_async16(st + W_OFF + (64 + (tid >> 2)) * 64 + chunk * 16, c1.codes + kb * 64 + chunk * 16, 16u);
    if (tid < ROWS) dsv4::cp_async4(st + WS_OFF + 4 * tid, cs.scales + kb * 4, 4u);
    mbar_arrive_on_copies(&grp.full[s]);
  };
#pragma unroll
  for (int kb = 0; kb < STAGES - 2; ++kb) issue(kb);
  const int q = lane & 3;
  // Step kb's A fragments (a[c]: MMA c) and the scales of the lane's rows, from the step's stage. The
  // lane's offsets in a stage, kept (the compiler would otherwise read threadIdx.x again every step).
  const int n_lo = fragment_row(tid);
  const uint8_t* w_at = ring + W_OFF + n_lo * 64 + 16 * q;
  const uint8_t* s_at = ring + WS_OFF + 4 * n_lo;
  auto convert = [&](int kb, uint32_t (&a)[4][4], float (&ws)[2]) {
    const int at = (kb % STAGES) * STAGE_BYTES;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(w_at + at + 8 * 64 * h);
      const uint32_t sc = *reinterpret_cast<const uint32_t*>(s_at + at + 4 * 8 * h);
      const uint32_t top = max(max(sc & 0xFFu, (sc >> 8) & 0xFFu), max((sc >> 16) & 0xFFu, sc >> 24));
      ws[h] = dsv4::e8m0(top);
      const int shift = min(int(top - ((sc >> (8 * q)) & 0xFFu)), SHIFTS - 1);
      const uint32_t lo = grp.lut[shift][0], hi = grp.lut[shift][1];
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint2 e = e2m1x8_to_e4m3(words[c], lo, hi);
        a[c][h] = e.x;
        a[c][2 + h] = e.y;
      }
    }
  };
  uint32_t a[4][4], a_next[4][4];
  float ws[2], ws_next[2], step[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
  mbar_wait(&grp.full[0], 0);
  convert(0, a, ws);
  for (int kb = 0; kb < nk; ++kb) {
    const int s = kb % STAGES;
    const uint8_t* st = ring + s * STAGE_BYTES;
    // No proxy fence between the copies (seen landed through the mbarrier) and the MMAs' reads: as CUTLASS's
    // cp.async-fed warpgroup-MMA mainloops do. Here a fence would also wait for this thread's own copies of
    // the steps ahead, still in flight (ncu: the fence and the MMAs' arrive, the most stalled instructions).
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < 4; ++c) wgmma_rs<N>(step, a[c], smem_desc(st + 32 * c), c);
    wgmma_commit();
    if (kb + 1 < nk) {
      mbar_wait(&grp.full[(kb + 1) % STAGES], ((kb + 1) / STAGES) & 1);
      convert(kb + 1, a_next, ws_next);
    }
    wgmma_wait_all();
#pragma unroll
    for (int i = 0; i < N / 2; ++i) wgmma_pin(step[i]);
#pragma unroll
    for (int c = 0; c < 4; ++c)                 // read by the MMAs until the wait: not reused before it
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[c][i])::"memory");
    const float* ts = reinterpret_cast<const float*>(st + TS_OFF);
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      const float2 t = *reinterpret_cast<const float2*>(ts + 8 * j + 2 * q);
      acc[4 * j] = fmaf(step[4 * j], ws[0] * t.x, acc[4 * j]);
      acc[4 * j + 1] = fmaf(step[4 * j + 1], ws[0] * t.y, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(step[4 * j + 2], ws[1] * t.x, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(step[4 * j + 3], ws[1] * t.y, acc[4 * j + 3]);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&grp.empty[s]);   // this warp is done with the stage
    issue(kb + STAGES - 2);
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[c][i] = a_next[c][i];
    ws[0] = ws_next[0];
    ws[1] = ws_next[1];
  }
}

template <int N, class S>
__device__ __forceinline__ void gate_up_group(const uint8_t* x_codes, const float* x_scales, int count,
                                              GroupShared<S>& grp, const uint8_t* e, const float* route_w,
                                              __nv_bfloat16* h, int tile, int D, int F, float limit) {
  // CTA row n = 16 m + r (m = 4 warpgroup + warp): F row 64 tile + 8 m + r % 8 of w1 (r < 8) or of w3
  const size_t wbytes = size_t(F) * D / 2;
  auto weight_row = [&](int n) {
    const int which = (n >> 3) & 1, f = tile * 64 + 8 * (n >> 4) + (n & 7);
    return WeightRow{e + which * wbytes + size_t(f) * (D / 2),
                     e + 3 * wbytes + which * size_t(F) * (D / 32) + size_t(f) * (D / 32)};
  };
  float acc[N / 2];
  tile_gemm<N, S>(x_codes, x_scales, D, count, grp, weight_row, acc);
  const int n = fragment_row(threadIdx.x), f = tile * 64 + 8 * (n >> 4) + (n & 7), q = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {             // gate: fragment row g (acc 4j + e), up: g + 8 (4j + 2 + e)
    const int j = i >> 1, col = 8 * j + 2 * q + (i & 1);
    if (col >= count) continue;
    float gate = __bfloat162float(__float2bfloat16(acc[4 * j + (i & 1)]));
    float up = __bfloat162float(__float2bfloat16(acc[4 * j + 2 + (i & 1)]));
    if (limit > 0.f) {
      up = fminf(fmaxf(up, -limit), limit);
      gate = fminf(gate, limit);
    }
    const int pair = grp.pair_of[col];
    h[size_t(pair) * F + f] = __float2bfloat16(route_w[pair] * (gate / (1.f + __expf(-gate)) * up));
  }
}

template <int N, class S>
__device__ __forceinline__ void down_group(const uint8_t* h_codes, const float* h_scales, int count,
                                           GroupShared<S>& grp, const uint8_t* e, float* ypart, int tile, int D,
                                           int F) {
  const size_t wbytes = size_t(F) * D / 2;
  auto weight_row = [&](int n) {
    const int row = tile * ROWS + n;
    return WeightRow{e + 2 * wbytes + size_t(row) * (F / 2),
                     e + 3 * wbytes + 2 * size_t(F) * (D / 32) + size_t(row) * (F / 32)};
  };
  float acc[N / 2];
  tile_gemm<N, S>(h_codes, h_scales, F, count, grp, weight_row, acc);
  const int row = tile * ROWS + fragment_row(threadIdx.x), q = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const int j = i >> 1, col = 8 * j + 2 * q + (i & 1);
    if (col >= count) continue;
    float* out = ypart + size_t(grp.pair_of[col]) * D + row;
    out[0] = __bfloat162float(__float2bfloat16(acc[4 * j + (i & 1)]));
    out[8] = __bfloat162float(__float2bfloat16(acc[4 * j + 2 + (i & 1)]));
  }
}
// fn(std::integral_constant<int, N>) with the MMA's N for a group of `count` pairs: count rounded up to 32
// (the host never makes a group of more than MAX_N).
template <int MAX_N, class Fn>
__device__ __forceinline__ void with_columns(int count, Fn fn) {
  if constexpr (MAX_N == 64) {
    if (count <= 32) fn(std::integral_constant<int, 32>()); else fn(std::integral_constant<int, 64>());
  } else {
    switch ((count + 31) / 32) {
      case 1: fn(std::integral_constant<int, 32>()); break;
      case 2: fn(std::integral_constant<int, 64>()); break;
      case 3: fn(std::integral_constant<int, 96>()); break;
      default: fn(std::integral_constant<int, 128>());
    }
  }
}

// The kernels' bodies, for either Shape S.
template <class S>
__device__ __forceinline__ void gate_up_kernel(const uint8_t* x_codes, const float* x_scales, const int* pairs,
                                               const int* g_expert, const int* g_start, const int* g_count,
                                               const float* route_w, const uint64_t* table, __nv_bfloat16* h,
                                               int topk, int D, int F, float limit) {
  dsv4::pdl_wait();                             // the codes come from the act_quant launch before
  dsv4::pdl_launch_dependents();
  const int tiles = F / 64, grp_id = blockIdx.x / tiles, tile = blockIdx.x % tiles, count = g_count[grp_id];
  if (count == 0) return;                       // past the chunk's groups (group_pairs pads)
  __shared__ GroupShared<S> grp;
  load_group(pairs, g_start[grp_id], count, topk, grp);
  const uint8_t* e = reinterpret_cast<const uint8_t*>(table[g_expert[grp_id]]);
  with_columns<S::MAX_N>(count, [&](auto n) {
    gate_up_group<decltype(n)::value, S>(x_codes, x_scales, count, grp, e, route_w, h, tile, D, F, limit);
  });
}

template <class S>
__device__ __forceinline__ void down_kernel(const uint8_t* h_codes, const float* h_scales, const int* pairs,
                                            const int* g_expert, const int* g_start, const int* g_count,
                                            const uint64_t* table, float* ypart, int D, int F) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const int tiles = D / ROWS, grp_id = blockIdx.x / tiles, tile = blockIdx.x % tiles, count = g_count[grp_id];
  if (count == 0) return;                       // past the chunk's groups (group_pairs pads)
  __shared__ GroupShared<S> grp;
  load_group(pairs, g_start[grp_id], count, 1, grp);
  const uint8_t* e = reinterpret_cast<const uint8_t*>(table[g_expert[grp_id]]);
  with_columns<S::MAX_N>(count, [&](auto n) {
    down_group<decltype(n)::value, S>(h_codes, h_scales, count, grp, e, ypart, tile, D, F);
  });
}
#endif

}  // namespace moe_prefill

// gate_up. Grid: groups x (F / 64), 256 threads, dynamic shared memory Shape<G>::SHARED_BYTES, G the kernel's
// group size (its name's suffix: none for 128, _g64 for 64). x_codes [T, D] e4m3 in slot order and x_scales
// [T, D / 128] (act_quant of x); h [T * topk, F] bf16, pair-indexed.
// down. Grid: groups x (D / 128), as gate_up. h_codes [T * topk, F] e4m3 in slot order and h_scales
// [T * topk, F / 128] (act_quant of h); ypart [T * topk, D] float32, each pair's output rounded to bf16 as
// the decode kernel rounds each expert's.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV4_MOE_PREFILL_BODY(CALL) CALL
#else
#define DSV4_MOE_PREFILL_BODY(CALL)
#endif
#define DSV4_MOE_PREFILL_WGMMA(G, SUFFIX)                                                                      \
  extern "C" __global__ void __launch_bounds__(moe_prefill::THREADS, moe_prefill::Shape<G>::CTAS_PER_SM)       \
      dsv4_moe_gate_up_wgmma##SUFFIX(const uint8_t* x_codes, const float* x_scales, const int* pairs,          \
                                     const int* g_expert, const int* g_start, const int* g_count,              \
                                     const float* route_w, const uint64_t* table, __nv_bfloat16* h, int topk,  \
                                     int D, int F, float limit) {                                               \
    DSV4_MOE_PREFILL_BODY((moe_prefill::gate_up_kernel<moe_prefill::Shape<G>>(                                 \
        x_codes, x_scales, pairs, g_expert, g_start, g_count, route_w, table, h, topk, D, F, limit)));         \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(moe_prefill::THREADS, moe_prefill::Shape<G>::CTAS_PER_SM)       \
      dsv4_moe_down_wgmma##SUFFIX(const uint8_t* h_codes, const float* h_scales, const int* pairs,             \
                                  const int* g_expert, const int* g_start, const int* g_count,                 \
                                  const uint64_t* table, float* ypart, int D, int F) {                         \
    DSV4_MOE_PREFILL_BODY((moe_prefill::down_kernel<moe_prefill::Shape<G>>(                                    \
        h_codes, h_scales, pairs, g_expert, g_start, g_count, table, ypart, D, F)));                            \
  }
DSV4_MOE_PREFILL_WGMMA(128, )
DSV4_MOE_PREFILL_WGMMA(64, _g64)
