// Conversions between float32 and fp16 / bf16, checked against reference
// formulas written independently of util/half.cc (plain arithmetic in double,
// no F16C, no bit tricks shared with the implementation).

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "util/half.h"

namespace sqz {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Value of fp16 bits by the IEEE 754 definition (NaN for every NaN pattern).
double RefHalfValue(uint16_t h) {
  const int sign = h >> 15;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);  // subnormal (or zero)
  } else if (exp == 31) {
    v = mant == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  }
  return sign ? -v : v;
}

// Value of bf16 bits: 8-bit exponent, 7-bit mantissa. With `unbounded`, an
// all-ones exponent is read as an ordinary binade (2^128 for 0x7f80), which is
// what rounding needs to decide overflow.
double RefBf16Value(uint16_t b, bool unbounded = false) {
  const int sign = b >> 15;
  const int exp = (b >> 7) & 0xff;
  const int mant = b & 0x7f;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -133);
  } else if (exp == 255 && !unbounded) {
    v = mant == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<double>(128 + mant), exp - 134);
  }
  return sign ? -v : v;
}

// Round-to-nearest-even of a finite float to bf16, decided by comparing
// distances in double (exact: every operand fits in 53 bits).
uint16_t RefFloatToBf16(float f) {
  const uint32_t u = Bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation toward zero
  if ((u & 0xffff) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // next away from zero
  const double x = std::fabs(static_cast<double>(f));
  const double dlo = x - std::fabs(RefBf16Value(lo));
  const double dhi = std::fabs(RefBf16Value(hi, /*unbounded=*/true)) - x;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

bool HalfIsNan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool Bf16IsNan(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

TEST(HalfTest, HalfToFloatExhaustive) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const double ref = RefHalfValue(static_cast<uint16_t>(h));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    } else {
      // Bit comparison also distinguishes -0 from +0.
      ASSERT_EQ(Bits(f), Bits(static_cast<float>(ref))) << std::hex << h;
    }
  }
}

TEST(HalfTest, RoundTripExhaustive) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = FloatToHalf(HalfToFloat(static_cast<uint16_t>(h)));
    if (HalfIsNan(static_cast<uint16_t>(h))) {
      EXPECT_TRUE(HalfIsNan(back)) << std::hex << h;
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

// For every pair of adjacent finite fp16 values of the same sign: the float
// midpoint rounds to the even one, and one float ulp either side of it rounds
// to the nearer one. This covers every rounding boundary of the format.
TEST(HalfTest, RoundsToNearestEvenAtEveryBoundary) {
  for (uint32_t sign = 0; sign <= 0x8000; sign += 0x8000) {
    for (uint32_t m = 0; m < 0x7bff; ++m) {  // 0x7bff is the largest finite
      const uint16_t a = static_cast<uint16_t>(sign | m);
      const uint16_t b = static_cast<uint16_t>(sign | (m + 1));
      const float fa = HalfToFloat(a), fb = HalfToFloat(b);
      const float mid = static_cast<float>((static_cast<double>(fa) + fb) / 2);  // exact in float
      const uint16_t even = (m & 1) ? b : a;
      ASSERT_EQ(FloatToHalf(mid), even) << std::hex << m;
      ASSERT_EQ(FloatToHalf(std::nextafter(mid, fa)), a) << std::hex << m;
      ASSERT_EQ(FloatToHalf(std::nextafter(mid, fb)), b) << std::hex << m;
    }
  }
}

TEST(HalfTest, KnownCases) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(0.5f), 0x3800);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);  // largest finite
  // Ties to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10.
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
  // Overflow: 65520 is halfway between 65504 and 65536 (= inf): even is inf.
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  // Subnormals and underflow.
  EXPECT_EQ(FloatToHalf(0x1p-24f), 0x0001);
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);  // tie -> 0 (even)
  EXPECT_EQ(FloatToHalf(0x1p-25f * 1.0001f), 0x0001);
  EXPECT_EQ(FloatToHalf(3 * 0x1p-25f), 0x0002);  // tie between 1 and 2 -> 2
  EXPECT_EQ(FloatToHalf(0x1p-14f), 0x0400);      // smallest normal
  EXPECT_EQ(FloatToHalf(1e-10f), 0x0000);
  EXPECT_EQ(FloatToHalf(-1e-10f), 0x8000);
  // Inf and NaN.
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(HalfIsNan(FloatToHalf(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(HalfIsNan(FloatToHalf(-std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lives only in the low float bits must stay NaN, not
  // become infinity.
  EXPECT_TRUE(HalfIsNan(FloatToHalf(FromBits(0x7f800001u))));
  EXPECT_TRUE(HalfIsNan(FloatToHalf(FromBits(0x7fc00000u))));
}

TEST(Bf16Test, Bf16ToFloatExhaustive) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    const double ref = RefBf16Value(static_cast<uint16_t>(b));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << b;
    } else {
      ASSERT_EQ(Bits(f), Bits(static_cast<float>(ref))) << std::hex << b;
    }
  }
}

TEST(Bf16Test, RoundTripExhaustive) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t back = FloatToBf16(Bf16ToFloat(static_cast<uint16_t>(b)));
    if (Bf16IsNan(static_cast<uint16_t>(b))) {
      EXPECT_TRUE(Bf16IsNan(back)) << std::hex << b;
    } else {
      ASSERT_EQ(back, b) << std::hex << b;
    }
  }
}

