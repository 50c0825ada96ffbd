// Helpers shared by the project's kernels: DeepSeek's power-of-two block scales, E8M0 decoding, the FP8
// tensor-core MMA, and DeepSeek's FP8 act_quant of a short activation row into shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace dsv4 {

// 2^ceil(log2(amax * inv_qmax)) by exponent bits, as DeepSeek's fast_round_scale.
__device__ __forceinline__ float pow2_ceil_scale(float amax, float inv_qmax) {
  const uint32_t bits = __float_as_uint(amax * inv_qmax);
  const int exp = int((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0);
  return __uint_as_float(uint32_t(exp + 127) << 23);
}

// Programmatic dependent launch (sm_90+; the host launches with programmatic stream serialisation). A
// kernel may read immutable weights before pdl_wait(); activations written by the previous kernel, and
// every global write, come after it. pdl_launch_dependents() lets the next kernel's CTAs start (and
// prefetch their weights) while this one finishes; called after pdl_wait(), so by the time any dependent
// starts, every kernel before this one has completed.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A barrier among `threads` threads (whole warps) of the CTA, for warps that go on while others have left.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The sum of v over the CTA's `dim` threads (thread c holding one value each, dim a multiple of 32), the
// warps' sums added in warp order; every thread calls it and gets the sum (it synchronises on scratch: dim / 32
// floats of shared memory, which the caller may write again only after another barrier).
__device__ __forceinline__ float block_sum(float v, int c, int dim, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (c % 32 == 0) scratch[c / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < dim / 32; ++w) total += scratch[w];
  return total;
}

// x rounded to bf16 and back: the rounding a bf16 tensor between two torch ops applies.
__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

// The RoPE table row of query row r: rot gathered per row ([rows, rope/2, 2]: row r), or with `pos` the layer's
// whole table ([max_len, rope/2, 2]) read at pos[r] (the decode step's, where the gather was a launch of its own).
__device__ __forceinline__ long long rot_row(const int64_t* __restrict__ pos, int r) {
  return pos == nullptr ? r : pos[r];
}

// A shared-memory pointer as the 32-bit address PTX takes.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Loads from shared memory at a 32-bit shared address (smem_addr). Where a loop keeps such addresses in
// registers (pinned with keep_in_register), ptxas does not rebuild them from the shared window's base in every
// iteration, as it did for generic pointers into shared memory in the FP8 GEMV's step.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
template <class T>
__device__ __forceinline__ void keep_in_register(T& v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "a 32- or 64-bit value");
  if constexpr (sizeof(T) == 4)
    asm volatile("" : "+r"(v));
  else
    asm volatile("" : "+l"(v));
}

// 16 bytes global -> shared without registers (cp.async); `bytes` < 16 zero-fills the rest (0: all zeros,
// `src` still a valid address). cp_async_wait_all() waits for this thread's copies.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// 4 bytes global -> shared (`src` 4-byte aligned; `bytes` < 4 reads that many and zero-fills the rest).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
// Closes this thread's copies issued since the last commit into one group (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` (0..7) of this thread's newest groups are still in flight. The PTX takes an
// immediate; a ring whose depth is a launch parameter (the GPU's shared memory decides it) picks it here.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  switch (pending) {
#define DSV4_WAIT_GROUP(N) \
  case N: asm volatile("cp.async.wait_group " #N ";\n" ::: "memory"); break;
    DSV4_WAIT_GROUP(0) DSV4_WAIT_GROUP(1) DSV4_WAIT_GROUP(2) DSV4_WAIT_GROUP(3)
    DSV4_WAIT_GROUP(4) DSV4_WAIT_GROUP(5) DSV4_WAIT_GROUP(6)
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory");
#undef DSV4_WAIT_GROUP
  }
}

// 1 / s for a power of two s = 2^e with |e| < 127, exactly (as 1.0f / s) from its exponent bits: 2^-e.
__device__ __forceinline__ float pow2_inverse(float s) { return __uint_as_float((254u << 23) - __float_as_uint(s)); }

