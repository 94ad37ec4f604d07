#include "query/selection.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "index/probability.h"
#include "query/attention.h"

namespace sqz::query {

namespace {

// Bound on the scores scratch of one tile of queries, so a long prefill
// against many centroids does not allocate T * K2 scores at once.
constexpr int64_t kScoreTileFloats = int64_t{1} << 20;

// Up to this many query rows, ScoreCentroidRows uses its loop kernel instead
// of sgemm (see there).
constexpr int kLoopRows = 16;

int TileRows(int T, int64_t k) {
  int64_t rows = kScoreTileFloats / std::max<int64_t>(k, 1);
  return static_cast<int>(std::clamp<int64_t>(rows, 1, T));
}

// Per-key probabilities of all k clusters (centroids c, sizes), averaged over
// units of R consecutive queries: q is [U, R, d], and mean[u * k + j] is the
// mean over the R queries of unit u of p_j, each p_j computed with its own
// query's max and denominator.
void MeanProbabilities(const float* q, int U, int R, int d, float scale, const float* c, const uint32_t* sizes,
                       int64_t k, std::vector<double>* mean) {
  mean->assign(static_cast<size_t>(U) * k, 0.0);
  if (k == 0) return;
  const int n = U * R;
  const int tile = TileRows(n, k);
  std::vector<double> s(static_cast<size_t>(tile) * k), p(k);
  std::vector<float> scratch;
  for (int t0 = 0; t0 < n; t0 += tile) {
    const int rows = std::min(tile, n - t0);
    ScoreCentroidRows(q + static_cast<int64_t>(t0) * d, rows, c, k, d, scale, s.data(), &scratch);
    for (int r = 0; r < rows; ++r) {
      index::ClusterProbabilities(s.data() + static_cast<int64_t>(r) * k, sizes, k, p.data());
      double* m = mean->data() + static_cast<int64_t>((t0 + r) / R) * k;
      for (int64_t j = 0; j < k; ++j) m[j] += p[j];
    }
  }
  for (double& m : *mean) m /= R;
}

// Hierarchical fine probabilities p'_j over the surviving fine clusters
// `survivors` (ascending ids), averaged over the T queries q: mean[i] belongs
// to survivors[i].
void SurvivorProbabilities(const IndexView& idx, const float* q, int T, float scale,
                           const std::vector<uint32_t>& survivors, std::vector<double>* mean) {
  const int d = idx.head_dim;
  const int64_t n = static_cast<int64_t>(survivors.size());
  mean->assign(n, 0.0);
  if (n == 0) return;
  // Gather the survivors' centroids so they are scored with one BLAS call.
  std::vector<float> c(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(idx.fine_centroids + static_cast<int64_t>(survivors[i]) * d, d, c.data() + i * d);
  }
  const int tile = TileRows(T, n);
  std::vector<double> s(static_cast<size_t>(tile) * n), by_id(idx.k2), p(n);
  std::vector<float> scratch;
  for (int t0 = 0; t0 < T; t0 += tile) {
    const int rows = std::min(tile, T - t0);
    ScoreCentroidRows(q + static_cast<int64_t>(t0) * d, rows, c.data(), n, d, scale, s.data(), &scratch);
    for (int r = 0; r < rows; ++r) {
      // index::SubsetProbabilities takes scores indexed by cluster id.
      for (int64_t i = 0; i < n; ++i) by_id[survivors[i]] = s[static_cast<int64_t>(r) * n + i];
      index::SubsetProbabilities(by_id.data(), idx.fine_sizes, survivors.data(), n, p.data());
      for (int64_t i = 0; i < n; ++i) (*mean)[i] += p[i];
    }
  }
  for (double& m : *mean) m /= T;
}

// Keeps candidates by the mode's rule (threshold tau or budget target).
void Keep(const SelectionParams& params, const double* p, const uint32_t* ids, const uint32_t* sizes, int64_t n,
          double tau, double target, std::vector<uint32_t>* out) {
  if (params.mode == SelectionMode::kThreshold) {
    SelectThreshold(p, ids, n, tau, out);
  } else {
    SelectBudget(p, ids, sizes, n, target, out);
  }
}

// Children of the kept coarse clusters, ascending (children of a coarse
// cluster are one contiguous id range, and the CSR orders the ranges).
void Children(const IndexView& idx, const std::vector<uint32_t>& coarse, std::vector<uint32_t>* fine) {
  fine->clear();
  for (uint32_t a : coarse) {
    for (uint32_t j = idx.coarse_child_offsets[a]; j < idx.coarse_child_offsets[a + 1]; ++j) fine->push_back(j);
  }
}

// One selection per unit of queries. q is [U, R, head_dim]; unit u ranks or
// thresholds the clusters by the mean over its R queries of their estimated
// probabilities, and (*out)[u] is its set. The callers choose the units (see
// SelectHead): one query head's T queries (R = T), one of its queries
// (R = 1), or a whole GQA group's queries (R = G * T, or R = G per query).
void SelectUnits(const IndexView& idx, const float* q, int U, int R, const SelectionParams& params,
                 std::vector<std::vector<uint32_t>>* out, int64_t* dot_products) {
  const int d = idx.head_dim;
  const int64_t rows = static_cast<int64_t>(U) * R;
  out->assign(U, {});
  const double n_clustered = static_cast<double>(idx.n_clustered);
  const double fine_target = params.budget * n_clustered;

  if (!params.hierarchical) {
    std::vector<uint32_t> ids(idx.k2);
    std::iota(ids.begin(), ids.end(), 0u);
    std::vector<double> p;
    MeanProbabilities(q, U, R, d, params.scale, idx.fine_centroids, idx.fine_sizes, idx.k2, &p);
    *dot_products += rows * idx.k2;
    for (int u = 0; u < U; ++u) {
      Keep(params, p.data() + static_cast<int64_t>(u) * idx.k2, ids.data(), idx.fine_sizes, idx.k2, params.tau_flat,
           fine_target, &(*out)[u]);
    }
    return;
  }

  // Hierarchical: the coarse level first, then only the children of kept
  // coarse clusters, with the denominator over those survivors.
  std::vector<uint32_t> coarse_ids(idx.k1);
  std::iota(coarse_ids.begin(), coarse_ids.end(), 0u);
  const double coarse_target = CoarseBudgetTarget(idx, params);
  std::vector<double> P;
  CoarseProbabilities(idx, q, U, R, params.scale, &P);
  *dot_products += rows * idx.k1;
  std::vector<uint32_t> kept_coarse, survivors, sizes;
  std::vector<double> p;
  for (int u = 0; u < U; ++u) {
    kept_coarse.clear();
    Keep(params, P.data() + static_cast<int64_t>(u) * idx.k1, coarse_ids.data(), idx.coarse_sizes, idx.k1,
         params.tau_coarse, coarse_target, &kept_coarse);
    Children(idx, kept_coarse, &survivors);
    // p' averaged over the unit's R queries.
    SurvivorProbabilities(idx, q + static_cast<int64_t>(u) * R * d, R, params.scale, survivors, &p);
    *dot_products += static_cast<int64_t>(R) * static_cast<int64_t>(survivors.size());
    sizes.resize(survivors.size());
    for (size_t i = 0; i < survivors.size(); ++i) sizes[i] = idx.fine_sizes[survivors[i]];
    Keep(params, p.data(), survivors.data(), sizes.data(), static_cast<int64_t>(survivors.size()), params.tau_fine,
         fine_target, &(*out)[u]);
  }
}

void SortUnique(std::vector<uint32_t>* v) {
  std::sort(v->begin(), v->end());
  v->erase(std::unique(v->begin(), v->end()), v->end());
}

}  // namespace

void ScoreCentroidRows(const float* q, int T, const float* c, int64_t k, int d, float scale, double* s,
                       std::vector<float>* scratch) {
  if (T <= 0 || k <= 0) return;
  const int kk = static_cast<int>(k);
  scratch->resize(static_cast<size_t>(T) * k);
  float* f = scratch->data();
  if (T <= kLoopRows) {
    // Few rows (decode: the G query heads of a KV head, T = 1): a plain loop,
    // centroid-major, so each centroid row is loaded once for all T rows (one
    // pass over the centroid matrix). BLAS would gain nothing at this size,
    // and its own threads would fight the engine's parallel KV heads (an
    // sgemm of 4 rows called from inside the OpenMP region cost ~1 ms per
    // KV head, 10x the arithmetic).
    ScoreRows(q, T, c, k, d, scale, f, k);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, kk, d, scale, q, d, c, d, 0.0f, f, kk);
  }
  for (int t = 0; t < T; ++t) {
    const float* row = f + static_cast<int64_t>(t) * k;
    double* out = s + static_cast<int64_t>(t) * k;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      finite &= std::isfinite(row[j]);
      out[j] = row[j];
    }
    // Dot products of finite floats cannot overflow a double.
    if (!finite) index::ScoreCentroids(q + static_cast<int64_t>(t) * d, c, k, d, scale, out);
  }
}

