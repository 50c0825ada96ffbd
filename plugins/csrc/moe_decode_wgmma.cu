// MXFP4 routed experts for decode on Hopper's warpgroup MMA (sm_90a only; elsewhere, and for more than 8
// experts per token, the mma.sync kernels of moe_experts.cu serve). Same numerics as those:
//   g = bf16(W1 x'), u = bf16(W3 x'), h = bf16(weight * silu(min(g, L)) * clamp(u, -L, L)),
//   ypart[pair] = float(bf16(W2 h')), and y = the token's pairs added in ascending expert id order.
//
// Why: Hopper has no FP8 mma.sync. The compiler emulates one with f16 MMAs and converts both operands for
// every MMA, and the H200 showed the mma.sync decode kernels bound by those instructions (ncu, session 9:
// about 90 per warp and 16-row 32-K block, 0.44 of the copy bandwidth). wgmma multiplies e4m3 natively, and
// takes its A operand from registers: each warp streams its weight rows through the same cp.async ring as
// the mma.sync kernels (fp4_ring.cuh), turns the codes into e4m3 with the same shifts (exactly 2^-6 times
// their values) and hands them to one wgmma m64n8k32 per 32-K block (one E8M0 scale block). B is the
// activation in shared memory: the token's codes (gate_up) or each pair's h codes (down) as the columns of
// 8-row core matrices. Each block's product comes out fresh and is added in float32 with its row's scale
// times the activation's, as the mma.sync kernels do; only the tensor core's adds within 32 K differ (the
// FP8 MMA adds in less than float32), so the results agree with those kernels to about a bf16 unit.
//
// gate_up: a CTA is two warpgroups over an item (expert slot j, 64 rows of F): warpgroup 0 multiplies w1's
// rows, warpgroup 1 w3's, each warp 16 of them over all of K; the CTA then forms h for the 64 rows.
// down: a CTA is one warpgroup over an item (pair j, 64 rows of D): ypart [T * topk, D]; the sum over pairs
// is dsv4_moe_sum_pairs (moe_experts.cu).
// Launches never allocate or synchronise.
#include "common.cuh"
#include "fp4_ring.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The B tile's descriptor at 32-K block `blk`: core matrices without swizzle, the next along K 128 bytes on
// (as leading and as stride offset: with 8 columns there is no next core matrix along N, so either reading
// of the two fields finds it).
__device__ __forceinline__ uint64_t b_tile_desc(const uint8_t* tile, int blk) {
  return uint64_t(((smem_addr(tile) + blk * 256) & 0x3FFFF) >> 4) | (uint64_t(128 >> 4) << 16) |
         (uint64_t(128 >> 4) << 32);
}

// d = A (64 x 32, e4m3 from registers: the warp's 16 rows) . B (32 x 8 from the descriptor), fresh.
__device__ __forceinline__ void wgmma_m64n8k32_rs(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(0));
}

// One step of the warpgroup: each warp's 16 rows x the step's blocks (from its ring stage) times column
// `col` of the B tile; acc[0], acc[1] += rows r, r + 8 (in lanes q == col / 2). act_s: the column's
// activation scales per 128 K; blk: the step's first block.
__device__ __forceinline__ void wgmma_step(const uint8_t* stage, const Fp4Job& j, bool async_scales,
                                           const uint8_t* tile, const float* act_s, int col, int blk, int lane,
                                           float (&acc)[2]) {
  const int r = lane >> 2, odd = col & 1;
  uint32_t sc[2][2];
  step_scales(stage, j, async_scales, r, sc);
  // The step's A fragments first, then one fence, then the MMAs: wgmma reads its A registers asynchronously,
  // and a register written after the fence may not feed one (PTX: wgmma.fence).
  uint32_t a[UB][4];
  float c[UB][4];
#pragma unroll
  for (int u = 0; u < UB; u += 2) {
    if (u >= j.blocks) break;                    // warpgroup-uniform: every warp's step has the same blocks
    uint32_t d[4];
    load_block_pair(stage, u, lane, d);
#pragma unroll
    for (int h = 0; h < 2; ++h) {                // block u + h: rows r, r + 8 of its even slots, then odd
      a[u + h][0] = e2m1_even(d[2 * h]);
      a[u + h][1] = e2m1_even(d[2 * h + 1]);
      a[u + h][2] = e2m1_odd(d[2 * h]);
      a[u + h][3] = e2m1_odd(d[2 * h + 1]);
    }
  }
#pragma unroll
  for (int u = 0; u < UB; ++u)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      c[u][i] = 0.f;
      wgmma_pin(c[u][i]);
    }
  wgmma_fence();
