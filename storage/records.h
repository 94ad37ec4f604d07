// The one owner of the on-disk records (private to storage/): encodes,
// decodes and validates the Manifest and HeadIndex FlatBuffers. Nobody else
// builds or parses them (LevelDB's VersionEdit pattern).
#pragma once

#include <string>
#include <string_view>

#include "sqz/db.h"
#include "storage/store.h"

namespace sqz::storage {

std::string EncodeManifest(const ContextInfo& info);
// Verifies the FlatBuffer, fills *info (name from the record, bytes_on_disk
// left 0) and validates it. Corruption names `where`; NotSupported for a
// record of another format version.
Status DecodeManifest(std::string_view bytes, const std::string& where, ContextInfo* info);

std::string EncodeHeadIndex(const ContextInfo& info, const HeadIndexRecord& rec);
// Verifies, decodes and validates (ValidateHeadIndex with `full`).
Status DecodeHeadIndex(std::string_view bytes, const ContextInfo& info, int layer, int head, bool full,
                       const std::string& where, HeadIndexRecord* rec);

}  // namespace sqz::storage
