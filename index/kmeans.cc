#include "index/kmeans.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <utility>

namespace sqz::index {

namespace {

// Row-wise L2 normalisation into dst. Zero rows stay zero: they have no
// direction, score 0 against every centroid and land deterministically in
// the first best one.
void NormalizeRows(const float* src, int64_t n, int d, std::vector<float>* dst) {
  dst->resize(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    const float* x = src + i * d;
    float* y = dst->data() + i * d;
    double ss = 0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(x[c]) * x[c];
    if (ss > 0 && std::isfinite(ss)) {
      const double inv = 1.0 / std::sqrt(ss);
      for (int c = 0; c < d; ++c) y[c] = static_cast<float>(x[c] * inv);
    } else if (ss > 0) {
      // Sum of squares overflowed a double: cannot happen for float input
      // (d * FLT_MAX^2 < DBL_MAX), kept for safety; scale first.
      double mx = 0;
      for (int c = 0; c < d; ++c) mx = std::max(mx, std::fabs(static_cast<double>(x[c])));
      double ss2 = 0;
      for (int c = 0; c < d; ++c) ss2 += (x[c] / mx) * (x[c] / mx);
      const double inv = 1.0 / (mx * std::sqrt(ss2));
      for (int c = 0; c < d; ++c) y[c] = static_cast<float>(x[c] * inv);
    } else {
      std::fill(y, y + d, 0.0f);
    }
  }
}

// Seed of the coarse problems: different from the fine level's so the two
// initialisations are not correlated.
uint64_t CoarseSeed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ull + 1; }

// "head <i>" in messages, only when there are several heads.
Status ForHead(Status s, size_t i, size_t n_heads) {
  if (s.ok() || n_heads <= 1) return s;
  return s.WithPrefix("head " + std::to_string(i));
}

// A backend's result must have the sizes of its problem and labels in
// [0, k): everything below indexes with them.
Status CheckResult(const KMeansBackend& backend, const KMeansProblem& p, const KMeansResult& r, const char* level) {
  const std::string who = std::string("k-means: backend '") + backend.name() + "' returned ";
  if (r.labels.size() != static_cast<size_t>(p.n) || r.centroids.size() != static_cast<size_t>(p.k) * p.d) {
    return Status::Aborted(who + "a " + level + " result of the wrong size (" + std::to_string(r.labels.size()) +
                           " labels for " + std::to_string(p.n) + " points, " + std::to_string(r.centroids.size()) +
                           " centroid values for " + std::to_string(p.k) + " x " + std::to_string(p.d) + ")");
  }
  for (int64_t i = 0; i < p.n; ++i) {
    if (r.labels[i] < 0 || r.labels[i] >= p.k) {
      return Status::Aborted(who + "an invalid " + level + " assignment: point " + std::to_string(i) + " -> " +
                             std::to_string(r.labels[i]) + ", k = " + std::to_string(p.k));
    }
  }
  return Status::OK();
}

// Runs a batch, turning exceptions into Aborted (no exception crosses the
// interface, whatever the backend does).
Status RunBackend(KMeansBackend* backend, const std::vector<KMeansProblem>& problems, const KMeansParams& params,
                  std::vector<KMeansResult>* results) {
  results->assign(problems.size(), KMeansResult());
  try {
    return backend->Run(problems.data(), problems.size(), params, results->data());
  } catch (const std::bad_alloc&) {
    return Status::Aborted(std::string("k-means: backend '") + backend->name() + "' ran out of memory");
  } catch (const std::exception& e) {
    return Status::Aborted(std::string("k-means: backend '") + backend->name() + "' failed: " + e.what());
  }
}

// One head between the fine and the coarse k-means.
struct FineLevel {
  std::vector<int64_t> label;   // [n]: compact fine id of every key
  std::vector<double> sum;      // [kf * d]: sums of the raw member keys
  std::vector<int64_t> count;   // [kf]: member counts (all > 0)
  std::vector<float> fine_raw;  // [kf * d]: raw means
  std::vector<float> cn;        // [kf * d]: normalised raw means (coarse points)
  std::vector<float> weight;    // [kf]: count as float (coarse weights)
  int64_t kf = 0;
};

// Fine level post-processing of one head from the backend's labels: raw
// means in double, empty clusters dropped, ids compacted (ascending old
// order), and the inputs of the coarse problem.
void FinishFine(const float* keys, int64_t n, int d, int64_t k2_asked, std::vector<int64_t> label, FineLevel* f) {
  // Raw means in double (sums of up to 2^32 floats).
  std::vector<double> sum(static_cast<size_t>(k2_asked) * d, 0.0);
  std::vector<int64_t> count(static_cast<size_t>(k2_asked), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = label[i];
    ++count[j];
    const float* x = keys + i * d;
    double* s = sum.data() + j * d;
    for (int c = 0; c < d; ++c) s[c] += x[c];
  }
  // Drop empty clusters: compact ids in ascending old order.
  std::vector<int64_t> compact(static_cast<size_t>(k2_asked), -1);
  int64_t kf = 0;
  for (int64_t j = 0; j < k2_asked; ++j) {
    if (count[j] == 0) continue;
    compact[j] = kf;
    if (kf != j) {
      std::copy(sum.begin() + j * d, sum.begin() + (j + 1) * d, sum.begin() + kf * d);
      count[kf] = count[j];
    }
    ++kf;
  }
  sum.resize(static_cast<size_t>(kf) * d);
  count.resize(static_cast<size_t>(kf));
  for (int64_t i = 0; i < n; ++i) label[i] = compact[label[i]];

  std::vector<float> fine_raw(static_cast<size_t>(kf) * d);  // raw means, compact ids
  for (int64_t j = 0; j < kf; ++j) {
    const double inv = 1.0 / static_cast<double>(count[j]);
    for (int c = 0; c < d; ++c) fine_raw[j * d + c] = static_cast<float>(sum[j * d + c] * inv);
  }
  NormalizeRows(fine_raw.data(), kf, d, &f->cn);
  f->weight.resize(static_cast<size_t>(kf));
  for (int64_t j = 0; j < kf; ++j) f->weight[j] = static_cast<float>(count[j]);
  f->label = std::move(label);
  f->sum = std::move(sum);
  f->count = std::move(count);
  f->fine_raw = std::move(fine_raw);
  f->kf = kf;
}

// Coarse level post-processing of one head from the backend's parents of
// the fine clusters: empty coarse clusters dropped, fine ids renumbered so
// each coarse cluster's children are contiguous, the permutation, the
// output centroids.
void FinishCoarse(int64_t n, int d, int64_t k1_asked, std::vector<int64_t> parent, FineLevel* f, HeadClustering* out) {
  const int64_t kf = f->kf;
  const std::vector<int64_t>& count = f->count;
  const std::vector<double>& sum = f->sum;
  std::vector<int64_t> ccount(static_cast<size_t>(k1_asked), 0);
  for (int64_t j = 0; j < kf; ++j) ++ccount[parent[j]];
  std::vector<int64_t> ccompact(static_cast<size_t>(k1_asked), -1);
  int64_t kc = 0;
  for (int64_t a = 0; a < k1_asked; ++a) {
    if (ccount[a] > 0) ccompact[a] = kc++;
  }
  for (int64_t j = 0; j < kf; ++j) parent[j] = ccompact[parent[j]];

  // --- Renumber fine clusters: by coarse id, then old fine id ---------------
  std::vector<int64_t> order(static_cast<size_t>(kf));  // new id -> old id
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return parent[a] < parent[b]; });
  std::vector<int64_t> new_id(static_cast<size_t>(kf));
  for (int64_t j = 0; j < kf; ++j) new_id[order[j]] = j;

  out->fine_centroids.resize(static_cast<size_t>(kf) * d);
  out->fine_offsets.assign(static_cast<size_t>(kf) + 1, 0);
  for (int64_t j = 0; j < kf; ++j) {
    const int64_t old = order[j];
    std::copy(f->fine_raw.begin() + old * d, f->fine_raw.begin() + (old + 1) * d, out->fine_centroids.begin() + j * d);
    out->fine_offsets[j + 1] = out->fine_offsets[j] + static_cast<uint32_t>(count[old]);
  }
  // Counting sort of the keys by new fine id; within a cluster the
  // original order is kept (stable), which makes blocks deterministic.
  out->permutation.resize(static_cast<size_t>(n));
  std::vector<uint32_t> cursor(out->fine_offsets.begin(), out->fine_offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) out->permutation[cursor[new_id[f->label[i]]]++] = static_cast<uint32_t>(i);

  // Coarse CSR and centroids: size-weighted mean of the children, i.e.
  // the mean of all raw member keys (from the double sums).
  out->coarse_child_offsets.assign(static_cast<size_t>(kc) + 1, 0);
  out->coarse_centroids.assign(static_cast<size_t>(kc) * d, 0.0f);
  std::vector<double> csum(static_cast<size_t>(d));
  int64_t j = 0;
  for (int64_t a = 0; a < kc; ++a) {
    std::fill(csum.begin(), csum.end(), 0.0);
    int64_t members = 0;
    while (j < kf && parent[order[j]] == a) {
      const int64_t old = order[j];
      for (int c = 0; c < d; ++c) csum[c] += sum[old * d + c];
      members += count[old];
      ++j;
    }
    out->coarse_child_offsets[a + 1] = static_cast<uint32_t>(j);
    const double inv = 1.0 / static_cast<double>(members);
    for (int c = 0; c < d; ++c) out->coarse_centroids[a * d + c] = static_cast<float>(csum[c] * inv);
  }
}

