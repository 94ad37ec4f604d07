// Querying a context: sparse attention of query vectors over a stored context.
//
// For each query head the engine scores the KV head's centroids, selects the
// clusters that will get attention mass (threshold or budget, flat or
// hierarchical), reads only their key/value blocks, and computes exact softmax
// attention over the selected keys plus the always-attended window and sinks.
// It returns the output O and the log-sum-exp LSE (natural log) so a caller
// can merge it with attention over its own tokens (MergeAttentionStates).
//
// Consistency: a handle reads one version of its context for its whole life
// (a storage snapshot): replacing or dropping the context while it is open
// never gives it an error or a mix; it keeps answering from the version it
// opened, and the space is reclaimed after the last such handle closes.
//
// Thread-safety: a ContextHandle is immutable after Open; Attend, Plan and
// ReadRows may be called from many threads at once. The DB must outlive
// every handle opened on it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/status.h"

namespace sqz {

enum class SelectionMode : uint8_t {
  kDense = 0,      // attend every fixed key (exact dense attention)
  kBudget = 1,     // keep clusters by decreasing estimated mass up to `budget`
  kThreshold = 2,  // keep clusters whose per-key estimated probability > tau
};

enum class GqaPolicy : uint8_t {
  // Budget mode: the group selects jointly (mean estimated mass over its
  // query heads), so `budget` bounds the keys read per KV head. Threshold
  // mode: each query head attends the union of its group's selections.
  kUnion = 0,
  kPerHead = 1,  // each query head attends its own selection (reads: the union)
};

struct QueryOptions {
  SelectionMode mode = SelectionMode::kBudget;
  // Budget mode: fraction of the clustered keys to keep (0..1]. 1 = dense.
  // Per KV head under kUnion (the keys read); per query head under kPerHead.
  double budget = 0.125;
  // Threshold mode: use the context's calibrated thresholds at this quantile
  // (must be one the context was calibrated for) when >= 0; otherwise the
  // explicit `threshold` (flat) / `threshold_coarse` + `threshold` (hier).
  double threshold_quantile = -1;
  float threshold = 0;
  float threshold_coarse = 0;
  // Two-level lookup: coarse centroids first, then only children of kept
  // coarse clusters. In budget mode the coarse level keeps
  // min(1, coarse_budget_factor * budget) of the keys.
  bool hierarchical = false;
  double coarse_budget_factor = 2.0;
  GqaPolicy gqa = GqaPolicy::kUnion;
  // Prefill (T > 1): false = one selection per head shared by the T queries
  // (mean of the estimated probabilities); true = each query selects alone.
  bool per_query_selection = false;
  // Softmax scale; 0 means 1/sqrt(head_dim).
  float softmax_scale = 0;
};

enum class Device : uint8_t {
  kCpu = 0,   // the CPU engine (the reference implementation)
  kCuda = 1,  // the GPU engine (CUDA; see the GPU issue)
};

// Where a handle keeps the KV pages it attends over.
enum class Residency : uint8_t {
  kStorage = 0,  // read from the database (its block cache) per call
  kDevice = 1,   // every page of the served heads copied to GPU memory at Open
};

struct OpenOptions {
  Device device = Device::kCpu;
  int device_id = 0;  // CUDA device ordinal (kCuda)
  // The KV heads this handle serves: [kv_head_begin, kv_head_end), -1 = up
  // to n_kv_heads. A tensor-parallel rank opens only its heads: only their
  // index is loaded and Attend's q / o / lse cover only their query heads
  // (query heads kv_head_begin * G .. kv_head_end * G - 1, G = group size).
  int kv_head_begin = 0;
  int kv_head_end = -1;
  Residency residency = Residency::kStorage;
  // kCuda: bytes of GPU memory for KV pages; 0 = every served page resident.
  size_t device_cache_bytes = 0;
};

// A run of rows of one (layer, KV head). Rows are numbered in the stored
// (permuted) order: [0, n_clustered) the clustered keys, fine clusters
// contiguous; [n_clustered, n_tokens) the always set (sinks then window).
struct Segment {
  uint32_t first_row = 0;
  uint32_t n_rows = 0;
};

// A selection as the engines execute it (docs/SEMANTICS.md, "Segment
// table"): what every query row attends and which pages are read. The CPU
// engine produces and consumes exactly this table; the GPU engine is tested
// against it run by run. Heads are the handle's served heads, numbered from
// 0 (KV head kv_head_begin + h).
struct SegmentTable {
  int layer = 0;
  int T = 0;
  int group_size = 0;  // G: query heads per KV head
  int n_kv_heads = 0;  // served KV heads
  int page_rows = 0;
  // Attended sets: set s is segments[set_offsets[s] .. set_offsets[s + 1]),
  // ascending, disjoint and non-adjacent (adjacent clusters are merged), the
  // always set last; set_kv_head[s] is its served KV head.
  std::vector<uint32_t> set_offsets;  // [n_sets + 1]
  std::vector<Segment> segments;
  std::vector<int32_t> set_kv_head;  // [n_sets]
  // [n_kv_heads * G * T]: the set attended by query row (h * G + g) * T + t
  // (served KV head h, its g-th query head, query t).
  std::vector<int32_t> row_set;
  // Per served KV head: the union of its sets (what is read), as segments
  // and as the pages they touch (ascending page ids).
  std::vector<uint32_t> read_offsets;  // [n_kv_heads + 1]
  std::vector<Segment> read_segments;
  std::vector<uint32_t> page_offsets;  // [n_kv_heads + 1]
  std::vector<uint32_t> pages;
  // Per served KV head: centroid dot products per query, fine clusters read.
  std::vector<int64_t> clusters_scored;
  std::vector<int64_t> clusters_read;

