// The vocabulary head for decode: logits [B, V] fp32 = y [B, D] fp32 . W[V, D]^T, W stored in bf16 (and the
// same for bf16 rows y, widened as they are loaded: `dsv4::wide_linear` of decode activations).
//
// DeepSeek keeps the head as an fp32 parameter loaded from bf16 weights, so bf16 holds every value exactly:
// reading it as bf16 halves the largest single read of a decode step (1.06 GB instead of 2.1 GB at Flash
// size) and changes nothing but the fp32 summation order. A warp per row at a time (rows gw, gw + warps,
// ...), each lane streaming 16-byte loads (8 weights) four at a time against y held in shared memory, the
// next four in flight while it multiplies.
#include "common.cuh"

namespace {
constexpr int MAX_B = 4;        // decode rows held in shared memory (B x D floats)
constexpr int UNROLL = 4;       // 16-byte loads in flight per lane
}  // namespace

namespace dsv4_head {

// The kernel for y of type Y: float32 rows (the head), or bf16 rows widened as they are loaded (the narrow
// products of decode activations, exact: a bf16 value is a float32 one), which spares a widening launch.
template <typename Y>
__device__ __forceinline__ void load_rows(const Y* __restrict__ y, float* ys, int n);
template <>
__device__ __forceinline__ void load_rows<float>(const float* __restrict__ y, float* ys, int n) {
  for (int i = threadIdx.x * 4; i < n; i += blockDim.x * 4)
    *reinterpret_cast<float4*>(ys + i) = *reinterpret_cast<const float4*>(y + i);
}
template <>
__device__ __forceinline__ void load_rows<__nv_bfloat16>(const __nv_bfloat16* __restrict__ y, float* ys, int n) {
  for (int i = threadIdx.x * 4; i < n; i += blockDim.x * 4) {   // 8-byte loads: the host checks the alignment
    const uint2 raw = *reinterpret_cast<const uint2*>(y + i);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    *reinterpret_cast<float4*>(ys + i) = make_float4(a.x, a.y, b.x, b.y);
  }
}

template <typename Y>
__device__ __forceinline__ void head_gemv(const Y* __restrict__ y, const __nv_bfloat16* __restrict__ w,
                                          float* __restrict__ out, int B, int V, int D, int split) {
  extern __shared__ float ys[];                 // [B][D]
  __shared__ float partial[8][MAX_B];           // split > 1: each warp's sums, added by the row's first warp
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int rows_per_cta = warps / split, part = warp % split, stride = int(gridDim.x) * rows_per_cta;
  const int chunks = D / 256, per = chunks / split;   // 32 lanes x 8 weights per chunk; chunks per slice
  const int c_begin = part * per, c_end = c_begin + per;
  auto row_of = [&](int v) { return reinterpret_cast<const uint4*>(w + size_t(v) * D); };
  int v = int(blockIdx.x) * rows_per_cta + warp / split;
  uint4 raw[UNROLL], next[UNROLL];
  if (v < V) dsv4::load_row_chunks(row_of(v), c_begin, c_end, lane, raw);
  dsv4::pdl_wait();                             // y comes from the previous kernels
  dsv4::pdl_launch_dependents();
  load_rows(y, ys, B * D);
  __syncthreads();
  for (int first = int(blockIdx.x) * rows_per_cta; first < V; first += stride, v += stride) {  // CTA-uniform
    const bool live = v < V;
    float acc[MAX_B] = {0.f, 0.f, 0.f, 0.f};
    for (int c0 = c_begin; live && c0 < c_end; c0 += UNROLL) {
      // the next loads in flight while this step's are multiplied: the row's next chunks, or at its end the
      // first of the warp's next row (session 27: head 249 against 250-252 us, one round at a time)
      if (c0 + UNROLL < c_end)
        dsv4::load_row_chunks(row_of(v), c0 + UNROLL, c_end, lane, next);
      else if (v + stride < V)
        dsv4::load_row_chunks(row_of(v + stride), c_begin, c_end, lane, next);
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (c0 + u >= c_end) break;
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
        float wf[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __bfloat1622float2(h[j]);
          wf[2 * j] = f.x;
          wf[2 * j + 1] = f.y;
        }
        const int k = ((c0 + u) * 32 + lane) * 8;
#pragma unroll
        for (int b = 0; b < MAX_B; ++b) {
          if (b >= B) break;
          const float4 y0 = *reinterpret_cast<const float4*>(ys + b * D + k);
          const float4 y1 = *reinterpret_cast<const float4*>(ys + b * D + k + 4);
          acc[b] = fmaf(wf[0], y0.x, acc[b]);
          acc[b] = fmaf(wf[1], y0.y, acc[b]);
          acc[b] = fmaf(wf[2], y0.z, acc[b]);
          acc[b] = fmaf(wf[3], y0.w, acc[b]);
          acc[b] = fmaf(wf[4], y1.x, acc[b]);
          acc[b] = fmaf(wf[5], y1.y, acc[b]);
          acc[b] = fmaf(wf[6], y1.z, acc[b]);
          acc[b] = fmaf(wf[7], y1.w, acc[b]);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) raw[u] = next[u];
    }
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) acc[b] = dsv4::warp_sum(acc[b]);
    if (split == 1) {
#pragma unroll
      for (int b = 0; b < MAX_B; ++b)
        if (b < B && live && lane == 0) out[size_t(b) * V + v] = acc[b];
      continue;
    }
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < MAX_B; ++b) partial[warp][b] = acc[b];
    }
    __syncthreads();
    if (part == 0 && live && lane < B) {        // lane b writes token b's sum, the slices in order
      float s = 0.f;
      for (int p = 0; p < split; ++p) s += partial[warp + p][lane];
      out[size_t(lane) * V + v] = s;
    }
    __syncthreads();                            // partial is refilled by the next row
  }
}

}  // namespace dsv4_head

