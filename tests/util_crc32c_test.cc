// CRC32C against published test vectors (RFC 3720 appendix B.4, the iSCSI
// check value) and a bitwise reference implementation.

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "util/crc32c.h"

namespace sqz {
namespace {

// Bit-at-a-time CRC32C (reflected polynomial 0x82F63B78): slow but obviously
// the definition, independent of the SSE4.2 implementation.
uint32_t RefCrc32c(const uint8_t* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

TEST(Crc32cTest, StandardVectors) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c("", 0), 0u);
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);

  uint8_t buf[32];
  std::memset(buf, 0, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x8A9136AAu);
  std::memset(buf, 0xff, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x113FDB5Cu);

  // iSCSI SCSI Read (10) command PDU (RFC 3720 B.4).
  const uint8_t pdu[48] = {0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                           0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00,
                           0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00,
                           0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  EXPECT_EQ(Crc32c(pdu, sizeof(pdu)), 0xD9963A56u);
  EXPECT_EQ(RefCrc32c(pdu, sizeof(pdu)), 0xD9963A56u);
}

TEST(Crc32cTest, MatchesReferenceForAllLengthsAndAlignments) {
  std::mt19937_64 rng(1);
  std::vector<uint8_t> data(1100);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t n = 0; n + offset <= data.size(); n += (n < 80 ? 1 : 97)) {
      ASSERT_EQ(Crc32c(data.data() + offset, n), RefCrc32c(data.data() + offset, n)) << offset << " " << n;
    }
  }
}

TEST(Crc32cTest, ExtendsInPieces) {
  std::string s = "The quick brown fox jumps over the lazy dog, twice over for good measure.";
  const uint32_t whole = Crc32c(s.data(), s.size());
  EXPECT_EQ(whole, RefCrc32c(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    const uint32_t first = Crc32c(s.data(), cut);
    ASSERT_EQ(Crc32c(s.data() + cut, s.size() - cut, first), whole) << cut;
  }
}

TEST(Crc32cTest, DetectsChanges) {
  std::vector<uint8_t> data(4096, 0x5a);
  const uint32_t base = Crc32c(data.data(), data.size());
  for (size_t i = 0; i < data.size(); i += 511) {
    for (int bit = 0; bit < 8; ++bit) {
      data[i] ^= static_cast<uint8_t>(1u << bit);
      ASSERT_NE(Crc32c(data.data(), data.size()), base) << i << " " << bit;
      data[i] ^= static_cast<uint8_t>(1u << bit);
    }
  }
}

}  // namespace
}  // namespace sqz
