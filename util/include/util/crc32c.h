// CRC32C (Castagnoli), used to check KV blocks end to end.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sqz {

// CRC32C of n bytes, continuing from `crc` (0 for a fresh checksum).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);

}  // namespace sqz