#pragma unroll
  for (int u = 0; u < UB; ++u) {
    if (u >= j.blocks) break;
    wgmma_m64n8k32_rs(c[u], a[u][0], a[u][1], a[u][2], a[u][3], b_tile_desc(tile, blk + u));
  }
  wgmma_commit();
  wgmma_wait_all();
#pragma unroll
  for (int u = 0; u < UB; ++u) {
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma_pin(c[u][i]);
    if (u >= j.blocks) break;
    const float sx = act_s[(blk + u) / 4];
    const float s0 = dsv4::e8m0(sc[0][u / 4] >> (8 * (u % 4))), s8 = dsv4::e8m0(sc[1][u / 4] >> (8 * (u % 4)));
    acc[0] = fmaf(odd ? c[u][1] : c[u][0], s0 * sx, acc[0]);
    acc[1] = fmaf(odd ? c[u][3] : c[u][2], s8 * sx, acc[1]);
  }
}

// Zeroes the B tile (`bytes`, a multiple of 16) so that its unused columns hold no NaN codes.
__device__ __forceinline__ void clear_tile(uint8_t* tile, int bytes) {
  for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) reinterpret_cast<uint4*>(tile)[i] = make_uint4(0, 0, 0, 0);
}
#endif

}  // namespace

// Grid (slots, tokens), 256 threads. Dynamic shared memory: RING_BYTES, the B tile (D / 32 * 256 bytes),
// the token's scales (D / 128 floats). h [T * topk, F] bf16.
extern "C" __global__ void __launch_bounds__(256, 2) dsv4_moe_gate_up_decode_wgmma(
    const __nv_bfloat16* __restrict__ x, const int* __restrict__ experts, const float* __restrict__ route_w,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ h, int topk, int D, int F, float limit) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  __shared__ const uint8_t* base[MAX_TOPK];
  __shared__ float gu[2][64];
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem) + RING_BYTES;
  float* scales = reinterpret_cast<float*>(tile + D / 32 * 256);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int which = warp / 4, slice = warp % 4;   // w1 or w3; the warp's 16 of the item's 64 rows
  const int groups = F / 64, items = topk * groups, nb = D / 32, steps = (nb + UB - 1) / UB;
  const int mine = my_items(items), total = mine * steps;
  const size_t wbytes = size_t(F) * D / 2;
  clear_tile(tile, D / 32 * 256);
  dsv4::pdl_wait();                             // the routing (experts, weights) and x come from before
  dsv4::pdl_launch_dependents();
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  auto job = [&](const GateUpCursor& c) {
    const int row0 = c.rg * 64 + slice * 16, blk = c.s * UB;
    const uint8_t* e = base[min(c.j, topk - 1)];
    Fp4Job jb;
    jb.ld = D / 2;
    jb.sld = D / 32;
    jb.w = e + which * wbytes + size_t(row0) * jb.ld + blk * 16;
    jb.s = e + 3 * wbytes + which * size_t(F) * jb.sld + size_t(row0) * jb.sld + blk;
    jb.blocks = c.it < mine ? min(UB, nb - c.s * UB) : 0;
    return jb;
  };
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + warp * STAGES * STAGE_BYTES;
  const bool async_scales = nb % 4 == 0;
  GateUpCursor now(groups), ahead(groups);      // the step being multiplied, the step being loaded
