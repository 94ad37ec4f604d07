// Selection (query/selection.h) against a brute-force implementation of the
// formulas of docs/SEMANTICS.md, written independently in double precision.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "query/selection.h"

namespace sqz::query {
namespace {

// A random two-level index with its own storage.
struct RandomIndex {
  int d = 0;
  std::vector<float> fine, coarse;
  std::vector<uint32_t> fine_sizes, coarse_sizes, child_offsets;
  int64_t n_clustered = 0;

  RandomIndex(int dim, int k1, uint64_t seed) : d(dim) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> n_children(1, 8), size(1, 20);
    child_offsets.push_back(0);
    for (int a = 0; a < k1; ++a) {
      const int children = n_children(rng);
      std::vector<double> mean(d, 0.0);
      uint32_t total = 0;
      for (int c = 0; c < children; ++c) {
        const uint32_t n = size(rng);
        fine_sizes.push_back(n);
        total += n;
        for (int i = 0; i < d; ++i) {
          const float x = normal(rng);
          fine.push_back(x);
          mean[i] += n * static_cast<double>(x);
        }
      }
      for (int i = 0; i < d; ++i) coarse.push_back(static_cast<float>(mean[i] / total));
      coarse_sizes.push_back(total);
      child_offsets.push_back(child_offsets.back() + children);
      n_clustered += total;
    }
  }
  int k2() const { return static_cast<int>(fine_sizes.size()); }
  int k1() const { return static_cast<int>(coarse_sizes.size()); }

  IndexView View() const {
    IndexView v;
    v.head_dim = d;
    v.n_clustered = n_clustered;
    v.k2 = k2();
    v.k1 = k1();
    v.fine_centroids = fine.data();
    v.fine_sizes = fine_sizes.data();
    v.coarse_centroids = coarse.data();
    v.coarse_sizes = coarse_sizes.data();
    v.coarse_child_offsets = child_offsets.data();
    return v;
  }
};

// --- brute force -------------------------------------------------------------

// p over the clusters `ids` (centroids c [.., d], sizes by id) for query q.
std::vector<double> BruteProbs(const float* q, int d, double scale, const std::vector<float>& c,
                               const std::vector<uint32_t>& sizes, const std::vector<uint32_t>& ids) {
  std::vector<double> s(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    double dot = 0;
    for (int x = 0; x < d; ++x) dot += static_cast<double>(q[x]) * c[static_cast<size_t>(ids[i]) * d + x];
    s[i] = scale * dot;
  }
  double m = -INFINITY;
  for (double x : s) m = std::max(m, x);
  double denom = 0;
  for (size_t i = 0; i < ids.size(); ++i) denom += sizes[ids[i]] * std::exp(s[i] - m);
  std::vector<double> p(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) p[i] = std::exp(s[i] - m) / denom;
  return p;
}

// Mean of BruteProbs over the `rows` queries q [rows, d].
std::vector<double> BruteMeanProbs(const float* q, int rows, int d, double scale, const std::vector<float>& c,
                                   const std::vector<uint32_t>& sizes, const std::vector<uint32_t>& ids) {
  std::vector<double> mean(ids.size(), 0.0);
  for (int t = 0; t < rows; ++t) {
    auto p = BruteProbs(q + t * d, d, scale, c, sizes, ids);
    for (size_t i = 0; i < p.size(); ++i) mean[i] += p[i] / rows;
  }
  return mean;
}

std::set<uint32_t> BruteKeep(const SelectionParams& params, const std::vector<double>& p,
                             const std::vector<uint32_t>& ids, const std::vector<uint32_t>& sizes, double tau,
                             double target) {
  std::set<uint32_t> out;
  if (params.mode == SelectionMode::kThreshold) {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (p[i] > tau) out.insert(ids[i]);
    }
    return out;
  }
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return p[a] != p[b] ? p[a] > p[b] : ids[a] < ids[b]; });
  double kept = 0;
  for (size_t i : order) {
    if (kept >= target) break;
    out.insert(ids[i]);
    kept += sizes[ids[i]];
  }
  return out;
}

