#include "query/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SQZ_ATTN_AVX2 1
#endif

#include "sqz/query.h"
#include "util/half.h"

namespace sqz::query {

namespace {

// Bound on the score scratch of one tile of query rows (floats).
constexpr int64_t kScoreTileFloats = int64_t{1} << 22;

// Turns the scores row x[0..n) into exp(x_i - max) in place and returns the
// max and the sum of the exponentials (double); false (x untouched) if a
// score is not finite.
bool ExpRow(float* x, int64_t n, double* max_out, double* sum_out) {
  float m = -INFINITY;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite &= std::isfinite(x[i]);
    m = std::max(m, x[i]);
  }
  if (!finite) return false;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  *max_out = m;
  *sum_out = sum;
  return true;
}

// One row entirely in double: only for scores that overflow float32, where
// q . k of finite floats is still finite in double.
void AttendRowDouble(const float* q, const float* k, const float* v, int64_t n, int d, float scale, float* o,
                     float* lse) {
  std::vector<double> x(n), acc(d, 0.0);
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[i * d + c];
    x[i] = scale * dot;
    m = std::max(m, x[i]);
  }
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double w = std::exp(x[i] - m);
    sum += w;
    for (int c = 0; c < d; ++c) acc[c] += w * v[i * d + c];
  }
  for (int c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / sum);
  *lse = static_cast<float>(m + std::log(sum));
}

}  // namespace

void ScoreRows(const float* q, int rows, const float* k, int64_t n, int d, float scale, float* x, int64_t ldx) {
  // Key-major: each key row is loaded once for all query rows of the tile.
  for (int64_t i = 0; i < n; ++i) {
    const float* ki = k + i * d;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int c = 0; c < d; ++c) acc += qr[c] * ki[c];
      x[static_cast<int64_t>(r) * ldx + i] = scale * acc;
    }
  }
}

namespace {

// o [rows, d] += P V for normalised weights P = x [rows, n] (rows ldx apart).
void WeightedSumLoops(const float* x, int rows, const float* v, int64_t n, int d, float* o, int64_t ldx) {
  for (int64_t i = 0; i < n; ++i) {
    const float* vi = v + i * d;
    for (int r = 0; r < rows; ++r) {
      const float w = x[static_cast<int64_t>(r) * ldx + i];
      float* orow = o + static_cast<int64_t>(r) * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) orow[c] += w * vi[c];
    }
  }
}

}  // namespace

void AttendRows(const float* q, int64_t m, const float* k, const float* v, int64_t n, int d, float scale, float* o,
                float* lse, Kernel kernel, std::vector<float>* scratch) {
  if (n == 0) {
    std::fill_n(o, m * d, 0.0f);
    std::fill_n(lse, m, -INFINITY);
    return;
  }
  const int64_t tile = std::clamp<int64_t>(kScoreTileFloats / n, 1, m);
  scratch->resize(tile * n);
  float* x = scratch->data();
  const int nn = static_cast<int>(n);
  std::vector<int> overflowed;
  for (int64_t r0 = 0; r0 < m; r0 += tile) {
    const int rows = static_cast<int>(std::min(tile, m - r0));
    const float* qt = q + r0 * d;
    float* ot = o + r0 * d;
    if (kernel == Kernel::kBlas) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nn, d, scale, qt, d, k, d, 0.0f, x, nn);
    } else {
      ScoreRows(qt, rows, k, n, d, scale, x, n);
    }
    overflowed.clear();
    for (int r = 0; r < rows; ++r) {
      float* row = x + static_cast<int64_t>(r) * n;
      double mx, sum;
      if (!ExpRow(row, n, &mx, &sum)) {
        std::fill_n(row, n, 0.0f);  // recomputed in double after the product
        overflowed.push_back(r);
        continue;
      }
      lse[r0 + r] = static_cast<float>(mx + std::log(sum));
      // Normalise the weights before the product so P V is already O.
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t i = 0; i < n; ++i) row[i] *= inv;
    }
    if (kernel == Kernel::kBlas) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, nn, 1.0f, x, nn, v, d, 0.0f, ot, d);
    } else {
      std::fill_n(ot, static_cast<int64_t>(rows) * d, 0.0f);
      WeightedSumLoops(x, rows, v, n, d, ot, n);
    }
    for (int r : overflowed) {
      AttendRowDouble(qt + static_cast<int64_t>(r) * d, k, v, n, d, scale, ot + static_cast<int64_t>(r) * d,
                      lse + r0 + r);
    }
  }
}

#ifdef SQZ_ATTN_AVX2
// AVX2 forms of ScoreRows / WeightedSumLoops for AttendBlocks (d % 32 == 0):
// same products, summed in a different order (float rounding only).

float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x[r * ldx + i] = scale * q_r . k_i. Four query rows per pass over a key
// row: four independent FMA chains, the key row loaded once for them.
void ScoresAvx2(const float* q, int rows, const float* k, int64_t n, int d, float scale, float* x, int64_t ldx) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + static_cast<int64_t>(r) * d;
    const float *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
    for (int64_t i = 0; i < n; ++i) {
      const float* ki = k + i * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int c = 0; c < d; c += 8) {
        const __m256 kv = _mm256_loadu_ps(ki + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + c), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + c), kv, a3);
      }
      x[static_cast<int64_t>(r) * ldx + i] = scale * HorizontalSum(a0);
      x[static_cast<int64_t>(r + 1) * ldx + i] = scale * HorizontalSum(a1);
      x[static_cast<int64_t>(r + 2) * ldx + i] = scale * HorizontalSum(a2);
      x[static_cast<int64_t>(r + 3) * ldx + i] = scale * HorizontalSum(a3);
    }
  }
  if (r < rows) ScoreRows(q + static_cast<int64_t>(r) * d, rows - r, k, n, d, scale, x + r * ldx, ldx);
}

