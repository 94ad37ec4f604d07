#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_util.h"

namespace sqz::gpu {

Status CheckDecodeShape(int head_dim, int group_size, DType dtype) {
  if (head_dim != 64 && head_dim != 128) return Status::NotSupported("GPU decode: head_dim must be 64 or 128");
  if (group_size < 1 || group_size > kMaxGroup) return Status::NotSupported("GPU decode: group size must be 1..8");
  if (dtype != DType::kF16 && dtype != DType::kBF16) {
    return Status::NotSupported("GPU decode: dtype must be F16 or BF16");
  }
  return Status::OK();
}

int DecodeSplits(int sm_count, int n_heads, uint32_t max_rows) {
  const int want = std::max(1, 4 * std::max(1, sm_count) / std::max(1, n_heads));
  return std::max(1, std::min<int>(want, static_cast<int>((max_rows + 63) / 64)));
}

cudaError_t LaunchDecode(const DecodeParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  const bool half = dtype == DType::kF16;
  if (head_dim == 64) {
    return half ? LaunchSparseDecode<__half, 64>(p, stream) : LaunchSparseDecode<__nv_bfloat16, 64>(p, stream);
  }
  return half ? LaunchSparseDecode<__half, 128>(p, stream) : LaunchSparseDecode<__nv_bfloat16, 128>(p, stream);
}

uint32_t PrepareSegments(const std::vector<uint32_t>& offsets, const std::vector<uint32_t>& n_rows,
                         std::vector<uint32_t>* before, std::vector<uint32_t>* head_rows) {
  before->assign(n_rows.size(), 0);
  head_rows->clear();
  uint32_t max_rows = 0;
  for (size_t h = 0; h + 1 < offsets.size(); ++h) {
    uint32_t rows = 0;
    for (uint32_t s = offsets[h]; s < offsets[h + 1]; ++s) {
      (*before)[s] = rows;
      rows += n_rows[s];
    }
    head_rows->push_back(rows);
    max_rows = std::max(max_rows, rows);
  }
  return max_rows;
}

}  // namespace sqz::gpu