// What one query head selects for the queries q [rows, d] (one selection).
std::set<uint32_t> BruteSelectOne(const RandomIndex& ix, const float* q, int rows, const SelectionParams& params) {
  const double scale = params.scale;
  std::vector<uint32_t> all_fine(ix.k2()), all_coarse(ix.k1());
  std::iota(all_fine.begin(), all_fine.end(), 0u);
  std::iota(all_coarse.begin(), all_coarse.end(), 0u);
  const double fine_target = params.budget * ix.n_clustered;
  if (!params.hierarchical) {
    auto p = BruteMeanProbs(q, rows, ix.d, scale, ix.fine, ix.fine_sizes, all_fine);
    return BruteKeep(params, p, all_fine, ix.fine_sizes, params.tau_flat, fine_target);
  }
  auto P = BruteMeanProbs(q, rows, ix.d, scale, ix.coarse, ix.coarse_sizes, all_coarse);
  auto kept = BruteKeep(params, P, all_coarse, ix.coarse_sizes, params.tau_coarse,
                        std::min(1.0, params.coarse_budget_factor * params.budget) * ix.n_clustered);
  std::vector<uint32_t> survivors;
  for (uint32_t a : kept) {
    for (uint32_t j = ix.child_offsets[a]; j < ix.child_offsets[a + 1]; ++j) survivors.push_back(j);
  }
  // The denominator of p' runs over the survivors only.
  auto p = BruteMeanProbs(q, rows, ix.d, scale, ix.fine, ix.fine_sizes, survivors);
  return BruteKeep(params, p, survivors, ix.fine_sizes, params.tau_fine, fine_target);
}

// The queries of head h in q [G, T, d] that one selection averages over: all
// T, or query t alone with per-query selection; appended to *rows.
void AppendSelectionRows(const RandomIndex& ix, const float* q, int T, const SelectionParams& params, int h, int t,
                         std::vector<float>* rows) {
  const float* qh = q + static_cast<size_t>(h) * T * ix.d;
  if (params.per_query && T > 1) {
    rows->insert(rows->end(), qh + static_cast<size_t>(t) * ix.d, qh + static_cast<size_t>(t + 1) * ix.d);
  } else {
    rows->insert(rows->end(), qh, qh + static_cast<size_t>(T) * ix.d);
  }
}

// Expected attended set of (g, t) for q [G, T, d].
std::set<uint32_t> BruteAttended(const RandomIndex& ix, const float* q, int G, int T, const SelectionParams& params,
                                 int g, int t) {
  auto own = [&](int h) {
    std::vector<float> rows;
    AppendSelectionRows(ix, q, T, params, h, t, &rows);
    return BruteSelectOne(ix, rows.data(), static_cast<int>(rows.size()) / ix.d, params);
  };
  if (params.mode == SelectionMode::kDense) {
    std::set<uint32_t> all;
    for (int j = 0; j < ix.k2(); ++j) all.insert(j);
    return all;
  }
  if (params.gqa == GqaPolicy::kPerHead) return own(g);
  if (params.mode == SelectionMode::kBudget) {
    // Joint: one selection by the mean probability over the group's G heads
    // (and T queries when shared); every head of the group attends it.
    std::vector<float> rows;
    for (int h = 0; h < G; ++h) AppendSelectionRows(ix, q, T, params, h, t, &rows);
    return BruteSelectOne(ix, rows.data(), static_cast<int>(rows.size()) / ix.d, params);
  }
  // Threshold: each head thresholds its own probabilities; the union.
  std::set<uint32_t> u;
  for (int h = 0; h < G; ++h) {
    auto s = own(h);
    u.insert(s.begin(), s.end());
  }
  return u;
}

void ExpectMatchesBruteForce(const RandomIndex& ix, const std::vector<float>& q, int G, int T,
                             const SelectionParams& params, const std::string& what) {
  HeadSelection sel;
  SelectHead(ix.View(), q.data(), G, T, params, &sel);
  ASSERT_EQ(sel.set_of.size(), static_cast<size_t>(G) * T) << what;
  std::set<uint32_t> read_expected;
  for (int g = 0; g < G; ++g) {
    for (int t = 0; t < T; ++t) {
      auto expected = BruteAttended(ix, q.data(), G, T, params, g, t);
      read_expected.insert(expected.begin(), expected.end());
      const auto& got = sel.sets[sel.set_of[static_cast<size_t>(g) * T + t]];
      EXPECT_TRUE(std::is_sorted(got.begin(), got.end())) << what;
      EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()), expected) << what << " g=" << g << " t=" << t;
      EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()).size(), got.size()) << what << ": duplicate ids";
    }
  }
  EXPECT_EQ(std::set<uint32_t>(sel.read.begin(), sel.read.end()), read_expected) << what;
}

