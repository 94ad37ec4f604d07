// Element types and non-owning tensor views shared by the whole API.
//
// Thread-safety: plain values; no shared state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sqz {

// Element type of stored keys and values.
// These values are part of the on-disk format and must never change.
enum class DType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
};

// Size of one element in bytes (4, 2, 2).
size_t DTypeSize(DType t);
// Safetensors spelling: "F32", "F16", "BF16".
const char* DTypeName(DType t);
// Parses the safetensors spelling; returns false for anything else.
bool ParseDType(std::string_view s, DType* out);

// A row-major tensor owned by someone else. `data` must stay valid while the
// view is used. Shapes are in elements; strides are implied (contiguous).
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
};

// "[a, b, c]" for error messages.
std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace sqz
