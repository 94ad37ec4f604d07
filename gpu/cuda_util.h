// Small CUDA helpers shared by the gpu/ .cu files (private to gpu/).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "select.cuh"
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

// Checks what the GPU engine supports.
Status CheckDecodeShape(int head_dim, int group_size, DType dtype);

}  // namespace sqz::gpu