std::vector<float> RandomQueries(int G, int T, int d, float norm, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(G) * T * d);
  for (float& x : q) x = norm * normal(rng);
  return q;
}

// A threshold in the middle of the flat (or coarse/fine) probabilities of the
// queries, so that both sides are non-empty.
float MedianFlatP(const RandomIndex& ix, const std::vector<float>& q, float scale) {
  std::vector<uint32_t> ids(ix.k2());
  std::iota(ids.begin(), ids.end(), 0u);
  auto p = BruteProbs(q.data(), ix.d, scale, ix.fine, ix.fine_sizes, ids);
  std::sort(p.begin(), p.end());
  return static_cast<float>(0.5 * (p[p.size() / 2] + p[p.size() / 2 + 1]));
}

TEST(QuerySelectionTest, MatchesBruteForceAcrossModes) {
  const int d = 16;
  int cases = 0;
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    RandomIndex ix(d, 7, seed);
    for (int G : {1, 3}) {
      for (int T : {1, 4}) {
        auto q = RandomQueries(G, T, d, 2.0f, seed * 100 + G * 10 + T);
        SelectionParams base;
        base.scale = 1.0f / std::sqrt(static_cast<float>(d));
        const float tau = MedianFlatP(ix, q, base.scale);
        for (SelectionMode mode : {SelectionMode::kBudget, SelectionMode::kThreshold, SelectionMode::kDense}) {
          for (bool hier : {false, true}) {
            for (GqaPolicy gqa : {GqaPolicy::kUnion, GqaPolicy::kPerHead}) {
              for (bool per_query : {false, true}) {
                for (double budget : {0.0, 0.1, 0.3, 1.0}) {
                  if (mode != SelectionMode::kBudget && budget != 0.1) continue;
                  SelectionParams p = base;
                  p.mode = mode;
                  p.hierarchical = hier;
                  p.gqa = gqa;
                  p.per_query = per_query;
                  p.budget = budget;
                  p.tau_flat = tau;
                  p.tau_fine = tau * 1.5f;
                  p.tau_coarse = tau * 0.2f;
                  ExpectMatchesBruteForce(ix, q, G, T, p,
                                          "seed " + std::to_string(seed) + " G " + std::to_string(G) + " T " +
                                              std::to_string(T) + " mode " + std::to_string(int(mode)) + " hier " +
                                              std::to_string(hier) + " gqa " + std::to_string(int(gqa)) +
                                              " per_query " + std::to_string(per_query) + " budget " +
                                              std::to_string(budget));
                  ++cases;
                }
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 300);
}

// Budget + union reads the budget per KV head: the read set is exactly the
// shortest prefix of the joint order (mean p_j over the group's heads and
// queries) whose keys reach b * n_clustered, for any G, and every head attends
// it. Per-head reads the union of the heads' own budget-b selections.
TEST(QuerySelectionTest, JointBudgetReadsTheBudgetPerKvHead) {
  const int d = 16;
  int64_t per_head_read = 0, union_read = 0;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    RandomIndex ix(d, 40, seed);
    std::vector<uint32_t> all(ix.k2());
    std::iota(all.begin(), all.end(), 0u);
    uint32_t max_size = 0;
    for (uint32_t n : ix.fine_sizes) max_size = std::max(max_size, n);
    for (int G : {1, 2, 4, 8}) {
      for (int T : {1, 3}) {
        for (bool per_query : {false, true}) {
          for (double b : {0.05, 0.125, 0.3}) {
            const std::string what = "seed " + std::to_string(seed) + " G " + std::to_string(G) + " T " +
                                     std::to_string(T) + " per_query " + std::to_string(per_query) + " b " +
                                     std::to_string(b);
            auto q = RandomQueries(G, T, d, 2.0f, seed * 1000 + G * 10 + T);
            SelectionParams p;
            p.scale = 1.0f / std::sqrt(static_cast<float>(d));
            p.budget = b;
            p.per_query = per_query;
            const double target = b * ix.n_clustered;
            HeadSelection sel;
            SelectHead(ix.View(), q.data(), G, T, p, &sel);
            const int U = per_query && T > 1 ? T : 1;
            ASSERT_EQ(sel.sets.size(), static_cast<size_t>(U)) << what;
            std::set<uint32_t> read_expected;
            for (int u = 0; u < U; ++u) {
              // The joint order of unit u, and its shortest prefix >= target.
              std::vector<float> rows;
              for (int h = 0; h < G; ++h) AppendSelectionRows(ix, q.data(), T, p, h, u, &rows);
              auto score = BruteMeanProbs(rows.data(), static_cast<int>(rows.size()) / d, d, p.scale, ix.fine,
                                          ix.fine_sizes, all);
              std::vector<uint32_t> order = all;
              std::sort(order.begin(), order.end(),
                        [&](uint32_t a, uint32_t c) { return score[a] != score[c] ? score[a] > score[c] : a < c; });
              std::set<uint32_t> prefix;
              int64_t keys = 0;
              for (size_t i = 0; i < order.size() && keys < target; ++i) {
                prefix.insert(order[i]);
                keys += ix.fine_sizes[order[i]];
              }
              const auto& got = sel.sets[u];
              EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()), prefix) << what << " u " << u;
              int64_t got_keys = 0;
              for (uint32_t j : got) got_keys += ix.fine_sizes[j];
              // Read fraction ~= b, independent of G.
              EXPECT_GE(got_keys, target) << what;
              EXPECT_LT(got_keys, target + max_size) << what;
              read_expected.insert(got.begin(), got.end());
            }
            for (int g = 0; g < G; ++g) {
              for (int t = 0; t < T; ++t) {
                EXPECT_EQ(sel.set_of[static_cast<size_t>(g) * T + t], U > 1 ? t : 0) << what;
              }
            }
            EXPECT_EQ(std::set<uint32_t>(sel.read.begin(), sel.read.end()), read_expected) << what;
            if (U == 1) {
              EXPECT_EQ(sel.read, sel.sets[0]) << what;
              for (uint32_t j : sel.read) union_read += ix.fine_sizes[j];
            }

            // Per-head: each head its own budget-b selection; reads the union.
            p.gqa = GqaPolicy::kPerHead;
            HeadSelection ph;
            SelectHead(ix.View(), q.data(), G, T, p, &ph);
            std::set<uint32_t> u;
            for (int g = 0; g < G; ++g) {
              for (int t = 0; t < T; ++t) {
                std::vector<float> rows;
                AppendSelectionRows(ix, q.data(), T, p, g, t, &rows);
                auto own = BruteSelectOne(ix, rows.data(), static_cast<int>(rows.size()) / d, p);
                const auto& got = ph.sets[ph.set_of[static_cast<size_t>(g) * T + t]];
                EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()), own) << what << " per-head g " << g;
                u.insert(own.begin(), own.end());
              }
            }
            EXPECT_EQ(std::set<uint32_t>(ph.read.begin(), ph.read.end()), u) << what << " per-head";
            if (U == 1) {
              for (uint32_t j : ph.read) per_head_read += ix.fine_sizes[j];
            }
          }
        }
      }
    }
  }
  // Independent random heads: the per-head union reads well above the budget.
  EXPECT_GT(per_head_read, 1.5 * union_read);
}

