// FP8 block-scaled linear for decode (1-16 rows): DeepSeek's act_quant + fp8_gemm numerics.
//
//   act_quant:  x [M, K] bf16 -> e4m3 codes [M, K] and fp32 scales [M, K/128], the scale of each 128-block
//               2^ceil(log2(amax * (1/448))) (amax floored at 1e-4), codes rounded to nearest even.
//   gemv:       y [M, N] bf16 = (codes * scales) . W[N, K]^T, W e4m3 with E8M0 scales per 128x128 block,
//               on FP8 tensor cores per 128-K block, scaled and summed in fp32, rounded once. W is read once.
//
// Decode is bound by the weight read, so the GEMV is built to keep HBM busy: a persistent grid sized to the
// resident CTAs, each warp streaming 16-byte weight loads one step (4 KB per warp) ahead of its MMAs, across
// row groups without a bubble; and, since the H200 showed it bound by instructions rather than DRAM, with
// few instructions per weight byte (the weights are the MMA's 16-row operand, the tokens its 8 columns). The
// fused form quantises the activation rows itself (each CTA, into shared memory, while its first weight loads
// are in flight): one launch. For many rows x long K the separate act_quant kernel writes the codes once
// instead (dsv4_fp8_gemv_m*), read through L1 by every CTA. The same kernel serves DeepSeek's grouped wo_a
// with its bf16 activation (kGrouped, below). Launch paths never allocate or synchronise, so they can be
// captured in CUDA graphs.
#include <type_traits>

#include "common.cuh"
#include "rows.cuh"
#include "trace.cuh"

using dsv4::e8m0;
using dsv4::mma_e4m3;

// One warp per (row, 128-block): 32 lanes x 4 elements. Writes the e4m3 codes and the block's scale. With
// `mma_slots`, lane l's word goes to word 8 ((l / 2) % 4) + 4 (l % 2) + l / 8 of the block: the order in which
// the prefill MoE kernels take them (csrc/moe_wgmma.cu).
extern "C" __global__ void dsv4_act_quant_fp8(const __nv_bfloat16* __restrict__ x, uint8_t* __restrict__ codes,
                                              float* __restrict__ scales, int rows, int K, int mma_slots) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int blocks_per_row = K / 128;
  if (warp >= rows * blocks_per_row) return;
  const size_t base = size_t(warp / blocks_per_row) * K + size_t(warp % blocks_per_row) * 128 + lane * 4;
  float v[4], amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = __bfloat162float(x[base + i]);
    amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = dsv4::pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
  const float inv = dsv4::pow2_inverse(scale);
  const int word = mma_slots ? 8 * ((lane >> 1) & 3) + 4 * (lane & 1) + (lane >> 3) : lane;
  *reinterpret_cast<uint32_t*>(codes + base + 4 * (word - lane)) =
      dsv4::fp8x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
  if (lane == 0) scales[warp] = scale;
}

