// Building a context: turn a KV source into a committed context of a DB.
//
// Per (layer, KV head) the builder keeps the last `window` tokens (and the
// first `n_sinks`) aside, clusters the other keys with spherical k-means
// (FAISS on the CPU unless BuildOptions::kmeans says otherwise) into a fine
// level, clusters the fine centroids into a coarse level, stores keys and
// values permuted so each fine cluster is one contiguous block, and
// calibrates thresholds from the window queries when the source has them.
// See docs/ARCHITECTURE.md and DESIGN.md section 2 for the formulas.
//
// Thread-safety: BuildContext may run concurrently for different names on one
// DB. Two concurrent builds of the same name: the last to commit wins.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "sqz/status.h"

namespace sqz {

class KMeansBackend;  // sqz/kmeans.h

struct BuildProgress {
  int layer = 0;  // layer being processed (0-based)
  int head = 0;   // KV head being processed (0-based)
  int n_layers = 0;
  int n_kv_heads = 0;
  int64_t heads_done = 0;  // (layer, head) pairs finished
  int64_t heads_total = 0;
  double keys_per_second = 0;  // clustered keys per second so far
  double eta_seconds = 0;      // estimate for the rest of the build
};

struct BuildOptions {
  // Observation window: the last `window` tokens are always attended and not
  // clustered. Clamped to n_tokens - n_sinks.
  int window = 100;
  // Always-kept first tokens (attention sinks), not clustered. LLMs park a
  // large share of attention on the first few tokens (StreamingLLM keeps 4);
  // clustered, such a key's centroid is diluted by its neighbours and the
  // lookup underestimates it. Clamped to n_tokens.
  int n_sinks = 4;
  // Fine level: ceil(fine_ratio * n_clustered) clusters before empty ones are
  // dropped.
  double fine_ratio = 0.05;
  // Coarse level: ceil(coarse_ratio * n_clustered) clusters of fine centroids.
  double coarse_ratio = 0.01;
  // Rows per KV page (docs/FORMAT.md, "KV pages"): the unit in which keys and
  // values are stored, read and paged to the GPU. Chosen from the read
  // amplification and cold-read measurements in docs/PERFORMANCE.md.
  int page_rows = 16;
  // Lloyd iterations of each k-means.
  int kmeans_iters = 10;
  // Seed of the k-means initialisation; a build is deterministic for a seed.
  uint64_t seed = 1234;
  // The k-means engine (sqz/kmeans.h), borrowed for the duration of the
  // build. The builder gives it the KV heads of a layer in batches, one Run
  // call per batch and level. Shared by concurrent builds, its Run must be
  // thread-safe.
  KMeansBackend* kmeans = nullptr;  // null: FAISS on the CPU
  // Most bytes of float32 keys per k-means batch: a batch holds as many KV
  // heads of a layer as fit (at least one); the batch and its normalised copy
  // are in memory together. 256 MiB = 4 heads of 128K tokens x 128 dims.
  size_t kmeans_batch_bytes = size_t{256} << 20;
  // Read and check the next layer of the source on a second thread while
  // this one is clustered and written (one more layer of K and V in memory).
  bool read_ahead = true;
  // Calibration quantiles f (fraction of keys dropped by the window queries).
  std::vector<double> quantiles = {0.5, 0.7, 0.8, 0.9, 0.95};
  // Hierarchical calibration: the coarse threshold drops this share of the
  // target fraction (coarse quantile = coarse_share * f); the fine threshold
  // then makes the total dropped fraction f.
  double coarse_share = 0.5;
  // Replace an existing context of the same name (atomically). Without it an
  // existing name is AlreadyExists.
  bool replace = false;
  // Called after each (layer, head); may be empty.
  std::function<void(const BuildProgress&)> on_progress;
};

struct BuildStats {
  double seconds_total = 0;
  double seconds_read = 0;       // reading + converting + validating the source
  double seconds_kmeans = 0;     // fine + coarse k-means
  double seconds_calibrate = 0;  // threshold calibration
  double seconds_write = 0;      // encoding + RocksDB writes + final flush
  int64_t keys_clustered = 0;    // over all layers and heads
  uint64_t kv_bytes = 0;         // raw K+V bytes handed to storage
  uint64_t index_bytes = 0;      // raw index record bytes
  uint64_t peak_rss_bytes = 0;   // process peak resident set at the end
};

// Builds context `name` from `source` and commits it. The context becomes
// visible only when its manifest is committed, last and atomically; on any
// error (bad input such as NaN/Inf, a full disk, ...) everything written for
// it is removed and the database is as before.
// Errors: InvalidArgument (bad options, bad input values, naming the layer and
// head), AlreadyExists (name exists and !options.replace), IOError.
Status BuildContext(DB* db, const std::string& name, KvSource* source, const BuildOptions& options,
                    BuildStats* stats = nullptr);

}  // namespace sqz