TEST(QuerySelectionTest, BudgetRuleEdges) {
  RandomIndex ix(8, 5, 42);
  auto q = RandomQueries(1, 1, 8, 1.0f, 7);
  SelectionParams p;
  p.scale = 0.5f;
  HeadSelection sel;
  p.budget = 0;  // keeps none
  SelectHead(ix.View(), q.data(), 1, 1, p, &sel);
  EXPECT_TRUE(sel.read.empty());
  ASSERT_EQ(sel.sets.size(), 1u);
  EXPECT_TRUE(sel.sets[0].empty());
  for (double b : {1.0, 1.5}) {  // keeps all
    p.budget = b;
    SelectHead(ix.View(), q.data(), 1, 1, p, &sel);
    EXPECT_EQ(sel.read.size(), static_cast<size_t>(ix.k2()));
    p.hierarchical = true;
    SelectHead(ix.View(), q.data(), 1, 1, p, &sel);
    EXPECT_EQ(sel.read.size(), static_cast<size_t>(ix.k2()));
    p.hierarchical = false;
  }
  // The kept keys reach the target with the shortest prefix: dropping the
  // last kept cluster (the one of least p) falls below it.
  p.budget = 0.25;
  SelectHead(ix.View(), q.data(), 1, 1, p, &sel);
  int64_t kept = 0;
  for (uint32_t j : sel.read) kept += ix.fine_sizes[j];
  EXPECT_GE(kept, 0.25 * ix.n_clustered);
  std::vector<uint32_t> ids(ix.k2());
  std::iota(ids.begin(), ids.end(), 0u);
  auto prob = BruteProbs(q.data(), 8, p.scale, ix.fine, ix.fine_sizes, ids);
  uint32_t weakest = sel.read[0];
  for (uint32_t j : sel.read) weakest = prob[j] < prob[weakest] ? j : weakest;
  EXPECT_LT(kept - ix.fine_sizes[weakest], 0.25 * ix.n_clustered);
}

