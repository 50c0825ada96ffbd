// MXFP4 routed experts for decode (few tokens), DeepSeek's numerics:
//   g = bf16(W1 x'), u = bf16(W3 x')                       x' = FP8 act_quant(x), W MXFP4 (E8M0 per 32 K)
//   h = bf16(weight * silu(min(g, L)) * clamp(u, -L, L))   in fp32
//   y[t] = sum over the token's experts in ascending id order of float(bf16(W2 h')),  h' = FP8 act_quant(h)
// Two launches: gate_up (act_quant of x in every CTA, w1 and w3, SwiGLU, route weight -> h) and down
// (act_quant of the token's h in every CTA, w2, the sum over experts -> y).
// Experts are reached through a table of pointers, one per expert, each to one contiguous expert:
//   [w1 F x D/2 | w3 F x D/2 | w2 D x F/2 | s1 F x D/32 | s3 F x D/32 | s2 D x F/32]   (bytes)
// Any pointer may point into mapped pinned host memory. Launches never allocate or synchronise.
//
// Products run on FP8 tensor cores (mma m16n8k32 e4m3) with the weights as the 16-row A operand and the
// token as column 0 of B. One MMA covers one 32-K scale block: lane (r, q) loads the 4 bytes [q*4, q*4+4)
// of the block for weight rows r and r+8 (elements 8q .. 8q+7); the low nibbles (even elements) go to the
// first k-slots, the high nibbles (odd elements) to the second, and the activation codes are stored in that
// order (quantise_to_smem<true>). An E2M1 code s.e1e0.m becomes the e4m3 byte s.0000.e1e0.m.00 with two
// shifts and masks: that byte's value is exactly 2^-6 times the E2M1 value (e1e0 = 0 lands on the e4m3
// subnormal 0.5 * 2^-6), so the sums are multiplied by 64 once, exactly.
//
// Decode reads every byte of 6 experts once; a warp streams a 2 KB step (16 rows x 8 blocks) one step
// ahead of its MMAs, and the grid is the resident CTAs, each running items b, b + grid, ...
#include "common.cuh"
#include "fp4_ring.cuh"
#include "rows.cuh"

using dsv4::smem_addr;

namespace {

constexpr int PARTS = 4;     // K slices of one matrix, each a warp, added in shared memory

// One token (decode): acc[0], acc[1] += rows r, r + 8 of the step's products (lanes q == 0 hold the token's
// column). TOKENS = 8 (prefill groups): the B operand's 8 columns are `ntok` tokens (lane (r, q) feeds token
// r) and acc[0..3] += rows r, r, r + 8, r + 8 of tokens 2q, 2q + 1, 2q, 2q + 1. act: the codes (slot order),
// token t's at t * lda; act_s: their scales per 128 K, token t's at t * lda / 128; blk: the step's first
// block. Each column's products and sums are the one-token form's.
template <int TOKENS>
__device__ __forceinline__ void mma_step(const uint8_t* stage, const Fp4Job& j, bool async_scales, const uint8_t* act,
                                         const float* act_s, int lda, int ntok, int blk, int lane,
                                         float (&acc)[TOKENS > 1 ? 4 : 2]) {
  const int r = (lane & 31) >> 2, q = lane & 3;
  uint32_t sc[2][2];
  step_scales(stage, j, async_scales, r, sc);
  const uint8_t* codes = act + r * lda + blk * 32 + q * 8;     // this lane's token's codes for the step
  const bool live = r < ntok;
  auto block = [&](int b, uint32_t w0, uint32_t w8) {
    const uint2 x = live ? *reinterpret_cast<const uint2*>(codes + b * 32) : make_uint2(0, 0);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    dsv4::mma_e4m3(c, e2m1_even(w0), e2m1_even(w8), e2m1_odd(w0), e2m1_odd(w8), x.x, x.y);
    const float s0 = dsv4::e8m0(sc[0][b / 4] >> (8 * (b % 4))), s8 = dsv4::e8m0(sc[1][b / 4] >> (8 * (b % 4)));
    if constexpr (TOKENS == 1) {
      const float sx = act_s[(blk + b) / 4];
      acc[0] = fmaf(c[0], s0 * sx, acc[0]);
      acc[1] = fmaf(c[2], s8 * sx, acc[1]);
    } else {                                     // columns past ntok hold zeros: their scale is never read
      const int kb = (blk + b) / 4, per = lda / 128, t0 = 2 * q, t1 = 2 * q + 1;
      const float x0 = t0 < ntok ? act_s[t0 * per + kb] : 0.f, x1 = t1 < ntok ? act_s[t1 * per + kb] : 0.f;
      acc[0] = fmaf(c[0], s0 * x0, acc[0]);
      acc[1] = fmaf(c[1], s0 * x1, acc[1]);
      acc[2] = fmaf(c[2], s8 * x0, acc[2]);
      acc[3] = fmaf(c[3], s8 * x1, acc[3]);
    }
  };
  // A full step (every step at Flash sizes) unrolls without bounds checks: the checks and the address
  // arithmetic they kept the compiler from hoisting were a large share of the instructions (ncu, session 9).
  uint32_t d[4];
  if (j.blocks == UB) {
#pragma unroll
    for (int u = 0; u < UB; u += 2) {
      load_block_pair(stage, u, lane, d);
      block(u, d[0], d[1]);
      block(u + 1, d[2], d[3]);
    }
    return;
  }
#pragma unroll
  for (int u = 0; u < UB; u += 2) {
    if (u >= j.blocks) break;
    load_block_pair(stage, u, lane, d);
    block(u, d[0], d[1]);
    if (u + 1 < j.blocks) block(u + 1, d[2], d[3]);
  }
}

// down: step s of job slot `slot` (job warp + 8 * slot) of the CTA's it-th item (16 rows of D).
struct DownCursor {
  int it = 0, slot = 0, s = 0;
  __device__ __forceinline__ void advance(int steps, int per_warp) {
    if (++s < steps) return;
    s = 0;
    if (++slot < per_warp) return;
    slot = 0, ++it;
  }
};

}  // namespace