  int n_sets() const { return set_offsets.empty() ? 0 : static_cast<int>(set_offsets.size()) - 1; }
};

// Layout of query / output tensors in device memory.
enum class TensorLayout : uint8_t {
  kHeadMajor = 0,   // [heads, T, head_dim]
  kTokenMajor = 1,  // [T, heads, head_dim] (what serving stacks hold)
};

// One Attend on tensors in GPU memory (ContextHandle::AttendDevice): the
// whole call (query conversion, centroid scoring, selection, segment table,
// sparse attention, merge) is enqueued on `stream`; nothing is allocated and
// the host is never synchronised inside the call, so it can be captured in a
// CUDA graph. q must be finite (the device call does not check it: a NaN in
// q gives NaN in O). docs/SEMANTICS.md, "Device call".
struct DeviceAttendArgs {
  int layer = 0;
  int T = 0;
  const void* q = nullptr;  // served query heads, `dtype`, `layout`
  void* o = nullptr;        // same shape, dtype and layout as q
  float* lse = nullptr;     // [heads, T] (kHeadMajor) or [T, heads] (kTokenMajor)
  DType dtype = DType::kBF16;
  TensorLayout layout = TensorLayout::kTokenMajor;
  bool lse_base2 = false;     // false: natural log (ours); true: log2 (FlashInfer-style states)
  void* workspace = nullptr;  // DeviceWorkspaceBytes() bytes of device memory
  size_t workspace_bytes = 0;
  void* stream = nullptr;  // cudaStream_t
};

// Statistics of one Attend call for one KV head.
struct HeadStats {
  int64_t keys_selected = 0;    // clustered keys read (union over the group)
  int64_t keys_attended = 0;    // keys attended incl. window and sinks, summed over the group's query heads and queries
  int64_t clusters_scored = 0;  // centroid dot products per query (coarse + fine)
  int64_t clusters_selected = 0;  // fine clusters read
  int64_t segments_read = 0;      // row runs read (always set included)
  int64_t pages_read = 0;         // KV pages read
  uint64_t bytes_read = 0;        // K+V bytes of the pages read (stored dtype, padding included)
};

struct AttendStats {
  std::vector<HeadStats> heads;  // per KV head
  // Stage times are summed over KV heads, which run in parallel for decode:
  // they are thread-seconds (compare them with each other, not with wall time).
  double seconds_score = 0;   // centroid scoring + selection
  double seconds_read = 0;    // page reads from storage / cache
  double seconds_attend = 0;  // attention over the selected keys
  int64_t keys_selected() const;
  uint64_t bytes_read() const;
};

class ContextHandle {
 public:
  // Opens context `name` as of now: takes a consistent snapshot of it and
  // loads the index of the served heads. NotFound if the context does not
  // exist; InvalidArgument for a bad head range; NotSupported for a device
  // this build or this implementation lacks.
  static Status Open(DB* db, const std::string& name, const OpenOptions& options, std::unique_ptr<ContextHandle>* out);
  static Status Open(DB* db, const std::string& name, std::unique_ptr<ContextHandle>* out);