TEST(QuerySelectionTest, SelectBudgetTiesPreferSmallerIds) {
  const std::vector<double> p = {0.1, 0.3, 0.3, 0.1, 0.3};
  const std::vector<uint32_t> ids = {10, 11, 12, 13, 14}, sizes = {1, 1, 1, 1, 1};
  std::vector<uint32_t> out;
  SelectBudget(p.data(), ids.data(), sizes.data(), 5, 2, &out);
  EXPECT_EQ(out, (std::vector<uint32_t>{11, 12}));
  out.clear();
  SelectBudget(p.data(), ids.data(), sizes.data(), 5, 3.5, &out);
  EXPECT_EQ(out, (std::vector<uint32_t>{10, 11, 12, 14}));
}

TEST(QuerySelectionTest, SelectBudgetEqualsFullSortOnLargeInputs) {
  std::mt19937_64 rng(17);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t n = 100 + static_cast<int64_t>(rng() % 5000);
    std::vector<double> p(n);
    std::vector<uint32_t> ids(n), sizes(n);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = static_cast<double>(rng() % 50);  // many ties
      ids[i] = static_cast<uint32_t>(3 * i + 1);
      sizes[i] = 1 + static_cast<uint32_t>(rng() % (trial % 2 ? 3 : 200));  // skewed sizes too
      total += sizes[i];
    }
    std::vector<uint32_t> sizes_by_id(3 * n + 2, 0);  // BruteKeep looks sizes up by id
    for (int64_t i = 0; i < n; ++i) sizes_by_id[ids[i]] = sizes[i];
    for (double frac : {0.0001, 0.01, 0.125, 0.5, 0.99, 1.0}) {
      std::vector<uint32_t> got;
      SelectBudget(p.data(), ids.data(), sizes.data(), n, frac * total, &got);
      auto want = BruteKeep(SelectionParams(), p, ids, sizes_by_id, 0, frac * total);
      EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()), want) << "n " << n << " frac " << frac;
      EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
    }
  }
}

