// DB: a persistent database of fixed contexts (KV caches plus their centroid
// index), stored in one RocksDB directory.
//
// Building a context lives in sqz/build.h, querying one in sqz/query.h; this
// header covers opening the database and managing the contexts in it.
//
// Thread-safety: a DB may be used from many threads at once; every method is
// internally synchronised.
//
// Processes: one process at a time may open a directory read-write (RocksDB's
// LOCK file; a second read-write Open returns IOError naming the holder).
// Any number of processes may open it with Options::read_only at the same
// time, also while the writer builds, replaces and drops contexts: a reader
// takes no lock, writes nothing in the directory, and sees the database as it
// was when it opened (or last called Refresh), never a partial context.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz {

namespace storage {
class Store;  // storage/include/storage/store.h (internal)
}

struct Options {
  // Create the directory and an empty database when none exists.
  bool create_if_missing = true;
  // Fail if a database already exists at the path.
  bool error_if_exists = false;
  // Open for reading only: no lock, no write of any kind to the directory
  // (no leftover cleanup, no space reclamation), create_if_missing ignored.
  // The reader's view is fixed at Open; Refresh() moves it forward. Drop and
  // build calls return NotSupported. Beside a writer, Open and Refresh retry
  // until they get a whole, current view; a writer that changes its files
  // (flushes, compactions) during every attempt for about 4 s makes them
  // return IOError ending in "try again" (transient: nothing is wrong).
  bool read_only = false;
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
  // The context's generation: an id never reused within a database (it
  // survives reopen, drop, replace and a killed build), so a cache keyed by
  // it never serves another context's keys. A replace gets a new id.
  uint64_t id = 0;
  uint32_t format_version = 0;  // on-disk format the context was written in
  std::string model;            // free text from the KV file
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
  // KV pages (docs/FORMAT.md): every (layer, KV head) stores its rows in the
  // permuted order as pages of `page_rows` rows (K plane then V plane, the
  // last page of a run zero-padded); the clustered rows take
  // `clustered_pages` pages, the always set (sinks then window) the next
  // `always_pages`. Every page has page_bytes() bytes.
  int page_rows = 0;
  int64_t clustered_pages = 0;  // per (layer, KV head)
  int64_t always_pages = 0;     // per (layer, KV head)
  // Fine-cluster sizes over the whole context: bucket b counts the clusters
  // of size in [2^b, 2^(b+1)).
  std::vector<int64_t> cluster_size_histogram;
  uint64_t kv_bytes = 0;       // raw (uncompressed) K+V bytes stored, padding included
  uint64_t index_bytes = 0;    // raw bytes of the index records
  uint64_t bytes_on_disk = 0;  // RocksDB's estimate for the context's key ranges
  double build_seconds = 0;
  int64_t created_unix = 0;
  // Filled by DescribeContext, not stored: empty for a healthy context, else
  // what is wrong with its table files (missing, truncated, unreadable; a
  // degraded open, docs/RELIABILITY.md). Reading such a context fails with
  // Corruption; every other context works, and dropping it is allowed.
  std::string damage;

  int group_size() const { return n_kv_heads > 0 ? n_q_heads / n_kv_heads : 0; }
  int64_t n_always() const { return n_tokens - n_clustered; }
  int64_t pages_per_head() const { return clustered_pages + always_pages; }
  size_t page_bytes() const;  // 2 * page_rows * head_dim * DTypeSize(dtype)
};

// What VerifyContext checked.
struct VerifyReport {
  int64_t records_checked = 0;
  int64_t kv_pages_checked = 0;
  uint64_t bytes_checked = 0;
};

// What DB::Backup made (sqctl backup).
struct BackupInfo {
  uint32_t backup_id = 0;  // id within the backup directory (1, 2, ...)
  std::vector<std::string> contexts;
  uint64_t bytes = 0;  // size of the files of this backup (shared files counted once)
};

// What DB::Repair salvaged (sqctl repair).
struct RepairReport {
  std::vector<std::string> recovered;  // contexts that verified in the repaired copy, sorted
  // Contexts known (from the damaged database's manifests or their
  // redundant copies) that could not be recovered, each with the reason.
  std::vector<std::pair<std::string, std::string>> lost;
  // Context ids that had records but no readable manifest anywhere (their
  // names are unknown); their records are not in the copy.
  std::vector<uint64_t> unnamed_ids;
  std::vector<std::string> damaged_files;  // table files RocksDB's repair set aside (in the copy's lost/)
  // The write-ahead log could not be replayed beside the table files (see
  // docs/RELIABILITY.md): writes made since the last flush are not in the
  // copy; contexts they committed are among `lost` or absent from the copy.
  bool logs_skipped = false;
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
  virtual bool read_only() const = 0;

  // Read-only DB: moves the view forward to what the writer has committed
  // now (new contexts appear, dropped ones disappear). Handles opened before
  // keep answering from the version they opened. Read-write DB: no-op (it
  // always sees its own commits).
  virtual Status Refresh() = 0;

  // Names of the committed contexts, sorted.
  virtual Status ListContexts(std::vector<std::string>* names) = 0;

  // Fills *info for context `name`. NotFound if there is none.
  virtual Status DescribeContext(const std::string& name, ContextInfo* info) = 0;

  // Removes context `name` atomically. Its space is reclaimed (range delete
  // plus compaction) once no handle of this process still reads it; a crash
  // before that is finished by the next read-write open. NotFound if there
  // is none; NotSupported on a read-only DB.
  virtual Status DropContext(const std::string& name) = 0;

  // Reads every record of context `name` and checks it: RocksDB block
  // checksums, the records' own validation (the one used by open and query),
  // the permutation, and a CRC32C of every KV page. Corruption names the
  // first bad record.
  virtual Status VerifyContext(const std::string& name, VerifyReport* report) = 0;

  // Writes a consistent copy of the database into `backup_dir` (RocksDB's
  // BackupEngine: created when missing; an existing backup directory gets
  // one more backup, sharing unchanged table files), then re-reads every
  // file of it against its checksum. Readers keep running; commits made
  // during the backup are either in it entirely or not at all.
  // NotSupported on a read-only DB (the copy needs the writer's instance).
  virtual Status Backup(const std::string& backup_dir, BackupInfo* info) = 0;

  // Restores backup `backup_id` (0: the latest) of `backup_dir` into
  // `db_path`, which must not exist or be empty (nothing is ever restored
  // over a directory with files in it), then verifies every context.
  static Status Restore(const std::string& backup_dir, uint32_t backup_id, const std::string& db_path,
                        BackupInfo* info);

  // Salvages what is readable of a damaged database at `damaged_path` into a
  // new database at `out_path` (must not exist or be empty). The damaged
  // directory is only read: table files are hard-linked (or copied) into
  // `out_path` and RocksDB's RepairDB rebuilds the copy's metadata there;
  // manifests lost with the manifest column family are recovered from their
  // redundant copies; every context is verified and those that fail are
  // left out and reported. OK when the copy was made, whatever was lost.
  static Status Repair(const std::string& damaged_path, const std::string& out_path, RepairReport* report);

  // Internal: the interface through which the builder and the query engine
  // reach the records (storage/include/storage/store.h). Not for
  // applications; its type is incomplete outside the library.
  virtual storage::Store* store() = 0;
};

}  // namespace sqz
