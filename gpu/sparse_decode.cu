#include "cuda_util.h"

namespace sqz::gpu {

Status CheckDecodeShape(int head_dim, int group_size, DType dtype) {
  if (head_dim != 64 && head_dim != 128) return Status::NotSupported("GPU engine: head_dim must be 64 or 128");
  if (group_size < 1 || group_size > kMaxSelectRows) {
    return Status::NotSupported("GPU engine: the GQA group size must be 1.." + std::to_string(kMaxSelectRows));
  }
  if (dtype != DType::kF16 && dtype != DType::kBF16) {
    return Status::NotSupported(
        "GPU engine: the context stores F32 keys and values, the GPU engine takes F16 or BF16 (build the context from "
        "F16/BF16 tensors, e.g. python -m squeeze.hf export --kv-dtype float16)");
  }
  return Status::OK();
}

}  // namespace sqz::gpu
