// Weights pulled into L2 ahead of the kernel that streams them: while the decode step runs its short,
// latency-bound kernels (norms, hyper-connections, routing, attention over a few hundred rows) the memory
// is nearly idle; a prefetch issued at their start lets the next GEMV read from L2.
// A prefetch is only a hint: it returns nothing and writes nothing, so the kernel may exit before the
// lines arrive (bulk prefetches are fire-and-forget), and nothing after it waits for them. It still waits
// for the kernel before it (pdl_wait): launched early, it would otherwise end before that kernel, and the
// kernel after it would take that end for its predecessors' (common.cuh).
#include <stdint.h>

#include "common.cuh"

namespace dsv4_l2 {

constexpr uint32_t kBulkChunk = 64 * 1024;   // bytes per cp.async.bulk.prefetch (a multiple of 16)

}  // namespace dsv4_l2

// `bytes` from `p` (16-byte aligned), chunk after chunk over the grid's threads: TMA bulk prefetches on
// sm_90+, one prefetch.global.L2 per 128-byte line before that.
extern "C" __global__ void dsv4_l2_prefetch(const uint8_t* __restrict__ p, unsigned long long bytes) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const unsigned long long thread = blockIdx.x * blockDim.x + threadIdx.x, threads = gridDim.x * blockDim.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned long long chunk = dsv4_l2::kBulkChunk;
  for (unsigned long long at = thread * chunk; at < bytes; at += threads * chunk) {
    const uint32_t size = uint32_t(bytes - at < chunk ? bytes - at : chunk) & ~15u;
    if (size) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p + at), "r"(size) : "memory");
  }
#else
  for (unsigned long long at = thread * 128; at < bytes; at += threads * 128)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + at));
#endif
}

// The same with one prefetch.global.L2::evict_last per 128-byte line (to compare with the bulk form).
extern "C" __global__ void dsv4_l2_prefetch_lines(const uint8_t* __restrict__ p, unsigned long long bytes) {
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  const unsigned long long thread = blockIdx.x * blockDim.x + threadIdx.x, threads = gridDim.x * blockDim.x;
  for (unsigned long long at = thread * 128; at < bytes; at += threads * 128) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(p + at));
#else
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + at));
#endif
  }
}
