// The CPU query engine behind sqz::ContextHandle (private to query/; the
// public API is include/sqz/query.h).
//
// Attend = Plan + Run, the two steps of the AttentionBackend seam:
// - Plan: per served KV head, score the group's query heads against the
//   centroids and select fine clusters (query/selection.h), then express the
//   selection as a SegmentTable (runs of rows of the stored order, the pages
//   they touch).
// - Run: per KV head, read the table's pages through the handle's storage
//   snapshot (one MultiGet) and compute exact attention of every query row
//   over its set's segments, straight from the stored pages (decode) or from
//   a float copy with BLAS (prefill) (query/attention.h).
//
// Device::kCuda: Open copies every page of the served heads and their index
// into GPU memory (gpu/resident.h). Calls the GPU engine takes (GQA union
// with one shared selection, or dense; G * T <= 64 query rows per KV head)
// run there whole: selection, segment table, attention; Plan then returns
// the device's table. Other calls run on the CPU over the same snapshot.
// AttendDevice is the GPU engine alone, on device tensors.
//
// Thread-safety: immutable after Open; every method is const and uses
// per-call scratch (buffers kept per thread between calls, never shared).
// Within one call the KV heads run in parallel for decode (OpenMP); results
// do not depend on the thread count.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu/resident.h"
#include "query/attention.h"
#include "query/selection.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "sqz/status.h"
#include "storage/store.h"
#include "util/guard.h"

namespace sqz::query {

// The index of one (layer, KV head) as the engine uses it.
struct HeadData {
  int32_t k2 = 0;
  int32_t k1 = 0;
  std::vector<float> fine_centroids;           // [k2, d]
  std::vector<uint32_t> fine_offsets;          // [k2 + 1] into the stored rows
  std::vector<uint32_t> fine_sizes;            // [k2]
  std::vector<float> coarse_centroids;         // [k1, d]
  std::vector<uint32_t> coarse_child_offsets;  // [k1 + 1] over fine ids
  std::vector<uint32_t> coarse_sizes;          // [k1]
};

// The attention seam: a plan step that turns queries into a SegmentTable
// (and says how much workspace the run needs) and a run step that executes
// a table. The CPU engine is the first implementation; the GPU engine the
// second.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual Status Plan(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* table,
                      size_t* workspace_bytes) const = 0;
  virtual Status Run(const SegmentTable& table, const float* q, float scale, float* o, float* lse,
                     AttendStats* stats) const = 0;
};

class ContextHandleImpl final : public ContextHandle, public AttentionBackend {
 public:
  static Status Open(DB* db, const std::string& name, const OpenOptions& options,
                     std::unique_ptr<ContextHandleImpl>* out);

  // --- ContextHandle ---------------------------------------------------------
  const ContextInfo& info() const override { return snap_->info(); }
  int device_id() const override { return resident_ ? resident_->device() : -1; }
  int kv_head_begin() const override { return head_begin_; }
  int kv_head_end() const override { return head_end_; }
  // Each entry point runs under util::Guarded: no exception escapes it.
  Status Attend(int layer, const float* q, int T, const QueryOptions& options, float* o, float* lse,
                AttendStats* stats = nullptr) const override {
    return util::Guarded("ContextHandle::Attend", [&] { return AttendUnguarded(layer, q, T, options, o, lse, stats); });
  }
  Status Plan(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* table) const override {
    return util::Guarded("ContextHandle::Plan", [&] { return PlanUnguarded(layer, q, T, options, table); });
  }
  Status ReadRows(int layer, int kv_head, int64_t first_row, int64_t n_rows, float* k, float* v,
                  uint64_t* bytes = nullptr) const override {
    return util::Guarded("ContextHandle::ReadRows",
                         [&] { return ReadRowsUnguarded(layer, kv_head, first_row, n_rows, k, v, bytes); });
  }
  Status DeviceWorkspaceBytes(int T, const QueryOptions& options, size_t* bytes) const override {
    return util::Guarded("ContextHandle::DeviceWorkspaceBytes",
                         [&] { return DeviceWorkspaceBytesUnguarded(T, options, bytes); });
  }
  Status AttendDevice(const DeviceAttendArgs& args, const QueryOptions& options) const override {
    return util::Guarded("ContextHandle::AttendDevice", [&] { return AttendDeviceUnguarded(args, options); });
  }
  Status AttendUnguarded(int layer, const float* q, int T, const QueryOptions& options, float* o, float* lse,
                         AttendStats* stats) const;
  Status PlanUnguarded(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* table) const;
  Status ReadRowsUnguarded(int layer, int kv_head, int64_t first_row, int64_t n_rows, float* k, float* v,
                           uint64_t* bytes) const;
  Status DeviceWorkspaceBytesUnguarded(int T, const QueryOptions& options, size_t* bytes) const;
  Status AttendDeviceUnguarded(const DeviceAttendArgs& args, const QueryOptions& options) const;