void CoarseProbabilities(const IndexView& idx, const float* q, int U, int R, float scale, std::vector<double>* P) {
  MeanProbabilities(q, U, R, idx.head_dim, scale, idx.coarse_centroids, idx.coarse_sizes, idx.k1, P);
}

double CoarseBudgetTarget(const IndexView& idx, const SelectionParams& params) {
  return std::min(1.0, params.coarse_budget_factor * params.budget) * static_cast<double>(idx.n_clustered);
}

void SelectThreshold(const double* p, const uint32_t* ids, int64_t n, double tau, std::vector<uint32_t>* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] > tau) out->push_back(ids[i]);
  }
}

void SelectBudget(const double* p, const uint32_t* ids, const uint32_t* sizes, int64_t n, double target,
                  std::vector<uint32_t>* out) {
  if (n == 0 || !(target > 0)) return;
  // (p descending, id ascending) is a strict total order, so ordering the
  // candidates chunk by chunk (nth_element, then sort of the chunk) yields
  // exactly the prefix a full sort would, in O(n) for the usual small
  // budgets instead of O(n log n) per query head and step.
  auto before = [&](int64_t a, int64_t b) { return p[a] != p[b] ? p[a] > p[b] : ids[a] < ids[b]; };
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += sizes[i];
  // First chunk: the expected number of candidates for the target, plus slack.
  int64_t chunk = static_cast<int64_t>(std::ceil(1.25 * target / (total / n))) + 8;
  const size_t first = out->size();
  double kept = 0;
  int64_t begin = 0;
  while (kept < target && begin < n) {
    const int64_t end = std::min(n, begin + chunk);
    if (end < n) std::nth_element(order.begin() + begin, order.begin() + end - 1, order.end(), before);
    std::sort(order.begin() + begin, order.begin() + end, before);
    for (int64_t i = begin; i < end && kept < target; ++i) {
      out->push_back(ids[order[i]]);
      kept += sizes[order[i]];
    }
    begin = end;
    chunk *= 2;
  }
  std::sort(out->begin() + static_cast<std::ptrdiff_t>(first), out->end());
}