namespace {

// The activation's codes and scales a GEMV step reads: in shared memory (the fused forms) at 32-bit shared
// addresses, which a loop keeps in registers (common.cuh lds128), or an act_quant launch's in global memory.
template <bool SHARED>
using act_addr = std::conditional_t<SHARED, uint32_t, uintptr_t>;
template <bool SHARED>
__device__ __forceinline__ act_addr<SHARED> act_at(const void* p) {
  if constexpr (SHARED) return dsv4::smem_addr(p); else return reinterpret_cast<uintptr_t>(p);
}
template <bool SHARED>
__device__ __forceinline__ uint4 act_load128(act_addr<SHARED> a) {
  if constexpr (SHARED) return dsv4::lds128(a); else return *reinterpret_cast<const uint4*>(a);
}
template <bool SHARED>
__device__ __forceinline__ float act_load_f32(act_addr<SHARED> a) {
  if constexpr (SHARED) return __uint_as_float(dsv4::lds32(a)); else return *reinterpret_cast<const float*>(a);
}

constexpr int ROW_PAD = 64;     // values after each shared activation row
constexpr int U = 2;            // 128-K blocks per step
constexpr int CHUNKS = 4 * U;   // 16-byte weight loads per lane per step: [block][half][row g, g + 8]
constexpr int WARPS = 8;
// The plain fused form issues its first loop step's copies early (between its activation's loads and their
// quantise) from this K on: on the H200 wo_b (K 8192) went from 10.6-10.8 to 10.3 us so, the same bits; the
// shared expert's w1 | w3 (4096) gained 0.4-0.5 us alone but cost the decode layer 1.1-1.3 us beside the
// routed experts (bench/results/gemv-early-step-s44-h200.txt).
constexpr int EARLY_STEP_K = 8192;
static_assert(8 * 32 * 4 <= CHUNKS * 32 * 16, "an item's K-slice sums (up to 8 per lane) fit a warp's ring slot");
// What the fused form does to its input rows before quantising them (rows.cuh), where that GEMV is the
// transform's only reader: the query latent's RMSNorm before wq_b and the indexer's wq_b, the shared
// expert's SwiGLU before w2. One launch fewer each; the rows go through shared memory in bf16, as the
// transform's own kernel would have written them.
// kGrouped: DeepSeek's wo_a, each row group of the weight applied to its own group's activation (below).
enum Prologue { kPlain = 0, kNorm = 1, kSwiglu = 2, kGrouped = 3 };
constexpr int NORM_PER_THREAD = 8;  // kNorm: K <= 2048 (the query latent: 1024)

// kGrouped's activation: `rows` bf16 rows of K values (row stride ld) into shared memory as f16 values at
// dst + 2 * (r * (K + pad) + k), each 128-block times 2^-e with 2^e in scales[r * K / 128 + block]: e puts the
// block's largest magnitude in [2^15, 2^16), where every bf16 value is an f16 value (8 significant bits of
// 11; bf16's largest mantissa times 2^15 is 65280, under f16's 65504). So the f16 MMAs multiply the bf16
// activation itself, as DeepSeek's bf16 einsum does, but for values 2^29 times smaller than their block's
// largest, which land in f16's subnormals (an error under 2^-39 of that largest). 16 threads own a block.
__device__ __forceinline__ void widen_to_smem(const __nv_bfloat16* __restrict__ x, int rows, int K, size_t ld,
                                              int pad, uint8_t* dst, float* scales) {
  const int sub = threadIdx.x & 15, kblocks = K / 128, blocks = rows * kblocks;
  // both half-warps of a warp run the loop as long as either has a block (the shuffles take the whole warp)
  for (int b = threadIdx.x >> 4; (b & ~1) < blocks; b += blockDim.x >> 4) {
    const bool live = b < blocks;
    const int r = live ? b / kblocks : 0, k = (live ? b % kblocks : 0) * 128 + sub * 8;
    const uint4 raw = *reinterpret_cast<const uint4*>(x + r * ld + k);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float v[8], amax = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      v[2 * j] = f.x, v[2 * j + 1] = f.y;
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    // e = exponent(amax) - 15, kept where 2^e and 2^-e are normal floats (a block of zeros: any e)
    const int e = min(max(int((__float_as_uint(amax) >> 23) & 0xFF) - 127 - 15, -100), 100);
    const float scale = __uint_as_float(uint32_t(e + 127) << 23), inv = dsv4::pow2_inverse(scale);
    uint4 out;
    uint32_t* words = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __half2 pair = __floats2half2_rn(v[2 * j] * inv, v[2 * j + 1] * inv);
      words[j] = *reinterpret_cast<const uint32_t*>(&pair);
    }
    if (live) {
      *reinterpret_cast<uint4*>(dst + 2 * (size_t(r) * (K + pad) + k)) = out;
      if (sub == 0) scales[b] = scale;
    }
  }
}

