// Vector types and helpers shared by the native CPU kernels (cpu_attention.cc, cpu_matmul.cc):
// a vectorizable exp for non-positive arguments (softmax, SwiGLU's sigmoid), and
// GCC/Clang vector types of the target's widest float vector (kW lanes; the compiler picks the
// instructions), with 8- and 4-lane fallbacks (AVX2, SSE/NEON).
#pragma once

#include <cstdint>
#include <cstring>

namespace jaxserve_simd {

#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX__) || defined(__ARM_FEATURE_SVE)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
typedef float VF __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(float))));

inline VF LoadF(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void StoreF(float* p, VF v) { std::memcpy(p, &v, sizeof v); }

// Lanes [0, kW/2) = sums of adjacent lane pairs of a, lanes [kW/2, kW) = the same for b.
inline VF PairSum(VF a, VF b) {
#if defined(__clang__)
#define JXS_SHUF(...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define JXS_SHUF(...) __builtin_shuffle(a, b, VI{__VA_ARGS__})
#endif
#if defined(__AVX512F__)
  return JXS_SHUF(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         JXS_SHUF(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(__AVX__) || defined(__ARM_FEATURE_SVE)
  return JXS_SHUF(0, 2, 4, 6, 8, 10, 12, 14) + JXS_SHUF(1, 3, 5, 7, 9, 11, 13, 15);
#else
  return JXS_SHUF(0, 2, 4, 6) + JXS_SHUF(1, 3, 5, 7);
#endif
#undef JXS_SHUF
}

// x[i] <- exp(x[i]) for x[i] <= 0 (finite), written so the loop vectorizes: x = k ln2 + r with
// integer k and |r| <= ln2 / 2, e^r from its degree-7 Taylor polynomial (truncation < 2e-9
// relative; the result is within a few float32 ulp of exp), 2^k put into the exponent bits.
// Inputs are clamped at -80: e^-80 ~ 1.8e-35 is still a normal float, so no result is subnormal
// (slow on x86), and a key that far below the row's max weighs nothing next to the max's 1.
inline void ExpNonPositive(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] < -80.0f ? -80.0f : x[i];
    const float k = (v * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(v / ln2)
    float r = v - k * 0.693359375f;                                   // ln2, high part (exact)
    r = r - k * -2.12194440e-4f;                                      // ln2, low part
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    x[i] = p * two_k;
  }
}

}  // namespace jaxserve_simd
