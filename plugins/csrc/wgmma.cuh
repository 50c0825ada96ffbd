// Hopper's warpgroup MMA (sm_90a): the fences and waits around wgmma.mma_async, shared by the prefill
// (moe_wgmma.cu) and decode (moe_decode_wgmma.cu) expert kernels. Only where the architecture has it.
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

}  // namespace
#endif
