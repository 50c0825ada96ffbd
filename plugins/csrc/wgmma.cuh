// Hopper's warpgroup MMA (sm_90a): the fences and waits around wgmma.mma_async, shared by the prefill
// (moe_wgmma.cu) and decode (moe_decode_wgmma.cu) expert kernels and the decode GEMV (fp8_gemv_wgmma.cu), and
// the e4m3 MMAs with A from registers that the decode kernels take (N = 8: the experts', 16: the GEMV's; the
// prefill kernel writes its own, N from 32 to 128). Only where the architecture has it.
#pragma once

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// shared-memory writes by ordinary stores and cp.async, made visible to the async proxy wgmma reads through
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

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

// d (+)= A (64 x 32 e4m3 from registers) . B (32 x 16 from the descriptor); without ACCUMULATE d is only
// written (so it needs no zeros first).
#define DSV4_GW_MMA(OUT, SCALE_D)                                                                             \
  asm volatile(                                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                                                   \
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, " \
      "p, 1, 1;\n}\n"                                                                                        \
      : OUT(d[0]), OUT(d[1]), OUT(d[2]), OUT(d[3]), OUT(d[4]), OUT(d[5]), OUT(d[6]), OUT(d[7])                 \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_m64n16k32_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (ACCUMULATE)
    DSV4_GW_MMA("+f", "1");
  else
    DSV4_GW_MMA("=f", "0");
}
#undef DSV4_GW_MMA

}  // namespace
#endif
