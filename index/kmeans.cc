#include "index/kmeans.h"

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#include <faiss/impl/FaissException.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <exception>
#include <numeric>
#include <string>

namespace sqz::index {

namespace {

// FAISS takes an int seed; fold the 64-bit seed so both halves matter.
int FaissSeed(uint64_t seed) { return static_cast<int>((seed ^ (seed >> 32)) & 0x7fffffffu); }

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

// Spherical k-means of x [n, d] (already normalised) into k centroids, then
// nearest-centroid (inner product) labels of every row. k <= n.
void SphericalKMeans(const float* x, int64_t n, int d, int64_t k, int iters, int seed, const float* weights,
                     std::vector<int64_t>* labels) {
  faiss::ClusteringParameters cp;
  cp.niter = iters;
  cp.nredo = 1;
  cp.spherical = true;
  cp.verbose = false;
  cp.seed = seed;
  // Never subsample (the method clusters every key) and never warn about
  // few points per centroid (k <= n always holds).
  cp.max_points_per_centroid = INT_MAX / 2;
  cp.min_points_per_centroid = 1;
  faiss::Clustering clus(d, static_cast<int>(k), cp);
  faiss::IndexFlatIP index(d);
  clus.train(n, x, index, weights);
  // After train the index holds exactly the final centroids; the last
  // iteration's labels belong to the previous centroids, so assign again.
  labels->assign(static_cast<size_t>(n), -1);
  std::vector<float> dist(static_cast<size_t>(n));
  index.search(n, x, 1, dist.data(), labels->data());
}

}  // namespace

int64_t ClusterCount(double ratio, int64_t n, int64_t hi) {
  if (n <= 0 || hi <= 0) return 0;
  double want = std::ceil(ratio * static_cast<double>(n) * (1.0 - 1e-12));
  int64_t k = want < 1 ? 1 : (want > static_cast<double>(hi) ? hi : static_cast<int64_t>(want));
  return std::clamp<int64_t>(k, 1, hi);
}

Status ClusterHead(const float* keys, int64_t n, int d, const KMeansOptions& options, HeadClustering* out) {
  *out = HeadClustering();
  out->dim = d;
  out->n = n;
  if (d <= 0) return Status::InvalidArgument("k-means: head_dim must be positive, got " + std::to_string(d));
  if (n < 0 || n >= (int64_t{1} << 32)) {
    return Status::InvalidArgument("k-means: key count out of range: " + std::to_string(n));
  }
  if (!(options.fine_ratio > 0 && options.fine_ratio <= 1) ||
      !(options.coarse_ratio > 0 && options.coarse_ratio <= 1) || options.iters < 1) {
    return Status::InvalidArgument("k-means: bad options (ratios must be in (0, 1], iters >= 1)");
  }
  out->fine_offsets.push_back(0);
  out->coarse_child_offsets.push_back(0);
  if (n == 0) return Status::OK();

  try {
    // --- Fine level ----------------------------------------------------------
    std::vector<float> xn;
    NormalizeRows(keys, n, d, &xn);
    const int64_t k2_asked = ClusterCount(options.fine_ratio, n, n);
    std::vector<int64_t> label;
    SphericalKMeans(xn.data(), n, d, k2_asked, options.iters, FaissSeed(options.seed), nullptr, &label);
    xn.clear();
    xn.shrink_to_fit();

    // Raw means in double (sums of up to 2^32 floats).
    std::vector<double> sum(static_cast<size_t>(k2_asked) * d, 0.0);
    std::vector<int64_t> count(static_cast<size_t>(k2_asked), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = label[i];
      if (j < 0 || j >= k2_asked) return Status::Aborted("k-means: FAISS returned an invalid assignment");
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

    // --- Coarse level --------------------------------------------------------
    const int64_t k1_asked = ClusterCount(options.coarse_ratio, n, kf);
    std::vector<float> cn;
    NormalizeRows(fine_raw.data(), kf, d, &cn);
    std::vector<float> weight(static_cast<size_t>(kf));
    for (int64_t j = 0; j < kf; ++j) weight[j] = static_cast<float>(count[j]);
    std::vector<int64_t> parent;
    // A different seed than the fine level so the two initialisations are
    // not correlated.
    SphericalKMeans(cn.data(), kf, d, k1_asked, options.iters, FaissSeed(options.seed * 0x9E3779B97F4A7C15ull + 1),
                    weight.data(), &parent);
    std::vector<int64_t> ccount(static_cast<size_t>(k1_asked), 0);
    for (int64_t j = 0; j < kf; ++j) {
      if (parent[j] < 0 || parent[j] >= k1_asked) {
        return Status::Aborted("k-means: FAISS returned an invalid coarse assignment");
      }
      ++ccount[parent[j]];
    }
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
      std::copy(fine_raw.begin() + old * d, fine_raw.begin() + (old + 1) * d, out->fine_centroids.begin() + j * d);
      out->fine_offsets[j + 1] = out->fine_offsets[j] + static_cast<uint32_t>(count[old]);
    }
    // Counting sort of the keys by new fine id; within a cluster the
    // original order is kept (stable), which makes blocks deterministic.
    out->permutation.resize(static_cast<size_t>(n));
    std::vector<uint32_t> cursor(out->fine_offsets.begin(), out->fine_offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) out->permutation[cursor[new_id[label[i]]]++] = static_cast<uint32_t>(i);

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
  } catch (const faiss::FaissException& e) {
    return Status::Aborted(std::string("k-means: FAISS error: ") + e.what());
  } catch (const std::bad_alloc&) {
    return Status::Aborted("k-means: out of memory");
  }
  return Status::OK();
}

}  // namespace sqz::index
