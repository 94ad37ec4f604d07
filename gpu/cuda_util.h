// Small CUDA helpers shared by the gpu/ .cu files (private to gpu/).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "sparse_decode.cuh"
#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::gpu {

inline Status CudaError(cudaError_t e, const char* what) {
  return Status::IOError(std::string("CUDA: ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                         ")");
}

#define SQZ_CUDA_TRY(expr, what)                       \
  do {                                                 \
    cudaError_t _e = (expr);                           \
    if (_e != cudaSuccess) return CudaError(_e, what); \
  } while (0)

// Checks what the decode kernels support.
Status CheckDecodeShape(int head_dim, int group_size, DType dtype);

// Thread blocks per KV head: enough to fill the GPU (about 4 per SM in all),
// at least 64 rows each.
int DecodeSplits(int sm_count, int n_heads, uint32_t max_rows);

// Launches the decode kernels for p (pages, tables, segments, q, o, lse,
// workspace filled in) on `stream`.
cudaError_t LaunchDecode(const DecodeParams& p, DType dtype, int head_dim, cudaStream_t stream);

// Host segment arrays in the kernel's form: per-segment rows_before, per-head
// total rows; returns the most rows of one head.
uint32_t PrepareSegments(const std::vector<uint32_t>& offsets, const std::vector<uint32_t>& n_rows,
                         std::vector<uint32_t>* before, std::vector<uint32_t>* head_rows);

}  // namespace sqz::gpu
