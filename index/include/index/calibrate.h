// Threshold calibration from the window queries (docs/SEMANTICS.md,
// "Calibration").
//
// Per-key scores are constant within a fine (or coarse) cluster, so each
// cluster contributes ONE weighted sample (value r_j, weight N_j): memory is
// K2 samples per (layer, query head), not n_tokens.
//
// Two passes, because the hierarchical fine samples depend on which coarse
// clusters survive tau_coarse, and tau_coarse is a quantile over ALL layers:
//   pass 1 (AddFirstPass for every head): flat and coarse samples;
//   FinishFirstPass: tau_flat(f) and tau_coarse(f);
//   pass 2 (AddSecondPass for every head, same inputs): hierarchical fine
//   samples per f; Finish: tau_fine(f).
//
// Thread-safety: a Calibrator is used by one thread at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "index/kmeans.h"

namespace sqz::index {

// Borrowed index of one (layer, KV head); see storage/format.fbs HeadIndex.
struct HeadView {
  int dim = 0;
  int64_t k2 = 0;
  const float* fine_centroids = nullptr;   // [k2 * dim]
  const uint32_t* fine_offsets = nullptr;  // [k2 + 1]
  int64_t k1 = 0;
  const float* coarse_centroids = nullptr;         // [k1 * dim]
  const uint32_t* coarse_child_offsets = nullptr;  // [k1 + 1]
};

HeadView ViewOf(const HeadClustering& c);

// One weighted sample of the per-key score distribution.
struct WeightedSample {
  float value;
  uint32_t weight;
};

// For each f in fs: the smallest sample value t with
// weight(samples <= t) >= f * total, where `zero_weight` is extra weight at
// value 0 (all sample values must be >= 0). Sorts *samples. Returns 0 for
// every f when the total weight is 0.
std::vector<float> WeightedQuantiles(std::vector<WeightedSample>* samples, const std::vector<double>& fs,
                                     uint64_t zero_weight = 0);

struct Thresholds {
  double quantile = 0;
  float flat = 0;
  float coarse = 0;
  float fine = 0;
};

class Calibrator {
 public:
  // quantiles in (0, 1); coarse_share in (0, 1]. scale 0 = 1/sqrt(dim).
  Calibrator(std::vector<double> quantiles, double coarse_share, double scale = 0);

  // q: the window queries of the n_q query heads mapped to this KV head,
  // [n_q, w, dim] float32 (finite).
  void AddFirstPass(const HeadView& head, const float* q, int n_q, int w);
  void FinishFirstPass();
  void AddSecondPass(const HeadView& head, const float* q, int n_q, int w);
  std::vector<Thresholds> Finish();

  // After FinishFirstPass (for tests).
  const std::vector<float>& tau_flat() const { return tau_flat_; }
  const std::vector<float>& tau_coarse() const { return tau_coarse_; }

 private:
  double ScaleFor(int dim) const;

  std::vector<double> quantiles_;
  double coarse_share_;
  double scale_;
  std::vector<WeightedSample> flat_;
  std::vector<WeightedSample> coarse_;
  std::vector<float> tau_flat_;
  std::vector<float> tau_coarse_;
  std::vector<std::vector<WeightedSample>> fine_;  // per quantile
  std::vector<uint64_t> fine_zero_;                // per quantile: weight at value 0
};

}  // namespace sqz::index
