// The score-routed MoE gate after its product, for decode: one launch where torch makes four or five
// (softplus and sqrt, the biased top-k with its sort, the gather, the normalisation), DeepSeek's numerics:
//   score = sqrt(softplus(logit))            softplus(x) = x above 20, else log1p(exp(x)) (torch's threshold)
//   experts = the top k of score + bias      the bias only chooses
//   weight = score[e] / sum of the k scores * scale
// A warp per row: each lane keeps its experts' biased scores in registers, k rounds of warp argmax pick
// the experts in descending order (ties to the lower id), and the scores are summed in that order. Built
// for 8, 16 and 32 experts per lane (256, 512, 1024 experts): a single warp runs its instructions one
// after another, so a 256-expert gate must not pay for 1024 (the 32-slot build alone took 8.3 us on the
// H200, about 2700 instructions in a row).
#include "common.cuh"

namespace {
template <int SLOTS>
__device__ __forceinline__ void route_topk_row(const float* __restrict__ logits, const float* __restrict__ bias,
                                               float* __restrict__ weights, int* __restrict__ experts, int E,
                                               int k, float scale) {
  const int row = blockIdx.x, lane = threadIdx.x;
  dsv4::pdl_wait();                            // the logits come from the gate's product
  dsv4::pdl_launch_dependents();
  float score[SLOTS], chooser[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const int e = i * 32 + lane;
    if (e < E) {
      const float x = logits[size_t(row) * E + e];
      score[i] = sqrtf(x > 20.f ? x : log1pf(expf(x)));
      chooser[i] = score[i] + bias[e];
    } else {
      score[i] = 0.f;
      chooser[i] = -INFINITY;
    }
  }
  float mine = 0.f, sum = 0.f;                 // lane j: the j-th pick's score and id
  int mine_id = 0;
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
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
      if (i * 32 + lane == id) s = score[i], chooser[i] = -INFINITY;
    s = __shfl_sync(0xffffffffu, s, id & 31);  // from the lane that held it
    if (lane == j) mine = s, mine_id = id;
    sum += s;
  }
  if (lane < k) {
    weights[size_t(row) * k + lane] = mine / sum * scale;
    experts[size_t(row) * k + lane] = mine_id;
  }
}
}  // namespace

// Grid: one warp (32 threads) per row. logits [N, E] float32, bias [E] -> weights [N, k] float32,
// experts [N, k] int32; E <= 32 * SLOTS, k <= 16.
#define DSV4_ROUTE_TOPK(SLOTS)                                                                                  \
  extern "C" __global__ void __launch_bounds__(32) dsv4_route_topk_s##SLOTS(                                  \
      const float* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ weights,           \
      int* __restrict__ experts, int E, int k, float scale) {                                                  \
    route_topk_row<SLOTS>(logits, bias, weights, experts, E, k, scale);                                        \
  }
DSV4_ROUTE_TOPK(8)
DSV4_ROUTE_TOPK(16)
DSV4_ROUTE_TOPK(32)
#undef DSV4_ROUTE_TOPK