// Grid (slots, tokens). An item is (expert slot j of token t, 16 rows of F): warps 0-3 take w1's four K
// slices, warps 4-7 w3's; the CTA then forms h for those 16 rows. h [T * topk, F] bf16.
extern "C" __global__ void __launch_bounds__(256, 2) dsv4_moe_gate_up(
    const __nv_bfloat16* __restrict__ x, const int* __restrict__ experts, const float* __restrict__ route_w,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ h, int topk, int D, int F, float limit) {
  extern __shared__ uint4 smem[];              // the warps' rings, codes [D], scales [D / 128]
  __shared__ const uint8_t* base[MAX_TOPK];
  __shared__ float partial[8][16];
  uint8_t* codes = reinterpret_cast<uint8_t*>(smem) + RING_BYTES;
  float* scales = reinterpret_cast<float*>(codes + D);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int which = warp / PARTS, part = warp % PARTS;
  const int groups = F / 16, items = topk * groups;
  const int nb = D / 32 / PARTS, steps = (nb + UB - 1) / UB;
  const int mine = my_items(items), total = mine * steps;

  dsv4::pdl_wait();                             // the routing (experts, weights) and x come from before
  dsv4::pdl_launch_dependents();
  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  __syncthreads();
  auto job = [&](const GateUpCursor& c) {
    const int row0 = c.rg * 16, blk = part * nb + c.s * UB;
    return bank_job(base[min(c.j, topk - 1)], which, row0, blk, step_blocks(c, mine, nb), D, F);
  };
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + warp * STAGES * STAGE_BYTES;
  const bool async_scales = nb % 4 == 0;
  GateUpCursor now(groups), ahead(groups);      // the step being multiplied, the step being loaded
  const auto advance = [&](GateUpCursor& c) { c.advance(steps, groups); };
  prime_ring(ring, job, ahead, advance, lane, async_scales);
  dsv4::quantise_to_smem<true>(x + size_t(t) * D, D, D, 0, codes, scales);   // while the first steps stream
  __syncthreads();
  float acc[2] = {0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    const uint8_t* stage = next_stage(ring, g, job, ahead, advance, lane, async_scales);
    const int blk = part * nb + now.s * UB;
    mma_step<1>(stage, job(now), async_scales, codes, scales, 0, 1, blk, lane, acc);
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    if (now.s == steps - 1) {
      if (q == 0) {
        partial[warp][r] = acc[0];
        partial[warp][r + 8] = acc[1];
      }
      acc[0] = acc[1] = 0.f;
      __syncthreads();
      if (threadIdx.x < 16) {
        const int j = now.j, n = now.rg * 16 + threadIdx.x;
        float sg = 0.f, su = 0.f;
        for (int p = 0; p < PARTS; ++p) {
          sg += partial[p][threadIdx.x];
          su += partial[PARTS + p][threadIdx.x];
        }
        float gate = __bfloat162float(__float2bfloat16(sg * 64.f));
        float up = __bfloat162float(__float2bfloat16(su * 64.f));
        if (limit > 0.f) {
          up = fminf(fmaxf(up, -limit), limit);
          gate = fminf(gate, limit);
        }
        const float wgt = route_w[t * topk + j];
        h[size_t(t * topk + j) * F + n] = __float2bfloat16(wgt * (gate / (1.f + __expf(-gate)) * up));
      }
      __syncthreads();
    }
    advance(now);
  }
}

