// On-disk layout constants and key encoding of a squeeze database (private
// to storage/). Everything in this file is part of the on-disk format: see
// docs/FORMAT.md. The format version is in storage/include/storage/store.h.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace sqz::storage {

// Column family names. Their names are part of the format.
inline constexpr const char* kCfDefault = "default";    // format version, id counter, reclaim markers
inline constexpr const char* kCfManifest = "manifest";  // name -> Manifest
inline constexpr const char* kCfIndex = "index";        // ctx|layer|head -> HeadIndex
inline constexpr const char* kCfKv = "kv";              // ctx|layer|head|page -> K plane then V plane

// Keys in the default column family.
inline constexpr const char* kFormatVersionKey = "format_version";  // uint32, big endian
inline constexpr const char* kNextIdKey = "next_context_id";        // uint64, big endian
inline constexpr const char* kReclaimPrefix = "reclaim/";           // + ctx(8): space still to reclaim

// Big-endian, fixed-width, so byte order equals numeric order and a context,
// a layer or a head is one contiguous key range.
std::string ContextPrefix(uint64_t ctx);                                          // 8 bytes
std::string ContextEnd(uint64_t ctx);                                             // first key after ctx's range
std::string HeadKey(uint64_t ctx, uint32_t layer, uint32_t head);                 // 16 bytes
std::string PageKey(uint64_t ctx, uint32_t layer, uint32_t head, uint32_t page);  // 20 bytes
std::string ReclaimKey(uint64_t ctx);
// Index family: ctx(8) then 8 bytes 0xff. A redundant copy of the context's
// Manifest, committed in the same batch as the manifest record, inside the
// context's key range (so a drop's range delete removes it): `sqctl repair`
// recovers the manifests from it when the manifest family is lost.
std::string ManifestCopyKey(uint64_t ctx);
bool IsManifestCopyKey(std::string_view key);
// Decodes the context id of any index or kv key (false if shorter than 8 bytes).
bool DecodeContextId(std::string_view key, uint64_t* ctx);
bool DecodePageKey(std::string_view key, uint64_t* ctx, uint32_t* layer, uint32_t* head, uint32_t* page);
bool DecodeReclaimKey(std::string_view key, uint64_t* ctx);
std::string EncodeBE(uint64_t v, int bytes);
bool DecodeBE(std::string_view s, int bytes, uint64_t* v);

}  // namespace sqz::storage