  virtual ~ContextHandle() = default;
  virtual const ContextInfo& info() const = 0;
  // The generation of the version this handle reads (ContextInfo::id): a
  // cache keyed by it never mixes two versions of a context.
  uint64_t generation() const { return info().id; }
  // The CUDA device a GPU handle's context lives on; -1 for a CPU handle.
  virtual int device_id() const { return -1; }
  virtual int kv_head_begin() const = 0;
  virtual int kv_head_end() const = 0;
  int n_served_q_heads() const { return (kv_head_end() - kv_head_begin()) * info().group_size(); }

  // Attention for one layer.
  //   q:   [n_served_q_heads, T, head_dim] float32, row-major (post-RoPE queries)
  //   o:   [n_served_q_heads, T, head_dim] float32 (written)
  //   lse: [n_served_q_heads, T] float32 (written; natural log)
  // Errors: InvalidArgument for a layer out of range, T < 1, NaN/Inf in q,
  // finite queries so large that attention scores overflow (never a NaN
  // answer with OK),
  // a threshold quantile the context lacks, or an uncalibrated context in
  // threshold-quantile mode; IOError/Corruption from storage; Aborted when
  // memory runs out (no exception leaves any call of this API).
  virtual Status Attend(int layer, const float* q, int T, const QueryOptions& options, float* o, float* lse,
                        AttendStats* stats = nullptr) const = 0;

  // The selection Attend makes for these queries, as a segment table (the
  // plan step; Attend = Plan + run). Same arguments and errors as Attend.
  virtual Status Plan(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* table) const = 0;

  // Reads rows [first_row, first_row + n_rows) of (layer, kv_head) (absolute
  // KV head id, one this handle serves; rows as in Segment) converted to
  // float32: k, v [n_rows, head_dim]. *bytes (optional): stored bytes of the
  // pages read.
  virtual Status ReadRows(int layer, int kv_head, int64_t first_row, int64_t n_rows, float* k, float* v,
                          uint64_t* bytes = nullptr) const = 0;

  // Device call (GPU handles). Workspace bytes for T queries and `options`.
  // A CPU handle returns NotSupported; so does a GPU handle for what the GPU
  // engine does not take yet: T > 2^20 / G, GqaPolicy::kPerHead, per-query
  // selection with T > 1 (Attend runs those on the CPU). Above 64 / G
  // queries (prefill) the call runs on tensor cores, with the queries and
  // softmax weights rounded to the context's 16-bit type
  // (docs/SEMANTICS.md).
  virtual Status DeviceWorkspaceBytes(int T, const QueryOptions& options, size_t* bytes) const;
  // Enqueues the call; argument errors are returned before anything is
  // enqueued. The workspace must not be used by another call in flight.
  virtual Status AttendDevice(const DeviceAttendArgs& args, const QueryOptions& options) const;
};

// One request of a batch: its handle (context), tensors, workspace and options.
struct DeviceBatchItem {
  const ContextHandle* handle = nullptr;
  DeviceAttendArgs args;  // args.stream is ignored: the batch's stream is used
  QueryOptions options;
};

// Enqueues every request after what `stream` (cudaStream_t) holds: all
// requests are checked first, so on an error nothing is enqueued; they run
// concurrently on side streams forked from `stream` and joined back into it
// (a CUDA graph capture of the call records parallel branches). Each request
// needs its own workspace; all handles must live on one device, `stream`'s.
Status AttendDeviceBatch(const std::vector<DeviceBatchItem>& items, void* stream);

// The device form of MergeAttentionStates: o_* [n, head_dim] of `dtype` (F32,
// F16, BF16) and lse_* [n] fp32 in GPU memory, in place into a; lse in base 2
// with lse_base2 (FlashInfer-style states), natural log otherwise. Enqueued on
// `stream`; no allocation, no synchronisation. NotSupported without CUDA.
Status MergeAttentionStatesDevice(void* o_a, float* lse_a, const void* o_b, const float* lse_b, int64_t n, int head_dim,
                                  DType dtype, bool lse_base2, void* stream);

// Merges attention state (o_b, lse_b) into (o_a, lse_a), in place:
//   lse = log(e^lse_a + e^lse_b), o = (e^lse_a o_a + e^lse_b o_b) / e^lse.
// o_*: [n, head_dim]; lse_*: [n]. An empty state has lse = -inf (its o is
// ignored); merging two empty states gives an empty state with o = 0.
void MergeAttentionStates(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n, int head_dim);

}  // namespace sqz