// Grid (slots, tokens). An item is 16 rows of D for token t: its topk x PARTS jobs (expert slot, F slice)
// are spread over the 8 warps; the CTA then rounds each expert's output to bf16 and adds them in
// ascending expert id order. y [T, D] float32.
extern "C" __global__ void __launch_bounds__(256, 2) dsv4_moe_down(
    const __nv_bfloat16* __restrict__ h, const int* __restrict__ experts, const uint64_t* __restrict__ table,
    float* __restrict__ y, int topk, int D, int F) {
  extern __shared__ uint4 smem[];  // the warps' rings, codes [topk][F], scales [topk][F / 128], partial [jobs][16]
  __shared__ const uint8_t* base[MAX_TOPK];
  __shared__ int order[MAX_TOPK];
  uint8_t* codes = reinterpret_cast<uint8_t*>(smem) + RING_BYTES;
  float* scales = reinterpret_cast<float*>(codes + topk * F);
  float* partial = scales + topk * (F / 128);
  const int t = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int jobs = topk * PARTS, per_warp = (jobs + 7) / 8;
  const int nb = F / 32 / PARTS, steps = (nb + UB - 1) / UB;
  const int items = D / 16, mine = my_items(items), total = mine * per_warp * steps;

  if (threadIdx.x < topk) base[threadIdx.x] = reinterpret_cast<const uint8_t*>(table[experts[t * topk + threadIdx.x]]);
  if (threadIdx.x == 0) {                       // expert slots by ascending id (insertion sort, topk <= 16)
    for (int a = 0; a < topk; ++a) {
      const int id = experts[t * topk + a];
      int b = a;
      for (; b > 0 && experts[t * topk + order[b - 1]] > id; --b) order[b] = order[b - 1];
      order[b] = a;
    }
  }
  __syncthreads();
  auto job = [&](const DownCursor& c) {
    const int item = int(blockIdx.x) + c.it * int(gridDim.x), jobid = warp + 8 * c.slot;
    const int j = min(jobid / PARTS, topk - 1), blk = (jobid % PARTS) * nb + c.s * UB;
    return bank_job(base[j], 2, item * 16, blk, jobid < jobs ? step_blocks(c, mine, nb) : 0, D, F);
  };
  uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + warp * STAGES * STAGE_BYTES;
  const bool async_scales = nb % 4 == 0;
  DownCursor now, ahead;                        // the step being multiplied, the step being loaded
  const auto advance = [&](DownCursor& c) { c.advance(steps, per_warp); };
  prime_ring(ring, job, ahead, advance, lane, async_scales);
  dsv4::pdl_wait();                             // h comes from gate_up (experts and table from before it)
  dsv4::pdl_launch_dependents();
  dsv4::quantise_to_smem<true>(h + size_t(t) * topk * F, topk * F, topk * F, 0, codes, scales);
  __syncthreads();
  float acc[2] = {0.f, 0.f};
  for (int g = 0; g < total; ++g) {
    const uint8_t* stage = next_stage(ring, g, job, ahead, advance, lane, async_scales);
    const int jobid = warp + 8 * now.slot;
    const int blk = (jobid % PARTS) * nb + now.s * UB, pair = min(jobid / PARTS, topk - 1);
    mma_step<1>(stage, job(now), async_scales, codes + pair * F,
                scales + pair * (F / 128), 0, 1, blk, lane, acc);
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    if (now.s == steps - 1) {
      if (q == 0 && jobid < jobs) {
        partial[jobid * 16 + r] = acc[0];
        partial[jobid * 16 + r + 8] = acc[1];
      }
      acc[0] = acc[1] = 0.f;
    }
    if (now.s == steps - 1 && now.slot == per_warp - 1) {     // the item's last step
      __syncthreads();
      if (threadIdx.x < 16) {
        const int item = int(blockIdx.x) + now.it * int(gridDim.x);
        float sum = 0.f;
        for (int a = 0; a < topk; ++a) {
          const int j = order[a];
          float o = 0.f;
          for (int p = 0; p < PARTS; ++p) o += partial[(j * PARTS + p) * 16 + threadIdx.x];
          sum += __bfloat162float(__float2bfloat16(o * 64.f));
        }
        y[size_t(t) * D + item * 16 + threadIdx.x] = sum;
      }
      __syncthreads();
    }
    advance(now);
  }
}

