#include "index/calibrate.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "index/probability.h"

namespace sqz::index {

HeadView ViewOf(const HeadClustering& c) {
  HeadView v;
  v.dim = c.dim;
  v.k2 = c.n_fine();
  v.fine_centroids = c.fine_centroids.data();
  v.fine_offsets = c.fine_offsets.data();
  v.k1 = c.n_coarse();
  v.coarse_centroids = c.coarse_centroids.data();
  v.coarse_child_offsets = c.coarse_child_offsets.data();
  return v;
}

std::vector<float> WeightedQuantiles(std::vector<WeightedSample>* samples, const std::vector<double>& fs,
                                     uint64_t zero_weight) {
  std::vector<float> out(fs.size(), 0.0f);
  // Ties in value need no tie-break: the answer is a value, not a sample.
  std::sort(samples->begin(), samples->end(),
            [](const WeightedSample& a, const WeightedSample& b) { return a.value < b.value; });
  uint64_t total = zero_weight;
  for (const WeightedSample& s : *samples) total += s.weight;
  if (total == 0) return out;
  for (size_t q = 0; q < fs.size(); ++q) {
    // Integer weights: the cumulative sums are exact in uint64.
    const double target = fs[q] * static_cast<double>(total);
    uint64_t cum = zero_weight;
    if (zero_weight > 0 && static_cast<double>(cum) >= target) {
      out[q] = 0.0f;  // every value is >= 0, so 0 is the smallest candidate
      continue;
    }
    float value = samples->empty() ? 0.0f : samples->back().value;
    for (const WeightedSample& s : *samples) {
      cum += s.weight;
      if (static_cast<double>(cum) >= target) {
        value = s.value;
        break;
      }
    }
    out[q] = value;
  }
  return out;
}

namespace {

// s[t * k + j] = scale * (q_t . c_j) for the w queries q_t, as doubles.
// One float GEMM does the work (the bulk of calibration); rows where float
// arithmetic overflowed (finite inputs of extreme magnitude) are recomputed
// in double by the shared ScoreCentroids, so no score is ever inf or NaN.
void ScoreQueries(const float* q, int w, const float* centroids, int64_t k, int dim, double scale,
                  std::vector<float>* fbuf, std::vector<double>* s) {
  const size_t n = static_cast<size_t>(w) * k;
  fbuf->resize(n);
  s->resize(n);
  if (n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, w, static_cast<int>(k), dim, static_cast<float>(scale), q, dim,
              centroids, dim, 0.0f, fbuf->data(), static_cast<int>(k));
  for (int t = 0; t < w; ++t) {
    const float* f = fbuf->data() + static_cast<size_t>(t) * k;
    double* row = s->data() + static_cast<size_t>(t) * k;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      finite = finite && std::isfinite(f[j]);
      row[j] = f[j];
    }
    if (!finite) ScoreCentroids(q + static_cast<int64_t>(t) * dim, centroids, k, dim, scale, row);
  }
}

// Mean over the w queries of each query's cluster probabilities (flat p_j
// over all k clusters): r[j] = (1/w) sum_t p_j(q_t).
void MeanProbabilities(const float* centroids, const uint32_t* sizes, int64_t k, int dim, double scale, const float* q,
                       int w, std::vector<double>* r) {
  r->assign(static_cast<size_t>(k), 0.0);
  if (k == 0 || w == 0) return;
  std::vector<float> fbuf;
  std::vector<double> s, p(static_cast<size_t>(k));
  ScoreQueries(q, w, centroids, k, dim, scale, &fbuf, &s);
  for (int t = 0; t < w; ++t) {
    ClusterProbabilities(s.data() + static_cast<size_t>(t) * k, sizes, k, p.data());
    for (int64_t j = 0; j < k; ++j) (*r)[j] += p[j];
  }
  for (double& x : *r) x /= w;
}

struct Sizes {
  std::vector<uint32_t> fine, coarse;
};

Sizes SizesOf(const HeadView& h) {
  Sizes s;
  s.fine.resize(static_cast<size_t>(h.k2));
  s.coarse.resize(static_cast<size_t>(h.k1));
  if (h.k2 > 0) SizesFromOffsets(h.fine_offsets, h.k2, s.fine.data());
  if (h.k1 > 0) CoarseSizes(h.fine_offsets, h.coarse_child_offsets, h.k1, s.coarse.data());
  return s;
}

}  // namespace

Calibrator::Calibrator(std::vector<double> quantiles, double coarse_share, double scale)
    : quantiles_(std::move(quantiles)),
      coarse_share_(coarse_share),
      scale_(scale),
      fine_(quantiles_.size()),
      fine_zero_(quantiles_.size(), 0) {}

