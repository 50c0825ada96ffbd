// MXFP4 routed experts for decode on Hopper's warpgroup MMA (sm_90a only; elsewhere, and for more than 16
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
// activation in shared memory: the token's codes (gate_up) or the item's pair's h codes (down), each 32-K
// block in a column of its own (block k in column k % 8 of 8-row core matrices, the rest zeros), so the
// eight MMAs of a step accumulate into one fragment and still leave each block's product whole, in its
// column. Each product is added in float32 with its row's scale times the activation's, as the mma.sync
// kernels do; only the tensor core's adds within 32 K differ (the FP8 MMA adds in less than float32), so the
// results agree with those kernels to about a bf16 unit. (Until session 32 the activation was column 0 alone
// and each block's MMA wrote fresh registers: every lane then scaled all eight products of its rows, where it
// now scales two: the same bits at Flash sizes, and faster, bench/results/moe-decode-ab-s32-h200.txt.)
//
// A CTA is one warpgroup, each warp 16 rows of the MMA's 64 over all of K. gate_up: an item is (expert slot
// j, 32 rows of F): warps 0-1 take those rows of w1, warps 2-3 of w3, and the CTA forms h for the 32 rows.
// down: an item is (pair j, 64 rows of D) -> ypart [T * topk, D]; the sum over pairs is dsv4_moe_sum_pairs
// (moe_experts.cu). Items of 32 (gate_up) and 64 rows keep 384 CTAs over the H200's 132 SMs at Flash size.
// Launches never allocate or synchronise.
#include "common.cuh"
#include "fp4_ring.cuh"
#include "trace.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The B tile's descriptor: core matrices without swizzle, the next along K 128 bytes on (as leading and as
// stride offset: with 8 columns there is no next core matrix along N, so either reading of the two fields
// finds it). Block b's is this plus 16 * b (256 bytes).
__device__ __forceinline__ uint64_t b_tile_desc(const uint8_t* tile) { return kmajor_desc(smem_addr(tile), 128, 128); }

// The E8M0 scales of lane (r, q)'s accumulator entries in a step: rows r, r + 8 (h) of the step's blocks 2q,
// 2q + 1 (i). From the ring, or from global memory where the scales were not copied (`async_scales`).
__device__ __forceinline__ void lane_scales(const uint8_t* stage, const Fp4Job& j, bool async_scales, int r, int q,
                                            float (&s)[2][2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t v = 0;                              // the two scale bytes, block 2q's the lower
    if (async_scales) {
      v = *reinterpret_cast<const uint16_t*>(stage + STAGE_W + (r + 8 * h) * UB + 2 * q);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (2 * q + i < j.blocks) v |= uint32_t(__ldg(j.s + size_t(r + 8 * h) * j.sld + 2 * q + i)) << (8 * i);
    }
    s[h][0] = dsv4::e8m0(v);
    s[h][1] = dsv4::e8m0(v >> 8);
  }
}

// One step of the warpgroup: each warp's 16 rows x the step's blocks (from its ring stage) times the item's
// B region (descriptor `desc` at the step's first block, where block u of the step is column u: B_TILE in
// quantise_to_smem). The step's MMAs accumulate into one fragment, so lane (r, q) ends with rows r, r + 8
// times blocks 2q, 2q + 1, each block's product whole, and adds them with their row scales times the
// activation's into acc[0], acc[1] (its share of rows r, r + 8: the item's sum is the four lanes q's). act_s:
// the item's activation scales per 128 K from the step's first block. FULL: a whole step of UB blocks (every
// step at Flash sizes), without bounds checks.
template <bool FULL>
__device__ __forceinline__ void wgmma_step(const uint8_t* stage, const Fp4Job& j, bool async_scales, uint64_t desc,
                                           const float* act_s, int lane, float (&acc)[2]
                                           DSV4_TRACE_AT(, unsigned long long (&marks)[2])) {
  const int r = lane >> 2, q = lane & 3, blocks = FULL ? UB : j.blocks;
  // Each half's A fragments first, then a fence, then its MMAs: wgmma reads its A registers asynchronously,
  // and registers written between the fence and an MMA may not feed it (PTX: wgmma.fence). A short step
  // multiplies zeros past its blocks (the ring stage always holds UB blocks, some stale) rather than
  // branching between the MMAs, which made the compiler serialise them.
  uint32_t a[UB][4];
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  // In two halves: the tensor cores multiply the first half's blocks while the warp converts the second's.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int u = half * UB / 2; u < (half + 1) * UB / 2; u += 2) {
      uint32_t d[4];
      load_block_pair(stage, u, lane, d);
#pragma unroll
      for (int h = 0; h < 2; ++h) {              // block u + h: rows r, r + 8 of its even slots, then odd
        const bool live = FULL || u + h < blocks;
        a[u + h][0] = live ? e2m1_even(d[2 * h]) : 0u;
        a[u + h][1] = live ? e2m1_even(d[2 * h + 1]) : 0u;
        a[u + h][2] = live ? e2m1_odd(d[2 * h]) : 0u;
        a[u + h][3] = live ? e2m1_odd(d[2 * h + 1]) : 0u;
      }
    }
