#include "util/half.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace sqz {

namespace {
inline uint16_t Load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
}  // namespace

float HalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

uint16_t FloatToHalf(float f) {
  // F16C rounds to nearest even with _MM_FROUND_TO_NEAREST_INT; NaN stays NaN.
  // (The vector form of _cvtss_sh: clang's _cvtss_sh is a macro with a
  // compound literal, which -Wpedantic refuses in C++.)
  return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0));
}

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

void ConvertToFloat(const void* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16: {
      // `src` may be unaligned (RocksDB values are): byte-wise loads only.
      const uint8_t* s = static_cast<const uint8_t*>(src);
      size_t i = 0;
      for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
      for (; i < n; ++i) dst[i] = HalfToFloat(Load16(s + 2 * i));
      return;
    }
    case DType::kBF16: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      size_t i = 0;
      for (; i + 8 <= n; i += 8) {
        // bf16 -> f32 is a 16-bit left shift of the bit pattern.
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      for (; i < n; ++i) dst[i] = Bf16ToFloat(Load16(s + 2 * i));
      return;
    }
  }
}

void ConvertFromFloat(const float* src, size_t n, DType t, void* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      size_t i = 0;
      for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      }
      for (; i < n; ++i) d[i] = FloatToHalf(src[i]);
      return;
    }
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToBf16(src[i]);
      return;
    }
  }
}

bool AllFinite(const void* src, DType t, size_t n) {
  switch (t) {
    case DType::kF32: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      uint32_t bad = 0;
      for (size_t i = 0; i < n; ++i) bad |= ((Load32(s + 4 * i) & 0x7f800000u) == 0x7f800000u);
      return bad == 0;
    }
    case DType::kF16: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      uint32_t bad = 0;
      for (size_t i = 0; i < n; ++i) bad |= ((Load16(s + 2 * i) & 0x7c00u) == 0x7c00u);
      return bad == 0;
    }
    case DType::kBF16: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      uint32_t bad = 0;
      for (size_t i = 0; i < n; ++i) bad |= ((Load16(s + 2 * i) & 0x7f80u) == 0x7f80u);
      return bad == 0;
    }
  }
  return false;
}

}  // namespace sqz