TEST(Bf16Test, RoundsToNearestEvenAtEveryBoundary) {
  for (uint32_t sign = 0; sign <= 0x8000; sign += 0x8000) {
    for (uint32_t m = 0; m < 0x7f7f; ++m) {  // 0x7f7f is the largest finite
      const uint16_t a = static_cast<uint16_t>(sign | m);
      const uint16_t b = static_cast<uint16_t>(sign | (m + 1));
      const float fa = Bf16ToFloat(a), fb = Bf16ToFloat(b);
      const float mid = static_cast<float>((static_cast<double>(fa) + fb) / 2);
      const uint16_t even = (m & 1) ? b : a;
      ASSERT_EQ(FloatToBf16(mid), even) << std::hex << m;
      ASSERT_EQ(FloatToBf16(std::nextafter(mid, fa)), a) << std::hex << m;
      ASSERT_EQ(FloatToBf16(std::nextafter(mid, fb)), b) << std::hex << m;
    }
  }
}

TEST(Bf16Test, MatchesReferenceOnRandomFloats) {
  std::mt19937_64 rng(12345);
  for (int i = 0; i < 2000000; ++i) {
    const float f = FromBits(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) {
      ASSERT_TRUE(Bf16IsNan(FloatToBf16(f))) << std::hex << Bits(f);
      continue;
    }
    ASSERT_EQ(FloatToBf16(f), RefFloatToBf16(f)) << std::hex << Bits(f);
  }
}

TEST(Bf16Test, KnownCases) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);  // tie -> even
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  // NaNs whose payload is only in the low 16 bits must not turn into inf.
  EXPECT_TRUE(Bf16IsNan(FloatToBf16(FromBits(0x7f800001u))));
  EXPECT_TRUE(Bf16IsNan(FloatToBf16(FromBits(0xff800001u))));
  EXPECT_TRUE(Bf16IsNan(FloatToBf16(FromBits(0x7fffffffu))));
  EXPECT_TRUE(Bf16IsNan(FloatToBf16(std::numeric_limits<float>::quiet_NaN())));
}

// The array conversions (vectorised in part) must agree with the scalar ones
// element by element, for lengths that exercise the tails.
TEST(ConvertTest, ToFloatMatchesScalarForAllHalfPatterns) {
  std::vector<uint16_t> all(65536 + 5);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);  // odd: a permutation
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, all.size()}) {
    std::vector<float> out(n + 1, 123.0f);
    ConvertToFloat(all.data(), DType::kF16, n, out.data());
    for (size_t i = 0; i < n; ++i) {
      const float ref = HalfToFloat(all[i]);
      if (std::isnan(ref)) {
        ASSERT_TRUE(std::isnan(out[i])) << i;
      } else {
        ASSERT_EQ(Bits(out[i]), Bits(ref)) << i;
      }
    }
    EXPECT_EQ(out[n], 123.0f) << "wrote past the end, n=" << n;

    ConvertToFloat(all.data(), DType::kBF16, n, out.data());
    for (size_t i = 0; i < n; ++i) {
      const float ref = Bf16ToFloat(all[i]);
      if (std::isnan(ref)) {
        ASSERT_TRUE(std::isnan(out[i])) << i;
      } else {
        ASSERT_EQ(Bits(out[i]), Bits(ref)) << i;
      }
    }
    EXPECT_EQ(out[n], 123.0f);
  }
}

