#include "format.h"

namespace sqz::storage {

std::string EncodeBE(uint64_t v, int bytes) {
  std::string s;
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return s;
}

bool DecodeBE(std::string_view s, int bytes, uint64_t* v) {
  if (s.size() < static_cast<size_t>(bytes)) return false;
  uint64_t x = 0;
  for (int i = 0; i < bytes; ++i) x = (x << 8) | static_cast<uint8_t>(s[i]);
  *v = x;
  return true;
}

std::string ContextPrefix(uint64_t ctx) { return EncodeBE(ctx, 8); }

std::string ContextEnd(uint64_t ctx) { return ctx == UINT64_MAX ? std::string(9, '\xff') : ContextPrefix(ctx + 1); }

std::string HeadKey(uint64_t ctx, uint32_t layer, uint32_t head) {
  return EncodeBE(ctx, 8) + EncodeBE(layer, 4) + EncodeBE(head, 4);
}

std::string PageKey(uint64_t ctx, uint32_t layer, uint32_t head, uint32_t page) {
  return HeadKey(ctx, layer, head) + EncodeBE(page, 4);
}

std::string ReclaimKey(uint64_t ctx) { return std::string(kReclaimPrefix) + EncodeBE(ctx, 8); }

std::string ManifestCopyKey(uint64_t ctx) { return ContextPrefix(ctx) + std::string(8, '\xff'); }

bool IsManifestCopyKey(std::string_view key) { return key.size() == 16 && key.substr(8) == std::string(8, '\xff'); }

bool DecodeContextId(std::string_view key, uint64_t* ctx) { return DecodeBE(key, 8, ctx); }

bool DecodePageKey(std::string_view key, uint64_t* ctx, uint32_t* layer, uint32_t* head, uint32_t* page) {
  if (key.size() != 20) return false;
  uint64_t l, h, p;
  DecodeBE(key, 8, ctx);
  DecodeBE(key.substr(8), 4, &l);
  DecodeBE(key.substr(12), 4, &h);
  DecodeBE(key.substr(16), 4, &p);
  *layer = static_cast<uint32_t>(l);
  *head = static_cast<uint32_t>(h);
  *page = static_cast<uint32_t>(p);
  return true;
}

bool DecodeReclaimKey(std::string_view key, uint64_t* ctx) {
  const std::string_view prefix(kReclaimPrefix);
  if (key.size() != prefix.size() + 8 || key.substr(0, prefix.size()) != prefix) return false;
  return DecodeBE(key.substr(prefix.size()), 8, ctx);
}

}  // namespace sqz::storage
