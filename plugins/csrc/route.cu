// The MoE gate after its product, for decode: one launch where torch makes four or five (softplus and sqrt,
// the biased top-k with its sort, the gather, the normalisation), DeepSeek's numerics:
//   score = sqrt(softplus(logit))            softplus(x) = x above 20, else log1p(exp(x)) (torch's threshold)
//   experts = the top k of score + bias      the bias only chooses
//          or tid2eid[token id]              hash layers: the table's row, in its order
//   weight = score[e] / sum of the k scores * scale   (summed in the experts' order)
// A warp per row. Score routing: each lane keeps its experts' biased scores in registers, k rounds of warp
// argmax pick the experts in descending order (ties to the lower id). Hash routing: lane j reads the row's
// j-th expert from the table and scores that logit alone. Built for 8, 16 and 32 experts per lane (256, 512,
// 1024 experts): a single warp runs its instructions one after another, so a 256-expert gate must not pay for
// 1024 (the 32-slot build alone took 8.3 us on the H200, about 2700 instructions in a row).
#include "common.cuh"

namespace {
__device__ __forceinline__ float gate_score(float logit) {
  return sqrtf(logit > 20.f ? logit : log1pf(expf(logit)));
}

// Lane j < k: the j-th biased top-k pick of the row, its score and id (the other lanes keep theirs).
template <int SLOTS>
__device__ __forceinline__ void topk_picks(const float* __restrict__ logits, const float* __restrict__ bias, int E,
                                           int k, float& mine, int& mine_id) {
  const int lane = threadIdx.x;
  float score[SLOTS], chooser[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const int e = i * 32 + lane;
    if (e < E) {
      score[i] = gate_score(logits[e]);
      chooser[i] = score[i] + bias[e];
    } else {
      score[i] = 0.f;
      chooser[i] = -INFINITY;
    }
  }
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int at = -1;                               // this lane's best slot
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
      if (chooser[i] > best) best = chooser[i], at = i;
    int id = at < 0 ? 0x7FFFFFFF : at * 32 + lane;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {   // the warp's best, the lower id on a tie
      const float b = __shfl_xor_sync(0xffffffffu, best, off);
      const int o = __shfl_xor_sync(0xffffffffu, id, off);
      if (b > best || (b == best && o < id)) best = b, id = o;
    }
    // No finite score left (NaN logits, e.g. from a layer that overflowed): an id in range anyway, whose NaN
    // weight shows in the output, not one past the expert table, whose read would fault the whole step.
    if (id == 0x7FFFFFFF) id = j;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
      if (i * 32 + lane == id) s = score[i], chooser[i] = -INFINITY;
    s = __shfl_sync(0xffffffffu, s, id & 31);  // from the lane that held it
    if (lane == j) mine = s, mine_id = id;
  }
}

// One row: the experts (hash routing where tid2eid is given, else the biased top-k) and their weights.
template <int SLOTS>
__device__ __forceinline__ void route_row(const float* __restrict__ logits, const float* __restrict__ bias,
                                          const int* __restrict__ tid2eid, const int64_t* __restrict__ ids,
                                          float* __restrict__ weights, int* __restrict__ experts, int E, int k,
                                          float scale) {
  const int row = blockIdx.x, lane = threadIdx.x;
  dsv4::pdl_wait();                            // the logits come from the gate's product, the ids from the step
  dsv4::pdl_launch_dependents();
  logits += size_t(row) * E;
  float mine = 0.f;                            // lane j: the row's j-th expert's score and id
  int mine_id = 0;
  if (tid2eid != nullptr) {
    if (lane < k) {
      mine_id = tid2eid[size_t(ids[row]) * k + lane];
      mine = gate_score(logits[mine_id]);
    }
  } else {
    topk_picks<SLOTS>(logits, bias, E, k, mine, mine_id);
  }
  float sum = 0.f;
  for (int j = 0; j < k; ++j) sum += __shfl_sync(0xffffffffu, mine, j);   // in the experts' order
  if (lane < k) {
    weights[size_t(row) * k + lane] = mine / sum * scale;
    experts[size_t(row) * k + lane] = mine_id;
  }
}
}  // namespace

// Grid: one warp (32 threads) per row. logits [N, E] float32 -> weights [N, k] float32, experts [N, k] int32;
// score routing: bias [E] float32, tid2eid and ids null; hash routing: tid2eid [V, k] int32, ids [N] int64,
// bias null. E <= 32 * SLOTS, k <= 16.
#define DSV4_ROUTE_TOPK(SLOTS)                                                                                  \
  extern "C" __global__ void __launch_bounds__(32) dsv4_route_topk_s##SLOTS(                                  \
      const float* __restrict__ logits, const float* __restrict__ bias, const int* __restrict__ tid2eid,       \
      const int64_t* __restrict__ ids, float* __restrict__ weights, int* __restrict__ experts, int E, int k,    \
      float scale) {                                                                                           \
    route_row<SLOTS>(logits, bias, tid2eid, ids, weights, experts, E, k, scale);                               \
  }
DSV4_ROUTE_TOPK(8)
DSV4_ROUTE_TOPK(16)
DSV4_ROUTE_TOPK(32)
#undef DSV4_ROUTE_TOPK
