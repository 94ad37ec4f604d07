#include "query/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "sqz/query.h"

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

// Scores x [rows, n] = scale * Q K^T for a tile of rows.
void ScoresLoops(const float* q, int rows, const float* k, int64_t n, int d, float scale, float* x) {
  // Key-major: each key row is loaded once for all query rows of the tile.
  for (int64_t i = 0; i < n; ++i) {
    const float* ki = k + i * d;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int c = 0; c < d; ++c) acc += qr[c] * ki[c];
      x[static_cast<int64_t>(r) * n + i] = scale * acc;
    }
  }
}

// o [rows, d] = P V for normalised weights P = x [rows, n].
void WeightedSumLoops(const float* x, int rows, const float* v, int64_t n, int d, float* o) {
  std::fill_n(o, static_cast<int64_t>(rows) * d, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* vi = v + i * d;
    for (int r = 0; r < rows; ++r) {
      const float w = x[static_cast<int64_t>(r) * n + i];
      float* orow = o + static_cast<int64_t>(r) * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) orow[c] += w * vi[c];
    }
  }
}

}  // namespace

void AttendRows(const float* q, int64_t m, const float* k, const float* v, int64_t n, int d, float scale,
                float* o, float* lse, Kernel kernel, std::vector<float>* scratch) {
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
      ScoresLoops(qt, rows, k, n, d, scale, x);
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
      WeightedSumLoops(x, rows, v, n, d, ot);
    }
    for (int r : overflowed) {
      AttendRowDouble(qt + static_cast<int64_t>(r) * d, k, v, n, d, scale, ot + static_cast<int64_t>(r) * d,
                      lse + r0 + r);
    }
  }
}

}  // namespace sqz::query

namespace sqz {

void MergeAttentionStates(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n,
                          int head_dim) {
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
