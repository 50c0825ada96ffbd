// A probe build's timeline of every warp of the traced kernels (python -m plugins.build -D DSV4_TRACE=1; read by
// bench/kernel_trace.py), to tell a warp that waits for its weights from one that waits on its own work. Per
// warp: when it started, when it reached its wait for the launch before (its own work before it done), when
// that wait returned, when its walk's loop began, and for each step four marks (the decode MoE: its ring
// stage landed, the first half of its codes converted, the warpgroup's MMAs done, its products added; the FP8
// GEMV: landed and added, the middle two zero), when it ended (the SM's cycles; start and end also in global
// nanoseconds). Lane 0 of each warp writes its record, each launch over the last one's. The default build has
// none of this (DSV4_TRACE_AT expands to nothing).
#pragma once

namespace dsv4_trace {
enum Kernel { kMoeGateUp = 0, kMoeDown = 1, kFp8Gemv = 2 };   // the buffer's first index
}  // namespace dsv4_trace

#ifdef DSV4_TRACE
namespace dsv4_trace {
constexpr int KERNELS = 3, CTAS = 512, WARPS = 8, STEPS = 32;
struct Warp {
  unsigned long long start_ns, end_ns, start, ready, waited, walk, step[STEPS][4], end;
  unsigned sm, steps;
};
}  // namespace dsv4_trace
extern "C" {
__device__ dsv4_trace::Warp dsv4_trace_buffer[dsv4_trace::KERNELS][dsv4_trace::CTAS][dsv4_trace::WARPS];
}

namespace dsv4_trace {
// This warp's record (lane 0 of warps of the first CTAS CTAs), or null.
__device__ __forceinline__ Warp* warp_record(int kernel) {
  const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), warp = threadIdx.x >> 5;
  return (threadIdx.x & 31) == 0 && cta < CTAS && warp < WARPS ? &dsv4_trace_buffer[kernel][cta][warp] : nullptr;
}
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ Warp* start(int kernel) {
  Warp* w = warp_record(kernel);
  if (w) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    w->start_ns = global_ns(), w->start = clock64(), w->sm = sm;
  }
  return w;
}
__device__ __forceinline__ void step(Warp* w, int g, unsigned long long landed, unsigned long long converted,
                                     unsigned long long mma_done) {
  if (w && g < STEPS) {
    w->step[g][0] = landed, w->step[g][1] = converted, w->step[g][2] = mma_done;
    w->step[g][3] = clock64();
  }
}
__device__ __forceinline__ void end(Warp* w, int steps) {
  if (w) w->end = clock64(), w->end_ns = global_ns(), w->steps = steps;
}
}  // namespace dsv4_trace
#define DSV4_TRACE_AT(...) __VA_ARGS__
#else
#define DSV4_TRACE_AT(...)
#endif
