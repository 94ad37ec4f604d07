// libFuzzer target: the storage layer's record decoders (storage/records.h:
// DecodeManifest, DecodeHeadIndex), which read what RocksDB hands back, so
// any byte of a damaged database. Input layout: fuzz/fuzz_common.h.
//
// Asserts, beyond "no crash, leak, hang or unbounded allocation": a record
// that decodes passes the validator it promises (a manifest ValidateManifest,
// a head index ValidateHeadIndex against its context) and round-trips:
// encoding the decoded values and decoding again gives the same values
// (floating-point ones by value, below), and encoding those gives the same
// bytes.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common.h"
#include "records.h"

namespace sqz::fuzz {
namespace {

// Floating-point fields compare by value, a NaN equal to a NaN (one may sit
// in a field the validator does not look at). Not by bits: FlatBuffers does
// not store a scalar equal to its default, and -0.0 == 0.0, so a -0.0 comes
// back as 0.0 (the same value in every use: thresholds are compared with
// scores, ratios multiplied).
template <typename T>
bool SameValue(T a, T b) {
  return a == b || (std::isnan(a) && std::isnan(b));
}
template <typename T>
bool SameValues(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!SameValue(a[i], b[i])) return false;
  }
  return true;
}

bool SameManifest(const ContextInfo& a, const ContextInfo& b) {
  if (a.thresholds.size() != b.thresholds.size()) return false;
  for (size_t i = 0; i < a.thresholds.size(); ++i) {
    const ThresholdInfo &x = a.thresholds[i], &y = b.thresholds[i];
    if (!SameValue(x.quantile, y.quantile) || !SameValue(x.flat, y.flat) || !SameValue(x.coarse, y.coarse) ||
        !SameValue(x.fine, y.fine)) {
      return false;
    }
  }
  return a.name == b.name && a.id == b.id && a.format_version == b.format_version && a.model == b.model &&
         a.n_layers == b.n_layers && a.n_kv_heads == b.n_kv_heads && a.n_q_heads == b.n_q_heads &&
         a.head_dim == b.head_dim && a.n_tokens == b.n_tokens && a.dtype == b.dtype && a.window == b.window &&
         a.n_sinks == b.n_sinks && a.n_clustered == b.n_clustered && SameValue(a.fine_ratio, b.fine_ratio) &&
         SameValue(a.coarse_ratio, b.coarse_ratio) && a.kmeans_iters == b.kmeans_iters && a.seed == b.seed &&
         a.fine_clusters == b.fine_clusters && a.coarse_clusters == b.coarse_clusters &&
         a.calibration_queries == b.calibration_queries && a.page_rows == b.page_rows &&
         a.clustered_pages == b.clustered_pages && a.always_pages == b.always_pages &&
         a.cluster_size_histogram == b.cluster_size_histogram && a.kv_bytes == b.kv_bytes &&
         a.index_bytes == b.index_bytes && a.bytes_on_disk == b.bytes_on_disk &&
         SameValue(a.build_seconds, b.build_seconds) && a.created_unix == b.created_unix;
}

bool SameHeadIndex(const storage::HeadIndexRecord& a, const storage::HeadIndexRecord& b) {
  return a.layer == b.layer && a.head == b.head && SameValues(a.fine_centroids, b.fine_centroids) &&
         a.fine_offsets == b.fine_offsets && SameValues(a.coarse_centroids, b.coarse_centroids) &&
         a.coarse_child_offsets == b.coarse_child_offsets && a.permutation == b.permutation && a.page_crc == b.page_crc;
}

void FuzzManifest(std::string_view bytes) {
  ContextInfo info;
  const Status s = storage::DecodeManifest(bytes, "fuzz", &info);
  if (!s.ok()) {
    SQZ_FUZZ_CHECK(s.IsCorruption() || s.IsNotSupported());
    return;
  }
  SQZ_FUZZ_CHECK(storage::ValidateManifest(info).ok());
  const std::string encoded = storage::EncodeManifest(info);
  ContextInfo again;
  SQZ_FUZZ_CHECK(storage::DecodeManifest(encoded, "fuzz", &again).ok());
  SQZ_FUZZ_CHECK(SameManifest(info, again));
  SQZ_FUZZ_CHECK(storage::EncodeManifest(again) == encoded);
}

void FuzzHeadIndex(const uint8_t* prefix, std::string_view bytes) {
  const HeadIndexCall c = HeadIndexContext(prefix);
  SQZ_FUZZ_CHECK(storage::ValidateManifest(c.info).ok());  // the harness's own promise
  const ContextInfo info = c.Context();
  storage::HeadIndexRecord rec;
  const Status s = storage::DecodeHeadIndex(bytes, info, c.layer, c.head, c.full, "fuzz", &rec);
  if (!s.ok()) {
    SQZ_FUZZ_CHECK(s.IsCorruption());
    return;
  }
  SQZ_FUZZ_CHECK(storage::ValidateHeadIndex(info, c.layer, c.head, rec, c.full, "fuzz").ok());
  const std::string encoded = storage::EncodeHeadIndex(info, rec);
  storage::HeadIndexRecord again;
  SQZ_FUZZ_CHECK(storage::DecodeHeadIndex(encoded, info, c.layer, c.head, c.full, "fuzz", &again).ok());
  SQZ_FUZZ_CHECK(SameHeadIndex(rec, again));
  SQZ_FUZZ_CHECK(storage::EncodeHeadIndex(info, again) == encoded);
}

}  // namespace
}  // namespace sqz::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const char* rest = reinterpret_cast<const char*>(data + 1);
  if ((data[0] & 1) == 0) {
    sqz::fuzz::FuzzManifest(std::string_view(rest, size - 1));
    return 0;
  }
  if (size < 1 + sqz::fuzz::kHeadIndexPrefixBytes) return 0;
  sqz::fuzz::FuzzHeadIndex(
      data + 1, std::string_view(rest + sqz::fuzz::kHeadIndexPrefixBytes, size - 1 - sqz::fuzz::kHeadIndexPrefixBytes));
  return 0;
}
