// Two-level spherical k-means of the clustered keys of (layer, KV head)s
// (DESIGN.md section 2, docs/SEMANTICS.md "Stored index").
//
// Fine level: spherical k-means on the L2-normalised keys into
// K2 = ceil(fine_ratio * n) clusters (clamped to [1, n]); every key is then
// assigned to its nearest centroid by inner product; the stored centroid is
// the mean of the RAW member keys (magnitude kept); empty clusters dropped.
// Coarse level: size-weighted spherical k-means over the normalised fine
// centroids into K1 = ceil(coarse_ratio * n) clusters (clamped to [1, K2]);
// coarse centroid = size-weighted mean of its children's raw centroids; empty
// ones dropped. Fine ids are renumbered so each coarse cluster's children are
// a contiguous id range (stable: by coarse id, then old fine id).
//
// The k-means runs themselves go to a KMeansBackend (sqz/kmeans.h): FAISS on
// the CPU by default. Everything else above is done here, once, for every
// backend. ClusterHeads batches: the fine problems of all heads go to the
// backend in one Run call, then their coarse problems in a second one.
//
// Deterministic for a seed: FAISS initialises from a seeded permutation and
// every reduction it runs in parallel has a fixed order.
//
// Thread-safety: ClusterHead(s) are reentrant (FAISS uses OpenMP internally)
// as long as the backend's Run may be called concurrently (the FAISS one
// may).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "sqz/kmeans.h"
#include "sqz/status.h"

namespace sqz::index {

struct KMeansOptions {
  double fine_ratio = 0.05;    // in (0, 1]
  double coarse_ratio = 0.01;  // in (0, 1]
  int iters = 10;              // >= 1, each level
  // The fine problems get this seed, the coarse ones
  // seed * 0x9E3779B97F4A7C15 + 1 (uncorrelated initialisations).
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
  // Per-iteration objective of the fine and coarse k-means as the backend
  // reported it (KMeansResult::objective); empty when n == 0.
  std::vector<double> fine_objective;
  std::vector<double> coarse_objective;

  int64_t n_fine() const { return fine_offsets.empty() ? 0 : static_cast<int64_t>(fine_offsets.size()) - 1; }
  int64_t n_coarse() const {
    return coarse_child_offsets.empty() ? 0 : static_cast<int64_t>(coarse_child_offsets.size()) - 1;
  }
};

// Number of clusters asked of k-means: ceil(ratio * n) clamped to [1, hi]
// (0 when n == 0). A relative epsilon keeps float noise in ratio * n (e.g.
// 0.05 * 2000 = 100.00000000000001) from adding a cluster.
int64_t ClusterCount(double ratio, int64_t n, int64_t hi);

// The FAISS CPU backend: faiss::Clustering (nredo 1, no subsampling,
// seed folded to FAISS's int), then a final assignment of every point with
// IndexFlatIP (spherical) or IndexFlatL2. Problems run one after another,
// each parallelised by FAISS's OpenMP. Stateless: Run may be called
// concurrently. Besides the interface's checks it rejects n or k above
// INT_MAX (FAISS counts points and centroids in int) with InvalidArgument.
std::unique_ptr<KMeansBackend> MakeFaissKMeansBackend();

// The keys of one head: [n, d] float32, finite, row-major. n may be 0.
struct HeadKeys {
  const float* keys = nullptr;
  int64_t n = 0;
  int d = 0;
};

// Clusters n_heads heads; out: size n_heads, out[i] receives the clustering
// of heads[i], bit-identical to ClusterHead of that head alone (same backend,
// same options). backend: nullptr means FAISS on the CPU. Heads with n == 0
// get an empty clustering (offsets {0}) and are not sent to the backend; the
// others' fine problems go to backend->Run in ONE call, then their coarse
// problems in a second call (no call when every head is empty).
// Errors: InvalidArgument (bad options or shapes: d < 1, n < 0, n >= 2^32,
// null keys with n > 0), whatever backend->Run returns (its messages number
// the problems among the non-empty heads), Aborted (the backend
// returned a result of the wrong size or a label out of range, threw, or
// memory ran out). Per-head messages start with "head <i>" when n_heads > 1.
// On error the contents of out are unspecified.
Status ClusterHeads(KMeansBackend* backend, const HeadKeys* heads, size_t n_heads, const KMeansOptions& options,
                    HeadClustering* out);

// One head with the FAISS CPU backend: ClusterHeads of {keys, n, d}.
// Clusters keys [n, d] (float32, finite, row-major). n may be 0 (empty
// clustering: offsets {0}). n must be < 2^32.
// Errors: InvalidArgument (bad options or shapes), Aborted (FAISS failure).
Status ClusterHead(const float* keys, int64_t n, int d, const KMeansOptions& options, HeadClustering* out);

}  // namespace sqz::index
