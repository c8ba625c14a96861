// Vector types and helpers shared by the native CPU kernels (cpu_attention.cc, cpu_matmul.cc):
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

}  // namespace jaxserve_simd