Status ClusterHeadsImpl(KMeansBackend* backend, const HeadKeys* heads, size_t n_heads, const KMeansOptions& options,
                        HeadClustering* out) {
  const KMeansParams params{options.iters, /*spherical=*/true};

  // --- Fine level: one batch of every non-empty head -------------------------
  std::vector<size_t> active;  // heads with keys, in order
  for (size_t h = 0; h < n_heads; ++h) {
    if (heads[h].n > 0) active.push_back(h);
  }
  if (active.empty()) return Status::OK();
  std::vector<std::vector<float>> xn(active.size());
  std::vector<KMeansProblem> problems(active.size());
  for (size_t i = 0; i < active.size(); ++i) {
    const HeadKeys& hk = heads[active[i]];
    NormalizeRows(hk.keys, hk.n, hk.d, &xn[i]);
    problems[i] = {xn[i].data(), hk.n, hk.d, ClusterCount(options.fine_ratio, hk.n, hk.n), nullptr, options.seed};
  }
  std::vector<KMeansResult> results;
  SQZ_RETURN_IF_ERROR(RunBackend(backend, problems, params, &results));
  xn = {};
  std::vector<FineLevel> fine(active.size());
  for (size_t i = 0; i < active.size(); ++i) {
    const size_t h = active[i];
    SQZ_RETURN_IF_ERROR(ForHead(CheckResult(*backend, problems[i], results[i], "fine"), h, n_heads));
    out[h].fine_objective = std::move(results[i].objective);
    FinishFine(heads[h].keys, heads[h].n, heads[h].d, problems[i].k, std::move(results[i].labels), &fine[i]);
    results[i] = KMeansResult();
  }

  // --- Coarse level: size-weighted, over the normalised fine centroids ------
  for (size_t i = 0; i < active.size(); ++i) {
    const HeadKeys& hk = heads[active[i]];
    FineLevel& f = fine[i];
    problems[i] = {f.cn.data(),
                   f.kf,
                   hk.d,
                   ClusterCount(options.coarse_ratio, hk.n, f.kf),
                   f.weight.data(),
                   CoarseSeed(options.seed)};
  }
  SQZ_RETURN_IF_ERROR(RunBackend(backend, problems, params, &results));
  for (size_t i = 0; i < active.size(); ++i) {
    const size_t h = active[i];
    SQZ_RETURN_IF_ERROR(ForHead(CheckResult(*backend, problems[i], results[i], "coarse"), h, n_heads));
    out[h].coarse_objective = std::move(results[i].objective);
    FinishCoarse(heads[h].n, heads[h].d, problems[i].k, std::move(results[i].labels), &fine[i], &out[h]);
    results[i] = KMeansResult();
    fine[i] = FineLevel();
  }
  return Status::OK();
}

}  // namespace