#pragma unroll
  for (int g = 0; g < STAGES - 1; ++g) {
    issue_step(job(ahead), ring + g * STAGE_BYTES, lane, async_scales);
    ahead.advance(steps, groups);
  }
  dsv4::quantise_to_smem<true, false, true>(x + size_t(t) * D, D, D, 0, tile, scales);
  fence_async_shared();                         // the tile's stores, visible to wgmma's reads
  __syncthreads();
  float acc[2] = {0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    issue_step(job(ahead), ring + ((g + STAGES - 1) % STAGES) * STAGE_BYTES, lane, async_scales);
    ahead.advance(steps, groups);
    wait_stage();
    wgmma_step(ring + (g % STAGES) * STAGE_BYTES, job(now), async_scales, tile, scales, 0, now.s * UB, lane, acc);
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    if (now.s == steps - 1) {
      if (q == 0) {
        gu[which][slice * 16 + r] = acc[0];
        gu[which][slice * 16 + r + 8] = acc[1];
      }
      acc[0] = acc[1] = 0.f;
      __syncthreads();
      if (threadIdx.x < 64) {
        float gate = __bfloat162float(__float2bfloat16(gu[0][threadIdx.x] * 64.f));
        float up = __bfloat162float(__float2bfloat16(gu[1][threadIdx.x] * 64.f));
        if (limit > 0.f) {
          up = fminf(fmaxf(up, -limit), limit);
          gate = fminf(gate, limit);
        }
        const int j = now.j;
        h[size_t(t * topk + j) * F + now.rg * 64 + threadIdx.x] =
            __float2bfloat16(route_w[t * topk + j] * (gate / (1.f + __expf(-gate)) * up));
      }
      __syncthreads();
    }
    now.advance(steps, groups);
  }
#endif
}

// Grid (slots, tokens), 128 threads. Dynamic shared memory: RING_BYTES / 2 (four warps), the B tile (F / 32 *
// 256 bytes: the token's topk <= 8 pairs as columns), their scales (topk * F / 128 floats). An item is (pair
// j, 64 rows of D), item = j * (D / 64) + row block. ypart [T * topk, D] float32, each pair's output rounded
// to bf16.
extern "C" __global__ void __launch_bounds__(128, 4) dsv4_moe_down_decode_wgmma(
    const __nv_bfloat16* __restrict__ h, const int* __restrict__ experts, const uint64_t* __restrict__ table,
    float* __restrict__ ypart, int topk, int D, int F) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  __shared__ const uint8_t* base[MAX_TOPK];
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem) + RING_BYTES / 2;
  float* scales = reinterpret_cast<float*>(tile + F / 32 * 256);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int groups = D / 64, items = topk * groups, nb = F / 32, steps = (nb + UB - 1) / UB;
  const int mine = my_items(items), total = mine * steps;
  const size_t wbytes = size_t(F) * D / 2;
  clear_tile(tile, F / 32 * 256);
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  auto job = [&](const GateUpCursor& c) {       // c.j: the pair, c.rg: the row block
    const int row0 = c.rg * 64 + warp * 16, blk = c.s * UB;
    const uint8_t* e = base[min(c.j, topk - 1)];
    Fp4Job jb;
    jb.ld = F / 2;
    jb.sld = F / 32;
    jb.w = e + 2 * wbytes + size_t(row0) * jb.ld + blk * 16;
    jb.s = e + 3 * wbytes + 2 * size_t(F) * (D / 32) + size_t(row0) * jb.sld + blk;
    jb.blocks = c.it < mine ? min(UB, nb - c.s * UB) : 0;
    return jb;
  };
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + warp * STAGES * STAGE_BYTES;
  const bool async_scales = nb % 4 == 0;
  GateUpCursor now(groups), ahead(groups);
#pragma unroll
  for (int g = 0; g < STAGES - 1; ++g) {
    issue_step(job(ahead), ring + g * STAGE_BYTES, lane, async_scales);
    ahead.advance(steps, groups);
  }
  dsv4::pdl_wait();                             // h comes from gate_up (experts and table from before it)
  dsv4::pdl_launch_dependents();
  dsv4::quantise_to_smem<true, false, true>(h + size_t(t) * topk * F, topk * F, F, 0, tile, scales);
  fence_async_shared();
  __syncthreads();
  float acc[2] = {0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    issue_step(job(ahead), ring + ((g + STAGES - 1) % STAGES) * STAGE_BYTES, lane, async_scales);
    ahead.advance(steps, groups);
    wait_stage();
    const int j = min(now.j, topk - 1);
    wgmma_step(ring + (g % STAGES) * STAGE_BYTES, job(now), async_scales, tile, scales + j * (F / 128), j,
               now.s * UB, lane, acc);
    __syncwarp();
    if (now.s == steps - 1) {
      if (q == j / 2 && now.it < mine) {
        float* out = ypart + size_t(t * topk + j) * D + now.rg * 64 + warp * 16;
        out[r] = __bfloat162float(__float2bfloat16(acc[0] * 64.f));
        out[r + 8] = __bfloat162float(__float2bfloat16(acc[1] * 64.f));
      }
      acc[0] = acc[1] = 0.f;
    }
    now.advance(steps, groups);
  }
#endif
}