// y[m, n] for m < rows on tensor cores. A warp owns 16 weight rows (a row group: the MMA's A operand, rows
// g and g + 8 for lane (g, t)) and a slice of K; the tokens are the B operand's columns (token g for lane
// (g, t); a second MMA for tokens 8-15 when M = 16). `wpr` warps of a CTA split K for the same row group
// and add their sums in shared memory. Per 128-K block the MMA sums are scaled by w_scale * x_scale in
// fp32, as DeepSeek's fp8_gemm. Lane (g, t) loads 16 contiguous weight bytes at k0 + t*16 of its two rows
// and the activation bytes at the same k: the MMAs' k-slots are that permutation of K on both operands,
// so every product pairs the right elements. An item is the CTA's 8 / wpr row groups over all of K; CTA b
// runs items b, b + grid, ...
//
// The weights stream through a ring of `stages` steps (U blocks, 4 KB) per warp in shared memory, filled by
// cp.async, `stages` - 1 steps in flight while the warp multiplies one: with one step in flight in
// registers the H200 showed the kernel bound by latency (ncu: 0.45 instructions issued per cycle, 47% of
// DRAM bandwidth). Each lane reads back only the bytes it copied, so the ring needs no barrier; lanes 0..U-1
// copy the step's scale bytes (their aligned words), which the warp reads after a __syncwarp. The copy
// addresses advance by increments (the loop is bound by its instructions as much as by DRAM).
//
// Where the FP8 MMA is native (sm_89, sm_100, sm_120): m16n8k32 e4m3, two per 64 bytes of K. Where it is
// emulated (sm_90: the compiler converts both operands to f16 for every MMA), the fused form keeps the
// activation's f16 values in shared memory, converts each weight byte once and runs m16n8k16 f16 MMAs,
// four per 64 bytes of K: the same exact products, summed in fp32.
//
// PRO (fused form only): the rows x [rows][ld] go through a prologue first (Prologue above): kNorm with the
// float32 weight `pro_w` and eps `pro_param`; kSwiglu with gate at column 0, up at column `pro_up`, limit
// `pro_param`, K values each. kPlain: x is [rows][K] (ld unused). kGrouped: x is [rows][ld] holding G groups
// of K values, and weight rows g * pro_up .. (g + 1) * pro_up - 1 take group g: the activation goes in as
// bf16 (widen_to_smem; no FP8 round trip, DeepSeek's wo_a), on the f16 MMAs on every GPU. A CTA holds one
// group's rows at a time, so it walks consecutive items (the host keeps an item inside one group, and a CTA's
// items mostly in one) and stages the next group only where its items cross into it.
template <int M, bool FUSED, int PRO = kPlain, int STAGES = 0>
__device__ __forceinline__ void fp8_gemv(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq,
                                         const float* __restrict__ xs, const uint8_t* __restrict__ w,
                                         const uint8_t* __restrict__ w_scale, __nv_bfloat16* __restrict__ y,
                                         int rows, int N, int K, int wpr, int items, int stages,
                                         const float* __restrict__ pro_w, int ld, int pro_up, float pro_param) {
  if (STAGES > 0) stages = STAGES;              // a depth known at compile time: no jump table to wait on it
  DSV4_TRACE_AT(dsv4_trace::Warp* const trace = dsv4_trace::start(dsv4_trace::kFp8Gemv);)
  constexpr int NACC = M > 8 ? 8 : 4;           // c[0..3]: tokens 2t, 2t+1 of rows g, g + 8; c[4..7]: tokens + 8
  constexpr bool f16_path = FUSED && (dsv4::kEmulatedFp8Mma || PRO == kGrouped);
  // dynamic shared memory: the weight ring [WARPS][stages][CHUNKS][32 lanes] (16 B each), the scale ring
  // [WARPS][stages][U] (4 B each); then, FUSED, the activation codes [rows][K + ROW_PAD] (room for 2 bytes
  // each: f16 values on the f16 path, else e4m3 bytes) and their scales [rows][K/128]; then, with a
  // prologue, its bf16 rows [rows][K] from the next 16-byte boundary
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kblocks = K / 128, nkb = kblocks / wpr, part = warp % wpr, kb_begin = part * nkb;
  const int kb_end = kb_begin + nkb, steps = (nkb + U - 1) / U;
  // CTA b's items: b, b + grid, ...; kGrouped: per consecutive ones from b * per
  const int per = (items + int(gridDim.x) - 1) / int(gridDim.x);
  const int my_items = PRO == kGrouped ? max(0, min(per, items - int(blockIdx.x) * per))
                                       : (items - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
  const int total = my_items * steps;
  const int scale_bytes = ((N + 127) / 128) * kblocks;

  uint4* ring = smem + size_t(warp) * stages * CHUNKS * 32 + lane;
  uint32_t* scale_ring = reinterpret_cast<uint32_t*>(smem + size_t(WARPS) * stages * CHUNKS * 32);
  uint8_t* act = reinterpret_cast<uint8_t*>(scale_ring + WARPS * stages * U);
  scale_ring += warp * stages * U;
  const uint8_t* codes = FUSED ? act : xq;
  const float* scales = FUSED ? reinterpret_cast<const float*>(act + 2 * rows * (K + ROW_PAD)) : xs;
  const int ldx = FUSED ? K + ROW_PAD : K;
  // the token columns this lane feeds to B; past `rows` a valid row's values, in columns never written
  const int tok0 = min(g, rows - 1), tok1 = min(g + 8, rows - 1);

  const int groups_per_item = WARPS / wpr, my_group = warp / wpr;
  auto item_index = [&](int item) {
    return PRO == kGrouped ? int(blockIdx.x) * per + item : int(blockIdx.x) + item * int(gridDim.x);
  };
  auto first_row = [&](int item) { return (item_index(item) * groups_per_item + my_group) * 16; };
  // kGrouped: the activation group of the CTA's item (the same for all its warps)
  auto group_of = [&](int item) { return item_index(item) * groups_per_item * 16 / pro_up; };

  // The copy cursor: the next step to fetch, its ring slot and addresses (advanced by increments).
  struct Cursor {
    int item, step, slot, n0, kb, scale;        // kb: the step's first block; scale: its byte in w_scale
    const uint8_t *row_g, *row_g8;
  } nx;
  auto start_item = [&](Cursor& c) {
    c.n0 = first_row(c.item), c.kb = kb_begin;
    c.scale = (c.n0 / 128) * kblocks + kb_begin;
    c.row_g = w + size_t(min(c.n0 + g, N - 1)) * K + kb_begin * 128 + t * 16;
    c.row_g8 = w + size_t(min(c.n0 + g + 8, N - 1)) * K + kb_begin * 128 + t * 16;
  };
  nx.item = 0, nx.step = 0, nx.slot = 0;
  start_item(nx);
  auto issue = [&]() {                           // one step's copies, committed as one group (maybe empty)
    if (nx.item < my_items && nx.n0 < N) {       // warp-uniform
      uint4* dst = ring + nx.slot * CHUNKS * 32;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint32_t bytes = nx.kb + u < kb_end ? 16 : 0;       // zero-filled past the warp's blocks
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dsv4::cp_async16(dst + (4 * u + 2 * h) * 32, nx.row_g + u * 128 + h * 64, bytes);
          dsv4::cp_async16(dst + (4 * u + 2 * h + 1) * 32, nx.row_g8 + u * 128 + h * 64, bytes);
        }
      }
      if (lane < U && nx.kb + lane < kb_end) {
        const int word = (nx.scale + lane) & ~3;
        dsv4::cp_async4(scale_ring + nx.slot * U + lane, w_scale + word, min(4, scale_bytes - word));
      }
    }
    dsv4::cp_async_commit();
    if (++nx.slot == stages) nx.slot = 0;
    if (++nx.step == steps) {
      nx.step = 0, ++nx.item;
      start_item(nx);
    } else {
      nx.kb += U, nx.scale += U, nx.row_g += U * 128, nx.row_g8 += U * 128;
    }
  };

  for (int p = 0; p < stages - 1; ++p) issue();  // in flight while the activations are quantised
  bool early = false;                           // the first loop step's copies issued (early_step)
  DSV4_TRACE_AT(if (trace) trace->ready = clock64();)
  dsv4::pdl_wait();                              // x (or its codes) come from the previous kernels
  DSV4_TRACE_AT(if (trace) trace->waited = clock64();)
  dsv4::pdl_launch_dependents();
  // kGrouped: group g's rows into the activation's place
  auto stage_group = [&](int g) {
    widen_to_smem(x + size_t(g) * K, rows, K, ld, ROW_PAD, act, const_cast<float*>(scales));
  };
  if constexpr (PRO == kGrouped) {
    if (my_items > 0) stage_group(group_of(0));
    __syncthreads();
  } else if (FUSED) {
    const __nv_bfloat16* src = x;
    if (PRO != kPlain) {
      __shared__ float norm_scratch[WARPS];
      const uintptr_t end = reinterpret_cast<uintptr_t>(scales + rows * kblocks);
      __nv_bfloat16* staged = reinterpret_cast<__nv_bfloat16*>((end + 15) & ~uintptr_t(15));
      for (int r = 0; r < rows; ++r) {
        if (PRO == kNorm)
          dsv4_rows::rms_norm_row<NORM_PER_THREAD>(x + size_t(r) * ld, pro_w, staged + r * K, K, pro_param,
                                                   norm_scratch);
        else
          dsv4_rows::swiglu_row(x + size_t(r) * ld, pro_up, K, pro_param, staged + r * K);
        __syncthreads();                         // norm_scratch is reused by the next row
      }
      src = staged;
    }
    // A long plain row (wo_b's): the first loop step's copies issued as soon as the row's loads are, so that a
    // step more streams during the quantise (issued before those loads, they delayed them: session 41).
    const auto early_step = [&] {
      if (PRO == kPlain && K >= EARLY_STEP_K) {
        issue();
        early = true;
      }
    };
    dsv4::quantise_to_smem<false, f16_path>(src, rows * K, K, ROW_PAD, act, const_cast<float*>(scales), early_step);
    __syncthreads();
  }
  // Where this lane's B fragments start in the activation rows (at the warp's first block; bytes per value
  // `vb`), where its tokens' scales do, and its ring and scale words: found once and kept in registers
  // (act_addr), not rebuilt in every block (the step is bound by its instructions). A step's are these plus
  // its offset along K.
  constexpr int vb = f16_path ? 2 : 1;
  act_addr<FUSED> b_row0 = act_at<FUSED>(codes + vb * (size_t(tok0) * ldx + kb_begin * 128 + t * 16));
  act_addr<FUSED> b_row1 = act_at<FUSED>(codes + vb * (size_t(tok1) * ldx + kb_begin * 128 + t * 16));
  act_addr<FUSED> xs_row[NACC / 2];              // tokens 2t, 2t + 1 (+ 8)'s scales from kb_begin; 0 past `rows`
