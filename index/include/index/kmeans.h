// Two-level spherical k-means of one (layer, KV head)'s clustered keys
// (DESIGN.md section 2, docs/SEMANTICS.md "Stored index").
//
// Fine level: FAISS spherical k-means on the L2-normalised keys into
// K2 = ceil(fine_ratio * n) clusters (clamped to [1, n]); every key is then
// assigned to its nearest centroid by inner product; the stored centroid is
// the mean of the RAW member keys (magnitude kept); empty clusters dropped.
// Coarse level: size-weighted spherical k-means over the normalised fine
// centroids into K1 = ceil(coarse_ratio * n) clusters (clamped to [1, K2]);
// coarse centroid = size-weighted mean of its children's raw centroids; empty
// ones dropped. Fine ids are renumbered so each coarse cluster's children are
// a contiguous id range (stable: by coarse id, then old fine id).
//
// Deterministic for a seed: FAISS initialises from a seeded permutation and
// every reduction it runs in parallel has a fixed order.
//
// Thread-safety: ClusterHead is reentrant (FAISS uses OpenMP internally).
#pragma once

#include <cstdint>
#include <vector>

#include "sqz/status.h"

namespace sqz::index {

struct KMeansOptions {
  double fine_ratio = 0.05;
  double coarse_ratio = 0.01;
  int iters = 10;
  uint64_t seed = 1234;
};

// The clustering of n keys of dimension d, positions relative to the
// clustered keys (0 .. n-1; the builder adds n_sinks to get token positions).
struct HeadClustering {
  int dim = 0;
  int64_t n = 0;
  std::vector<float> fine_centroids;           // [K2 * dim]
  std::vector<uint32_t> fine_offsets;          // [K2 + 1], 0 .. n
  std::vector<float> coarse_centroids;         // [K1 * dim]
  std::vector<uint32_t> coarse_child_offsets;  // [K1 + 1], 0 .. K2
  std::vector<uint32_t> permutation;           // [n]: permuted position -> key index

  int64_t n_fine() const { return fine_offsets.empty() ? 0 : static_cast<int64_t>(fine_offsets.size()) - 1; }
  int64_t n_coarse() const {
    return coarse_child_offsets.empty() ? 0 : static_cast<int64_t>(coarse_child_offsets.size()) - 1;
  }
};

// Number of clusters asked of k-means: ceil(ratio * n) clamped to [1, hi]
// (0 when n == 0). A relative epsilon keeps float noise in ratio * n (e.g.
// 0.05 * 2000 = 100.00000000000001) from adding a cluster.
int64_t ClusterCount(double ratio, int64_t n, int64_t hi);

// Clusters keys [n, d] (float32, finite, row-major). n may be 0 (empty
// clustering: offsets {0}). n must be < 2^32.
// Errors: InvalidArgument (bad options or shapes), Aborted (FAISS failure).
Status ClusterHead(const float* keys, int64_t n, int d, const KMeansOptions& options, HeadClustering* out);

}  // namespace sqz::index