int64_t ClusterCount(double ratio, int64_t n, int64_t hi) {
  if (n <= 0 || hi <= 0) return 0;
  double want = std::ceil(ratio * static_cast<double>(n) * (1.0 - 1e-12));
  int64_t k = want < 1 ? 1 : (want > static_cast<double>(hi) ? hi : static_cast<int64_t>(want));
  return std::clamp<int64_t>(k, 1, hi);
}

Status ClusterHeads(KMeansBackend* backend, const HeadKeys* heads, size_t n_heads, const KMeansOptions& options,
                    HeadClustering* out) {
  if (n_heads > 0 && (heads == nullptr || out == nullptr)) {
    return Status::InvalidArgument("k-means: null heads or output");
  }
  for (size_t h = 0; h < n_heads; ++h) {
    out[h] = HeadClustering();
    out[h].dim = heads[h].d;
    out[h].n = heads[h].n;
  }
  for (size_t h = 0; h < n_heads; ++h) {
    const HeadKeys& hk = heads[h];
    Status s;
    if (hk.d <= 0) {
      s = Status::InvalidArgument("k-means: head_dim must be positive, got " + std::to_string(hk.d));
    } else if (hk.n < 0 || hk.n >= (int64_t{1} << 32)) {
      s = Status::InvalidArgument("k-means: key count out of range: " + std::to_string(hk.n));
    } else if (hk.n > 0 && hk.keys == nullptr) {
      s = Status::InvalidArgument("k-means: null keys");
    }
    SQZ_RETURN_IF_ERROR(ForHead(std::move(s), h, n_heads));
  }
  if (!(options.fine_ratio > 0 && options.fine_ratio <= 1) ||
      !(options.coarse_ratio > 0 && options.coarse_ratio <= 1) || options.iters < 1) {
    return Status::InvalidArgument("k-means: bad options (ratios must be in (0, 1], iters >= 1)");
  }
  for (size_t h = 0; h < n_heads; ++h) {
    out[h].fine_offsets.push_back(0);
    out[h].coarse_child_offsets.push_back(0);
  }
  try {
    std::unique_ptr<KMeansBackend> faiss;
    if (backend == nullptr) {
      faiss = MakeFaissKMeansBackend();
      backend = faiss.get();
    }
    return ClusterHeadsImpl(backend, heads, n_heads, options, out);
  } catch (const std::bad_alloc&) {
    return Status::Aborted("k-means: out of memory");
  }
}

Status ClusterHead(const float* keys, int64_t n, int d, const KMeansOptions& options, HeadClustering* out) {
  const HeadKeys head{keys, n, d};
  return ClusterHeads(nullptr, &head, 1, options, out);
}

}  // namespace sqz::index
