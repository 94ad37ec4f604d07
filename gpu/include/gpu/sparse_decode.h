// Sparse decode attention on the GPU over KV pages (the first kernel of the
// GPU engine; docs/ARCHITECTURE.md, "Seams").
//
// One decode step (T = 1) of one layer: every KV head h attends the rows of
// its segments (SegmentTable read segments: one attended set per KV head, the
// GQA-union default) for its G query heads. K and V come from pages in the
// stored layout (docs/FORMAT.md, "KV pages"). fp32 accumulation; the rows of
// a head are split across thread blocks (partial (o, m, l) states merged in
// a second kernel), so one request fills the GPU.
//
// This header is plain C++ (no CUDA types): the host-level entry uploads,
// runs and downloads, for tests and tools. The launcher for device-resident
// data (stream, caller workspace, no allocation) is gpu/sparse_decode.cuh.
//
// Thread-safety: SparseDecodeOnDevice may be called from several threads; each
// call uses its own stream and buffers.
#pragma once

#include <cstdint>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::gpu {

// One KV head of a decode problem, in host memory.
struct HostDecodeHead {
  // The head's pages: pages[i] has 2 * page_rows * head_dim elements of
  // `dtype` (K plane then V plane); page_ids[i] is its page id.
  std::vector<const void*> pages;
  std::vector<uint32_t> page_ids;
  // Attended rows: runs (first_row, n_rows) of the head's stored rows; every
  // row's page is among page_ids.
  std::vector<uint32_t> first_row;
  std::vector<uint32_t> n_rows;
};

struct HostDecodeProblem {
  int head_dim = 0;           // 64 or 128
  int group_size = 0;         // G query heads per KV head, 1..8
  int page_rows = 0;          // P
  DType dtype = DType::kF16;  // kF16 or kBF16
  int64_t n_clustered = 0;    // rows [0, n_clustered) are clustered, the rest the always set
  int64_t clustered_pages = 0;
  float scale = 0;  // softmax scale
  std::vector<HostDecodeHead> heads;
  const float* q = nullptr;  // [heads * G, head_dim]
};

struct DecodeRun {
  int splits = 0;        // thread blocks per KV head
  double kernel_ms = 0;  // both kernels, CUDA events
};

// Runs the problem on device 0: o [heads * G, head_dim], lse [heads * G]
// (natural log). NotSupported without a GPU or for an unsupported shape
// (head_dim, G, dtype); IOError for a CUDA error (named).
Status SparseDecodeOnDevice(const HostDecodeProblem& p, float* o, float* lse, DecodeRun* run = nullptr);

}  // namespace sqz::gpu