double Calibrator::ScaleFor(int dim) const { return scale_ > 0 ? scale_ : 1.0 / std::sqrt(static_cast<double>(dim)); }

void Calibrator::AddFirstPass(const HeadView& head, const float* q, int n_q, int w) {
  if (head.k2 == 0 || w == 0) return;
  const Sizes sz = SizesOf(head);
  const double scale = ScaleFor(head.dim);
  std::vector<double> r;
  for (int h = 0; h < n_q; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * w * head.dim;
    MeanProbabilities(head.fine_centroids, sz.fine.data(), head.k2, head.dim, scale, qh, w, &r);
    for (int64_t j = 0; j < head.k2; ++j) flat_.push_back({static_cast<float>(r[j]), sz.fine[j]});
    MeanProbabilities(head.coarse_centroids, sz.coarse.data(), head.k1, head.dim, scale, qh, w, &r);
    for (int64_t a = 0; a < head.k1; ++a) coarse_.push_back({static_cast<float>(r[a]), sz.coarse[a]});
  }
}

void Calibrator::FinishFirstPass() {
  tau_flat_ = WeightedQuantiles(&flat_, quantiles_);
  std::vector<double> cq(quantiles_.size());
  for (size_t i = 0; i < quantiles_.size(); ++i) cq[i] = coarse_share_ * quantiles_[i];
  tau_coarse_ = WeightedQuantiles(&coarse_, cq);
  // The samples are no longer needed; free them before pass 2 allocates.
  flat_ = {};
  coarse_ = {};
}

void Calibrator::AddSecondPass(const HeadView& head, const float* q, int n_q, int w) {
  if (head.k2 == 0 || w == 0) return;
  const Sizes sz = SizesOf(head);
  const double scale = ScaleFor(head.dim);
  const size_t nf = quantiles_.size();
  std::vector<double> rc;
  std::vector<std::vector<uint32_t>> ids(nf);  // surviving fine ids per quantile
  std::vector<std::vector<double>> acc(nf);    // sum over queries of p'_j, by position in ids
  std::vector<float> fbuf;
  std::vector<double> s, p(static_cast<size_t>(head.k2));
  for (int h = 0; h < n_q; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * w * head.dim;
    // Same computation as pass 1, so R_a is bit-identical to its sample.
    MeanProbabilities(head.coarse_centroids, sz.coarse.data(), head.k1, head.dim, scale, qh, w, &rc);
    for (size_t f = 0; f < nf; ++f) {
      ids[f].clear();
      for (int64_t a = 0; a < head.k1; ++a) {
        // Compare the value as sampled (float) so the cluster AT the
        // quantile is dropped exactly as the quantile definition says.
        if (static_cast<float>(rc[a]) > tau_coarse_[f]) {
          for (uint32_t j = head.coarse_child_offsets[a]; j < head.coarse_child_offsets[a + 1]; ++j)
            ids[f].push_back(j);
        }
      }
      acc[f].assign(ids[f].size(), 0.0);
    }
    ScoreQueries(qh, w, head.fine_centroids, head.k2, head.dim, scale, &fbuf, &s);
    for (int t = 0; t < w; ++t) {
      const double* st = s.data() + static_cast<size_t>(t) * head.k2;
      for (size_t f = 0; f < nf; ++f) {
        const int64_t m = static_cast<int64_t>(ids[f].size());
        SubsetProbabilities(st, sz.fine.data(), ids[f].data(), m, p.data());
        for (int64_t i = 0; i < m; ++i) acc[f][i] += p[i];
      }
    }
    for (size_t f = 0; f < nf; ++f) {
      uint64_t kept = 0;
      for (size_t i = 0; i < ids[f].size(); ++i) {
        const uint32_t j = ids[f][i];
        fine_[f].push_back({static_cast<float>(acc[f][i] / w), sz.fine[j]});
        kept += sz.fine[j];
      }
      // Clusters outside S score 0: one aggregated weight instead of samples.
      const uint64_t all = head.fine_offsets[head.k2] - head.fine_offsets[0];
      fine_zero_[f] += all - kept;
    }
  }
}

std::vector<Thresholds> Calibrator::Finish() {
  std::vector<Thresholds> out(quantiles_.size());
  for (size_t f = 0; f < quantiles_.size(); ++f) {
    out[f].quantile = quantiles_[f];
    out[f].flat = f < tau_flat_.size() ? tau_flat_[f] : 0.0f;
    out[f].coarse = f < tau_coarse_.size() ? tau_coarse_[f] : 0.0f;
    out[f].fine = WeightedQuantiles(&fine_[f], {quantiles_[f]}, fine_zero_[f])[0];
    fine_[f] = {};
  }
  return out;
}

}  // namespace sqz::index
