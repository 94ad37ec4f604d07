// The storage layer's interface to the layers above (index/ writes contexts,
// query/ reads them). Plain C++ structs and abstract classes only: no
// RocksDB, no FlatBuffers. storage/ alone encodes, decodes and validates the
// on-disk records (storage/records.cc); docs/FORMAT.md describes them.
//
// Thread-safety: a ContextWriter is used by one thread at a time. A
// ContextSnapshot is immutable: any number of threads may read through it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sqz/db.h"
#include "sqz/status.h"

namespace sqz::storage {

// On-disk format version written by this build (docs/FORMAT.md,
// "Versioning"). Version 1 (one KV block per fine cluster) is refused.
inline constexpr uint32_t kFormatVersion = 2;

// Page sizes a context may use (rows per page).
inline constexpr int kMinPageRows = 1;
inline constexpr int kMaxPageRows = 4096;

// The index of one (layer, KV head). Rows of the head are numbered in the
// permuted order: rows [0, n_clustered) are the clustered keys (fine clusters
// contiguous, children of a coarse cluster contiguous), rows
// [n_clustered, n_tokens) the always set (sinks then window).
struct HeadIndexRecord {
  int32_t layer = 0;
  int32_t head = 0;
  std::vector<float> fine_centroids;           // [K2, head_dim]: mean of the raw member keys
  std::vector<uint32_t> fine_offsets;          // [K2 + 1]: CSR into rows, 0 .. n_clustered
  std::vector<float> coarse_centroids;         // [K1, head_dim]: size-weighted mean of the children
  std::vector<uint32_t> coarse_child_offsets;  // [K1 + 1]: CSR over fine ids, 0 .. K2
  std::vector<uint32_t> permutation;           // [n_clustered]: row -> original token position
  std::vector<uint32_t> page_crc;              // [pages_per_head]: CRC32C of every page value

  int64_t n_fine() const { return fine_offsets.empty() ? 0 : static_cast<int64_t>(fine_offsets.size()) - 1; }
  int64_t n_coarse() const {
    return coarse_child_offsets.empty() ? 0 : static_cast<int64_t>(coarse_child_offsets.size()) - 1;
  }
};

// --- Page geometry (docs/FORMAT.md, "KV pages") -----------------------------
// Clustered rows r < n_clustered live in page r / P at slot r % P; always
// row n_clustered + i in page clustered_pages + i / P at slot i % P.
int64_t PagesFor(int64_t rows, int page_rows);  // ceil(rows / page_rows)
int64_t PageOfRow(const ContextInfo& info, int64_t row);
int64_t SlotOfRow(const ContextInfo& info, int64_t row);

// --- The one validator --------------------------------------------------------
// Checks a manifest's own consistency (shapes, dtype, page geometry, table
// lengths, thresholds). Used by every read of a manifest.
Status ValidateManifest(const ContextInfo& info);
// Checks a head index against its manifest: layer/head, CSR tables spanning
// their ranges with no empty cluster, centroid sizes and finiteness, cluster
// counts equal to the manifest's (when it has them: a committed one always
// does), page CRC count; with `full` also that the
// permutation is a bijection onto the clustered token positions (O(n); open
// and query skip it, verify does it). `where` prefixes the message.
Status ValidateHeadIndex(const ContextInfo& info, int layer, int head, const HeadIndexRecord& rec, bool full,
                         const std::string& where);

// --- Writing -------------------------------------------------------------------
// Collects the records of one context under a fresh generation id. Nothing
// is visible to readers until Commit. Destroying an uncommitted writer
// aborts it (its records are removed, or left for the next open to remove).
class ContextWriter {
 public:
  virtual ~ContextWriter() = default;
  // The generation id the context will carry.
  virtual uint64_t id() const = 0;
  // Stores a head index (validated when read back and at every open).
  virtual Status PutHeadIndex(const HeadIndexRecord& rec) = 0;
  // One page value: K plane [page_rows, head_dim] then V plane, stored dtype.
  virtual Status PutPage(int layer, int head, int64_t page, std::string_view value) = 0;
  // Reads back a head index written by this writer (calibration's second pass).
  virtual Status GetHeadIndex(int layer, int head, HeadIndexRecord* out) = 0;
  // Publishes the context: its records are made durable, then the manifest
  // (`info`, whose id must be id()) is written last, atomically, replacing a
  // context of the same name when `replace`. AlreadyExists otherwise.
  virtual Status Commit(const ContextInfo& info, bool replace) = 0;
  // Removes everything written (a failed build).
  virtual Status Abort() = 0;
  virtual uint64_t bytes_written() const = 0;
};

// --- Reading -------------------------------------------------------------------
// Pages read by ContextSnapshot::ReadPages, valid while this object lives
// (pinned in the block cache where possible, copied otherwise).
class PageSet {
 public:
  PageSet();
  ~PageSet();
  PageSet(const PageSet&) = delete;
  PageSet& operator=(const PageSet&) = delete;
  size_t size() const;
  // Page i of the request: page_bytes() bytes (may be unaligned).
  const uint8_t* data(size_t i) const;
  struct Rep;
  Rep* rep() { return rep_.get(); }

 private:
  std::unique_ptr<Rep> rep_;
};

// One consistent version of one committed context: every read through it
// sees the version that existed when it was opened, whatever is replaced or
// dropped meanwhile (the space is reclaimed after the last snapshot goes).
class ContextSnapshot {
 public:
  virtual ~ContextSnapshot() = default;
  virtual const ContextInfo& info() const = 0;
  // The validated head index (without the O(n) permutation check).
  virtual Status GetHeadIndex(int layer, int head, HeadIndexRecord* out) const = 0;
  // Reads pages[0..n) of (layer, head) into *out, each checked for its size
  // (RocksDB verifies its block checksums; sqctl verify checks page CRCs).
  // Corruption if a page is missing.
  virtual Status ReadPages(int layer, int head, const uint32_t* pages, size_t n, PageSet* out) const = 0;
};

// What the layers above need of a database beyond the public DB interface.
// DB::store() returns it (no downcast of the public interface).
class Store {
 public:
  virtual ~Store() = default;
  // A writer for a new context `name`. `shape` carries the shapes and page
  // geometry of the context (its per-head cluster counts may still be
  // empty: they are known at Commit). AlreadyExists early (before hours of
  // k-means) when the name is taken and !replace; NotSupported when the
  // database is read-only.
  virtual Status BeginContext(const std::string& name, bool replace, const ContextInfo& shape,
                              std::unique_ptr<ContextWriter>* out) = 0;
  // A snapshot of committed context `name`. NotFound if absent.
  virtual Status OpenSnapshot(const std::string& name, std::unique_ptr<ContextSnapshot>* out) = 0;
};

// The AlreadyExists error for a taken context name (one wording everywhere).
Status ContextExistsError(const std::string& name, const std::string& db_path);

}  // namespace sqz::storage
