// Cluster selection: which fine clusters of one (layer, KV head) a group of
// query heads attends. Pure functions over an in-memory index; no storage.
//
// The formulas are those of docs/SEMANTICS.md ("Estimated probabilities" and
// "Selection"). Selection produces sets of fine cluster ids; attention
// (query/attention.h) consumes them, so each half can be tested alone and the
// GPU engine can be checked against either.
//
// Precision: centroid scores are float32 dot products (BLAS, with a double
// fallback on overflow); everything after them (max subtraction,
// exponentials, denominators, means over queries) is double, so p_j is exact
// to float rounding of the scores, and no input of finite values gives an
// overflow or a NaN.
//
// Thread-safety: stateless functions; callers pass their own scratch.
#pragma once

#include <cstdint>
#include <vector>

#include "sqz/query.h"

namespace sqz::query {

// Read-only view of one head's index. Pointers are owned by the caller.
struct IndexView {
  int head_dim = 0;
  int64_t n_clustered = 0;
  int32_t k2 = 0;                                  // fine clusters
  int32_t k1 = 0;                                  // coarse clusters
  const float* fine_centroids = nullptr;           // [k2, head_dim]
  const uint32_t* fine_sizes = nullptr;            // [k2]: N_j > 0
  const float* coarse_centroids = nullptr;         // [k1, head_dim]
  const uint32_t* coarse_sizes = nullptr;          // [k1]: M_a > 0
  const uint32_t* coarse_child_offsets = nullptr;  // [k1 + 1]: CSR over fine ids, 0 .. k2
};

// Selection options resolved for one call (thresholds already looked up).
struct SelectionParams {
  SelectionMode mode = SelectionMode::kBudget;
  bool hierarchical = false;
  double budget = 0.125;
  double coarse_budget_factor = 2.0;
  float tau_flat = 0;    // flat threshold
  float tau_coarse = 0;  // hierarchical: coarse threshold
  float tau_fine = 0;    // hierarchical: fine threshold over the surviving set
  GqaPolicy gqa = GqaPolicy::kUnion;
  bool per_query = false;  // T > 1: each query selects alone
  float scale = 0;         // softmax scale (> 0)
};

// What one KV head's group of G query heads attends, for T queries.
struct HeadSelection {
  // Distinct attended sets of fine cluster ids, each sorted ascending.
  std::vector<std::vector<uint32_t>> sets;
  // [G * T]: sets[set_of[g * T + t]] is what query head g, query t attends.
  std::vector<int32_t> set_of;
  // Union of all sets, sorted ascending: the fine blocks to read.
  std::vector<uint32_t> read;
  // Centroid dot products computed, summed over the G heads and T queries.
  int64_t dot_products = 0;
};

// --- Estimated probabilities ------------------------------------------------
// The formulas themselves are index/probability.h's (shared with the offline
// calibration); these helpers feed them scores.

// s[t * k + j] = scale * q_t . c_j, in double, for T queries q [T, d] and k
// centroids c [k, d]. Computed in float32: a vectorised loop for few rows
// (T <= 16, e.g. decode's G heads: one pass over the centroids, no BLAS
// threads), sgemm for more;
// a row whose float scores overflow (a huge query
// norm) is recomputed in double (index::ScoreCentroids), so the result is
// finite for any finite input. `scratch` is reused across calls.
void ScoreCentroidRows(const float* q, int T, const float* c, int64_t k, int d, float scale, double* s,
                       std::vector<float>* scratch);

// --- Selection over probabilities --------------------------------------------

// Appends to *out the ids[i] with p[i] > tau, in the order given.
void SelectThreshold(const double* p, const uint32_t* ids, int64_t n, double tau, std::vector<uint32_t>* out);

// Budget rule: sorts the n candidates by p descending (ties: smaller id
// first) and appends to *out the shortest prefix whose sizes sum to >= target
// (all of them if they sum to less; none if target <= 0). sizes[i] is the size
// of candidate ids[i]. *out is left sorted ascending by id.
void SelectBudget(const double* p, const uint32_t* ids, const uint32_t* sizes, int64_t n, double target,
                  std::vector<uint32_t>* out);

// --- Hierarchical coarse stage ---------------------------------------------------

// The coarse probabilities the hierarchical rules rank (budget) or threshold
// the coarse clusters by: P[u * k1 + a] is the mean over the R queries of
// unit u of P_a, for q [U, R, head_dim] (SelectHead's units: for budget +
// kUnion with one shared selection, U = 1 and R = G * T, the KV head's
// query rows). SelectHead's coarse stage is this function; it is public so
// tests can see where its boundary falls.
void CoarseProbabilities(const IndexView& idx, const float* q, int U, int R, float scale, std::vector<double>* P);

// Hierarchical budget: the keys the coarse stage keeps (the budget rule's
// target over the coarse clusters): min(1, coarse_budget_factor * budget) *
// n_clustered.
double CoarseBudgetTarget(const IndexView& idx, const SelectionParams& params);

// --- Whole head ----------------------------------------------------------------

// Selects for the G query heads of one KV head. q: [G, T, head_dim] float32,
// finite. With mode kDense every fine cluster is one set.
//   budget + kUnion: one joint selection for the group (per query t with
//     per_query): clusters ranked by the mean of p_j over the G heads (and
//     the T queries when shared); every head attends it, and read is it, so
//     the keys read per KV head follow the budget whatever G is.
//   budget + kPerHead, threshold: each head selects alone; kUnion (threshold
//     only) attends the union of the group's sets, kPerHead its own.
void SelectHead(const IndexView& idx, const float* q, int G, int T, const SelectionParams& params, HeadSelection* out);

}  // namespace sqz::query
