// On-disk layout constants and key encoding of a squeeze database.
// Everything in this file is part of the on-disk format: see docs/FORMAT.md.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace sqz::storage {

// Version written by this build. Readers refuse a database whose version is
// larger (written by a newer, unknown build).
inline constexpr uint32_t kFormatVersion = 1;

// Column family names. Their names are part of the format.
inline constexpr const char* kCfDefault = "default";    // format version, misc
inline constexpr const char* kCfManifest = "manifest";  // name -> Manifest
inline constexpr const char* kCfIndex = "index";        // ctx|layer|head -> HeadIndex
inline constexpr const char* kCfKv = "kv";              // ctx|layer|head|block -> K rows then V rows

// Key in the default column family holding the format version (4 bytes, big endian).
inline constexpr const char* kFormatVersionKey = "format_version";

// Block id of the always-attended block (sinks then window) of a head.
inline constexpr uint32_t kAlwaysBlock = 0xFFFFFFFFu;

// Big-endian, fixed-width, so byte order equals numeric order and a context,
// a layer or a head is one contiguous key range.
std::string ContextPrefix(uint64_t ctx);                         // 8 bytes
std::string HeadKey(uint64_t ctx, uint32_t layer, uint32_t head);  // 16 bytes
std::string BlockKey(uint64_t ctx, uint32_t layer, uint32_t head, uint32_t block);  // 20 bytes
// Decodes the context id of any index or kv key (false if shorter than 8 bytes).
bool DecodeContextId(std::string_view key, uint64_t* ctx);
bool DecodeBlockKey(std::string_view key, uint64_t* ctx, uint32_t* layer, uint32_t* head, uint32_t* block);

}  // namespace sqz::storage
