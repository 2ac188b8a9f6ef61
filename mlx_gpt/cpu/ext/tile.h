// Small matrix products from a register tile: the attention kernels multiply (T, hs) by (hs, S)
// blocks with T, S up to the block size and hs about 64, below the sizes where BLAS pays for its
// packing. A tile of 4 rows by 16 columns of partial sums stays in registers over the whole inner
// loop, vectorized by the compiler.
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_gpt {

constexpr int kRows = 4;     // rows of a register tile
constexpr int kCols = 16;    // columns of a register tile: two AVX2 registers

// eight floats in one AVX2 register (two NEON registers); GCC and Clang vector extensions, since
// plain arrays of partial sums were partly kept on the stack
typedef float Lanes __attribute__((vector_size(32)));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// c (R x n) = a (R x kk) b (kk x n). a(i, k) is a[i * ai + k * ak]
// (either layout of a), row k of b starts at b + k * ldb, row i of c at c + i * ldc. The partial
// sums of an R x 16 tile stay in registers over the whole k loop.
template <int R>
inline void tile_rows(int64_t n, int64_t kk, const float* a, int64_t ai, int64_t ak, const float* b, int64_t ldb,
                      float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) {
    Lanes acc[R][2] = {};
    for (int64_t k = 0; k < kk; ++k) {
      const float* bk = b + k * ldb + j;
      Lanes b0 = load(bk), b1 = load(bk + 8);
      for (int r = 0; r < R; ++r) {
        Lanes av = Lanes{} + a[r * ai + k * ak];
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc + j;
      store(cr, acc[r][0]);
      store(cr + 8, acc[r][1]);
    }
  }
  if (j < n) {  // the last n % 16 columns
    int w = static_cast<int>(n - j);
    float acc[R][kCols] = {};
    for (int64_t k = 0; k < kk; ++k) {
      const float* bk = b + k * ldb + j;
      for (int r = 0; r < R; ++r) {
        float av = a[r * ai + k * ak];
        for (int l = 0; l < w; ++l) acc[r][l] += av * bk[l];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < w; ++l) c[r * ldc + j + l] = acc[r][l];
  }
}

// tile_rows for m rows: tiles of kRows, then one row at a time
inline void matmul(int64_t m, int64_t n, int64_t kk, const float* a, int64_t ai, int64_t ak, const float* b,
                   int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) tile_rows<kRows>(n, kk, a + i * ai, ai, ak, b, ldb, c + i * ldc, ldc);
  for (; i < m; ++i) tile_rows<1>(n, kk, a + i * ai, ai, ak, b, ldb, c + i * ldc, ldc);
}

}  // namespace mlx_gpt