#pragma unroll                                   // (fused: the ring comes first, so no scale is at address 0)
  for (int j = 0; j < NACC / 2; ++j) {
    const int tok = 2 * t + (j & 1) + (j >= 2 ? 8 : 0);
    xs_row[j] = tok < rows ? act_at<FUSED>(scales + tok * kblocks + kb_begin) : 0;
  }
  uint32_t ring_at = dsv4::smem_addr(ring), scale_at = dsv4::smem_addr(scale_ring);
  float total_c[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) total_c[i] = 0.f;
  int item = 0, step = 0, slot = 0;              // the step being multiplied and its ring slot
  int n0 = first_row(0), scale0 = (n0 / 128) * kblocks + kb_begin;
  DSV4_TRACE_AT(if (trace) trace->walk = clock64();)
  for (int gstep = 0; gstep < total; ++gstep) {
    __syncwarp();                                // the warp has read the scale words the next copy replaces
    if (gstep > 0 || !early) issue();
    dsv4::cp_async_wait_pending(stages - 1);     // this step's group has landed
    __syncwarp();                                // lanes 0..U-1's scale words are visible to the warp
    DSV4_TRACE_AT(const unsigned long long landed = clock64();)
    dsv4::keep_in_register(b_row0), dsv4::keep_in_register(b_row1);
    dsv4::keep_in_register(ring_at), dsv4::keep_in_register(scale_at);
#pragma unroll
    for (int j = 0; j < NACC / 2; ++j) dsv4::keep_in_register(xs_row[j]);
    const uint32_t src = ring_at + slot * CHUNKS * 32 * 16;
    const int kb0 = kb_begin + step * U;
    const act_addr<FUSED> b_step0 = b_row0 + vb * step * U * 128, b_step1 = b_row1 + vb * step * U * 128;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u;
      if (kb >= kb_end) break;
      float c[2][NACC];                          // one MMA chain per 64-K half
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) c[h][i] = 0.f;
        const int k = u * 128 + h * 64;          // from the step's first block, past the lane's t * 16
        const uint4 w0 = dsv4::lds128(src + (4 * u + 2 * h) * 512), w8 = dsv4::lds128(src + (4 * u + 2 * h + 1) * 512);
        float(&c0)[4] = *reinterpret_cast<float(*)[4]>(c[h]);
        float(&c1)[4] = *reinterpret_cast<float(*)[4]>(c[h] + 4);
        if (f16_path) {
          // f16 MMA i (of 4) takes bytes 4i .. 4i+3 of the 16: k-slots 2t, 2t+1 <- bytes 4i, 4i+1 and 2t+8,
          // 2t+9 <- 4i+2, 4i+3; the activation's f16 words 2i, 2i+1 hold the same positions
          const uint32_t a[2][4] = {{w0.x, w0.y, w0.z, w0.w}, {w8.x, w8.y, w8.z, w8.w}};
          const uint4 b0lo = act_load128<FUSED>(b_step0 + 2 * k), b0hi = act_load128<FUSED>(b_step0 + 2 * k + 16);
          const uint32_t f0[8] = {b0lo.x, b0lo.y, b0lo.z, b0lo.w, b0hi.x, b0hi.y, b0hi.z, b0hi.w};
          uint32_t f1[8] = {};
          if (M > 8) {
            const uint4 b1lo = act_load128<FUSED>(b_step1 + 2 * k), b1hi = act_load128<FUSED>(b_step1 + 2 * k + 16);
            f1[0] = b1lo.x, f1[1] = b1lo.y, f1[2] = b1lo.z, f1[3] = b1lo.w;
            f1[4] = b1hi.x, f1[5] = b1hi.y, f1[6] = b1hi.z, f1[7] = b1hi.w;
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t a0 = dsv4::e4m3x2_to_f16x2(a[0][i]), a1 = dsv4::e4m3x2_to_f16x2(a[1][i]);
            const uint32_t a2 = dsv4::e4m3x2_to_f16x2<true>(a[0][i]), a3 = dsv4::e4m3x2_to_f16x2<true>(a[1][i]);
            dsv4::mma_f16(c0, a0, a1, a2, a3, f0[2 * i], f0[2 * i + 1]);
            if (M > 8) dsv4::mma_f16(c1, a0, a1, a2, a3, f1[2 * i], f1[2 * i + 1]);
          }
        } else {
          const uint4 b0 = act_load128<FUSED>(b_step0 + k);
          mma_e4m3(c0, w0.x, w8.x, w0.y, w8.y, b0.x, b0.y);
          mma_e4m3(c0, w0.z, w8.z, w0.w, w8.w, b0.z, b0.w);
          if (M > 8) {
            const uint4 b1 = act_load128<FUSED>(b_step1 + k);
            mma_e4m3(c1, w0.x, w8.x, w0.y, w8.y, b1.x, b1.y);
            mma_e4m3(c1, w0.z, w8.z, w0.w, w8.w, b1.z, b1.w);
          }
        }
      }
      const int at = scale0 + step * U + u;
      const float sw = e8m0(dsv4::lds32(scale_at + (slot * U + u) * 4) >> (8 * (at & 3)));
      float sws[NACC / 2];                       // sw times tokens 2t, 2t + 1 (+ 8)'s scales, each loaded once
