// The score-routed MoE gate after its product, for decode: one launch where torch makes four or five
// (softplus and sqrt, the biased top-k with its sort, the gather, the normalisation), DeepSeek's numerics:
//   score = sqrt(softplus(logit))            softplus(x) = x above 20, else log1p(exp(x)) (torch's threshold)
//   experts = the top k of score + bias      the bias only chooses
//   weight = score[e] / sum of the k scores * scale
// A warp per row: each lane keeps its experts' biased scores in registers, k rounds of warp argmax pick
// the experts in descending order (ties to the lower id), and the scores are summed in that order.
#include "common.cuh"

namespace {
constexpr int MAX_PER_LANE = 32;   // experts per row up to 32 x 32
constexpr int MAX_K = 16;
}  // namespace

// Grid: one warp (32 threads) per row. logits [N, E] float32, bias [E] -> weights [N, k] float32,
// experts [N, k] int32.
extern "C" __global__ void __launch_bounds__(32) dsv4_route_topk(const float* __restrict__ logits,
                                                                const float* __restrict__ bias,
                                                                float* __restrict__ weights,
                                                                int* __restrict__ experts, int E, int k,
                                                                float scale) {
  const int row = blockIdx.x, lane = threadIdx.x;
  dsv4::pdl_wait();                            // the logits come from the gate's product
  dsv4::pdl_launch_dependents();
  float score[MAX_PER_LANE], chooser[MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < MAX_PER_LANE; ++i) {
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
  float picked[MAX_K], sum = 0.f;
  int ids[MAX_K];
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int at = -1;                               // this lane's best slot
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i)
      if (i * 32 < E && chooser[i] > best) best = chooser[i], at = i;
    int id = at < 0 ? 0x7FFFFFFF : at * 32 + lane;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {   // the warp's best, the lower id on a tie
      const float b = __shfl_xor_sync(0xffffffffu, best, off);
      const int o = __shfl_xor_sync(0xffffffffu, id, off);
      if (b > best || (b == best && o < id)) best = b, id = o;
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i)
      if (i * 32 + lane == id) s = score[i], chooser[i] = -INFINITY;
    s = __shfl_sync(0xffffffffu, s, id & 31);  // from the lane that held it
    picked[j] = s;
    ids[j] = id;
    sum += s;
  }
  if (lane == 0) {
    for (int j = 0; j < k; ++j) {
      weights[size_t(row) * k + j] = picked[j] / sum * scale;
      experts[size_t(row) * k + j] = ids[j];
    }
  }
}
