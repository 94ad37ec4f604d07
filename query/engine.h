// The CPU query engine behind sqz::ContextHandle (internal; the public API is
// include/sqz/query.h). Exposes the steps of Attend (selection, block reads)
// so the evaluation (query/eval.h) and the tests can observe them.
//
// Per call and KV head the engine: scores the group's query heads against the
// head's centroids and selects fine clusters (query/selection.h), reads the
// always block plus the union of the selected blocks in one MultiGet and
// converts them to float once, then computes exact attention of every query
// head over its set (query/attention.h). Decode (T = 1) with one attended set
// (budget + union, the default; threshold + union) skips the float copy:
// attention converts the pinned blocks tile by tile (AttendBlocks).
//
// Thread-safety: immutable after Open; every method is const and uses
// per-call scratch (buffers kept per thread between calls, never shared), so
// any number of threads may call Attend concurrently.
// Within one call the KV heads run in parallel (OpenMP); results do not
// depend on the thread count. AttendStats' stage times are summed over the
// KV heads (thread-seconds, not wall time, when heads run in parallel).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "query/attention.h"
#include "query/selection.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "sqz/status.h"

namespace sqz::storage {
class DBImpl;
}
namespace rocksdb {
class PinnableSlice;
}

namespace sqz::query {

// The index of one (layer, KV head) in plain vectors (from its HeadIndex).
struct HeadData {
  int32_t k2 = 0;
  int32_t k1 = 0;
  std::vector<float> fine_centroids;           // [k2, d]
  std::vector<uint32_t> fine_offsets;          // [k2 + 1] into the permuted order
  std::vector<uint32_t> fine_sizes;            // [k2]
  std::vector<float> coarse_centroids;         // [k1, d]
  std::vector<uint32_t> coarse_child_offsets;  // [k1 + 1] over fine ids
  std::vector<uint32_t> coarse_sizes;          // [k1]
  std::vector<uint32_t> always_positions;      // original positions: sinks then window
  int64_t n_always = 0;                        // always_positions.size()
};

// Float rows of some KV blocks of one head: the always set first, then the
// requested fine clusters in the order requested.
struct KvRows {
  int64_t rows = 0;
  int64_t n_always = 0;
  std::vector<float> k;  // [rows, d]
  std::vector<float> v;  // [rows, d]
  // [clusters + 1]: requested cluster i owns rows [cluster_begin[i], cluster_begin[i + 1]).
  std::vector<int64_t> cluster_begin;
  uint64_t bytes_read = 0;  // stored bytes of the blocks read
};

class ContextHandleImpl final : public ContextHandle {
 public:
  // Loads and validates the manifest and every head's index.
  // NotFound for an unknown context; Corruption for an inconsistent record.
  static Status Open(DB* db, const std::string& name, std::unique_ptr<ContextHandleImpl>* out);

  const ContextInfo& info() const override { return info_; }
  Status Attend(int layer, const float* q, int T, const QueryOptions& options, float* o, float* lse,
                AttendStats* stats = nullptr) const override;

  // Checks the layer, T, the pointer and that q [n_q_heads, T, d] is finite.
  Status CheckQueries(int layer, const float* q, int T) const;
  // Turns options into selection parameters (thresholds looked up).
  Status Resolve(const QueryOptions& options, SelectionParams* params) const;
  // The selection Attend makes for every KV head of `layer` (out: [n_kv_heads]).
  Status SelectLayer(int layer, const float* q, int T, const QueryOptions& options,
                     std::vector<HeadSelection>* out) const;
  // Reads the always block and the fine blocks `clusters` of (layer, kv_head).
  Status ReadRows(int layer, int kv_head, const std::vector<uint32_t>& clusters, KvRows* out) const;
  // The blocks of ReadRows as stored, pinned in the block cache (no copy):
  // blocks[i] = {K rows, V rows, count}, the always block first (if the head
  // has one), then `clusters` in order. `values` owns the pins; blocks points
  // into it. bytes: stored bytes read.
  Status ReadBlocks(int layer, int kv_head, const std::vector<uint32_t>& clusters,
                    std::vector<rocksdb::PinnableSlice>* values, std::vector<RowBlock>* blocks,
                    uint64_t* bytes) const;

  const HeadData& head(int layer, int kv_head) const { return heads_[layer * info_.n_kv_heads + kv_head]; }
  IndexView View(int layer, int kv_head) const;
  // n_q_heads / n_kv_heads.
  int group_size() const { return info_.n_q_heads / info_.n_kv_heads; }

 private:
  ContextHandleImpl() = default;
  Status LoadHead(int layer, int kv_head, const std::string& bytes, HeadData* h) const;
  // Selection, read and attention of one KV head (o, lse: the group's rows).
  Status AttendHead(int layer, int kv_head, const float* q, int T, const SelectionParams& params, float* o,
                    float* lse, HeadStats* hs, double seconds[3]) const;
  std::string Where(int layer, int kv_head) const;

  storage::DBImpl* db_ = nullptr;
  ContextInfo info_;
  std::vector<HeadData> heads_;  // [n_layers * n_kv_heads]
};

}  // namespace sqz::query
