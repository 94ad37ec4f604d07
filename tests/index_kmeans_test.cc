// Two-level k-means of one head (index/kmeans.h): structural invariants,
// centroid definitions, determinism, edge cases; and the shared probability
// helpers (index/probability.h).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "index/kmeans.h"
#include "index/probability.h"
#include "tests/index_test_util.h"

namespace sqz::index {
namespace {

using index_test::Gauss;

std::vector<float> TopicKeys(int64_t n, int d, uint64_t seed, int topics = 12) {
  std::vector<float> x(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    const int t = static_cast<int>(index_test::SplitMix(seed + i / 16) % topics);
    const float mag = 1.0f + 0.25f * index_test::Uni(seed + 3, i);
    for (int c = 0; c < d; ++c) x[i * d + c] = mag * Gauss(seed * 100 + t, c) + 0.2f * Gauss(seed + 1, i * d + c);
  }
  return x;
}

// Checks every invariant of docs/SEMANTICS.md "Stored index" against the
// input keys, recomputing centroids in double.
void CheckClustering(const HeadClustering& c, const std::vector<float>& keys, int64_t n, int d) {
  ASSERT_EQ(c.n, n);
  ASSERT_EQ(c.dim, d);
  const int64_t k2 = c.n_fine(), k1 = c.n_coarse();
  ASSERT_EQ(c.fine_offsets.size(), static_cast<size_t>(k2 + 1));
  ASSERT_EQ(c.coarse_child_offsets.size(), static_cast<size_t>(k1 + 1));
  ASSERT_EQ(c.fine_centroids.size(), static_cast<size_t>(k2 * d));
  ASSERT_EQ(c.coarse_centroids.size(), static_cast<size_t>(k1 * d));
  ASSERT_EQ(c.permutation.size(), static_cast<size_t>(n));
  if (n == 0) {
    EXPECT_EQ(k2, 0);
    EXPECT_EQ(k1, 0);
    return;
  }
  ASSERT_GE(k2, 1);
  ASSERT_GE(k1, 1);
  ASSERT_LE(k1, k2);
  // Fine CSR: starts at 0, ends at n, strictly increasing (no empty cluster).
  EXPECT_EQ(c.fine_offsets.front(), 0u);
  EXPECT_EQ(c.fine_offsets.back(), static_cast<uint32_t>(n));
  for (int64_t j = 0; j < k2; ++j) ASSERT_LT(c.fine_offsets[j], c.fine_offsets[j + 1]) << "empty fine cluster " << j;
  // Coarse CSR over fine ids: 0 .. k2, no empty coarse cluster.
  EXPECT_EQ(c.coarse_child_offsets.front(), 0u);
  EXPECT_EQ(c.coarse_child_offsets.back(), static_cast<uint32_t>(k2));
  for (int64_t a = 0; a < k1; ++a) ASSERT_LT(c.coarse_child_offsets[a], c.coarse_child_offsets[a + 1]);
  // Permutation is a permutation of 0..n-1, ascending within a cluster.
  std::vector<int> seen(static_cast<size_t>(n), 0);
  for (uint32_t p : c.permutation) {
    ASSERT_LT(p, n);
    ++seen[p];
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1);
  for (int64_t j = 0; j < k2; ++j) {
    for (uint32_t p = c.fine_offsets[j] + 1; p < c.fine_offsets[j + 1]; ++p) {
      ASSERT_LT(c.permutation[p - 1], c.permutation[p]) << "original order kept within a cluster";
    }
  }
  // Fine centroid = mean of its raw member keys.
  for (int64_t j = 0; j < k2; ++j) {
    std::vector<double> mean(d, 0.0);
    const uint32_t b = c.fine_offsets[j], e = c.fine_offsets[j + 1];
    for (uint32_t p = b; p < e; ++p) {
      for (int i = 0; i < d; ++i) mean[i] += keys[static_cast<size_t>(c.permutation[p]) * d + i];
    }
    for (int i = 0; i < d; ++i) {
      mean[i] /= (e - b);
      ASSERT_NEAR(c.fine_centroids[j * d + i], mean[i], 1e-5 * (1 + std::fabs(mean[i]))) << "fine " << j;
    }
  }
  // Coarse centroid = size-weighted mean of its children's centroids.
  for (int64_t a = 0; a < k1; ++a) {
    std::vector<double> mean(d, 0.0);
    double w = 0;
    for (uint32_t j = c.coarse_child_offsets[a]; j < c.coarse_child_offsets[a + 1]; ++j) {
      const double nj = c.fine_offsets[j + 1] - c.fine_offsets[j];
      w += nj;
      for (int i = 0; i < d; ++i) mean[i] += nj * c.fine_centroids[j * d + i];
    }
    for (int i = 0; i < d; ++i) {
      mean[i] /= w;
      ASSERT_NEAR(c.coarse_centroids[a * d + i], mean[i], 1e-5 * (1 + std::fabs(mean[i]))) << "coarse " << a;
    }
  }
}

TEST(IndexKMeansTest, ClusterCount) {
  EXPECT_EQ(ClusterCount(0.05, 2000, 2000), 100);  // no spurious +1 from 100.00000000000001
  EXPECT_EQ(ClusterCount(0.05, 2001, 2001), 101);
  EXPECT_EQ(ClusterCount(0.01, 10, 10), 1);
  EXPECT_EQ(ClusterCount(1.0, 10, 10), 10);
  EXPECT_EQ(ClusterCount(0.5, 10, 3), 3);  // clamped to hi
  EXPECT_EQ(ClusterCount(0.5, 0, 3), 0);
}

TEST(IndexKMeansTest, InvariantsHold) {
  const int d = 32;
  const int64_t n = 3000;
  auto keys = TopicKeys(n, d, 11);
  KMeansOptions o;
  o.fine_ratio = 0.05;
  o.coarse_ratio = 0.01;
  o.iters = 8;
  HeadClustering c;
  ASSERT_TRUE(ClusterHead(keys.data(), n, d, o, &c).ok());
  CheckClustering(c, keys, n, d);
  EXPECT_LE(c.n_fine(), 150);
  EXPECT_GE(c.n_fine(), 100);  // topic data: few empty clusters
  EXPECT_LE(c.n_coarse(), 30);
}

TEST(IndexKMeansTest, ClustersGroupSimilarKeys) {
  // Keys from 8 well-separated directions, many more clusters asked (so
  // random initialisation seeds every direction): each cluster must hold
  // keys of one direction only.
  const int d = 16, topics = 8;
  const int64_t n = 800;
  std::vector<float> keys(n * d);
  std::vector<int> topic(n);
  for (int64_t i = 0; i < n; ++i) {
    topic[i] = static_cast<int>(i % topics);
    for (int c = 0; c < d; ++c) keys[i * d + c] = (c == topic[i] ? 5.0f : 0.0f) + 0.05f * Gauss(3, i * d + c);
  }
  KMeansOptions o;
  o.fine_ratio = 64.0 / n;
  o.coarse_ratio = 2.0 / n;
  HeadClustering c;
  ASSERT_TRUE(ClusterHead(keys.data(), n, d, o, &c).ok());
  CheckClustering(c, keys, n, d);
  for (int64_t j = 0; j < c.n_fine(); ++j) {
    const int t0 = topic[c.permutation[c.fine_offsets[j]]];
    for (uint32_t p = c.fine_offsets[j]; p < c.fine_offsets[j + 1]; ++p) EXPECT_EQ(topic[c.permutation[p]], t0);
  }
}

TEST(IndexKMeansTest, DeterministicForASeed) {
  const int d = 24;
  const int64_t n = 2500;
  auto keys = TopicKeys(n, d, 5);
  KMeansOptions o;
  o.fine_ratio = 0.04;
  o.coarse_ratio = 0.01;
  o.iters = 5;
  o.seed = 99;
  HeadClustering a, b, c;
  ASSERT_TRUE(ClusterHead(keys.data(), n, d, o, &a).ok());
  ASSERT_TRUE(ClusterHead(keys.data(), n, d, o, &b).ok());
  EXPECT_EQ(a.fine_offsets, b.fine_offsets);
  EXPECT_EQ(a.permutation, b.permutation);
  EXPECT_EQ(a.coarse_child_offsets, b.coarse_child_offsets);
  EXPECT_EQ(a.fine_centroids, b.fine_centroids);  // bitwise
  EXPECT_EQ(a.coarse_centroids, b.coarse_centroids);
  o.seed = 100;
  ASSERT_TRUE(ClusterHead(keys.data(), n, d, o, &c).ok());
  CheckClustering(c, keys, n, d);
  EXPECT_TRUE(a.permutation != c.permutation || a.fine_offsets != c.fine_offsets)
      << "a new seed changes the clustering";
}

TEST(IndexKMeansTest, EdgeCases) {
  const int d = 8;
  KMeansOptions o;
  HeadClustering c;
  // n = 0: empty clustering.
  ASSERT_TRUE(ClusterHead(nullptr, 0, d, o, &c).ok());
  CheckClustering(c, {}, 0, d);
  // n = 1.
  std::vector<float> one = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_TRUE(ClusterHead(one.data(), 1, d, o, &c).ok());
  CheckClustering(c, one, 1, d);
  EXPECT_EQ(c.n_fine(), 1);
  // Ratio 1: K2 == n (FAISS copies the points); duplicates and zero keys.
  std::vector<float> dup(20 * d, 0.0f);
  for (int i = 0; i < 10; ++i) {
    for (int k = 0; k < d; ++k) dup[i * d + k] = static_cast<float>((i % 3) + 1) * (k == i % 4 ? 1.0f : 0.0f);
  }
  o.fine_ratio = 1.0;
  o.coarse_ratio = 1.0;
  ASSERT_TRUE(ClusterHead(dup.data(), 20, d, o, &c).ok());
  CheckClustering(c, dup, 20, d);
  // All-zero keys (no direction at all).
  std::vector<float> zeros(50 * d, 0.0f);
  o.fine_ratio = 0.2;
  o.coarse_ratio = 0.1;
  ASSERT_TRUE(ClusterHead(zeros.data(), 50, d, o, &c).ok());
  CheckClustering(c, zeros, 50, d);
  // Bad options.
  o.iters = 0;
  EXPECT_TRUE(ClusterHead(one.data(), 1, d, o, &c).IsInvalidArgument());
}

TEST(IndexProbabilityTest, FlatAndSubset) {
  const std::vector<double> s = {1.0, 3.0, -2.0, 3.0};
  const std::vector<uint32_t> n = {2, 1, 5, 3};
  std::vector<double> p(4);
  ClusterProbabilities(s.data(), n.data(), 4, p.data());
  double denom = 0;
  for (int j = 0; j < 4; ++j) denom += n[j] * std::exp(s[j]);
  double mass = 0;
  for (int j = 0; j < 4; ++j) {
    EXPECT_NEAR(p[j], std::exp(s[j]) / denom, 1e-15);
    mass += n[j] * p[j];
  }
  EXPECT_NEAR(mass, 1.0, 1e-12);
  const std::vector<uint32_t> ids = {0, 2};
  std::vector<double> ps(2);
  SubsetProbabilities(s.data(), n.data(), ids.data(), 2, ps.data());
  const double ds = 2 * std::exp(1.0) + 5 * std::exp(-2.0);
  EXPECT_NEAR(ps[0], std::exp(1.0) / ds, 1e-15);
  EXPECT_NEAR(ps[1], std::exp(-2.0) / ds, 1e-15);
}

TEST(IndexProbabilityTest, NoOverflowForHugeScores) {
  // Finite float inputs of extreme magnitude: double scores stay finite and
  // the max subtraction keeps exp() in range.
  const int d = 4;
  std::vector<float> q = {3e38f, -3e38f, 3e38f, 1.0f};
  std::vector<float> c = {3e38f, 3e38f, 1.0f, 0.0f, -3e38f, 0.0f, 0.0f, 0.0f};
  std::vector<double> s(2), p(2);
  ScoreCentroids(q.data(), c.data(), 2, d, 0.5, s.data());
  ASSERT_TRUE(std::isfinite(s[0]) && std::isfinite(s[1]));
  const std::vector<uint32_t> n = {3, 4};
  ClusterProbabilities(s.data(), n.data(), 2, p.data());
  for (double x : p) ASSERT_TRUE(std::isfinite(x));
  EXPECT_NEAR(3 * p[0] + 4 * p[1], 1.0, 1e-12);
  // Infinite scores (a caller's float overflow) still give no NaN.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> si = {inf, 1.0, inf};
  std::vector<uint32_t> ni = {1, 1, 1};
  std::vector<double> pi(3);
  ClusterProbabilities(si.data(), ni.data(), 3, pi.data());
  EXPECT_DOUBLE_EQ(pi[0], 0.5);
  EXPECT_DOUBLE_EQ(pi[1], 0.0);
  EXPECT_DOUBLE_EQ(pi[2], 0.5);
  // Coarse sizes from the CSR.
  std::vector<uint32_t> fo = {0, 2, 5, 9}, co = {0, 1, 3}, m(2);
  CoarseSizes(fo.data(), co.data(), 2, m.data());
  EXPECT_EQ(m[0], 2u);
  EXPECT_EQ(m[1], 7u);
}

}  // namespace
}  // namespace sqz::index