// ------------------------------------------------------------------ prefill: tokens grouped by expert
// The decode kernels read each token's experts anew, so a prefill chunk of T tokens would read T x topk
// experts. Here the chunk's (token, slot) pairs are sorted by expert and each expert's run cut into groups
// of at most `max_group` (<= 8) pairs (plugins/moe_experts.py group_pairs: a kernel writes the group table,
// padded to the most groups the chunk could have, and its group count, which these kernels read after their
// wait: the host never waits for it, so a CUDA graph captures a whole prefill chunk); a group's tokens are the
// MMA's B columns, so each weight byte read serves all of them. Every column's products and sums are the
// decode kernels' (mma_step<8>, the same parts added in the same order), so the outputs equal theirs bit
// for bit. A CTA runs a contiguous range of items (group, row block): its group, and the group's quantised
// activations, change rarely. Both launches never allocate or synchronise.
namespace {

// Where a warp is in its CTA's range of items (item = g * blocks + rb), advanced by counters; `e` is the
// group's expert (its bank bytes), looked up when the group changes.
struct GroupCursor {
  int it = 0, s = 0, g = 0, rb = 0;
  const uint8_t* e = nullptr;
  __device__ __forceinline__ void start(int first, int blocks, int groups, const int* g_expert, const uint64_t* table) {
    g = first / blocks, rb = first % blocks;
    if (g < groups) e = reinterpret_cast<const uint8_t*>(table[g_expert[g]]);
  }
  __device__ __forceinline__ void advance(int steps, int blocks, int groups, int mine, const int* g_expert,
                                          const uint64_t* table) {
    if (++s < steps) return;
    s = 0, ++it;
    if (++rb < blocks) return;
    rb = 0, ++g;
    if (g < groups && it < mine) e = reinterpret_cast<const uint8_t*>(table[g_expert[g]]);
  }
};

// The CTA's contiguous range of `items`: its first item and how many.
__device__ __forceinline__ int2 cta_range(int items) {
  const int per = (items + int(gridDim.x) - 1) / int(gridDim.x), first = int(blockIdx.x) * per;
  return make_int2(first, max(0, min(per, items - first)));
}

// The group's rows of `src` (pair p's at src + p * n, or token p / topk's at src + (p / topk) * n when
// by_token), quantised into codes [j][n] and scales [j][n / 128]: the decode kernels' act_quant per row.
__device__ __forceinline__ int quantise_group(const __nv_bfloat16* src, const int* pairs, int start, int count,
                                              int topk, bool by_token, int n, uint8_t* codes, float* scales) {
  for (int j = 0; j < count; ++j) {
    const int p = pairs[start + j], row = by_token ? p / topk : p;
    dsv4::quantise_to_smem<true>(src + size_t(row) * n, n, n, 0, codes + j * n, scales + j * (n / 128));
  }
  __syncthreads();
  return count;
}

// What both grouped kernels share: the activation rows (`src`, `n` values each, by token or by pair), the
// grouping (groups of at most `max_group` pairs), and the walk (`blocks` row blocks per group, `nb` 32-K
// blocks per warp and item).
struct GroupedWalk {
  const __nv_bfloat16* src;
  const int *pairs, *g_expert, *g_start, *g_count;
  const uint64_t* table;
  int groups, topk, n, blocks, nb, max_group;
  bool by_token;
};

// The CTA's items (group, row block) in order, each warp streaming its job's steps through its ring; at a
// new group its rows are quantised into `codes`; after an item's last step the warps' sums are in
// partial[warp][row][token] and epilogue(cursor, ntok) forms the outputs. job(cursor) -> Fp4Job.
template <class JobOf, class Epilogue>
__device__ __forceinline__ void walk_groups(const GroupedWalk& w, uint8_t* smem_bytes, float (&partial)[8][16][8],
                                            JobOf job, Epilogue epilogue) {
  uint8_t* codes = smem_bytes + RING_BYTES;
  float* scales = reinterpret_cast<float*>(codes + w.max_group * w.n);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const int part = warp % PARTS, steps = (w.nb + UB - 1) / UB;
  const int2 range = cta_range(w.groups * w.blocks);
  const int mine = range.y, total = mine * steps;
  uint8_t* ring = smem_bytes + warp * STAGES * STAGE_BYTES;
  const bool async_scales = w.nb % 4 == 0;
  GroupCursor now, ahead;                       // the step being multiplied, the step being loaded
  now.start(range.x, w.blocks, w.groups, w.g_expert, w.table);
  ahead.start(range.x, w.blocks, w.groups, w.g_expert, w.table);
  auto job_at = [&](const GroupCursor& c) {
    Fp4Job jb = job(c);
    jb.blocks = step_blocks(c, mine, w.nb);
    return jb;
  };
  const auto advance = [&](GroupCursor& c) { c.advance(steps, w.blocks, w.groups, mine, w.g_expert, w.table); };
  prime_ring(ring, job_at, ahead, advance, lane, async_scales);
  int coded = -1, ntok = 0;                     // the group whose rows are in `codes`
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < total; ++i) {
    if (now.s == 0 && now.g != coded)           // every warp is here at the same i; `codes` is free
      coded = now.g, ntok = quantise_group(w.src, w.pairs, w.g_start[now.g], w.g_count[now.g], w.topk, w.by_token,
                                           w.n, codes, scales);
    const uint8_t* stage = next_stage(ring, i, job_at, ahead, advance, lane, async_scales);
    mma_step<8>(stage, job_at(now), async_scales, codes, scales, w.n, ntok,
                part * w.nb + now.s * UB, lane, acc);
    __syncwarp();                               // the stage is refilled by the next iteration's issue
    if (now.s == steps - 1) {                   // the item's last step
      partial[warp][r][2 * q] = acc[0];
      partial[warp][r][2 * q + 1] = acc[1];
      partial[warp][r + 8][2 * q] = acc[2];
      partial[warp][r + 8][2 * q + 1] = acc[3];
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      __syncthreads();
      epilogue(now, ntok);
      __syncthreads();
    }
    advance(now);
  }
}

}  // namespace