  // --- AttentionBackend --------------------------------------------------------
  // Workspace: the CPU engine keeps per-thread scratch; the figure reported is
  // the float rows a run may materialise (an upper bound, for planning).
  Status Plan(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* table,
              size_t* workspace_bytes) const override;
  Status Run(const SegmentTable& table, const float* q, float scale, float* o, float* lse,
             AttendStats* stats) const override;

  // InvalidArgument when an output row is not finite (scores overflowed fp32).
  Status CheckOutputs(int layer, const float* q, int T, const float* o, const float* lse) const;
  // Checks the layer, T, the pointer and that q [n_served_q_heads, T, d] is finite.
  Status CheckQueries(int layer, const float* q, int T) const;
  // Turns options into selection parameters (thresholds looked up).
  Status Resolve(const QueryOptions& options, SelectionParams* params) const;
  // kv_head: served-local index.
  const HeadData& head(int layer, int local_head) const { return heads_[layer * n_served() + local_head]; }
  IndexView View(int layer, int local_head) const;
  int group_size() const { return info().group_size(); }
  int n_served() const { return head_end_ - head_begin_; }

 private:
  ContextHandleImpl() = default;
  Status LoadHead(const storage::HeadIndexRecord& rec, HeadData* h) const;
  Status RunHead(const SegmentTable& table, int local_head, const float* q, float scale, float* o, float* lse,
                 HeadStats* hs, double seconds[2]) const;
  std::string Where(int layer, int kv_head) const;

  Status LoadResident(const OpenOptions& options);
  // Whether the GPU engine takes a call (resident handle, T small enough,
  // GQA union with one shared selection, or dense).
  bool OnDevice(const SelectionParams& params, int T) const;
  static gpu::SelectConfig DeviceConfig(const SelectionParams& params);
  // A whole call on the GPU from host arrays; the device's selection as a
  // table (and o / lse / stats when given).
  Status PlanResident(int layer, const float* q, int T, const SelectionParams& params, SegmentTable* table, float* o,
                      float* lse, AttendStats* stats) const;
  // Checks a device call and translates it for the GPU layer.
  Status DeviceCall(const DeviceAttendArgs& args, const QueryOptions& options, SelectionParams* params,
                    gpu::DeviceCall* call) const;

  std::unique_ptr<storage::ContextSnapshot> snap_;
  std::unique_ptr<gpu::ResidentKv> resident_;  // Device::kCuda: every served page in GPU memory
  int head_begin_ = 0, head_end_ = 0;
  std::vector<HeadData> heads_;  // [n_layers * n_served]
};

// Appends the segments of fine clusters `ids` (ascending) of head `h` to
// *out: runs of consecutive ids merged into one segment each.
void ClusterSegments(const HeadData& h, const std::vector<uint32_t>& ids, std::vector<Segment>* out);

}  // namespace sqz::query
