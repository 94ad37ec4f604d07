// DB: a persistent database of fixed contexts (KV caches plus their centroid
// index), stored in one RocksDB directory.
//
// Building a context lives in sqz/build.h, querying one in sqz/query.h; this
// header covers opening the database and managing the contexts in it.
//
// Thread-safety: a DB may be used from many threads at once; every method is
// internally synchronised. Only one process may open a directory at a time
// (RocksDB's LOCK file); a second Open returns IOError.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz {

struct Options {
  // Create the directory and an empty database when none exists.
  bool create_if_missing = true;
  // Fail if a database already exists at the path.
  bool error_if_exists = false;
  // Bytes of RocksDB block cache shared by index records and KV blocks
  // (the in-memory cache that makes repeated queries "warm").
  size_t block_cache_bytes = size_t{512} << 20;
  // Background flush/compaction threads.
  int max_background_jobs = 2;
};

// One calibrated threshold: at quantile f (the fraction of keys the window
// queries would drop), `flat` is the fine-level tau, `coarse` and `fine` the
// two taus of the hierarchical lookup.
struct ThresholdInfo {
  double quantile = 0;
  float flat = 0;
  float coarse = 0;
  float fine = 0;
};

struct ContextInfo {
  std::string name;
  uint64_t id = 0;            // internal context id (key prefix on disk)
  std::string model;          // free text from the KV file
  int n_layers = 0;
  int n_kv_heads = 0;
  int n_q_heads = 0;
  int head_dim = 0;
  int64_t n_tokens = 0;
  DType dtype = DType::kF16;  // stored dtype of K and V
  int window = 0;             // observation window actually used (tokens)
  int n_sinks = 0;            // always-kept first tokens
  int64_t n_clustered = 0;    // n_tokens - window - n_sinks (same for every head)
  double fine_ratio = 0;
  double coarse_ratio = 0;
  int kmeans_iters = 0;
  uint64_t seed = 0;
  // Cluster counts per (layer, kv head), index layer * n_kv_heads + head.
  std::vector<int32_t> fine_clusters;
  std::vector<int32_t> coarse_clusters;
  // Number of window queries used for calibration (0: not calibrated; the
  // query side then uses budget mode).
  int calibration_queries = 0;
  std::vector<ThresholdInfo> thresholds;
  uint64_t kv_bytes = 0;       // raw (uncompressed) K+V bytes stored
  uint64_t index_bytes = 0;    // raw bytes of the index records
  uint64_t bytes_on_disk = 0;  // RocksDB's estimate for the context's key ranges
  double build_seconds = 0;
  int64_t created_unix = 0;
};

// What VerifyContext checked.
struct VerifyReport {
  int64_t records_checked = 0;
  int64_t kv_blocks_checked = 0;
  uint64_t bytes_checked = 0;
};

class DB {
 public:
  // Opens (or creates, per options) the database at `path`. Removes the
  // leftovers of builds that never committed (a killed process) before
  // returning. A database written by a newer, unknown format version is
  // refused with NotSupported.
  static Status Open(const Options& options, const std::string& path, std::unique_ptr<DB>* db);

  DB() = default;
  DB(const DB&) = delete;
  DB& operator=(const DB&) = delete;
  virtual ~DB() = default;  // closes the database

  virtual const std::string& path() const = 0;

  // Names of the committed contexts, sorted.
  virtual Status ListContexts(std::vector<std::string>* names) = 0;

  // Fills *info for context `name`. NotFound if there is none.
  virtual Status DescribeContext(const std::string& name, ContextInfo* info) = 0;

  // Removes context `name` atomically and reclaims its space (range delete
  // plus compaction of its key ranges). NotFound if there is none.
  virtual Status DropContext(const std::string& name) = 0;

  // Reads every record of context `name` and checks it: RocksDB block
  // checksums, FlatBuffers verification, shapes, offsets, the permutation and
  // a CRC32C of every KV block. Corruption names the first bad record.
  virtual Status VerifyContext(const std::string& name, VerifyReport* report) = 0;
};

}  // namespace sqz
