// The FAISS CPU k-means backend (index/kmeans.h MakeFaissKMeansBackend).
#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#include <faiss/impl/FaissException.h>

#include <climits>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "index/kmeans.h"

namespace sqz::index {

namespace {

// FAISS takes an int seed; fold the 64-bit seed so both halves matter.
int FaissSeed(uint64_t seed) { return static_cast<int>((seed ^ (seed >> 32)) & 0x7fffffffu); }

Status CheckProblem(const KMeansProblem& p, size_t i) {
  auto bad = [i](const std::string& m) {
    return Status::InvalidArgument("k-means problem " + std::to_string(i) + ": " + m);
  };
  if (p.d < 1) return bad("dimension must be >= 1, got " + std::to_string(p.d));
  if (p.n < 1 || p.n > INT_MAX) return bad("point count must be in [1, INT_MAX], got " + std::to_string(p.n));
  if (p.k < 1 || p.k > p.n) {
    return bad("k must be in [1, n = " + std::to_string(p.n) + "], got " + std::to_string(p.k));
  }
  if (p.x == nullptr) return bad("null points");
  return Status::OK();
}

// One problem: spherical (or L2) k-means, then the nearest final centroid of
// every point.
void Solve(const KMeansProblem& p, const KMeansParams& params, KMeansResult* r) {
  faiss::ClusteringParameters cp;
  cp.niter = params.iters;
  cp.nredo = 1;
  cp.spherical = params.spherical;
  cp.verbose = false;
  cp.seed = FaissSeed(p.seed);
  // Never subsample (every point is clustered) and never warn about few
  // points per centroid (k <= n always holds).
  cp.max_points_per_centroid = INT_MAX / 2;
  cp.min_points_per_centroid = 1;
  faiss::Clustering clus(p.d, static_cast<int>(p.k), cp);
  std::unique_ptr<faiss::IndexFlat> index;
  if (params.spherical) {
    index = std::make_unique<faiss::IndexFlatIP>(p.d);
  } else {
    index = std::make_unique<faiss::IndexFlatL2>(p.d);
  }
  clus.train(p.n, p.x, *index, p.weights);
  // After train the index holds exactly the final centroids; the last
  // iteration's labels belong to the previous centroids, so assign again.
  r->labels.assign(static_cast<size_t>(p.n), -1);
  std::vector<float> dist(static_cast<size_t>(p.n));
  index->search(p.n, p.x, 1, dist.data(), r->labels.data());
  r->centroids = std::move(clus.centroids);
  r->objective.clear();
  r->objective.reserve(clus.iteration_stats.size());
  for (const faiss::ClusteringIterationStats& s : clus.iteration_stats) r->objective.push_back(s.obj);
}

class FaissKMeansBackend final : public KMeansBackend {
 public:
  const char* name() const override { return "faiss-cpu"; }

  Status Run(const KMeansProblem* problems, size_t n_problems, const KMeansParams& params,
             KMeansResult* results) override {
    if (n_problems > 0 && (problems == nullptr || results == nullptr)) {
      return Status::InvalidArgument("k-means: null problems or results");
    }
    if (params.iters < 1) {
      return Status::InvalidArgument("k-means: iters must be >= 1, got " + std::to_string(params.iters));
    }
    for (size_t i = 0; i < n_problems; ++i) SQZ_RETURN_IF_ERROR(CheckProblem(problems[i], i));
    for (size_t i = 0; i < n_problems; ++i) {
      try {
        Solve(problems[i], params, &results[i]);
      } catch (const faiss::FaissException& e) {
        return Status::Aborted("k-means problem " + std::to_string(i) + ": FAISS error: " + e.what());
      } catch (const std::bad_alloc&) {
        return Status::Aborted("k-means problem " + std::to_string(i) + ": out of memory");
      }
    }
    return Status::OK();
  }
};

}  // namespace

std::unique_ptr<KMeansBackend> MakeFaissKMeansBackend() { return std::make_unique<FaissKMeansBackend>(); }

}  // namespace sqz::index
