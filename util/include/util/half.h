// Conversions between float32 and the 16-bit storage types (IEEE fp16, bf16).
// Round-to-nearest-even on the way down; exact on the way up.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sqz/types.h"

namespace sqz {

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
inline float Bf16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
uint16_t FloatToBf16(float f);

// dst[i] = float(src[i]) for n elements of type `t`.
void ConvertToFloat(const void* src, DType t, size_t n, float* dst);
// dst[i] = t(src[i]) for n elements (rounded to nearest even).
void ConvertFromFloat(const float* src, size_t n, DType t, void* dst);
// True if every one of the n elements is finite.
bool AllFinite(const void* src, DType t, size_t n);

}  // namespace sqz
