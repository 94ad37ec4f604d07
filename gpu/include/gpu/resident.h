// KV pages of a context resident in GPU memory, and decode over them.
//
// A ResidentKv owns one device buffer holding every page of the served KV
// heads of every layer, in the stored page layout (docs/FORMAT.md): page p of
// served head h of layer l is slot (l * n_heads + h) * pages_per_head + p.
// Decode takes the read segments of each served head (host arrays, as in a
// SegmentTable), uploads them with the queries, runs the sparse decode
// kernels (gpu/sparse_decode.cuh) on the object's stream and copies O and
// LSE back. Plain C++ header (no CUDA types); the kernels and their launcher
// (stream, caller workspace, no allocation) are gpu/sparse_decode.cuh.
//
// Thread-safety: Upload and Decode are serialised internally (one stream,
// one workspace); a ResidentKv may be shared by threads.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::gpu {

// What one Decode ran, when asked for.
struct DecodeRun {
  int splits = 0;        // thread blocks per KV head
  double kernel_ms = 0;  // both kernels, between CUDA events
};

struct ResidentShape {
  int n_layers = 0;
  int n_heads = 0;  // served KV heads
  int64_t pages_per_head = 0;
  int page_rows = 0;
  int head_dim = 0;  // 64 or 128
  DType dtype = DType::kF16;
  int64_t n_clustered = 0;
  int64_t clustered_pages = 0;
};

// The read segments of the served heads of one layer: head h attends
// runs [offsets[h], offsets[h + 1]) of (first_row, n_rows).
struct HostSegments {
  std::vector<uint32_t> offsets;
  std::vector<uint32_t> first_row;
  std::vector<uint32_t> n_rows;
};

class ResidentKv {
 public:
  // Allocates the page buffer on `device`. NotSupported without CUDA, without
  // that device, or for an unsupported shape; IOError (named) when the device
  // has too little memory.
  static Status Create(int device, const ResidentShape& shape, std::unique_ptr<ResidentKv>* out);
  virtual ~ResidentKv() = default;

  virtual const ResidentShape& shape() const = 0;
  virtual uint64_t bytes() const = 0;  // device bytes of the page buffer

  // Copies n_pages pages (contiguous host bytes, page after page) to pages
  // first_page .. first_page + n_pages - 1 of (layer, head).
  virtual Status Upload(int layer, int head, int64_t first_page, const void* data, int64_t n_pages) = 0;

  // Decode (T = 1) of one layer: q [n_heads * G, head_dim] -> o, lse
  // (natural log), all host memory. G is 1..8. With `run`, the kernels are
  // timed (two CUDA events more).
  virtual Status Decode(int layer, const HostSegments& segments, int group_size, float scale, const float* q, float* o,
                        float* lse, DecodeRun* run = nullptr) = 0;
};

}  // namespace sqz::gpu