// o [rows, d] += P V: per query row and 32 output columns, the accumulators
// stay in registers over the whole tile (v is an L1-resident tile).
void WeightedSumAvx2(const float* x, int rows, const float* v, int64_t n, int d, float* o, int64_t ldx) {
  for (int r = 0; r < rows; ++r) {
    const float* w = x + static_cast<int64_t>(r) * ldx;
    float* orow = o + static_cast<int64_t>(r) * d;
    for (int c = 0; c < d; c += 32) {
      __m256 a0 = _mm256_loadu_ps(orow + c), a1 = _mm256_loadu_ps(orow + c + 8);
      __m256 a2 = _mm256_loadu_ps(orow + c + 16), a3 = _mm256_loadu_ps(orow + c + 24);
      for (int64_t i = 0; i < n; ++i) {
        const __m256 wi = _mm256_broadcast_ss(w + i);
        const float* vi = v + i * d + c;
        a0 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi), a0);
        a1 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 8), a1);
        a2 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 16), a2);
        a3 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 24), a3);
      }
      _mm256_storeu_ps(orow + c, a0);
      _mm256_storeu_ps(orow + c + 8, a1);
      _mm256_storeu_ps(orow + c + 16, a2);
      _mm256_storeu_ps(orow + c + 24, a3);
    }
  }
}
#endif

bool AttendBlocks(const float* q, int64_t m, const RowBlock* blocks, size_t n_blocks, DType dtype, int d, float scale,
                  float* o, float* lse, std::vector<float>* scratch) {
  // Rows converted per tile: 64 rows of d = 128 floats are 32 KiB, in L1/L2.
  constexpr int64_t kTileRows = 64;
  int64_t n = 0;
  for (size_t b = 0; b < n_blocks; ++b) n += blocks[b].n;
  if (n == 0 || m == 0) {
    std::fill_n(o, m * d, 0.0f);
    std::fill_n(lse, m, -INFINITY);
    return true;
  }
  const size_t esize = DTypeSize(dtype);
  // Scratch: the scores x [m, n] (decode: G * n floats, L2-resident) and one
  // tile of converted rows.
  scratch->resize(static_cast<size_t>(m * n + kTileRows * d));
  float* x = scratch->data();
  float* tile = x + m * n;
  const int rows = static_cast<int>(m);

  // Visits the K (values = false) or V rows tile by tile as float32:
  // fn(tile, tile_rows, first_row).
  auto for_each_tile = [&](bool values, auto&& fn) {
    int64_t col = 0;
    for (size_t b = 0; b < n_blocks; ++b) {
      const char* base = static_cast<const char*>(values ? blocks[b].v : blocks[b].k);
      for (int64_t r0 = 0; r0 < blocks[b].n; r0 += kTileRows) {
        const int64_t tr = std::min(kTileRows, blocks[b].n - r0);
        ConvertToFloat(base + static_cast<size_t>(r0) * d * esize, dtype, static_cast<size_t>(tr) * d, tile);
        fn(tile, tr, col);
        col += tr;
      }
    }
  };

  // Pass 1 over K: the scores of all m rows (each key row loaded once).
#ifdef SQZ_ATTN_AVX2
  const bool avx2 = d % 32 == 0;
#else
  const bool avx2 = false;
#endif
  for_each_tile(false, [&](const float* kt, int64_t tr, int64_t col) {
#ifdef SQZ_ATTN_AVX2
    if (avx2) return ScoresAvx2(q, rows, kt, tr, d, scale, x + col, n);
#endif
    ScoreRows(q, rows, kt, tr, d, scale, x + col, n);
  });
  // Softmax per row, as AttendRows does.
  for (int r = 0; r < rows; ++r) {
    float* row = x + static_cast<int64_t>(r) * n;
    double mx, sum;
    if (!ExpRow(row, n, &mx, &sum)) return false;  // overflow: the caller falls back
    lse[r] = static_cast<float>(mx + std::log(sum));
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) row[i] *= inv;
  }
  // Pass 2 over V: o = P V (the loop form accumulates in AttendRows' order).
  std::fill_n(o, m * d, 0.0f);
  for_each_tile(true, [&](const float* vt, int64_t tr, int64_t col) {
#ifdef SQZ_ATTN_AVX2
    if (avx2) return WeightedSumAvx2(x + col, rows, vt, tr, d, o, n);
#endif
    WeightedSumLoops(x + col, rows, vt, tr, d, o, n);
  });
  return true;
}

}  // namespace sqz::query

namespace sqz {

void MergeAttentionStates(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n, int head_dim) {
  for (int64_t r = 0; r < n; ++r) {
    float* oa = o_a + r * head_dim;
    const float* ob = o_b + r * head_dim;
    const float la = lse_a[r], lb = lse_b[r];
    if (lb == -INFINITY) {
      // Nothing to add; an empty a stays empty but with o = 0 as documented.
      if (la == -INFINITY) std::fill_n(oa, head_dim, 0.0f);
      continue;
    }
    if (la == -INFINITY) {
      std::copy_n(ob, head_dim, oa);
      lse_a[r] = lb;
      continue;
    }
    // Rescale by the difference to the larger LSE: weights in (0, 1].
    const double mx = std::max(la, lb);
    const double wa = std::exp(la - mx), wb = std::exp(lb - mx);
    const double total = wa + wb;
    const float fa = static_cast<float>(wa / total), fb = static_cast<float>(wb / total);
    for (int c = 0; c < head_dim; ++c) oa[c] = fa * oa[c] + fb * ob[c];
    lse_a[r] = static_cast<float>(mx + std::log(total));
  }
}

}  // namespace sqz
