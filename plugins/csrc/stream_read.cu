// Calibration, not a model kernel: the plainest fast read of a buffer in one launch, so that a benchmark can
// say what any kernel reading those bytes once could reach in the same harness (bench/read_ceiling.py). Each
// thread issues its first eight 16-byte loads (bypassing L1) before waiting for the kernel before it, as the
// decode kernels issue their first weight copies before waiting for their input (programmatic dependent
// launch), then reads on, eight loads in flight, grid-stride over the resident CTAs. CTA b writes the XOR of
// the words it read to sink[b] (a plain store: one atomic per warp on one word serialised into microseconds),
// so the loads cannot be dropped and a test can check that every word was read once.
// Routed (ids given): the read starts only after the wait and after finding its bytes through two dependent
// reads, an expert id and then its table entry (src is then an offset from that entry), as the decode MoE's
// gate_up must: the ceiling of a kernel that learns what to read from the kernel before it.
#include "common.cuh"

namespace {

#ifndef READ_UNROLL
#define READ_UNROLL 8  // loads in flight per thread
#endif
#ifndef READ_MIN_CTAS
#define READ_MIN_CTAS 1  // __launch_bounds__'s CTAs per SM
#endif

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

}  // namespace

// Grid: any (the resident CTAs for speed), 256 threads. sink [gridDim.x] uint32. ids, table: null, or the
// routed read's id (ids[0]) and table of base addresses.
extern "C" __global__ void __launch_bounds__(256, READ_MIN_CTAS)
    dsv4_stream_read(const uint4* __restrict__ src, long long n16, unsigned* __restrict__ sink,
                     const int* __restrict__ ids, const unsigned long long* __restrict__ table) {
  __shared__ unsigned warp_xor[8];
  __shared__ const uint4* routed_src;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = 0u;
  uint4 v[READ_UNROLL];
  auto load_round = [&] {                      // the next READ_UNROLL loads of this thread, from i
#pragma unroll
    for (int u = 0; u < READ_UNROLL; ++u)
      v[u] = i + u * stride < n16 ? load_stream(src + i + u * stride) : make_uint4(0, 0, 0, 0);
  };
  // The plain read's first round before the wait: ptxas may move these read-only loads below the wait, as it
  // did until session 39 (tests/test_pdl_prefetch_sass.py checks the order in the SASS).
  const bool routed = ids != nullptr;
  if (!routed) load_round();
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  if (routed) {
    if (threadIdx.x == 0) routed_src = reinterpret_cast<const uint4*>(table[ids[0]] + reinterpret_cast<uintptr_t>(src));
    __syncthreads();
    src = routed_src;
    load_round();
  }
  for (;;) {
#pragma unroll
    for (int u = 0; u < READ_UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    i += READ_UNROLL * stride;
    if (i >= n16) break;
    load_round();
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) warp_xor[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned all = 0u;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) all ^= warp_xor[w];
    sink[blockIdx.x] = all;
  }
}

// The same read through the decode kernels' kind of pipeline: each warp copies steps of `chunks` 16-byte pieces
// per lane (chunks x 512 bytes a warp) into a ring of `stages` slots of its own in shared memory with cp.async,
// the first stages - 1 before the wait, then one step ahead of each step it reads back (each lane its own
// pieces, as the FP8 GEMV's ring: no barrier). Steps go to the grid's warps in turn. Against the plain read, it
// says what such a ring can stream in the same launches, apart from any arithmetic (bench/read_ceiling.py
// --read-form). Dynamic shared memory: warps x stages x chunks x 512 bytes (or more, to set CTAs an SM).
extern "C" __global__ void __launch_bounds__(256)
    dsv4_stream_read_ring(const uint4* __restrict__ src, long long n16, unsigned* __restrict__ sink, int chunks,
                          int stages) {
  extern __shared__ uint4 ring[];
  __shared__ unsigned warp_xor[8];
  constexpr int MAX_CHUNKS = 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const long long grid_warps = (long long)gridDim.x * warps, step16 = (long long)chunks * 32;
  uint4* mine = ring + (size_t)warp * stages * step16 + lane;
  long long next = (long long)blockIdx.x * warps + warp;   // the warp's next step to copy, in grid order
  const long long steps = ((n16 + step16 - 1) / step16 - next + grid_warps - 1) / grid_warps;
  int slot = 0;
  auto issue = [&] {                           // the next step into `slot`, one group (empty past the end)
    const long long base = next * step16;
    if (base < n16) {
#pragma unroll
      for (int c = 0; c < MAX_CHUNKS; ++c) {
        if (c >= chunks) break;
        const long long i = base + c * 32 + lane;
        dsv4::cp_async16(mine + (slot * chunks + c) * 32, src + (i < n16 ? i : 0), i < n16 ? 16u : 0u);
      }
    }
    dsv4::cp_async_commit();
    next += grid_warps;
    if (++slot == stages) slot = 0;
  };
  for (int p = 0; p < stages - 1; ++p) issue();
  dsv4::pdl_wait();
  dsv4::pdl_launch_dependents();
  unsigned acc = 0u;
  int read = 0;
  for (long long g = 0; g < steps; ++g) {
    issue();
    dsv4::cp_async_wait_pending(stages - 1);
#pragma unroll
    for (int c = 0; c < MAX_CHUNKS; ++c) {
      if (c >= chunks) break;
      const uint4 v = mine[(read * chunks + c) * 32];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (++read == stages) read = 0;
  }
  dsv4::cp_async_wait_all();
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) warp_xor[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned all = 0u;
    for (int w = 0; w < warps; ++w) all ^= warp_xor[w];
    sink[blockIdx.x] = all;
  }
}