#pragma unroll
    for (int u = half * UB / 2; u < (half + 1) * UB / 2; ++u)   // computed before the fence (the compiler
#pragma unroll                                                 // would sink them)
      for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[u][i])::"memory");
    DSV4_TRACE_AT(if (half == 0) marks[0] = clock64();)
    wgmma_fence();
#pragma unroll
    for (int u = half * UB / 2; u < (half + 1) * UB / 2; ++u) {  // past a short step's blocks: block 0's B,
      if (u == 0)                                               // times zeros
        wgmma_m64n8k32_rs<false>(c, a[u], desc);
      else
        wgmma_m64n8k32_rs<true>(c, a[u], desc + (FULL || u < blocks ? 16 * u : 0));
    }
  }
  wgmma_commit();
  wgmma_wait_all();
  DSV4_TRACE_AT(marks[1] = clock64();)
#pragma unroll
  for (int i = 0; i < 4; ++i) wgmma_pin(c[i]);
  float s[2][2];
  lane_scales(stage, j, async_scales, r, q, s);
  if (!FULL)                                     // blocks past a short step: products 0, scale bytes stale
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (2 * q + i >= blocks) s[0][i] = s[1][i] = 0.f;
  const float sx = act_s[q >> 1];                // blocks 2q and 2q + 1 share a 128-K activation block
  acc[0] = fmaf(fmaf(c[0], s[0][0], c[1] * s[0][1]), sx, acc[0]);
  acc[1] = fmaf(fmaf(c[2], s[1][0], c[3] * s[1][1]), sx, acc[1]);
}

// What both kernels share: the warpgroup walks its CTA's items (expert slot or pair j, row block rg; item
// = j * groups + rg) in `steps` steps each, streaming each warp's rows (job(cursor) -> Fp4Job) through its
// ring; the activation is quantised into the B tile (by quantise(), while the first steps stream); after
// an item's last step, epilogue(cursor, acc) gets the warp's sums for rows r, r + 8 (in every lane).
// region(cursor): the item's region of the tile (nb * 256 bytes, B_TILE's layout) and of `scales` (nb / 4
// floats).
//
// The copies' addresses move by increments inside an item (a step is UB blocks further along the same rows)
// and come from job() only where an item starts: the kernels stream at about the copy bandwidth only with
// all their warps at once, so a warp's instructions per step set how fast the last CTAs finish (session 31,
// README). Finding every step's addresses afresh took about 85 of a step's 430 instructions.
template <int KERNEL, class Job, class Quantise, class Region, class Epilogue>   // KERNEL: the trace's (trace.cuh)
__device__ __forceinline__ void walk_items(uint8_t* ring_base, const uint8_t* tile, const float* scales, int items,
                                           int groups, int nb, Job job, Quantise quantise, Region region, Epilogue epilogue) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int steps = (nb + UB - 1) / UB, mine = my_items(items), total = mine * steps;
  uint8_t* ring = ring_base + warp * STAGES * STAGE_BYTES;
  uint32_t ring_s = smem_addr(ring);
  const bool async_scales = nb % 4 == 0;
  GateUpCursor now(groups), ahead(groups);      // the step being multiplied, the step being loaded
  Fp4Job next = job(ahead);                     // the step `ahead` is at
  LaneCopies lc = lane_copies(next.ld, next.sld, lane);
  const auto issue = [&](int slot) {            // `next` into ring slot `slot`; then ahead and next one step on
    keep_in_registers(lc);
    dsv4::keep_in_register(ring_s);             // the same for the ring's address (ptxas rebuilt it too)
    issue_copies(next, lc, ring_s + slot * STAGE_BYTES, async_scales);
    ahead.advance(steps, groups);
    if (ahead.s == 0) {
      next = job(ahead);
    } else {
      next.w += UB * 16, next.s += UB;
      next.blocks = step_blocks(ahead, mine, nb);
    }
  };
