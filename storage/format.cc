#include "format.h"

#include "sqz/db.h"

size_t sqz::ContextInfo::page_bytes() const {
  return 2 * static_cast<size_t>(page_rows) * static_cast<size_t>(head_dim) * DTypeSize(dtype);
}

namespace sqz::storage {

namespace {
void PutBE(std::string* dst, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) dst->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetBE(std::string_view s, size_t pos, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(s[pos + i]);
  return v;
}
}  // namespace

std::string ContextPrefix(uint64_t ctx) {
  std::string k;
  PutBE(&k, ctx, 8);
  return k;
}

std::string HeadKey(uint64_t ctx, uint32_t layer, uint32_t head) {
  std::string k;
  k.reserve(16);
  PutBE(&k, ctx, 8);
  PutBE(&k, layer, 4);
  PutBE(&k, head, 4);
  return k;
}

std::string BlockKey(uint64_t ctx, uint32_t layer, uint32_t head, uint32_t block) {
  std::string k = HeadKey(ctx, layer, head);
  PutBE(&k, block, 4);
  return k;
}

bool DecodeContextId(std::string_view key, uint64_t* ctx) {
  if (key.size() < 8) return false;
  *ctx = GetBE(key, 0, 8);
  return true;
}

bool DecodeBlockKey(std::string_view key, uint64_t* ctx, uint32_t* layer, uint32_t* head, uint32_t* block) {
  if (key.size() != 20) return false;
  *ctx = GetBE(key, 0, 8);
  *layer = static_cast<uint32_t>(GetBE(key, 8, 4));
  *head = static_cast<uint32_t>(GetBE(key, 12, 4));
  *block = static_cast<uint32_t>(GetBE(key, 16, 4));
  return true;
}

}  // namespace sqz::storage
