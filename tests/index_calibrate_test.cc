// Threshold calibration (index/calibrate.h) against an independent,
// per-key brute-force implementation of docs/SEMANTICS.md "Calibration".
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "index/calibrate.h"
#include "index/kmeans.h"
#include "tests/index_test_util.h"

namespace sqz::index {
namespace {

using index_test::Gauss;

// One (layer, KV head) with its group's window queries.
struct Head {
  HeadClustering c;
  std::vector<float> q;  // [G, W, d]
};

// --- Brute force, straight from the spec, one sample per KEY, in double ----

// Per-query per-key probabilities p(key i) for clusters `ids` (all if empty
// subset flag false): exp(s_j) / sum_{k in set} N_k exp(s_k), via the max.
std::vector<double> BruteProbs(const float* q, const std::vector<float>& cent, const std::vector<double>& sizes,
                               const std::vector<bool>& in_set, int d) {
  const size_t k = sizes.size();
  std::vector<double> s(k);
  double m = -INFINITY;
  for (size_t j = 0; j < k; ++j) {
    double acc = 0;
    for (int c = 0; c < d; ++c) acc += static_cast<double>(q[c]) * cent[j * d + c];
    s[j] = acc / std::sqrt(static_cast<double>(d));
    if (in_set[j]) m = std::max(m, s[j]);
  }
  double den = 0;
  for (size_t j = 0; j < k; ++j) {
    if (in_set[j]) den += sizes[j] * std::exp(s[j] - m);
  }
  std::vector<double> p(k, 0.0);
  for (size_t j = 0; j < k; ++j) {
    if (in_set[j]) p[j] = std::exp(s[j] - m) / den;
  }
  return p;
}

// Quantile over per-key values: sort, the smallest t with count(<= t) >= f * total.
double BruteQuantile(std::vector<double> v, double f) {
  std::sort(v.begin(), v.end());
  const double target = f * static_cast<double>(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (static_cast<double>(i + 1) >= target) return v[i];
  }
  return v.back();
}

struct Brute {
  std::vector<double> flat, coarse, fine;
};

std::vector<Brute> BruteCalibrate(const std::vector<Head>& heads, int g, int w, int d, const std::vector<double>& fs,
                                  double share) {
  // Per-key flat and coarse values.
  std::vector<double> flat_keys, coarse_keys;
  struct Cache {
    std::vector<std::vector<double>> R;  // per q head: R_a
  };
  std::vector<Cache> cache(heads.size());
  for (size_t hi = 0; hi < heads.size(); ++hi) {
    const HeadClustering& c = heads[hi].c;
    const size_t k2 = c.n_fine(), k1 = c.n_coarse();
    std::vector<double> n2(k2), n1(k1, 0.0);
    std::vector<int> parent(k2);
    for (size_t j = 0; j < k2; ++j) n2[j] = c.fine_offsets[j + 1] - c.fine_offsets[j];
    for (size_t a = 0; a < k1; ++a) {
      for (uint32_t j = c.coarse_child_offsets[a]; j < c.coarse_child_offsets[a + 1]; ++j) {
        n1[a] += n2[j];
        parent[j] = static_cast<int>(a);
      }
    }
    for (int h = 0; h < g; ++h) {
      std::vector<double> r(k2, 0.0), R(k1, 0.0);
      for (int t = 0; t < w; ++t) {
        const float* q = heads[hi].q.data() + (static_cast<size_t>(h) * w + t) * d;
        auto p = BruteProbs(q, c.fine_centroids, n2, std::vector<bool>(k2, true), d);
        auto P = BruteProbs(q, c.coarse_centroids, n1, std::vector<bool>(k1, true), d);
        for (size_t j = 0; j < k2; ++j) r[j] += p[j] / w;
        for (size_t a = 0; a < k1; ++a) R[a] += P[a] / w;
      }
      // One sample per key.
      for (size_t j = 0; j < k2; ++j) {
        for (uint32_t i = 0; i < n2[j]; ++i) {
          flat_keys.push_back(r[j]);
          coarse_keys.push_back(R[parent[j]]);
        }
      }
      cache[hi].R.push_back(R);
    }
  }
  std::vector<Brute> out(fs.size());
  for (size_t f = 0; f < fs.size(); ++f) {
    const double tf = BruteQuantile(flat_keys, fs[f]);
    const double tc = BruteQuantile(coarse_keys, share * fs[f]);
    std::vector<double> fine_keys;
    for (size_t hi = 0; hi < heads.size(); ++hi) {
      const HeadClustering& c = heads[hi].c;
      const size_t k2 = c.n_fine();
      std::vector<double> n2(k2);
      for (size_t j = 0; j < k2; ++j) n2[j] = c.fine_offsets[j + 1] - c.fine_offsets[j];
      for (int h = 0; h < g; ++h) {
        std::vector<bool> in(k2, false);
        for (size_t a = 0; a < cache[hi].R[h].size(); ++a) {
          if (cache[hi].R[h][a] > tc) {
            for (uint32_t j = c.coarse_child_offsets[a]; j < c.coarse_child_offsets[a + 1]; ++j) in[j] = true;
          }
        }
        std::vector<double> r(k2, 0.0);
        bool any = std::find(in.begin(), in.end(), true) != in.end();
        for (int t = 0; t < w && any; ++t) {
          const float* q = heads[hi].q.data() + (static_cast<size_t>(h) * w + t) * d;
          auto p = BruteProbs(q, c.fine_centroids, n2, in, d);
          for (size_t j = 0; j < k2; ++j) r[j] += p[j] / w;
        }
        for (size_t j = 0; j < k2; ++j) {
          for (uint32_t i = 0; i < n2[j]; ++i) fine_keys.push_back(in[j] ? r[j] : 0.0);
        }
      }
    }
    out[f].flat = {tf};
    out[f].coarse = {tc};
    out[f].fine = {BruteQuantile(fine_keys, fs[f])};
  }
  return out;
}

std::vector<Head> MakeHeads(int n_heads, int64_t n, int d, int g, int w, float q_scale, uint64_t seed) {
  std::vector<Head> heads(n_heads);
  for (int hi = 0; hi < n_heads; ++hi) {
    std::vector<float> keys(static_cast<size_t>(n) * d);
    for (int64_t i = 0; i < n; ++i) {
      const int topic = static_cast<int>(index_test::SplitMix(seed + hi * 100 + i / 8) % 10);
      for (int c = 0; c < d; ++c) {
        keys[i * d + c] = Gauss(seed * 7 + hi * 100 + topic, c) + 0.3f * Gauss(seed + hi, i * d + c);
      }
    }
    KMeansOptions o;
    o.fine_ratio = 0.08;
    o.coarse_ratio = 0.02;
    o.iters = 4;
    o.seed = seed + hi;
    EXPECT_TRUE(ClusterHead(keys.data(), n, d, o, &heads[hi].c).ok());
    heads[hi].q.resize(static_cast<size_t>(g) * w * d);
    for (size_t i = 0; i < heads[hi].q.size(); ++i) heads[hi].q[i] = q_scale * Gauss(seed * 13 + hi, i);
  }
  return heads;
}

void RunAndCompare(const std::vector<Head>& heads, int g, int w, int d, double tol) {
  const std::vector<double> fs = {0.3, 0.5, 0.7, 0.9, 0.95};
  const double share = 0.5;
  Calibrator cal(fs, share);
  for (const Head& h : heads) cal.AddFirstPass(ViewOf(h.c), h.q.data(), g, w);
  cal.FinishFirstPass();
  for (const Head& h : heads) cal.AddSecondPass(ViewOf(h.c), h.q.data(), g, w);
  std::vector<Thresholds> got = cal.Finish();
  std::vector<Brute> want = BruteCalibrate(heads, g, w, d, fs, share);
  ASSERT_EQ(got.size(), fs.size());
  for (size_t f = 0; f < fs.size(); ++f) {
    SCOPED_TRACE("f = " + std::to_string(fs[f]));
    EXPECT_EQ(got[f].quantile, fs[f]);
    for (float x : {got[f].flat, got[f].coarse, got[f].fine}) {
      ASSERT_TRUE(std::isfinite(x));
      ASSERT_GE(x, 0.0f);
    }
    EXPECT_NEAR(got[f].flat, want[f].flat[0], tol * want[f].flat[0] + 1e-30);
    EXPECT_NEAR(got[f].coarse, want[f].coarse[0], tol * want[f].coarse[0] + 1e-30);
    EXPECT_NEAR(got[f].fine, want[f].fine[0], tol * want[f].fine[0] + 1e-30);
  }
  // Thresholds increase with f.
  for (size_t f = 1; f < fs.size(); ++f) {
    EXPECT_LE(got[f - 1].flat, got[f].flat);
    EXPECT_LE(got[f - 1].coarse, got[f].coarse);
  }
}

TEST(IndexCalibrateTest, WeightedQuantiles) {
  std::vector<WeightedSample> s = {{0.3f, 2}, {0.1f, 1}, {0.2f, 3}, {0.4f, 4}};  // total 10
  auto q = WeightedQuantiles(&s, {0.05, 0.1, 0.11, 0.4, 0.41, 0.6, 0.61, 0.99});
  EXPECT_EQ(q, (std::vector<float>{0.1f, 0.1f, 0.2f, 0.2f, 0.3f, 0.3f, 0.4f, 0.4f}));
  // Extra weight at 0.
  std::vector<WeightedSample> s2 = {{0.5f, 5}};
  auto q2 = WeightedQuantiles(&s2, {0.5, 0.51}, 5);
  EXPECT_EQ(q2, (std::vector<float>{0.0f, 0.5f}));
  std::vector<WeightedSample> empty;
  EXPECT_EQ(WeightedQuantiles(&empty, {0.5}), (std::vector<float>{0.0f}));
}

TEST(IndexCalibrateTest, MatchesBruteForce) {
  const int d = 16, g = 2, w = 6;
  auto heads = MakeHeads(3, 600, d, g, w, 1.0f, 21);
  RunAndCompare(heads, g, w, d, 2e-5);
}

TEST(IndexCalibrateTest, MatchesBruteForceSharpQueries) {
  // Larger query norms: mass concentrates, many near-zero scores.
  const int d = 16, g = 3, w = 5;
  auto heads = MakeHeads(2, 500, d, g, w, 12.0f, 33);
  RunAndCompare(heads, g, w, d, 1e-4);
}

TEST(IndexCalibrateTest, HugeQueryNormsNoNaN) {
  // |q| ~ 1e30: scores ~ 1e30, exp() of unshifted scores would overflow.
  const int d = 16, g = 2, w = 4;
  auto heads = MakeHeads(2, 400, d, g, w, 1e30f, 45);
  RunAndCompare(heads, g, w, d, 1e-4);
}

TEST(IndexCalibrateTest, FloatOverflowFallsBackToDouble) {
  // |q| ~ 1e37: q . c overflows float (the GEMM path) but not double.
  const int d = 16, g = 2, w = 4;
  auto heads = MakeHeads(2, 400, d, g, w, 5e37f, 46);
  bool overflows = false;
  for (const Head& h : heads) {
    for (size_t t = 0; t < h.q.size() / d; ++t) {
      for (int64_t j = 0; j < h.c.n_fine(); ++j) {
        float acc = 0;
        for (int c = 0; c < d; ++c) acc += h.q[t * d + c] * h.c.fine_centroids[j * d + c];
        overflows = overflows || !std::isfinite(acc);
      }
    }
  }
  ASSERT_TRUE(overflows) << "the inputs must exercise the double fallback";
  RunAndCompare(heads, g, w, d, 1e-4);
}

TEST(IndexCalibrateTest, NoClusteredKeys) {
  HeadClustering empty;
  empty.dim = 8;
  empty.fine_offsets = {0};
  empty.coarse_child_offsets = {0};
  std::vector<float> q(2 * 3 * 8, 1.0f);
  Calibrator cal({0.5, 0.9}, 0.5);
  cal.AddFirstPass(ViewOf(empty), q.data(), 2, 3);
  cal.FinishFirstPass();
  cal.AddSecondPass(ViewOf(empty), q.data(), 2, 3);
  auto t = cal.Finish();
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[1].quantile, 0.9);
  EXPECT_EQ(t[1].flat, 0.0f);
  EXPECT_EQ(t[1].fine, 0.0f);
}

}  // namespace
}  // namespace sqz::index