#pragma unroll
  for (int g = 0; g < STAGES - 1; ++g) issue(g);
  quantise();
  fence_async_shared();                         // the tile's stores, visible to wgmma's reads
  __syncthreads();
  const uint64_t desc0 = b_tile_desc(tile);
  float acc[2] = {0.f, 0.f};
  DSV4_TRACE_AT(dsv4_trace::Warp* const trace = dsv4_trace::warp_record(KERNEL); if (trace) trace->walk = clock64();)
  for (int g = 0; g < total; ++g) {
    issue((g + STAGES - 1) % STAGES);
    wait_stage();
    DSV4_TRACE_AT(const unsigned long long landed = clock64(); unsigned long long marks[2];)
    const uint8_t* stage = ring + (g % STAGES) * STAGE_BYTES;
    Fp4Job jb{};                                // the scales' addresses only where they skip the ring
    if (async_scales)
      jb.blocks = min(UB, nb - now.s * UB);     // every step of the walk is one of the CTA's items'
    else
      jb = job(now);
    const int blk = region(now) * nb + now.s * UB;   // in blocks from the tile's start
    const float* act_s = scales + blk / 4;
    if (jb.blocks == UB)
      wgmma_step<true>(stage, jb, async_scales, desc0 + 16 * blk, act_s, lane, acc DSV4_TRACE_AT(, marks));
    else
      wgmma_step<false>(stage, jb, async_scales, desc0 + 16 * blk, act_s, lane, acc DSV4_TRACE_AT(, marks));
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    DSV4_TRACE_AT(dsv4_trace::step(trace, g, landed, marks[0], marks[1]);)
    if (now.s == steps - 1) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {             // the four lanes q's shares of each row, in every lane
        acc[h] += __shfl_xor_sync(0xffffffffu, acc[h], 1);
        acc[h] += __shfl_xor_sync(0xffffffffu, acc[h], 2);
      }
      epilogue(now, acc);
      acc[0] = acc[1] = 0.f;
    }
    now.advance(steps, groups);
  }
  DSV4_TRACE_AT(dsv4_trace::end(trace, total);)
}

// The down kernel's B tile regions, one per item in hand: two let a CTA with more items than that quantise its
// first two pairs before its walk, at 68 KB a CTA (three an H200 SM); one item a CTA at Flash size (one token).
constexpr int TILE_REGIONS = 2;
static_assert((TILE_REGIONS & (TILE_REGIONS - 1)) == 0, "an item's region is found with a mask");

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
  DSV4_TRACE_AT(dsv4_trace::Warp* const trace = dsv4_trace::start(dsv4_trace::kMoeGateUp);)
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
  DSV4_TRACE_AT(if (trace) trace->ready = clock64();)
  dsv4::pdl_wait();                             // the routing (experts, weights) comes from the launch before
  DSV4_TRACE_AT(if (trace) trace->waited = clock64();)
  dsv4::pdl_launch_dependents();
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  const int mine = my_items(topk * groups);
  auto job = [&](const GateUpCursor& c) {
    const int row0 = c.rg * 32 + half * 16, blk = c.s * UB;
    return bank_job(base[min(c.j, topk - 1)], which, row0, blk, step_blocks(c, mine, nb), D, F);
  };
  auto quantise = [] {};                        // done above
  auto region = [](const GateUpCursor&) { return 0; };
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
  walk_items<dsv4_trace::kMoeGateUp>(reinterpret_cast<uint8_t*>(smem), tile, scales, topk * groups, groups, nb, job,
                                    quantise, region, epilogue);