TEST(ConvertTest, FromFloatMatchesScalar) {
  std::mt19937_64 rng(99);
  std::vector<float> src(100003);
  for (size_t i = 0; i < src.size(); ++i) {
    // Mix of arbitrary bit patterns and values in the fp16 range.
    src[i] = (i % 3 == 0) ? FromBits(static_cast<uint32_t>(rng()))
                          : static_cast<float>(static_cast<int64_t>(rng() % 2000001) - 1000000) * 1e-3f;
  }
  for (size_t n : {size_t{0}, size_t{3}, size_t{8}, size_t{15}, src.size()}) {
    std::vector<uint16_t> out(n + 1, 0xabcd);
    ConvertFromFloat(src.data(), n, DType::kF16, out.data());
    for (size_t i = 0; i < n; ++i) {
      const uint16_t ref = FloatToHalf(src[i]);
      if (HalfIsNan(ref)) {
        ASSERT_TRUE(HalfIsNan(out[i])) << i;
      } else {
        ASSERT_EQ(out[i], ref) << i << " " << src[i];
      }
    }
    EXPECT_EQ(out[n], 0xabcd) << "wrote past the end, n=" << n;

    ConvertFromFloat(src.data(), n, DType::kBF16, out.data());
    for (size_t i = 0; i < n; ++i) {
      const uint16_t ref = FloatToBf16(src[i]);
      if (Bf16IsNan(ref)) {
        ASSERT_TRUE(Bf16IsNan(out[i])) << i;
      } else {
        ASSERT_EQ(out[i], ref) << i;
      }
    }
    EXPECT_EQ(out[n], 0xabcd);

    std::vector<float> f32(n + 1, 7.0f);
    ConvertFromFloat(src.data(), n, DType::kF32, f32.data());
    ASSERT_EQ(std::memcmp(f32.data(), src.data(), n * 4), 0);
    EXPECT_EQ(f32[n], 7.0f);
    std::vector<float> back(n + 1, 7.0f);
    ConvertToFloat(f32.data(), DType::kF32, n, back.data());
    ASSERT_EQ(std::memcmp(back.data(), src.data(), n * 4), 0);
  }
}

TEST(AllFiniteTest, DetectsNanAndInfInEveryDtype) {
  const float specials[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), FromBits(0x7f800001u)};
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(t));
    const size_t n = 37;  // not a multiple of any vector width
    // Finite extremes: zero, -0, subnormals, the largest finite of each type.
    std::vector<float> src(n);
    for (size_t i = 0; i < n; ++i) src[i] = static_cast<float>(i) - 18.5f;
    src[0] = -0.0f;
    src[1] =
        t == DType::kF16 ? 65504.0f : (t == DType::kBF16 ? Bf16ToFloat(0x7f7f) : std::numeric_limits<float>::max());
    src[2] = t == DType::kF16 ? 0x1p-24f : std::numeric_limits<float>::denorm_min();
    std::vector<uint8_t> buf(n * DTypeSize(t));
    ConvertFromFloat(src.data(), n, t, buf.data());
    EXPECT_TRUE(AllFinite(buf.data(), t, n));
    EXPECT_TRUE(AllFinite(buf.data(), t, 0));
    for (float bad : specials) {
      for (size_t pos : {size_t{0}, size_t{17}, n - 1}) {
        std::vector<float> s2 = src;
        s2[pos] = bad;
        ConvertFromFloat(s2.data(), n, t, buf.data());
        EXPECT_FALSE(AllFinite(buf.data(), t, n)) << "value " << bad << " at " << pos;
        // Elements past n are not looked at.
        if (pos == n - 1) {
          EXPECT_TRUE(AllFinite(buf.data(), t, n - 1));
        }
      }
    }
  }
  // Values that only overflow once narrowed are caught in the narrow type.
  const float big = 1e6f;
  uint16_t h = FloatToHalf(big);
  EXPECT_FALSE(AllFinite(&h, DType::kF16, 1));
  EXPECT_TRUE(AllFinite(&big, DType::kF32, 1));
}

}  // namespace
}  // namespace sqz