void SelectHead(const IndexView& idx, const float* q, int G, int T, const SelectionParams& params, HeadSelection* out) {
  out->sets.clear();
  out->set_of.assign(static_cast<size_t>(G) * T, 0);
  out->read.clear();
  out->dot_products = 0;

  if (params.mode == SelectionMode::kDense) {
    std::vector<uint32_t> all(idx.k2);
    std::iota(all.begin(), all.end(), 0u);
    out->read = all;
    out->sets.push_back(std::move(all));
    return;
  }

  const int d = idx.head_dim;
  const bool per_query = params.per_query && T > 1;
  const int U = per_query ? T : 1;  // selections per query head: one per query, or one shared

  if (params.mode == SelectionMode::kBudget && params.gqa == GqaPolicy::kUnion) {
    // Joint selection: the budget bounds the keys read per KV head, so the
    // group makes one budget selection, ranking clusters by the mean of p_j
    // over its G query heads (and its T queries when shared), and all G
    // heads attend it. Units: all G * T queries at once (q is [1, G * T, d]),
    // or per query t the G heads' query t (gathered as [T, G, d]).
    const float* units = q;
    std::vector<float> by_query;
    if (per_query) {
      by_query.resize(static_cast<size_t>(G) * T * d);
      for (int t = 0; t < T; ++t) {
        for (int g = 0; g < G; ++g) {
          std::copy_n(q + (static_cast<int64_t>(g) * T + t) * d, d,
                      by_query.data() + (static_cast<int64_t>(t) * G + g) * d);
        }
      }
      units = by_query.data();
    }
    SelectUnits(idx, units, U, per_query ? G : G * T, params, &out->sets, &out->dot_products);
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < T; ++t) out->set_of[static_cast<size_t>(g) * T + t] = per_query ? t : 0;
    }
  } else {
    // Each query head selects alone (threshold mode, or the per-head policy).
    std::vector<std::vector<std::vector<uint32_t>>> own(G);  // [g][u]
    for (int g = 0; g < G; ++g) {
      SelectUnits(idx, q + static_cast<int64_t>(g) * T * d, U, per_query ? 1 : T, params, &own[g], &out->dot_products);
    }
    if (params.gqa == GqaPolicy::kUnion) {
      // Threshold + union: each head attends the union of the group's sets.
      out->sets.resize(U);
      for (int u = 0; u < U; ++u) {
        for (int g = 0; g < G; ++g) {
          out->sets[u].insert(out->sets[u].end(), own[g][u].begin(), own[g][u].end());
        }
        SortUnique(&out->sets[u]);
      }
      for (int g = 0; g < G; ++g) {
        for (int t = 0; t < T; ++t) out->set_of[static_cast<size_t>(g) * T + t] = per_query ? t : 0;
      }
    } else {
      out->sets.resize(static_cast<size_t>(G) * U);
      for (int g = 0; g < G; ++g) {
        for (int u = 0; u < U; ++u) out->sets[static_cast<size_t>(g) * U + u] = std::move(own[g][u]);
        for (int t = 0; t < T; ++t) out->set_of[static_cast<size_t>(g) * T + t] = g * U + (per_query ? t : 0);
      }
    }
  }
  // The blocks to read: the union of the attended sets.
  for (const auto& set : out->sets) out->read.insert(out->read.end(), set.begin(), set.end());
  SortUnique(&out->read);
}

}  // namespace sqz::query
