// Two-level k-means of one head (index/kmeans.h): structural invariants,
// centroid definitions, determinism, edge cases; batching through a k-means
// backend (sqz/kmeans.h) and the checks on what a backend returns; the FAISS
// backend itself; and the shared probability helpers (index/probability.h).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "index/kmeans.h"
#include "index/probability.h"
#include "sqz/kmeans.h"
#include "tests/index_test_util.h"
#include "tests/kmeans_test_backend.h"

namespace sqz::index {
namespace {

using index_test::Gauss;
using index_test::RecordingKMeansBackend;

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

// Bitwise equality of two clusterings, objectives included.
void ExpectSameClustering(const HeadClustering& a, const HeadClustering& b) {
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.n, b.n);
  EXPECT_EQ(a.fine_offsets, b.fine_offsets);
  EXPECT_EQ(a.permutation, b.permutation);
  EXPECT_EQ(a.coarse_child_offsets, b.coarse_child_offsets);
  EXPECT_EQ(a.fine_centroids, b.fine_centroids);
  EXPECT_EQ(a.coarse_centroids, b.coarse_centroids);
  EXPECT_EQ(a.fine_objective, b.fine_objective);
  EXPECT_EQ(a.coarse_objective, b.coarse_objective);
}

struct ThreeHeads {
  std::vector<std::vector<float>> keys;
  std::vector<HeadKeys> heads;
};

// Three heads of different sizes and dimensions.
ThreeHeads MakeThreeHeads() {
  ThreeHeads t;
  const int64_t ns[3] = {2000, 1500, 2600};
  const int ds[3] = {32, 16, 32};
  for (int h = 0; h < 3; ++h) t.keys.push_back(TopicKeys(ns[h], ds[h], 40 + h));
  for (int h = 0; h < 3; ++h) t.heads.push_back({t.keys[h].data(), ns[h], ds[h]});
  return t;
}

KMeansOptions SmallKMeansOptions() {
  KMeansOptions o;
  o.fine_ratio = 0.05;
  o.coarse_ratio = 0.01;
  o.iters = 6;
  o.seed = 7;
  return o;
}

TEST(IndexKMeansBatchTest, ClusterHeadsEqualsClusterHeadPerHead) {
  ThreeHeads t = MakeThreeHeads();
  const KMeansOptions o = SmallKMeansOptions();
  std::vector<HeadClustering> batch(3);
  Status s = ClusterHeads(nullptr, t.heads.data(), 3, o, batch.data());
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (int h = 0; h < 3; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    HeadClustering one;
    ASSERT_TRUE(ClusterHead(t.heads[h].keys, t.heads[h].n, t.heads[h].d, o, &one).ok());
    CheckClustering(batch[h], t.keys[h], t.heads[h].n, t.heads[h].d);
    ExpectSameClustering(batch[h], one);
  }
  // The FAISS backend made explicitly is the default one.
  auto faiss = MakeFaissKMeansBackend();
  EXPECT_STREQ(faiss->name(), "faiss-cpu");
  std::vector<HeadClustering> again(3);
  ASSERT_TRUE(ClusterHeads(faiss.get(), t.heads.data(), 3, o, again.data()).ok());
  for (int h = 0; h < 3; ++h) ExpectSameClustering(again[h], batch[h]);
}

TEST(IndexKMeansBatchTest, TwoRunCallsForAllHeads) {
  ThreeHeads t = MakeThreeHeads();
  const KMeansOptions o = SmallKMeansOptions();
  RecordingKMeansBackend rec;
  std::vector<HeadClustering> got(3), want(3);
  ASSERT_TRUE(ClusterHeads(&rec, t.heads.data(), 3, o, got.data()).ok());
  ASSERT_TRUE(ClusterHeads(nullptr, t.heads.data(), 3, o, want.data()).ok());
  for (int h = 0; h < 3; ++h) ExpectSameClustering(got[h], want[h]);

  ASSERT_EQ(rec.calls.size(), 2u) << "one Run call per level, every head in it";
  const auto& fine = rec.calls[0];
  const auto& coarse = rec.calls[1];
  ASSERT_EQ(fine.problems.size(), 3u);
  ASSERT_EQ(coarse.problems.size(), 3u);
  for (int h = 0; h < 3; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    EXPECT_EQ(fine.params.iters, o.iters);
    EXPECT_TRUE(fine.params.spherical);
    EXPECT_EQ(fine.problems[h].n, t.heads[h].n);
    EXPECT_EQ(fine.problems[h].d, t.heads[h].d);
    EXPECT_EQ(fine.problems[h].k, ClusterCount(o.fine_ratio, t.heads[h].n, t.heads[h].n));
    EXPECT_FALSE(fine.problems[h].weighted);
    EXPECT_EQ(fine.problems[h].seed, o.seed);
    // Coarse: the surviving fine clusters, weighted by size, another seed.
    EXPECT_EQ(coarse.params.iters, o.iters);
    EXPECT_TRUE(coarse.params.spherical);
    EXPECT_EQ(coarse.problems[h].n, got[h].n_fine());
    EXPECT_EQ(coarse.problems[h].d, t.heads[h].d);
    EXPECT_EQ(coarse.problems[h].k, ClusterCount(o.coarse_ratio, t.heads[h].n, got[h].n_fine()));
    EXPECT_TRUE(coarse.problems[h].weighted);
    EXPECT_NE(coarse.problems[h].seed, o.seed);
    EXPECT_EQ(got[h].fine_objective.size(), static_cast<size_t>(o.iters));
    EXPECT_EQ(got[h].coarse_objective.size(), static_cast<size_t>(o.iters));
  }
}

TEST(IndexKMeansBatchTest, EmptyHeadsSkipTheBackend) {
  ThreeHeads t = MakeThreeHeads();
  const KMeansOptions o = SmallKMeansOptions();
  // An empty head between two others: not sent to the backend, the others
  // as if clustered alone.
  std::vector<HeadKeys> heads = {t.heads[0], HeadKeys{nullptr, 0, 32}, t.heads[2]};
  RecordingKMeansBackend rec;
  std::vector<HeadClustering> got(3);
  ASSERT_TRUE(ClusterHeads(&rec, heads.data(), 3, o, got.data()).ok());
  ASSERT_EQ(rec.calls.size(), 2u);
  EXPECT_EQ(rec.calls[0].problems.size(), 2u);
  EXPECT_EQ(rec.calls[1].problems.size(), 2u);
  CheckClustering(got[1], {}, 0, 32);
  EXPECT_EQ(got[1].fine_offsets, std::vector<uint32_t>{0});
  EXPECT_EQ(got[1].coarse_child_offsets, std::vector<uint32_t>{0});
  EXPECT_TRUE(got[1].fine_objective.empty());
  for (int h : {0, 2}) {
    HeadClustering one;
    ASSERT_TRUE(ClusterHead(heads[h].keys, heads[h].n, heads[h].d, o, &one).ok());
    ExpectSameClustering(got[h], one);
  }
  // Only empty heads (or none): no Run call at all.
  RecordingKMeansBackend idle;
  std::vector<HeadKeys> empty = {HeadKeys{nullptr, 0, 8}, HeadKeys{nullptr, 0, 8}};
  ASSERT_TRUE(ClusterHeads(&idle, empty.data(), 2, o, got.data()).ok());
  ASSERT_TRUE(ClusterHeads(&idle, nullptr, 0, o, nullptr).ok());
  EXPECT_TRUE(idle.calls.empty());
}

TEST(IndexKMeansBatchTest, BadBackendResultsAreAborted) {
  ThreeHeads t = MakeThreeHeads();
  const KMeansOptions o = SmallKMeansOptions();
  std::vector<HeadClustering> out(3);
  struct Case {
    const char* what;
    size_t call;  // 0: fine, 1: coarse
    std::function<void(KMeansResult*)> tamper;
  };
  const std::vector<Case> cases = {
      {"fine label = k", 0, [](KMeansResult* r) { r->labels[5] = static_cast<int64_t>(r->centroids.size() / 32); }},
      {"fine label < 0", 0, [](KMeansResult* r) { r->labels.back() = -1; }},
      {"coarse label = k", 1, [](KMeansResult* r) { r->labels[0] = static_cast<int64_t>(r->centroids.size() / 32); }},
      {"fine labels missing", 0, [](KMeansResult* r) { r->labels.pop_back(); }},
      {"coarse centroids missing", 1, [](KMeansResult* r) { r->centroids.clear(); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    RecordingKMeansBackend rec;
    rec.after = [&](size_t call, KMeansResult* results, size_t n) {
      if (call == c.call) c.tamper(&results[2]);  // head 2 (d = 32)
      return Status::OK();
    };
    Status s = ClusterHeads(&rec, t.heads.data(), 3, o, out.data());
    EXPECT_TRUE(s.IsAborted()) << s.ToString();
    EXPECT_NE(s.message().find("head 2"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("recording"), std::string::npos) << s.ToString();
  }
  // A backend's own error is passed on; an exception becomes Aborted.
  RecordingKMeansBackend failing;
  failing.after = [](size_t, KMeansResult*, size_t) { return Status::Aborted("device lost"); };
  Status s = ClusterHeads(&failing, t.heads.data(), 3, o, out.data());
  EXPECT_TRUE(s.IsAborted()) << s.ToString();
  EXPECT_NE(s.message().find("device lost"), std::string::npos) << s.ToString();
  EXPECT_EQ(failing.calls.size(), 1u);
  RecordingKMeansBackend throwing;
  throwing.throw_on_run = true;
  s = ClusterHeads(&throwing, t.heads.data(), 3, o, out.data());
  EXPECT_TRUE(s.IsAborted()) << s.ToString();
  EXPECT_NE(s.message().find("test backend throws"), std::string::npos) << s.ToString();
}

TEST(IndexKMeansBatchTest, BadShapesAreInvalidArgument) {
  const KMeansOptions o = SmallKMeansOptions();
  std::vector<float> keys(64 * 8, 1.0f);
  std::vector<HeadClustering> out(2);
  RecordingKMeansBackend rec;
  std::vector<HeadKeys> heads = {{keys.data(), 64, 8}, {keys.data(), 64, 0}};
  Status s = ClusterHeads(&rec, heads.data(), 2, o, out.data());
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("head 1"), std::string::npos) << s.ToString();
  heads[1] = {nullptr, 64, 8};
  EXPECT_TRUE(ClusterHeads(&rec, heads.data(), 2, o, out.data()).IsInvalidArgument());
  heads[1] = {keys.data(), -1, 8};
  EXPECT_TRUE(ClusterHeads(&rec, heads.data(), 2, o, out.data()).IsInvalidArgument());
  heads[1] = {keys.data(), int64_t{1} << 32, 8};  // never read: rejected first
  EXPECT_TRUE(ClusterHeads(&rec, heads.data(), 2, o, out.data()).IsInvalidArgument());
  EXPECT_TRUE(ClusterHead(keys.data(), int64_t{1} << 32, 8, o, &out[0]).IsInvalidArgument());
  EXPECT_TRUE(ClusterHeads(&rec, nullptr, 2, o, out.data()).IsInvalidArgument());
  EXPECT_TRUE(rec.calls.empty()) << "shapes are checked before the backend runs";
}

// Problems for the FAISS backend directly: normalised topic keys.
std::vector<float> NormalisedTopicKeys(int64_t n, int d, uint64_t seed) {
  auto x = TopicKeys(n, d, seed);
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(x[i * d + c]) * x[i * d + c];
    for (int c = 0; c < d; ++c) x[i * d + c] = static_cast<float>(x[i * d + c] / std::sqrt(ss));
  }
  return x;
}

TEST(IndexKMeansFaissBackendTest, ObjectiveImprovesInFaissDirection) {
  const int d = 24;
  const int64_t n = 3000, k = 60;
  auto x = NormalisedTopicKeys(n, d, 21);
  auto backend = MakeFaissKMeansBackend();
  KMeansParams params;
  params.iters = 12;
  // Spherical: the objective is the sum of inner products with the assigned
  // centroid, which FAISS maximises (IP is a similarity metric).
  KMeansProblem p{x.data(), n, d, k, nullptr, 5};
  KMeansResult r;
  ASSERT_TRUE(backend->Run(&p, 1, params, &r).ok());
  ASSERT_EQ(r.objective.size(), static_cast<size_t>(params.iters));
  for (double v : r.objective) ASSERT_TRUE(std::isfinite(v));
  EXPECT_GT(r.objective.back(), r.objective.front());
  EXPECT_LE(r.objective.back(), static_cast<double>(n) * 1.0001) << "at most one per unit point";
  for (size_t i = 1; i < r.objective.size(); ++i) {
    EXPECT_GE(r.objective[i], r.objective[i - 1] - 1e-3 * std::fabs(r.objective[i - 1])) << "iteration " << i;
  }
  // Labels are the nearest final centroids by inner product; centroids unit.
  ASSERT_EQ(r.centroids.size(), static_cast<size_t>(k * d));
  ASSERT_EQ(r.labels.size(), static_cast<size_t>(n));
  for (int64_t j = 0; j < k; ++j) {
    double ss = 0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(r.centroids[j * d + c]) * r.centroids[j * d + c];
    EXPECT_NEAR(ss, 1.0, 1e-4);
  }
  for (int64_t i = 0; i < n; i += 37) {
    auto ip = [&](int64_t j) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += static_cast<double>(x[i * d + c]) * r.centroids[j * d + c];
      return s;
    };
    const double best = ip(r.labels[i]);
    for (int64_t j = 0; j < k; ++j) ASSERT_LE(ip(j), best + 1e-5) << "point " << i;
  }
  // L2 (not spherical): the sum of squared distances, minimised.
  params.spherical = false;
  ASSERT_TRUE(backend->Run(&p, 1, params, &r).ok());
  ASSERT_EQ(r.objective.size(), static_cast<size_t>(params.iters));
  for (double v : r.objective) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LT(r.objective.back(), r.objective.front());
}

TEST(IndexKMeansFaissBackendTest, BatchEqualsSingleProblems) {
  const int d = 16;
  auto a = NormalisedTopicKeys(900, d, 1);
  auto b = NormalisedTopicKeys(400, d, 2);
  std::vector<float> w(400);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 1.0f + static_cast<float>(i % 7);
  const KMeansProblem ps[2] = {{a.data(), 900, d, 30, nullptr, 3}, {b.data(), 400, d, 400, w.data(), 4}};
  auto backend = MakeFaissKMeansBackend();
  KMeansParams params;
  KMeansResult batch[2], one;
  ASSERT_TRUE(backend->Run(ps, 2, params, batch).ok());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(backend->Run(&ps[i], 1, params, &one).ok());
    EXPECT_EQ(batch[i].centroids, one.centroids);
    EXPECT_EQ(batch[i].labels, one.labels);
    EXPECT_EQ(batch[i].objective, one.objective);
  }
  // k == n: FAISS copies the points and reports one objective entry.
  EXPECT_EQ(batch[1].objective.size(), 1u);
  EXPECT_EQ(batch[1].centroids, b);
  ASSERT_TRUE(backend->Run(ps, 0, params, nullptr).ok());
}

