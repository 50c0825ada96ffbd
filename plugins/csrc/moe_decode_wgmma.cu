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
// A CTA is one warpgroup, each warp 16 rows of the MMA's 64 over all of K. gate_up: an item is (expert slot
// j, 32 rows of F): warps 0-1 take those rows of w1, warps 2-3 of w3, and the CTA forms h for the 32 rows.
// down: an item is (pair j, 64 rows of D) -> ypart [T * topk, D]; the sum over pairs is dsv4_moe_sum_pairs
// (moe_experts.cu). Items of 32 (gate_up) and 64 rows keep 384 CTAs over the H200's 132 SMs at Flash size.
// Launches never allocate or synchronise.
#include "common.cuh"
#include "fp4_ring.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The B tile's descriptor: core matrices without swizzle, the next along K 128 bytes on (as leading and as
// stride offset: with 8 columns there is no next core matrix along N, so either reading of the two fields
// finds it). Block b's is this plus 16 * b (256 bytes).
__device__ __forceinline__ uint64_t b_tile_desc(const uint8_t* tile) {
  return uint64_t((smem_addr(tile) & 0x3FFFF) >> 4) | (uint64_t(128 >> 4) << 16) | (uint64_t(128 >> 4) << 32);
}

// d = A (64 x 32, e4m3 from registers: the warp's 16 rows) . B (32 x 8 from the descriptor), fresh (scale-d
// false: d is only written).
__device__ __forceinline__ void wgmma_m64n8k32_rs(float (&d)[4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(0));
}

// One step of the warpgroup: each warp's 16 rows x the step's blocks (from its ring stage) times column
// `col` of the B tile (descriptor `desc` at the step's first block); acc[0], acc[1] += rows r, r + 8 (in
// lanes q == col / 2). act_s: the column's activation scales per 128 K from the step's first block. FULL: a
// whole step of UB blocks (every step at Flash sizes), without bounds checks.
template <bool FULL>
__device__ __forceinline__ void wgmma_step(const uint8_t* stage, const Fp4Job& j, bool async_scales, uint64_t desc,
                                           const float* act_s, int col, int lane, float (&acc)[2]) {
  const int r = lane >> 2, blocks = FULL ? UB : j.blocks;
  uint32_t sc[2][2];
  step_scales(stage, j, async_scales, r, sc);
  // The step's A fragments first, then one fence, then the MMAs: wgmma reads its A registers asynchronously,
  // and registers written between the fence and an MMA may not feed it (PTX: wgmma.fence). A short step
  // multiplies zeros past its blocks (the ring stage always holds UB blocks, some stale) rather than
  // branching between the MMAs, which made the compiler serialise them.
  uint32_t a[UB][4];
#pragma unroll
  for (int u = 0; u < UB; u += 2) {
    uint32_t d[4];
    load_block_pair(stage, u, lane, d);
#pragma unroll
    for (int h = 0; h < 2; ++h) {                // block u + h: rows r, r + 8 of its even slots, then odd
      const bool live = FULL || u + h < blocks;
      a[u + h][0] = live ? e2m1_even(d[2 * h]) : 0u;
      a[u + h][1] = live ? e2m1_even(d[2 * h + 1]) : 0u;
      a[u + h][2] = live ? e2m1_odd(d[2 * h]) : 0u;
      a[u + h][3] = live ? e2m1_odd(d[2 * h + 1]) : 0u;
    }
  }
#pragma unroll
  for (int u = 0; u < UB; ++u)                   // computed before the fence (the compiler would sink them)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[u][i])::"memory");
  float c[UB][4];
  wgmma_fence();
#pragma unroll
  for (int u = 0; u < UB; ++u)                   // past a short step's blocks: block 0's B, times zeros
    wgmma_m64n8k32_rs(c[u], a[u], desc + (FULL || u < blocks ? 16 * u : 0));
  wgmma_commit();
  wgmma_wait_all();
  const bool odd = col & 1;
#pragma unroll
  for (int u = 0; u < UB; ++u) {
    if (u >= blocks) break;
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma_pin(c[u][i]);
    const float sx = act_s[u / 4];
    const float s0 = dsv4::e8m0_byte(sc[0][u / 4], u % 4), s8 = dsv4::e8m0_byte(sc[1][u / 4], u % 4);
    acc[0] = fmaf(odd ? c[u][1] : c[u][0], s0 * sx, acc[0]);
    acc[1] = fmaf(odd ? c[u][3] : c[u][2], s8 * sx, acc[1]);
  }
}