#pragma unroll
      for (int j = 0; j < NACC / 2; ++j)
        sws[j] = xs_row[j] ? sw * act_load_f32<FUSED>(xs_row[j] + (step * U + u) * 4) : 0.f;
#pragma unroll
      for (int i = 0; i < NACC; ++i)             // c[.][i]: token 2t + (i & 1) (+ 8 for i >= 4)
        total_c[i] = fmaf(c[0][i] + c[1][i], sws[(i & 1) + (i >= 4 ? 2 : 0)], total_c[i]);
    }
    DSV4_TRACE_AT(dsv4_trace::step(trace, gstep, landed, 0, 0);)
    const int used = slot;
    if (++slot == stages) slot = 0;
    if (step == steps - 1) {                     // the item's last step: add the K slices, write y
      // The K slices' sums meet in the ring slot each warp has just multiplied: no copy is in flight into it
      // until the next iteration's issue(), after the barrier below (a static array of them took 4-8 KB that
      // wo_b's third ring stage needs beside its 8192-wide activation at two CTAs an SM).
      auto sums_of = [&](int w) { return reinterpret_cast<float*>(smem + (size_t(w) * stages + used) * CHUNKS * 32); };
      if (wpr > 1) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) sums_of(warp)[i * 32 + lane] = total_c[i];
        __syncthreads();
      }
      if (part == 0 && n0 < N) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) {
          float v = total_c[i];
          for (int p = 1; p < wpr; ++p) v += sums_of(warp + p)[i * 32 + lane];
          const int m = 2 * t + (i & 1) + (i >= 4 ? 8 : 0), n = n0 + g + (i & 2 ? 8 : 0);
          if (m < rows && n < N) y[size_t(m) * N + n] = __float2bfloat16(v);
        }
      }
      if (wpr > 1) __syncthreads();
