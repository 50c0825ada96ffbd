// Helpers shared by the project's kernels: DeepSeek's power-of-two block scales and E8M0 decoding.
#pragma once
#include <stdint.h>

namespace dsv4 {

// 2^ceil(log2(amax * inv_qmax)) by exponent bits, as DeepSeek's fast_round_scale.
__device__ __forceinline__ float pow2_ceil_scale(float amax, float inv_qmax) {
  const uint32_t bits = __float_as_uint(amax * inv_qmax);
  const int exp = int((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0);
  return __uint_as_float(uint32_t(exp + 127) << 23);
}

// An E8M0 scale byte as a float: 2^(b - 127).
__device__ __forceinline__ float e8m0(uint8_t b) { return __uint_as_float(uint32_t(b) << 23); }

}  // namespace dsv4