// An E8M0 scale byte as a float: 2^(b - 127).
__device__ __forceinline__ float e8m0(uint32_t b) { return __uint_as_float((b & 0xFFu) << 23); }
// A warp streaming one weight row: chunk c is 16 bytes per lane at row[c * 32 + lane]. Loads chunks c0 ..
// c0 + N - 1 (zeros past `chunks`) so that all N are in flight at once.
template <int N>
__device__ __forceinline__ void load_row_chunks(const uint4* __restrict__ row, int c0, int chunks, int lane,
                                                uint4 (&raw)[N]) {
#pragma unroll
  for (int u = 0; u < N; ++u) raw[u] = c0 + u < chunks ? __ldg(row + (c0 + u) * 32 + lane) : make_uint4(0, 0, 0, 0);
}

// The sum over a warp's lanes, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// c += A (16 x K, row) . B (K x 8, col) on tensor cores with fp32 accumulators, for the input types in
// SHAPE_TYPES; A is four 32-bit registers per lane, B two (the PTX fragment layouts).
#define DSV4_MMA_16X8(NAME, SHAPE_TYPES)                                                                   \
  __device__ __forceinline__ void NAME(float(&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,   \
                                       uint32_t b0, uint32_t b1) {                                         \
    asm volatile("mma.sync.aligned." SHAPE_TYPES " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                  \
  }
DSV4_MMA_16X8(mma_e4m3, "m16n8k32.row.col.f32.e4m3.e4m3.f32")   // K 32, e4m3 (sm_89+)
DSV4_MMA_16X8(mma_f16, "m16n8k16.row.col.f32.f16.f16.f32")      // K 16, f16
DSV4_MMA_16X8(mma_bf16, "m16n8k16.row.col.f32.bf16.bf16.f32")   // K 16, bf16
#undef DSV4_MMA_16X8

// Two e4m3 codes (the low 16 bits of `codes`, or with HIGH its high 16 bits; the lower byte first) as their
// exact f16 values (f16x2), in one conversion (sm_89+): cuda_fp8.h's wrapper returns two halves that the
// compiler then repacks. The halves are split by a mov, so that ptxas reads the high one in place (the
// conversion's .H1 operand); handed `codes >> 16` it spent a shift on every high pair.
template <bool HIGH = false>
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t codes) {
  uint32_t out;
  if constexpr (HIGH)
    asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %1;\ncvt.rn.f16x2.e4m3x2 %0, hi;\n}\n" : "=r"(out) : "r"(codes));
  else
    asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %1;\ncvt.rn.f16x2.e4m3x2 %0, lo;\n}\n" : "=r"(out) : "r"(codes));
  return out;
}

// Whether the FP8 MMA runs natively: Hopper has no FP8 mma.sync (its compiler emulates one with two f16
// MMAs and conversions of both operands: the fused m8 GEMV's sm_90a SASS, session 6), Ada and Blackwell do.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr bool kEmulatedFp8Mma = true;
#else
constexpr bool kEmulatedFp8Mma = false;
#endif

