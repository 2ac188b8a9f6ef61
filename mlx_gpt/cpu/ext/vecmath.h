// Branch-free float32 functions that the compiler vectorizes inside loops (libm's expf is a call
// per element), and fixed-width partial sums (a plain float sum loop is not vectorized without
// -ffast-math, which would also let the compiler reorder the rest of the arithmetic).
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_gpt {

constexpr int kLanes = 16;  // two AVX2 registers of partial sums

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e**d for d <= 0, within 2 ulp; 0 where the result would be subnormal (d < -87.33), NaN for NaN.
// Cody-Waite reduction d = n ln2 + r with a two-part ln 2, e**r by a degree-6 minimax polynomial
// on |r| <= ln(2)/2, and 2**n assembled in the exponent bits.
inline float exp_nonpositive(float d) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: y + kRound - kRound rounds to an integer
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440054690582e-4f;
  constexpr float c2 = 0.49999988f, c3 = 0.16666515f, c4 = 0.0416696f, c5 = 0.008369332f,
                  c6 = 0.0013749899f;
  constexpr float kMin = -87.33654475f;  // ln(2**-126)
  float dc = d < kMin ? kMin : d;
  float n = (dc * kLog2e + kRound) - kRound;
  float r = (dc - n * kLn2Hi) - n * kLn2Lo;
  float r2 = r * r;
  float p = ((1.0f + r) + r2 * (c2 + c3 * r)) + (r2 * r2) * ((c4 + c5 * r) + r2 * c6);
  float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  float e = p * scale;
  return d < kMin ? 0.0f : e;
}

// Sum of term(i) over [0, n): kLanes float partial sums over blocks of kBlock terms (vectorized),
// each block's total added in double, so the error stays a few ulps however long the row is.
template <class Term>
inline float sum_of(int64_t n, Term term) {
  constexpr int64_t kBlock = kLanes * 32;
  double total = 0.0;
  int64_t i = 0;
  auto fold = [](float* acc) {
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
  };
  for (; i + kBlock <= n; i += kBlock) {
    float acc[kLanes] = {};
    for (int64_t k = 0; k < kBlock; k += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += term(i + k + l);
    total += fold(acc);
  }
  float acc[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  float rest = 0.0f;
  for (; i < n; ++i) rest += term(i);
  return static_cast<float>(total + (static_cast<double>(fold(acc)) + rest));
}

inline float sum(const float* x, int64_t n) {
  return sum_of(n, [x](int64_t i) { return x[i]; });
}

inline float dot(const float* x, const float* y, int64_t n) {
  return sum_of(n, [x, y](int64_t i) { return x[i] * y[i]; });
}

// Largest x[i] over [0, n) (n >= 1); NaN if any x[i] is NaN.
inline float max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = x[0];
  int64_t i = 0;
  bool nan = false;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float v = x[i + l];
      acc[l] = v > acc[l] ? v : acc[l];
      nan |= v != v;
    }
  float m = acc[0];
  for (; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return nan ? __builtin_nanf("") : m;
}

}  // namespace mlx_gpt