// An item is (group g, 16 rows of F): warps 0-3 take w1's four K slices, warps 4-7 w3's, for all of the
// group's tokens; the CTA then forms h for those rows and tokens. h [T * topk, F] bf16, pair-indexed.
extern "C" __global__ void __launch_bounds__(256, 2) dsv4_moe_gate_up_grouped(
    const __nv_bfloat16* __restrict__ x, const int* __restrict__ pairs, const int* __restrict__ g_expert,
    const int* __restrict__ g_start, const int* __restrict__ g_count, const float* __restrict__ route_w,
    const uint64_t* __restrict__ table, __nv_bfloat16* __restrict__ h, const int* __restrict__ n_groups, int topk,
    int D, int F, float limit, int max_group) {
  extern __shared__ uint4 smem[];              // the warps' rings, codes [max_group][D], scales [max_group][D / 128]
  __shared__ float partial[8][16][8];
  const int warp = threadIdx.x >> 5, which = warp / PARTS, part = warp % PARTS, nb = D / 32 / PARTS;
  dsv4::pdl_wait();                             // the routing and x come from the kernels before
  dsv4::pdl_launch_dependents();
  const GroupedWalk w{x, pairs, g_expert, g_start, g_count, table, *n_groups, topk, D, F / 16, nb, max_group, true};
  auto job = [&](const GroupCursor& c) {
    return bank_job(c.e, which, c.rb * 16, part * nb + c.s * UB, 0, D, F);
  };
  auto epilogue = [&](const GroupCursor& c, int ntok) {
    const int row = threadIdx.x >> 3, j = threadIdx.x & 7;
    if (threadIdx.x >= 128 || j >= ntok) return;
    float sg = 0.f, su = 0.f;
    for (int p = 0; p < PARTS; ++p) {
      sg += partial[p][row][j];
      su += partial[PARTS + p][row][j];
    }
    float gate = __bfloat162float(__float2bfloat16(sg * 64.f));
    float up = __bfloat162float(__float2bfloat16(su * 64.f));
    if (limit > 0.f) {
      up = fminf(fmaxf(up, -limit), limit);
      gate = fminf(gate, limit);
    }
    const int pair = pairs[g_start[c.g] + j];
    h[size_t(pair) * F + c.rb * 16 + row] = __float2bfloat16(route_w[pair] * (gate / (1.f + __expf(-gate)) * up));
  };
  walk_groups(w, reinterpret_cast<uint8_t*>(smem), partial, job, epilogue);
}

