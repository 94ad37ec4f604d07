// A context resident in GPU memory, and the GPU engine over it.
//
// A ResidentKv owns one device buffer holding every page of the served KV
// heads of every layer, in the stored page layout (docs/FORMAT.md): page p of
// served head h of layer l is slot (l * n_heads + h) * pages_per_head + p;
// and the index of those heads (fine and coarse centroids in fp32, cluster
// offsets, parents), flattened per (layer, head).
//
// Attend enqueues one layer's whole query on a stream: queries converted and
// scaled, centroid scoring (flat, or coarse then the children of kept coarse
// clusters), selection (budget or threshold) and the segment table built on
// the device (gpu/select.cuh), sparse attention over the segments and the
// merge of its splits (gpu/sparse_decode.cuh), O in the caller's dtype and
// layout, LSE natural or base 2. Nothing is allocated and the host is not
// synchronised: a serving stack can capture it in a CUDA graph. The caller
// gives the workspace (WorkspaceBytes).
//
// Plain C++ header (no CUDA types); the kernels and their launchers are the
// .cuh files of gpu/.
//
// Thread-safety: Attend is const and may run on many threads with distinct
// workspaces; Upload / SetIndex / FinishIndex happen before (at open);
// AttendHost serialises on an internal mutex (it uses the object's own
// buffers and stream).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::gpu {

// Calls with more query rows per KV head (G * T) than this take the prefill
// kernels (gpu/prefill.cuh): tensor cores, with the queries, the centroids
// and the softmax weights rounded to the context's 16-bit element type.
inline constexpr int kDecodeMaxRows = 64;

struct ResidentShape {
  int n_layers = 0;
  int n_heads = 0;  // served KV heads
  int group = 1;    // query heads per KV head
  int64_t pages_per_head = 0;
  int page_rows = 0;
  int head_dim = 0;  // 64 or 128
  DType dtype = DType::kF16;
  int64_t n_clustered = 0;
  int64_t n_always = 0;
  int64_t clustered_pages = 0;
};

// The index of one (layer, served head), host memory (copied by SetIndex).
struct HeadIndexHost {
  int32_t k2 = 0, k1 = 0;
  const float* fine_centroids = nullptr;           // [k2, D]
  const uint32_t* fine_offsets = nullptr;          // [k2 + 1] stored rows
  const float* coarse_centroids = nullptr;         // [k1, D]
  const uint32_t* coarse_child_offsets = nullptr;  // [k1 + 1] fine ids
};

// The selection rule of one call, resolved (thresholds looked up).
struct SelectConfig {
  int mode = 1;  // 0 dense, 1 budget (joint over the GQA group), 2 threshold (union over the group)
  bool hierarchical = false;
  double budget = 0.125;
  double coarse_budget_factor = 2.0;
  float tau_flat = 0, tau_coarse = 0, tau_fine = 0;
  float scale = 0;  // softmax scale (> 0)
};

// One call on device tensors. q / o: the served query heads, `dtype`
// (kF32, kF16, kBF16), [heads, T, D] or, token_major, [T, heads, D]; lse:
// [heads, T] or [T, heads] fp32.
struct DeviceCall {
  int layer = 0;
  int T = 1;
  const void* q = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  DType dtype = DType::kBF16;
  bool token_major = true;
  bool lse_base2 = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  void* stream = nullptr;  // cudaStream_t; null = the legacy default stream
};

// What a call selected, per served head (AttendHost with a selection out).
struct DeviceSelection {
  std::vector<uint32_t> seg_offsets;  // [H + 1]
  std::vector<uint32_t> seg_first, seg_rows;
  std::vector<int64_t> clusters_scored, clusters_kept;
};

class ResidentKv {
 public:
  // Allocates the page buffer on `device`. NotSupported without CUDA, without
  // that device, or for an unsupported shape; IOError (named) when the device
  // has too little memory.
  static Status Create(int device, const ResidentShape& shape, std::unique_ptr<ResidentKv>* out);
  virtual ~ResidentKv() = default;

  virtual const ResidentShape& shape() const = 0;
  virtual uint64_t bytes() const = 0;  // device bytes of pages and index
  virtual int device() const = 0;

  // Copies n_pages pages (contiguous host bytes, page after page) to pages
  // first_page .. first_page + n_pages - 1 of (layer, head).
  virtual Status Upload(int layer, int head, int64_t first_page, const void* data, int64_t n_pages) = 0;
  // Stages the index of (layer, head); FinishIndex copies every head's to
  // the device (all must have been set). Attend needs it.
  virtual Status SetIndex(int layer, int head, const HeadIndexHost& index) = 0;
  virtual Status FinishIndex() = 0;

  // Largest T Attend takes (G * T query rows per KV head <= 2^20; above
  // kDecodeMaxRows the prefill kernels).
  virtual int MaxT() const = 0;
  // Workspace bytes of a call with T queries under `config`.
  virtual Status WorkspaceBytes(int T, const SelectConfig& config, size_t* bytes) const = 0;
  // Enqueues one call on call.stream (see the header comment). Argument errors
  // are returned before anything is enqueued; kernel errors are the stream's.
  virtual Status Attend(const DeviceCall& call, const SelectConfig& config) const = 0;
  // The same with host fp32 arrays ([heads, T, D] head-major): copies in,
  // attends, copies out, synchronises; with `selection`, what was selected.
  virtual Status AttendHost(int layer, int T, const float* q, const SelectConfig& config, float* o, float* lse,
                            DeviceSelection* selection = nullptr) = 0;
};

}  // namespace sqz::gpu