extern "C" __global__ void __launch_bounds__(256) dsv4_head_gemv(const float* __restrict__ y,
                                                                const __nv_bfloat16* __restrict__ w,
                                                                float* __restrict__ out, int B, int V, int D,
                                                                int split) {
  dsv4_head::head_gemv(y, w, out, B, V, D, split);
}

extern "C" __global__ void __launch_bounds__(256) dsv4_head_gemv_bf16_rows(const __nv_bfloat16* __restrict__ y,
                                                                          const __nv_bfloat16* __restrict__ w,
                                                                          float* __restrict__ out, int B, int V,
                                                                          int D, int split) {
  dsv4_head::head_gemv(y, w, out, B, V, D, split);
}

// The greedy pick after the head: out[b] = argmax_v logits[b, v] (int64; the first of equal maxima, a NaN above
// every number, as torch.argmax), one launch where torch's reduction over a 129280-wide row ran on few SMs
// (37.7 us of a Flash-8 decode step on the H200: bench/results/graph-timeline-flash8-before-s21-h200.json).
// Each value is keyed by 64 bits, its order-preserving float bits then its index's complement, so the largest
// key is the pick. Grid (ctas, B), 256 threads: each CTA writes its largest key to partial[b][cta]; the CTA that arrives
// last at counter[b] reduces the row's partials, writes the pick and sets the counter back to zero for the next
// launch (no reset launch, so a CUDA graph replays it as it is).
namespace dsv4_head {
__device__ __forceinline__ unsigned long long pick_key(float v, int i) {
  uint32_t bits = v == 0.f ? 0u : __float_as_uint(v);     // -0 and +0 are equal, as in torch
  bits = isnan(v) ? 0xFFFFFFFFu : (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(bits) << 32) | (0xFFFFFFFFu - uint32_t(i));
}

__device__ __forceinline__ unsigned long long block_max_key(unsigned long long key, unsigned long long* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) key = max(key, __shfl_xor_sync(0xffffffffu, key, off));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = key;
  __syncthreads();
  key = scratch[0];
  for (int w = 1; w < int(blockDim.x) / 32; ++w) key = max(key, scratch[w]);
  return key;
}
}  // namespace dsv4_head

extern "C" __global__ void __launch_bounds__(256) dsv4_argmax_rows(const float* __restrict__ logits, int V,
                                                                  unsigned long long* __restrict__ partial,
                                                                  unsigned int* __restrict__ counter,
                                                                  long long* __restrict__ out) {
  __shared__ unsigned long long scratch[8];
  __shared__ bool last;
  dsv4::pdl_wait();                             // the logits come from the head
  dsv4::pdl_launch_dependents();
  const int b = blockIdx.y, ctas = gridDim.x;
  const float* row = logits + size_t(b) * V;
  unsigned long long key = 0;
#pragma unroll 4
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += ctas * blockDim.x)
    key = max(key, dsv4_head::pick_key(row[i], i));
  key = dsv4_head::block_max_key(key, scratch);
  if (threadIdx.x == 0) {
    partial[size_t(b) * ctas + blockIdx.x] = key;
    __threadfence();                            // the partial is visible before the count says so
    last = atomicAdd(counter + b, 1u) == unsigned(ctas - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();                              // every other CTA's partial is visible to this one
  key = 0;
  for (int c = threadIdx.x; c < ctas; c += blockDim.x)
    key = max(key, reinterpret_cast<volatile unsigned long long*>(partial)[size_t(b) * ctas + c]);
  __syncthreads();                              // scratch is reused
  key = dsv4_head::block_max_key(key, scratch);
  if (threadIdx.x == 0) {
    out[b] = (long long)(0xFFFFFFFFu - uint32_t(key & 0xFFFFFFFFu));
    counter[b] = 0;
  }
}