// CoarseProbabilities and CoarseBudgetTarget are the hierarchical budget's
// coarse stage: the probabilities match the brute force (per key: sum_a M_a
// P_a = 1), and the budget rule over them keeps exactly the coarse clusters
// whose children SelectHead scores (its dot products) and selects from.
TEST(QuerySelectionTest, CoarseProbabilitiesAreTheCoarseStage) {
  const int d = 16;
  int cases = 0;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    RandomIndex ix(d, 30, seed);
    std::vector<uint32_t> all_coarse(ix.k1());
    std::iota(all_coarse.begin(), all_coarse.end(), 0u);
    for (int G : {1, 4}) {
      for (int T : {1, 3}) {
        auto q = RandomQueries(G, T, d, 2.0f, seed * 100 + G * 10 + T);
        const int R = G * T;
        SelectionParams p;
        p.scale = 1.0f / std::sqrt(static_cast<float>(d));
        p.hierarchical = true;
        std::vector<double> P;
        CoarseProbabilities(ix.View(), q.data(), 1, R, p.scale, &P);
        ASSERT_EQ(P.size(), static_cast<size_t>(ix.k1()));
        auto brute = BruteMeanProbs(q.data(), R, d, p.scale, ix.coarse, ix.coarse_sizes, all_coarse);
        double mass = 0;
        for (int a = 0; a < ix.k1(); ++a) {
          EXPECT_NEAR(P[a], brute[a], 1e-5 * brute[a] + 1e-12) << "seed " << seed << " a " << a;
          mass += ix.coarse_sizes[a] * P[a];
        }
        EXPECT_NEAR(mass, 1.0, 1e-9);
        // Units of R rows each: one call over U units is U calls of one.
        std::vector<double> Pu;
        CoarseProbabilities(ix.View(), q.data(), T, G, p.scale, &Pu);
        ASSERT_EQ(Pu.size(), static_cast<size_t>(T) * ix.k1());
        for (int u = 0; u < T; ++u) {
          std::vector<double> one;
          CoarseProbabilities(ix.View(), q.data() + static_cast<size_t>(u) * G * d, 1, G, p.scale, &one);
          for (int a = 0; a < ix.k1(); ++a) EXPECT_EQ(Pu[static_cast<size_t>(u) * ix.k1() + a], one[a]);
        }
        for (double b : {0.05, 0.125, 0.3}) {
          for (double factor : {1.0, 2.0, 4.0}) {
            const std::string what = "seed " + std::to_string(seed) + " G " + std::to_string(G) + " T " +
                                     std::to_string(T) + " b " + std::to_string(b) + " factor " +
                                     std::to_string(factor);
            p.budget = b;
            p.coarse_budget_factor = factor;
            const double target = CoarseBudgetTarget(ix.View(), p);
            EXPECT_EQ(target, std::min(1.0, factor * b) * ix.n_clustered) << what;
            const auto kept = BruteKeep(p, P, all_coarse, ix.coarse_sizes, 0, target);
            std::set<uint32_t> children;
            for (uint32_t a : kept) {
              for (uint32_t j = ix.child_offsets[a]; j < ix.child_offsets[a + 1]; ++j) children.insert(j);
            }
            HeadSelection sel;
            SelectHead(ix.View(), q.data(), G, T, p, &sel);
            EXPECT_EQ(sel.dot_products, static_cast<int64_t>(R) * (ix.k1() + static_cast<int64_t>(children.size())))
                << what;
            for (uint32_t j : sel.read) EXPECT_TRUE(children.count(j)) << what << " fine " << j;
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 4 * 2 * 2 * 9);
}

TEST(QuerySelectionTest, HugeQueryNormsStayFiniteAndExact) {
  const int d = 16;
  RandomIndex ix(d, 6, 9);
  // 1e4: exp() of the raw scores overflows without max subtraction.
  // 1e36: the float32 dot products themselves overflow (double fallback).
  for (float norm : {1e4f, 1e36f}) {
    for (int T : {1, 3}) {
      auto q = RandomQueries(2, T, d, norm, 77);
      std::vector<double> s(static_cast<size_t>(T) * ix.k2());
      std::vector<float> scratch;
      ScoreCentroidRows(q.data(), T, ix.fine.data(), ix.k2(), d, 0.25f, s.data(), &scratch);
      for (double x : s) EXPECT_TRUE(std::isfinite(x)) << norm;
      for (bool hier : {false, true}) {
        for (bool per_query : {false, true}) {
          SelectionParams p;
          p.scale = 0.25f;
          p.budget = 0.2;
          p.hierarchical = hier;
          p.per_query = per_query;
          ExpectMatchesBruteForce(ix, q, 2, T, p, "norm " + std::to_string(norm));
          p.mode = SelectionMode::kThreshold;
          p.tau_flat = p.tau_fine = p.tau_coarse = 1e-4f;
          ExpectMatchesBruteForce(ix, q, 2, T, p, "threshold norm " + std::to_string(norm));
        }
      }
    }
  }
}

TEST(QuerySelectionTest, NoClusters) {
  IndexView empty;
  empty.head_dim = 4;
  const uint32_t zero = 0;
  empty.coarse_child_offsets = &zero;
  std::vector<float> q(8, 1.0f);
  for (SelectionMode mode : {SelectionMode::kBudget, SelectionMode::kThreshold, SelectionMode::kDense}) {
    for (bool hier : {false, true}) {
      SelectionParams p;
      p.mode = mode;
      p.hierarchical = hier;
      p.scale = 0.5f;
      HeadSelection sel;
      SelectHead(empty, q.data(), 2, 1, p, &sel);
      EXPECT_TRUE(sel.read.empty());
      ASSERT_EQ(sel.set_of.size(), 2u);
      EXPECT_TRUE(sel.sets[sel.set_of[0]].empty());
    }
  }
}

TEST(QuerySelectionTest, DotProductCounts) {
  RandomIndex ix(8, 6, 3);
  auto q = RandomQueries(2, 3, 8, 1.0f, 5);
  SelectionParams p;
  p.scale = 0.3f;
  HeadSelection sel;
  SelectHead(ix.View(), q.data(), 2, 3, p, &sel);
  EXPECT_EQ(sel.dot_products, 2 * 3 * ix.k2());
  p.hierarchical = true;
  p.budget = 1.0;  // every coarse cluster survives: k1 + k2 per query
  SelectHead(ix.View(), q.data(), 2, 3, p, &sel);
  EXPECT_EQ(sel.dot_products, 2 * 3 * (ix.k1() + ix.k2()));
}

}  // namespace
}  // namespace sqz::query
