// Estimated per-key attention probabilities of clusters (docs/SEMANTICS.md,
// "Estimated probabilities"). Shared by the offline calibration (index/) and
// the online selection (query/) so both use bit-identical arithmetic.
//
// Everything is computed in double with max subtraction: for any finite float
// inputs no exp() overflows and no NaN appears (scores of finite float vectors
// cannot overflow a double; the largest term of a denominator is exp(0) = 1).
//
// Thread-safety: pure functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace sqz::index {

// sizes[j] = offsets[j + 1] - offsets[j] for j < k (CSR offsets, k + 1 entries).
inline void SizesFromOffsets(const uint32_t* offsets, int64_t k, uint32_t* sizes) {
  for (int64_t j = 0; j < k; ++j) sizes[j] = offsets[j + 1] - offsets[j];
}

// Coarse sizes M_a = sum of the sizes of a's children, from HeadIndex's
// fine_offsets [k2 + 1] and coarse_child_offsets [k1 + 1]. Children are a
// contiguous fine id range, so M_a is a difference of fine offsets.
inline void CoarseSizes(const uint32_t* fine_offsets, const uint32_t* coarse_child_offsets, int64_t k1,
                        uint32_t* sizes) {
  for (int64_t a = 0; a < k1; ++a) {
    sizes[a] = fine_offsets[coarse_child_offsets[a + 1]] - fine_offsets[coarse_child_offsets[a]];
  }
}

// s[j] = scale * (q . c_j) for the k centroids c (row-major [k, d]),
// accumulated in double.
inline void ScoreCentroids(const float* q, const float* centroids, int64_t k, int d, double scale, double* s) {
  for (int64_t j = 0; j < k; ++j) {
    const float* c = centroids + j * static_cast<int64_t>(d);
    double acc = 0;
    for (int i = 0; i < d; ++i) acc += static_cast<double>(q[i]) * static_cast<double>(c[i]);
    s[j] = scale * acc;
  }
}

// exp(s - m) with the convention exp(m - m) = 1 even when m is infinite, so
// a score that overflowed in a caller's float arithmetic still yields no NaN.
inline double ShiftedExp(double s, double m) { return s == m ? 1.0 : std::exp(s - m); }

// Flat per-key probabilities over all k clusters:
//   p_j = exp(s_j - m) / sum_k N_k exp(s_k - m),  m = max_j s_j.
// sum_j N_j p_j = 1 (when some N_j > 0). k == 0: nothing is written.
inline void ClusterProbabilities(const double* s, const uint32_t* sizes, int64_t k, double* p) {
  if (k <= 0) return;
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < k; ++j) m = s[j] > m ? s[j] : m;
  double denom = 0;
  for (int64_t j = 0; j < k; ++j) {
    p[j] = ShiftedExp(s[j], m);
    denom += static_cast<double>(sizes[j]) * p[j];
  }
  // denom >= N_argmax >= 1 for non-empty clusters; guard anyway.
  const double inv = denom > 0 ? 1.0 / denom : 0.0;
  for (int64_t j = 0; j < k; ++j) p[j] *= inv;
}

// Hierarchical fine probabilities over the surviving set S = ids[0..n):
//   p'_j = exp(s_j - m_S) / sum_{k in S} N_k exp(s_k - m_S),  m_S = max_{k in S} s_k.
// s and sizes are indexed by cluster id; p is written by position in ids
// (p[i] belongs to cluster ids[i]).
inline void SubsetProbabilities(const double* s, const uint32_t* sizes, const uint32_t* ids, int64_t n, double* p) {
  if (n <= 0) return;
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = s[ids[i]] > m ? s[ids[i]] : m;
  double denom = 0;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = ShiftedExp(s[ids[i]], m);
    denom += static_cast<double>(sizes[ids[i]]) * p[i];
  }
  const double inv = denom > 0 ? 1.0 / denom : 0.0;
  for (int64_t i = 0; i < n; ++i) p[i] *= inv;
}

}  // namespace sqz::index
