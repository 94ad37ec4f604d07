// Attention over given key rows (query/attention.h) and MergeAttentionStates,
// against a double-precision reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "query/attention.h"
#include "sqz/query.h"

namespace sqz::query {
namespace {

std::vector<float> Random(size_t n, float scale, std::mt19937_64* rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = scale * normal(*rng);
  return v;
}

// Exact softmax attention in double for one query row.
void Reference(const float* q, const float* k, const float* v, int64_t n, int d, double scale, std::vector<double>* o,
               double* lse) {
  o->assign(d, 0.0);
  if (n == 0) {
    *lse = -INFINITY;
    return;
  }
  std::vector<double> x(n);
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[i * d + c];
    x[i] = scale * dot;
    m = std::max(m, x[i]);
  }
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(x[i] - m);
  for (int64_t i = 0; i < n; ++i) {
    const double w = std::exp(x[i] - m) / z;
    for (int c = 0; c < d; ++c) (*o)[c] += w * v[i * d + c];
  }
  *lse = m + std::log(z);
}

double RelError(const float* got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t c = 0; c < want.size(); ++c) {
    diff += (got[c] - want[c]) * (got[c] - want[c]);
    norm += want[c] * want[c];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

void ExpectMatchesReference(const std::vector<float>& q, int64_t m, const std::vector<float>& k,
                            const std::vector<float>& v, int64_t n, int d, float scale, Kernel kernel,
                            double tol = 1e-4) {
  std::vector<float> o(m * d, -7.0f), lse(m, -7.0f), scratch;
  AttendRows(q.data(), m, k.data(), v.data(), n, d, scale, o.data(), lse.data(), kernel, &scratch);
  for (int64_t r = 0; r < m; ++r) {
    std::vector<double> want;
    double want_lse;
    Reference(q.data() + r * d, k.data(), v.data(), n, d, scale, &want, &want_lse);
    for (int c = 0; c < d; ++c) ASSERT_TRUE(std::isfinite(o[r * d + c]));
    if (n == 0) {
      EXPECT_EQ(lse[r], -INFINITY);
      for (int c = 0; c < d; ++c) EXPECT_EQ(o[r * d + c], 0.0f);
      continue;
    }
    EXPECT_LT(RelError(o.data() + r * d, want), tol) << "m " << m << " n " << n << " d " << d << " row " << r;
    EXPECT_NEAR(lse[r], want_lse, tol * std::max(1.0, std::fabs(want_lse))) << "row " << r;
  }
}

TEST(QueryAttentionTest, MatchesDoubleReference) {
  std::mt19937_64 rng(1);
  for (Kernel kernel : {Kernel::kLoops, Kernel::kBlas}) {
    for (int d : {8, 64, 128}) {
      for (int64_t m : {1, 3, 17}) {
        for (int64_t n : {0, 1, 5, 300}) {
          auto q = Random(m * d, 1.0f, &rng);
          auto k = Random(n * d, 1.0f, &rng);
          auto v = Random(n * d, 1.0f, &rng);
          ExpectMatchesReference(q, m, k, v, n, d, 1.0f / std::sqrt(static_cast<float>(d)), kernel);
        }
      }
    }
  }
}

TEST(QueryAttentionTest, HugeScoresNoOverflowNoNaN) {
  std::mt19937_64 rng(2);
  const int d = 64;
  const int64_t n = 200;
  for (Kernel kernel : {Kernel::kLoops, Kernel::kBlas}) {
    // 1e3: exp of raw scores overflows; 1e37: the float dot products do.
    for (float norm : {1e3f, 1e37f}) {
      auto q = Random(3 * d, norm, &rng);
      auto k = Random(n * d, 1.0f, &rng);
      auto v = Random(n * d, 1.0f, &rng);
      ExpectMatchesReference(q, 3, k, v, n, d, 0.125f, kernel, 1e-3);
    }
  }
}

TEST(QueryAttentionTest, MergeOfTwoHalvesEqualsWhole) {
  std::mt19937_64 rng(3);
  const int d = 32;
  const int64_t m = 4, n = 100, half = 37;
  auto q = Random(m * d, 1.0f, &rng), k = Random(n * d, 1.0f, &rng), v = Random(n * d, 1.0f, &rng);
  std::vector<float> o_all(m * d), l_all(m), o_a(m * d), l_a(m), o_b(m * d), l_b(m), scratch;
  AttendRows(q.data(), m, k.data(), v.data(), n, d, 0.2f, o_all.data(), l_all.data(), Kernel::kLoops, &scratch);
  AttendRows(q.data(), m, k.data(), v.data(), half, d, 0.2f, o_a.data(), l_a.data(), Kernel::kLoops, &scratch);
  AttendRows(q.data(), m, k.data() + half * d, v.data() + half * d, n - half, d, 0.2f, o_b.data(), l_b.data(),
             Kernel::kLoops, &scratch);
  MergeAttentionStates(o_a.data(), l_a.data(), o_b.data(), l_b.data(), m, d);
  for (int64_t i = 0; i < m * d; ++i) EXPECT_NEAR(o_a[i], o_all[i], 1e-5);
  for (int64_t r = 0; r < m; ++r) EXPECT_NEAR(l_a[r], l_all[r], 1e-5);
}

TEST(QueryAttentionTest, MergeEmptyStates) {
  const int d = 4;
  const float inf = INFINITY;
  std::vector<float> o_a = {1, 2, 3, 4, 9, 9, 9, 9, 5, 5, 5, 5}, l_a = {0.5f, -inf, -inf};
  const std::vector<float> o_b = {7, 7, 7, 7, 1, 1, 2, 2, 8, 8, 8, 8}, l_b = {-inf, 1.5f, -inf};
  MergeAttentionStates(o_a.data(), l_a.data(), o_b.data(), l_b.data(), 3, d);
  // Row 0: b empty, a unchanged.
  EXPECT_EQ(l_a[0], 0.5f);
  EXPECT_EQ((std::vector<float>(o_a.begin(), o_a.begin() + 4)), (std::vector<float>{1, 2, 3, 4}));
  // Row 1: a empty, b taken.
  EXPECT_EQ(l_a[1], 1.5f);
  EXPECT_EQ((std::vector<float>(o_a.begin() + 4, o_a.begin() + 8)), (std::vector<float>{1, 1, 2, 2}));
  // Row 2: both empty: empty with o = 0.
  EXPECT_EQ(l_a[2], -inf);
  EXPECT_EQ((std::vector<float>(o_a.begin() + 8, o_a.end())), (std::vector<float>{0, 0, 0, 0}));
}

TEST(QueryAttentionTest, MergeFarApartLseDoesNotOverflow) {
  std::vector<float> o_a = {1, 1}, l_a = {1000.0f};
  const std::vector<float> o_b = {3, 3}, l_b = {-1000.0f};
  MergeAttentionStates(o_a.data(), l_a.data(), o_b.data(), l_b.data(), 1, 2);
  EXPECT_FLOAT_EQ(l_a[0], 1000.0f);
  EXPECT_FLOAT_EQ(o_a[0], 1.0f);
  std::vector<float> o_c = {1, 1}, l_c = {10.0f};
  const std::vector<float> o_d = {3, 3}, l_d = {10.0f};
  MergeAttentionStates(o_c.data(), l_c.data(), o_d.data(), l_d.data(), 1, 2);
  EXPECT_FLOAT_EQ(l_c[0], 10.0f + std::log(2.0f));
  EXPECT_FLOAT_EQ(o_c[0], 2.0f);
}

}  // namespace
}  // namespace sqz::query
