// Hopper's warpgroup MMA (sm_90a): the fences and waits around wgmma.mma_async, shared by the prefill
// (moe_wgmma.cu) and decode (moe_decode_wgmma.cu) expert kernels and the decode GEMV (fp8_gemv_wgmma.cu); the
// e4m3 MMA with A from registers that the decode experts take (N = 8; the prefill kernel writes its own, N from
// 32 to 128), and the GEMV's with both operands from shared memory. Only where the architecture has it.
#pragma once

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// shared-memory writes by ordinary stores and cp.async, made visible to the async proxy wgmma reads through
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// A shared-memory descriptor of a K-major operand in 8-row x 16-byte core matrices, no swizzle: the next core
// matrix along K `lead` bytes on, the next along M or N `stride` bytes on.
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t addr, uint32_t lead, uint32_t stride) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lead >> 4) << 16) | (uint64_t(stride >> 4) << 32);
}

// Pins a register's reads and writes on one side of an asynchronous wgmma that writes it (the compiler
// does not know the MMA writes it later than its issue).
__device__ __forceinline__ void wgmma_pin(float& v) { asm volatile("" : "+f"(v)::"memory"); }

// d = A (64 x 32, e4m3 from registers: the warp's 16 rows) . B (32 x 8 from the descriptor), + d where
// ACCUMULATE (else d is only written).
template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_m64n8k32_rs(float (&d)[4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(int(ACCUMULATE)));
}

// d (+)= A (64 x 32 e4m3) . B (32 x NT e4m3), both from descriptors, NT = 8 or 16; without ACCUMULATE d is
// only written (so it needs no zeros first).
#define DSV4_SS_MMA(SHAPE, SCALE_D, OPERANDS)                                        \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\nwgmma.mma_async.sync.aligned." SHAPE \
  ".f32.e4m3.e4m3 " OPERANDS ", p, 1, 1;\n}\n"
template <int NT, bool ACCUMULATE>
__device__ __forceinline__ void wgmma_e4m3_ss(float (&d)[NT / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(NT == 8 || NT == 16, "the decode GEMV's token counts");
  if constexpr (NT == 8 && ACCUMULATE)
    asm volatile(DSV4_SS_MMA("m64n8k32", "1", "{%0,%1,%2,%3}, %4, %5")
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "l"(desc_a), "l"(desc_b) : "memory");
  else if constexpr (NT == 8)
    asm volatile(DSV4_SS_MMA("m64n8k32", "0", "{%0,%1,%2,%3}, %4, %5")
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "l"(desc_a), "l"(desc_b) : "memory");
  else if constexpr (ACCUMULATE)
    asm volatile(DSV4_SS_MMA("m64n16k32", "1", "{%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9")
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "l"(desc_a), "l"(desc_b) : "memory");
  else
    asm volatile(DSV4_SS_MMA("m64n16k32", "0", "{%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9")
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
                 : "l"(desc_a), "l"(desc_b) : "memory");
}
#undef DSV4_SS_MMA

}  // namespace
#endif