__device__ __forceinline__ uint32_t fp8x4(float a, float b, float c, float d) {
  // satfinite = DeepSeek's clamp to [-448, 448]; round to nearest even.
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

// DeepSeek's FP8 act_quant of n bf16 values (n % 128 == 0, 128-blocks never straddle rows) by the whole
// CTA: codes to shared memory (byte i of block b at b * 128 + i, plus `pad` bytes after every `row` values),
// one power-of-two scale per 128-block to `scales`. 16 threads own a 128-block, 8 values each.
// SLOTS: store each thread's 8 codes as (v0 v2 v4 v6 | v1 v3 v5 v7), the order the MXFP4 kernels' MMA
// fragments take (see moe_experts.cu); otherwise in natural order. F16 (natural order only): store each
// code's exact f16 value instead (2 bytes each, at byte 2 * i; `pad` counts values), for f16 MMAs. B_TILE (with
// SLOTS, `pad` 0, one row): store 32-K block k as column k % 8 of wgmma's B operand (the other columns left
// as they are), K-major 8-row x 16-byte core matrices without swizzle, two per 32 K (block k at k * 256: its
// slots 0-15 of the 8 columns, then 16-31); eight MMAs over consecutive blocks, accumulating, then leave each
// block's product in a column of its own. CORE (natural order, `pad` 0, one row): byte i at (i / 16) * 128 +
// i % 16, the row as one token of a K-major wgmma operand without swizzle (16-byte rows of 8-row core matrices,
// 128 bytes apart along K; the caller offsets `codes` to the token's row of its core matrices).
// after_loads(): run once by every thread, right after its first loads of x are issued (or at the end where it
// has none), for work that should queue behind those loads (the FP8 GEMV's early ring step).
struct NothingAfterLoads {
  __device__ __forceinline__ void operator()() const {}
};
template <bool SLOTS, bool F16 = false, bool B_TILE = false, bool CORE = false, class AfterLoads = NothingAfterLoads>
__device__ __forceinline__ void quantise_to_smem(const __nv_bfloat16* __restrict__ x, int n, int row, int pad,
                                                 uint8_t* codes, float* scales, AfterLoads after_loads = {}) {
  constexpr int BATCH = 4;                       // 128-blocks per thread group in flight at once
  const int sub = threadIdx.x & 15, groups = blockDim.x >> 4;
  const int blocks = n / 128;
  bool loads_first = true;                       // after_loads() not yet run
  // The loop bound is warp-uniform (both half-warps test the first one's block) for the shuffles below.
  for (int b0 = threadIdx.x >> 4; (b0 & ~1) < blocks; b0 += groups * BATCH) {
    uint4 raw[BATCH];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int b = b0 + i * groups;
      raw[i] = b < blocks ? *reinterpret_cast<const uint4*>(x + size_t(b) * 128 + sub * 8) : make_uint4(0, 0, 0, 0);
    }
    if (loads_first) after_loads(), loads_first = false;
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int b = b0 + i * groups;
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[i]);
      float v[8], amax = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(h[j]);
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
        amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      // scale in [2^-22, 2^120] (amax floored at 1e-4, at most bf16's largest): its inverse is exact, so
      // v * inv == v / scale
      const float scale = pow2_ceil_scale(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
      const float inv = pow2_inverse(scale);
      uint2 out;
      if (SLOTS) {
        out.x = fp8x4(v[0] * inv, v[2] * inv, v[4] * inv, v[6] * inv);
        out.y = fp8x4(v[1] * inv, v[3] * inv, v[5] * inv, v[7] * inv);
      } else {
        out.x = fp8x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
        out.y = fp8x4(v[4] * inv, v[5] * inv, v[6] * inv, v[7] * inv);
      }
      if (b < blocks) {
        const int at = b * 128 + sub * 8;
        int r = 0;                                 // at / row without a division (decode: a few rows at most)
        if (pad)
          for (int end = row; end <= at; end += row) ++r;
        if (B_TILE) {                              // slots 8q .. 8q + 3 are k-slots 4q .., 8q + 4 .. are 16 + 4q ..
          uint8_t* dst = codes + (at >> 5) * 256 + ((at >> 5) & 7) * 16 + ((at & 31) >> 1);
          *reinterpret_cast<uint32_t*>(dst) = out.x;
          *reinterpret_cast<uint32_t*>(dst + 128) = out.y;
        } else if (CORE) {
          *reinterpret_cast<uint2*>(codes + (at >> 4) * 128 + (at & 15)) = out;
        } else if (F16) {
          const uint4 wide = make_uint4(e4m3x2_to_f16x2(out.x), e4m3x2_to_f16x2<true>(out.x),
                                        e4m3x2_to_f16x2(out.y), e4m3x2_to_f16x2<true>(out.y));
          *reinterpret_cast<uint4*>(codes + 2 * (at + r * pad)) = wide;
        } else {
          *reinterpret_cast<uint2*>(codes + at + r * pad) = out;
        }
        if (sub == 0) scales[b] = scale;
      }
    }
  }
  if (loads_first) after_loads();
}

}  // namespace dsv4