// What both kernels share: the warpgroup walks its CTA's items (expert slot or pair j, row block rg; item
// = j * groups + rg) in `steps` steps each, streaming each warp's rows (job(cursor) -> Fp4Job) through its
// ring; the activation is quantised into the B tile (by quantise(), while the first steps stream); after
// an item's last step, epilogue(cursor, acc) gets the warp's sums for rows r, r + 8. col(cursor): the
// item's B column; act_s(cursor): that column's scales.
//
// The copies' addresses move by increments inside an item (a step is UB blocks further along the same rows)
// and come from job() only where an item starts: the kernels stream at about the copy bandwidth only with
// all their warps at once, so a warp's instructions per step set how fast the last CTAs finish (session 31,
// README). Finding every step's addresses afresh took about 85 of a step's 430 instructions.
template <class Job, class Quantise, class Col, class Epilogue>
__device__ __forceinline__ void walk_items(uint8_t* ring_base, const uint8_t* tile, const float* scales, int items,
                                           int groups, int nb, Job job, Quantise quantise, Col col, Epilogue epilogue) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int steps = (nb + UB - 1) / UB, mine = my_items(items), total = mine * steps;
  uint8_t* ring = ring_base + warp * STAGES * STAGE_BYTES;
  const uint32_t ring_s = smem_addr(ring);
  const bool async_scales = nb % 4 == 0;
  GateUpCursor now(groups), ahead(groups);      // the step being multiplied, the step being loaded
  Fp4Job next = job(ahead);                     // the step `ahead` is at
  const LaneCopies lc = lane_copies(next.ld, next.sld, lane);
  const auto issue = [&](int slot) {            // `next` into ring slot `slot`; then ahead and next one step on
    issue_copies(next, lc, ring_s + slot * STAGE_BYTES, async_scales);
    ahead.advance(steps, groups);
    if (ahead.s == 0) {
      next = job(ahead);
    } else {
      next.w += UB * 16, next.s += UB;
      next.blocks = ahead.it < mine ? min(UB, nb - ahead.s * UB) : 0;
    }
  };
#pragma unroll
  for (int g = 0; g < STAGES - 1; ++g) issue(g);
  quantise();
  fence_async_shared();                         // the tile's stores, visible to wgmma's reads
  __syncthreads();
  const uint64_t desc0 = b_tile_desc(tile);
  float acc[2] = {0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    issue((g + STAGES - 1) % STAGES);
    wait_stage();
    const uint8_t* stage = ring + (g % STAGES) * STAGE_BYTES;
    Fp4Job jb{};                                // the scales' addresses only where they skip the ring
    if (async_scales)
      jb.blocks = min(UB, nb - now.s * UB);     // every step of the walk is one of the CTA's items'
    else
      jb = job(now);
    const int c = col(now), blk = now.s * UB;
    const float* act_s = scales + c * (nb / 4) + blk / 4;
    if (jb.blocks == UB)
      wgmma_step<true>(stage, jb, async_scales, desc0 + 16 * blk, act_s, c, lane, acc);
    else
      wgmma_step<false>(stage, jb, async_scales, desc0 + 16 * blk, act_s, c, lane, acc);
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    if (now.s == steps - 1) {
      epilogue(now, acc);
      acc[0] = acc[1] = 0.f;
    }
    now.advance(steps, groups);
  }
}

// Zeroes the B tile (`bytes`, a multiple of 16) so that its unused columns hold no NaN codes.
__device__ __forceinline__ void clear_tile(uint8_t* tile, int bytes) {
  for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) reinterpret_cast<uint4*>(tile)[i] = make_uint4(0, 0, 0, 0);
}
#endif

}  // namespace