#pragma unroll
      for (int i = 0; i < NACC; ++i) total_c[i] = 0.f;
      step = 0, ++item;
      n0 = first_row(item), scale0 = (n0 / 128) * kblocks + kb_begin;
      if constexpr (PRO == kGrouped) {
        if (item < my_items && group_of(item) != group_of(item - 1)) {
          __syncthreads();                       // every warp is done with the previous group's rows
          stage_group(group_of(item));
          __syncthreads();
        }
      }
    } else {
      ++step;
    }
  }
  DSV4_TRACE_AT(dsv4_trace::end(trace, total);)
}

}  // namespace

#define DSV4_FP8_GEMV(NAME, M, FUSED, PRO)                                                                   \
  extern "C" __global__ void __launch_bounds__(256, 2) NAME(                                                 \
      const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ xq, const float* __restrict__ xs,     \
      const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws, __nv_bfloat16* __restrict__ y, int rows, \
      int N, int K, int wpr, int items, int stages, const float* __restrict__ pro_w, int ld, int pro_up,     \
      float pro_param) {                                                                                     \
    if (stages == 3) /* every Flash GEMV's ring on the H200 (plugins/fp8_linear.py ring_stages) */           \
      fp8_gemv<M, FUSED, PRO, 3>(x, xq, xs, w, ws, y, rows, N, K, wpr, items, stages, pro_w, ld, pro_up, pro_param); \
    else                                                                                                     \
      fp8_gemv<M, FUSED, PRO>(x, xq, xs, w, ws, y, rows, N, K, wpr, items, stages, pro_w, ld, pro_up, pro_param); \
  }
DSV4_FP8_GEMV(dsv4_fp8_gemv_m8, 8, false, kPlain)
DSV4_FP8_GEMV(dsv4_fp8_gemv_m16, 16, false, kPlain)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m8, 8, true, kPlain)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_m16, 16, true, kPlain)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_norm_m8, 8, true, kNorm)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_swiglu_m8, 8, true, kSwiglu)
DSV4_FP8_GEMV(dsv4_fp8_gemv_fused_grouped_m8, 8, true, kGrouped)