#endif
}

// Grid (slots, tokens), 128 threads. Dynamic shared memory: RING_BYTES / 2 (four warps), then TILE_REGIONS
// regions (fewer where the CTA has fewer items), each holding one item's pair's h quantised (F / 32 * 256
// bytes, B_TILE's layout), then their scales (F / 128 floats each). An item is (pair j, 64 rows of D). The
// first items' pairs are quantised before the walk; where a CTA has more items than regions, item it's
// region takes item it + TILE_REGIONS's pair once item it is done. ypart [T * topk, D] float32, each pair's
// output rounded to bf16.
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_down_decode_wgmma(
    const __nv_bfloat16* __restrict__ h, const int* __restrict__ experts, const uint64_t* __restrict__ table,
    float* __restrict__ ypart, int topk, int D, int F) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  __shared__ const uint8_t* base[MAX_TOPK];
  DSV4_TRACE_AT(dsv4_trace::Warp* const trace = dsv4_trace::start(dsv4_trace::kMoeDown);)
  const int t = blockIdx.y, warp = threadIdx.x >> 5, r = (threadIdx.x & 31) >> 2, q = threadIdx.x & 3;
  const int groups = D / 64, nb = F / 32;
  const int regions = min(TILE_REGIONS, (topk * groups + int(gridDim.x) - 1) / int(gridDim.x));
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem) + RING_BYTES / 2;
  float* scales = reinterpret_cast<float*>(tile + regions * nb * 256);
  clear_tile(tile, regions * nb * 256);
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  const int mine = my_items(topk * groups);
  auto job = [&](const GateUpCursor& c) {       // c.j: the pair, c.rg: the row block
    const int row0 = c.rg * 64 + warp * 16, blk = c.s * UB;
    return bank_job(base[min(c.j, topk - 1)], 2, row0, blk, step_blocks(c, mine, nb), D, F);
  };
  auto pair_of = [&](int it) { return (int(blockIdx.x) + it * int(gridDim.x)) / groups; };
  auto region_of = [&](int it) { return regions == 1 ? 0 : it % TILE_REGIONS; };  // no division in the walk
  auto quantise_item = [&](int it) {            // item it's pair into its region, by the whole CTA
    const int reg = region_of(it);
    dsv4::quantise_to_smem<true, false, true>(h + size_t(t * topk + pair_of(it)) * F, F, F, 0, tile + reg * nb * 256,
                                              scales + reg * (nb / 4));
  };
  auto quantise = [&] {
    DSV4_TRACE_AT(if (trace) trace->ready = clock64();)
    dsv4::pdl_wait();                           // h comes from gate_up (experts and table from before it)
    DSV4_TRACE_AT(if (trace) trace->waited = clock64();)
    dsv4::pdl_launch_dependents();
    for (int it = 0; it < min(mine, regions); ++it) quantise_item(it);
  };
  auto region = [&](const GateUpCursor& c) { return region_of(c.it); };
  auto epilogue = [&](const GateUpCursor& c, const float (&acc)[2]) {
    if (q == 0) {
      float* out = ypart + size_t(t * topk + c.j) * D + c.rg * 64 + warp * 16;
      out[r] = __bfloat162float(__float2bfloat16(acc[0] * 64.f));
      out[r + 8] = __bfloat162float(__float2bfloat16(acc[1] * 64.f));
    }
    const int later = c.it + regions;           // the item this region serves next (its MMAs are done)
    if (later < mine && pair_of(later) != pair_of(c.it)) {
      __syncthreads();                          // every warp is through item c.it's MMAs
      quantise_item(later);
      fence_async_shared();
      __syncthreads();
    }
  };
  walk_items<dsv4_trace::kMoeDown>(reinterpret_cast<uint8_t*>(smem), tile, scales, topk * groups, groups, nb, job,
                                  quantise, region, epilogue);
#endif
}