// An item is (group g, 32 rows of D): warps 0-3 take rows 0-15 over w2's four K (F) slices, warps 4-7 rows
// 16-31; the CTA rounds each pair's output to bf16, as the decode kernel rounds each expert's. ypart [T *
// topk, D] float32, pair-indexed; the host adds a token's pairs in ascending expert id order.
extern "C" __global__ void __launch_bounds__(256, 2) dsv4_moe_down_grouped(
    const __nv_bfloat16* __restrict__ h, const int* __restrict__ pairs, const int* __restrict__ g_expert,
    const int* __restrict__ g_start, const int* __restrict__ g_count, const uint64_t* __restrict__ table,
    float* __restrict__ ypart, const int* __restrict__ n_groups, int D, int F, int max_group) {
  extern __shared__ uint4 smem[];              // the warps' rings, codes [max_group][F], scales [max_group][F / 128]
  __shared__ float partial[8][16][8];
  const int warp = threadIdx.x >> 5, half = warp / PARTS, part = warp % PARTS, nb = F / 32 / PARTS;
  dsv4::pdl_wait();                             // h comes from gate_up
  dsv4::pdl_launch_dependents();
  const GroupedWalk w{h, pairs, g_expert, g_start, g_count, table, *n_groups, 1, F, D / 32, nb, max_group, false};
  auto job = [&](const GroupCursor& c) {
    return bank_job(c.e, 2, c.rb * 32 + half * 16, part * nb + c.s * UB, 0, D, F);
  };
  auto epilogue = [&](const GroupCursor& c, int ntok) {
    const int hh = threadIdx.x >> 7, row = (threadIdx.x >> 3) & 15, j = threadIdx.x & 7;
    if (j >= ntok) return;
    float o = 0.f;
    for (int p = 0; p < PARTS; ++p) o += partial[hh * PARTS + p][row][j];
    const int pair = pairs[g_start[c.g] + j];
    ypart[size_t(pair) * D + c.rb * 32 + hh * 16 + row] = __bfloat162float(__float2bfloat16(o * 64.f));
  };
  walk_groups(w, reinterpret_cast<uint8_t*>(smem), partial, job, epilogue);
}

