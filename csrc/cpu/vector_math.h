// Float32 math that the compiler can vectorize, for the CPU kernels.
//
// libm's expf/erff/tanhf are scalar calls, so a loop over them runs one
// element at a time; ATen gets around this with hand-written SIMD. Here the
// functions are plain branch-free arithmetic (selects, multiplies, a bit cast)
// that GCC and Clang vectorize on their own, and NANOBLOCK_VECTORIZE compiles
// a loop twice, for AVX2+FMA and for the baseline, picking one at load time
// (no -march flag, so the build runs on any x86-64). float64 keeps libm.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define NANOBLOCK_VECTORIZE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NANOBLOCK_VECTORIZE
#endif

// What a NANOBLOCK_VECTORIZE loop calls must be inlined into it, or the call
// runs the baseline build of the callee.
#if defined(__GNUC__)
#define NANOBLOCK_INLINE __attribute__((always_inline)) inline
#else
#define NANOBLOCK_INLINE inline
#endif

namespace nanoblock::cpu {

// exp(x), relative error below 2e-7 for x in [-87, 88]; x is clamped to that
// range (exp(-87) ~ 1.6e-38 stands in for 0, exp(88) ~ 1.7e38 for overflow).
NANOBLOCK_INLINE float exp_float(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // x = n ln2 + r with |r| <= ln2 / 2; n is rounded by adding 1.5 * 2^23.
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  // exp(r) by its Taylor series to r^7: truncation error < 1e-8 for |r| <= 0.35.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // times 2^n, built in the exponent bits
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erfc(z) for z >= 0 with relative error below 1.2e-7 (the Chebyshev fit of
// Numerical Recipes' erfcc) plus exp's. Relative, not absolute, accuracy
// matters here: GELU's tail for negative inputs is x * erfc(|x| / sqrt 2) / 2.
NANOBLOCK_INLINE float erfc_nonneg_float(float z) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_float(-z * z + p);
}

// The sum of value(i) for i in [0, n), kept in kLanes independent partial
// sums so that the compiler can vectorize it (one running sum would have to
// stay in order, hence scalar). The order is fixed: same inputs, same bits.
constexpr int64_t kLanes = 8;

template <typename T, typename Value>
NANOBLOCK_INLINE T lane_sum(int64_t n, const Value& value) {
  T lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += value(i + l);
  }
  for (; i < n; ++i) lane[0] += value(i);
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

}  // namespace nanoblock::cpu
