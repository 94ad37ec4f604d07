// KMeansBackend: the seam between the clustering of a context's keys and the
// k-means engine that runs it (in the manner of FAISS's Clustering, which
// takes the index that assigns points as a parameter).
//
// The builder hands a backend a batch of independent problems at a time
// (e.g. the fine level of every KV head of a layer, then their coarse level)
// so a backend can run them together (one GPU launch sequence, one thread
// pool). Everything around k-means (normalisation, raw-key centroids,
// dropping empty clusters, the two-level hierarchy, the permutation) is done
// once, by the caller, for every backend: a backend only solves the problems
// it is given.
//
// Backends: FAISS on the CPU (index layer, the default when none is given);
// a CUDA backend may implement this interface in the gpu layer.
//
// Thread-safety: a backend documents its own. Unless it says otherwise, Run
// may be called by one thread at a time per backend object. The FAISS
// backend holds no state: concurrent Run calls on one object are safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "sqz/status.h"

namespace sqz {

// One k-means problem: cluster the n rows of x into k centroids. Borrowed
// pointers: they must stay valid for the duration of Run.
struct KMeansProblem {
  const float* x = nullptr;        // points, size n * d, row-major; finite. For
                                   // spherical k-means the caller has already
                                   // L2-normalised every row (zero rows allowed).
  int64_t n = 0;                   // number of points, >= 1
  int d = 0;                       // dimension, >= 1
  int64_t k = 0;                   // number of centroids, 1 <= k <= n
  const float* weights = nullptr;  // size n, >= 0 (a point counts weights[i]
                                   // times in the centroid update), or nullptr
                                   // (every point weighs 1)
  uint64_t seed = 0;               // initialisation seed; same problem and seed,
                                   // same result (a backend is deterministic)
};

// Parameters shared by every problem of one Run call.
struct KMeansParams {
  // Lloyd iterations (assignment + centroid update), >= 1. No early stop.
  int iters = 10;
  // Spherical k-means: the similarity is the inner product and the
  // centroids are L2-normalised after every update (FAISS's
  // ClusteringParameters::spherical). Otherwise: squared L2 distance,
  // centroids are plain means.
  bool spherical = true;
};

// The solution of one problem. Run resizes every field.
struct KMeansResult {
  // Final centroids, size k * d, row-major (unit norm when spherical).
  std::vector<float> centroids;
  // Size n: for every point, the id in [0, k) of its nearest FINAL centroid
  // (largest inner product when spherical, smallest L2 distance otherwise).
  // Not the labels of the last iteration, which belong to the centroids
  // before its update.
  std::vector<int64_t> labels;
  // Size iters: the objective of each iteration as FAISS's
  // iteration_stats[i].obj, i.e. the unweighted sum over the points of the
  // similarity (spherical: inner product, LARGER is better, so it normally
  // increases over the iterations) or the squared distance (L2: smaller is better) to the
  // centroid each point was assigned to at the START of iteration i (before
  // that iteration's update). Corner case as in FAISS: when k == n the points
  // are the centroids, no iteration runs and the size is 1 (value 0).
  std::vector<double> objective;
};

class KMeansBackend {
 public:
  virtual ~KMeansBackend() = default;

  // Short name for messages and logs, e.g. "faiss-cpu".
  virtual const char* name() const = 0;

  // Runs n_problems independent problems (e.g. all KV heads of a layer) with
  // the same params. problems: size n_problems; results: size n_problems,
  // results[i] receives the solution of problems[i]. n_problems may be 0.
  // Results do not depend on how problems are batched: a problem gives the
  // same result alone or among others.
  // Errors (on error the contents of results are unspecified):
  //   InvalidArgument: a bad shape or parameter (k < 1, k > n, d < 1,
  //     null x, iters < 1, or a size the backend cannot handle), before any
  //     work is done; the message names the problem's index.
  //   Aborted: the backend failed (library error, out of memory, device
  //     error).
  virtual Status Run(const KMeansProblem* problems, size_t n_problems, const KMeansParams& params,
                     KMeansResult* results) = 0;
};

}  // namespace sqz