namespace moe_sum {

// Token t's pairs at 4 columns from col: ypart [T * topk, D] float32, pair-indexed (token * topk + slot), added
// in ascending expert id order, in float32 from zero, as the decode kernel adds its experts (so grouped
// prefill stays the decode kernels' bits). topk 0: ypart is the sum itself, [T, D].
__device__ __forceinline__ float4 pair_sum(const float* __restrict__ ypart, const int* __restrict__ experts,
                                           int t, int col, int topk, int D) {
  if (topk == 0) return *reinterpret_cast<const float4*>(ypart + size_t(t) * D + col);
  int id[MAX_TOPK], slot[MAX_TOPK];
  for (int a = 0; a < topk; ++a) {              // insertion sort of the token's (expert, slot) by expert id
    const int e = experts[size_t(t) * topk + a];
    int b = a;
    for (; b > 0 && id[b - 1] > e; --b) {
      id[b] = id[b - 1];
      slot[b] = slot[b - 1];
    }
    id[b] = e;
    slot[b] = a;
  }
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int a = 0; a < topk; ++a) {
    const float4 p = *reinterpret_cast<const float4*>(ypart + (size_t(t) * topk + slot[a]) * D + col);
    acc.x += p.x;
    acc.y += p.y;
    acc.z += p.z;
    acc.w += p.w;
  }
  return acc;
}

}  // namespace moe_sum

// Grid: (T, ceil(D / 1024)), 256 threads, 4 columns each: y [T, D] float32 = each token's pairs' sum
// (moe_sum::pair_sum). One launch where torch took a gather and an add per slot.
extern "C" __global__ void __launch_bounds__(256) dsv4_moe_sum_pairs(const float* __restrict__ ypart,
                                                                     const int* __restrict__ experts,
                                                                     float* __restrict__ y, int topk, int D) {
  dsv4::pdl_wait();                             // ypart comes from the down launch
  dsv4::pdl_launch_dependents();
  const int t = blockIdx.x, col = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
  if (col >= D) return;
  *reinterpret_cast<float4*>(y + size_t(t) * D + col) = moe_sum::pair_sum(ypart, experts, t, col, topk, D);
}

// The decode MoE's end inside its hyper-connection post, one launch where the program ran the sum over pairs
// and a kernel of its own for the rest (the layer's last): per token t and column,
//   f = bf16( pair_sum + shared )   (plugins' moe_hc_post: the routed sum, float32, plus the shared expert's
//                                    bf16 output, rounded to the activation dtype)
//   out[t, k] = hc_post of f over the streams res [T, HC, D] bf16 with post [T, HC], comb [T, HC, HC] float32
// Grid (T, ceil(D / 1024)), 256 threads, 4 columns each. out [T, HC, D] bf16.
extern "C" __global__ void __launch_bounds__(256) dsv4_moe_sum_pairs_post(
    const float* __restrict__ ypart, const int* __restrict__ experts, const __nv_bfloat16* __restrict__ shared,
    const __nv_bfloat16* __restrict__ res, const float* __restrict__ post, const float* __restrict__ comb,
    __nv_bfloat16* __restrict__ out, int topk, int D) {
  constexpr int HC = 4;
  dsv4::pdl_wait();                             // ypart and the shared output come from the kernels before
  dsv4::pdl_launch_dependents();
  const int t = blockIdx.x, col = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
  if (col >= D) return;
  const float4 acc = moe_sum::pair_sum(ypart, experts, t, col, topk, D);
  const float sum[4] = {acc.x, acc.y, acc.z, acc.w};
  float f[4], r[HC][4];
  const uint2 sh = *reinterpret_cast<const uint2*>(shared + size_t(t) * D + col);
  const __nv_bfloat16* shv = reinterpret_cast<const __nv_bfloat16*>(&sh);
#pragma unroll
  for (int e = 0; e < 4; ++e) f[e] = dsv4::bf16_round(sum[e] + __bfloat162float(shv[e]));
#pragma unroll
  for (int j = 0; j < HC; ++j) {
    const uint2 raw = *reinterpret_cast<const uint2*>(res + (size_t(t) * HC + j) * D + col);
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) r[j][e] = __bfloat162float(v[e]);
  }
  const float* comb_t = comb + size_t(t) * HC * HC;
#pragma unroll
  for (int k = 0; k < HC; ++k) {
    __nv_bfloat16 o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float rj[HC] = {r[0][e], r[1][e], r[2][e], r[3][e]};
      o[e] = dsv4_rows::hc_post_value<HC>(post[t * HC + k], f[e], comb_t, k, rj);
    }
    *reinterpret_cast<uint2*>(out + (size_t(t) * HC + k) * D + col) = *reinterpret_cast<uint2*>(o);
  }
}