TEST(IndexKMeansFaissBackendTest, BadShapesAreInvalidArgument) {
  const int d = 8;
  auto x = NormalisedTopicKeys(50, d, 9);
  auto backend = MakeFaissKMeansBackend();
  KMeansParams params;
  KMeansResult r[2];
  auto run = [&](KMeansProblem p) {
    const KMeansProblem ok{x.data(), 50, d, 5, nullptr, 1};
    const KMeansProblem ps[2] = {ok, p};
    return backend->Run(ps, 2, params, r);
  };
  Status s = run({x.data(), 50, d, 51, nullptr, 1});  // k > n
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("problem 1"), std::string::npos) << s.ToString();
  EXPECT_TRUE(run({x.data(), 50, d, 0, nullptr, 1}).IsInvalidArgument());                // k < 1
  EXPECT_TRUE(run({x.data(), 0, d, 0, nullptr, 1}).IsInvalidArgument());                 // n < 1
  EXPECT_TRUE(run({x.data(), 50, 0, 5, nullptr, 1}).IsInvalidArgument());                // d < 1
  EXPECT_TRUE(run({nullptr, 50, d, 5, nullptr, 1}).IsInvalidArgument());                 // no points
  EXPECT_TRUE(run({x.data(), int64_t{1} << 31, d, 5, nullptr, 1}).IsInvalidArgument());  // beyond FAISS's int
  params.iters = 0;
  EXPECT_TRUE(run({x.data(), 50, d, 5, nullptr, 1}).IsInvalidArgument());
  params.iters = 1;
  EXPECT_TRUE(run({x.data(), 50, d, 5, nullptr, 1}).ok());
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