// Grid (slots, tokens), 128 threads. Dynamic shared memory: RING_BYTES / 2 (four warps), the B tile (D / 32 *
// 256 bytes), the token's scales (D / 128 floats). h [T * topk, F] bf16. table: n_table entries.
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_gate_up_decode_wgmma(
    const __nv_bfloat16* __restrict__ x, const int* __restrict__ experts, const float* __restrict__ route_w,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ h, int topk, int D, int F, float limit,
    int n_table) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  __shared__ const uint8_t* base[MAX_TOPK];
  __shared__ float gu[2][32];
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem) + RING_BYTES / 2;
  float* scales = reinterpret_cast<float*>(tile + D / 32 * 256);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, r = (threadIdx.x & 31) >> 2, q = threadIdx.x & 3;
  const int which = warp / 2, half = warp % 2;  // w1 or w3; the warp's 16 of the item's 32 rows
  const int groups = F / 32, nb = D / 32;
  // Before the wait, while the router runs: the expert table into L2 (its lines, by a few CTAs: a hint, the
  // entries are read after the wait), and x quantised into the B tile. The router reads x, so x comes from
  // a launch before the router's and is complete once this kernel starts. After the wait, every CTA's read
  // and quantisation of the same x lay on its path to its first products: behind a 4.9 us router stand-in on
  // the H200, router and gate_up took 26.6 us that way, 24.1 us this way
  // (bench/results/moe-gate-up-probe-s31-h200.txt).
  if (blockIdx.x < 4 && threadIdx.x * 16 < n_table)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(table + threadIdx.x * 16));
  clear_tile(tile, D / 32 * 256);
  __syncthreads();
  dsv4::quantise_to_smem<true, false, true>(x + size_t(t) * D, D, D, 0, tile, scales);
  dsv4::pdl_wait();                             // the routing (experts, weights) comes from the launch before
  dsv4::pdl_launch_dependents();
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  const int mine = my_items(topk * groups);
  auto job = [&](const GateUpCursor& c) {
    const int row0 = c.rg * 32 + half * 16, blk = c.s * UB;
    return bank_job(base[min(c.j, topk - 1)], which, row0, blk, c.it < mine ? min(UB, nb - c.s * UB) : 0, D, F);
  };
  auto quantise = [] {};                        // done above
  auto col = [](const GateUpCursor&) { return 0; };
  auto epilogue = [&](const GateUpCursor& c, const float (&acc)[2]) {
    if (q == 0) {
      gu[which][half * 16 + r] = acc[0];
      gu[which][half * 16 + r + 8] = acc[1];
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      float gate = __bfloat162float(__float2bfloat16(gu[0][threadIdx.x] * 64.f));
      float up = __bfloat162float(__float2bfloat16(gu[1][threadIdx.x] * 64.f));
      if (limit > 0.f) {
        up = fminf(fmaxf(up, -limit), limit);
        gate = fminf(gate, limit);
      }
      h[size_t(t * topk + c.j) * F + c.rg * 32 + threadIdx.x] =
          __float2bfloat16(route_w[t * topk + c.j] * (gate / (1.f + __expf(-gate)) * up));
    }
    __syncthreads();
  };
  walk_items(reinterpret_cast<uint8_t*>(smem), tile, scales, topk * groups, groups, nb, job, quantise, col, epilogue);
#endif
}

// Grid (slots, tokens), 128 threads. Dynamic shared memory: RING_BYTES / 2 (four warps), the B tile (F / 32 *
// 256 bytes: the token's topk <= 8 pairs as columns, of which the CTA quantises those of its items), their
// scales (topk * F / 128 floats). An item is (pair j, 64 rows of D). ypart [T * topk, D] float32, each
// pair's output rounded to bf16.
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_down_decode_wgmma(
    const __nv_bfloat16* __restrict__ h, const int* __restrict__ experts, const uint64_t* __restrict__ table,
    float* __restrict__ ypart, int topk, int D, int F) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  __shared__ const uint8_t* base[MAX_TOPK];
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem) + RING_BYTES / 2;
  float* scales = reinterpret_cast<float*>(tile + F / 32 * 256);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, r = (threadIdx.x & 31) >> 2, q = threadIdx.x & 3;
  const int groups = D / 64, nb = F / 32;
  clear_tile(tile, F / 32 * 256);
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  const int mine = my_items(topk * groups);
  auto job = [&](const GateUpCursor& c) {       // c.j: the pair, c.rg: the row block
    const int row0 = c.rg * 64 + warp * 16, blk = c.s * UB;
    return bank_job(base[min(c.j, topk - 1)], 2, row0, blk, c.it < mine ? min(UB, nb - c.s * UB) : 0, D, F);
  };
  auto quantise = [&] {                         // only the pairs of this CTA's items, each into its column
    dsv4::pdl_wait();                           // h comes from gate_up (experts and table from before it)
    dsv4::pdl_launch_dependents();
    for (int it = 0, done = -1; it < mine; ++it) {
      const int j = (int(blockIdx.x) + it * int(gridDim.x)) / groups;
      if (j == done) continue;
      done = j;
      dsv4::quantise_to_smem<true, false, true>(h + size_t(t * topk + j) * F, F, F, 0, tile + 16 * j,
                                                scales + j * (F / 128));
    }
  };
  auto col = [&](const GateUpCursor& c) { return min(c.j, topk - 1); };
  auto epilogue = [&](const GateUpCursor& c, const float (&acc)[2]) {
    if (q == c.j / 2) {
      float* out = ypart + size_t(t * topk + c.j) * D + c.rg * 64 + warp * 16;
      out[r] = __bfloat162float(__float2bfloat16(acc[0] * 64.f));
      out[r + 8] = __bfloat162float(__float2bfloat16(acc[1] * 64.f));
    }
  };
  walk_items(reinterpret_cast<uint8_t*>(smem), tile, scales, topk * groups, groups, nb, job, quantise, col, epilogue);
#endif
}
