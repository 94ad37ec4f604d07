// The record decoders (storage/records.h) on bytes no writer produces: the
// inputs fuzz/fuzz_records found (docs/RELIABILITY.md, "Fuzzing"). Under
// scripts/sanitize.sh a regression is also a UBSan report.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "storage/records.h"

namespace sqz::storage {
namespace {

// fuzz_records crash-892a4587 (a damaged manifest): its cluster_size_histogram,
// an [int64] vector, started 4 bytes off an 8-byte boundary. FlatBuffers'
// Verifier checks only the vector's 4-byte length field for alignment, so
// the buffer passed verification and decoding read every element unaligned.
// Here the same buffer is made from a valid one: every object moved by 4
// bytes (the root offset grows by 4 and 4 bytes follow it). The manifest has
// no 8-byte scalar (each one is at its default, which FlatBuffers does not
// store), so the histogram is the only thing misaligned by the move.
TEST(StorageRecords, ManifestWithMisalignedInt64VectorIsCorruption) {
  ContextInfo info;
  info.name = "c";
  info.format_version = kFormatVersion;
  info.n_layers = 1;
  info.n_kv_heads = 1;
  info.n_q_heads = 1;
  info.head_dim = 4;
  info.cluster_size_histogram = {1, 2, 3};
  const std::string good = EncodeManifest(info);

  // Aligned, it passes verification and decodes (then fails validation: no
  // id, no tokens).
  ContextInfo out;
  Status s = DecodeManifest(good, "good", &out);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_EQ(s.ToString().find("FlatBuffers"), std::string::npos) << s.ToString();
  EXPECT_EQ(out.cluster_size_histogram, (std::vector<int64_t>{1, 2, 3}));

  uint32_t root = 0;
  for (int i = 3; i >= 0; --i) root = (root << 8) | static_cast<uint8_t>(good[i]);
  root += 4;
  std::string moved;
  for (int i = 0; i < 4; ++i) moved.push_back(static_cast<char>((root >> (8 * i)) & 0xff));
  moved += std::string(4, '\0') + good.substr(4);

  s = DecodeManifest(moved, "moved", &out);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.ToString().find("moved: manifest fails FlatBuffers verification"), std::string::npos) << s.ToString();
}

// Whatever EncodeManifest writes decodes to the same manifest. The builder
// does not align an empty vector, so an empty [int64] histogram can sit 4
// bytes off an 8-byte boundary in a valid buffer, depending on the lengths
// of what precedes it: the first version of the fix above refused such
// manifests (fuzz_records' round trip found it: a context with no clustered
// key has an empty histogram). Every layout of the strings and tables in
// front of it is tried, with the histogram empty and not.
TEST(StorageRecords, EveryEncodedManifestDecodes) {
  ContextInfo info;
  info.format_version = kFormatVersion;
  info.id = 7;
  info.n_layers = 1;
  info.n_kv_heads = 1;
  info.n_q_heads = 2;
  info.head_dim = 4;
  info.n_tokens = 10;
  info.window = 2;
  info.n_sinks = 1;
  info.n_clustered = 7;
  info.page_rows = 4;
  info.clustered_pages = 2;
  info.always_pages = 1;
  info.fine_clusters = {3};
  info.coarse_clusters = {1};
  int cases = 0;
  for (int name_len = 1; name_len <= 8; ++name_len) {
    for (int model_len = 0; model_len <= 8; ++model_len) {
      for (int n_thresholds = 0; n_thresholds <= 2; ++n_thresholds) {
        for (const std::vector<int64_t>& histogram : {std::vector<int64_t>{}, std::vector<int64_t>{5}}) {
          info.name = std::string(name_len, 'n');
          info.model = std::string(model_len, 'm');
          info.thresholds.assign(n_thresholds, ThresholdInfo{0.5, 1, 2, 3});
          info.cluster_size_histogram = histogram;
          ContextInfo out;
          const Status s = DecodeManifest(EncodeManifest(info), "encoded", &out);
          ASSERT_TRUE(s.ok()) << s.ToString() << " (name " << name_len << ", model " << model_len << ", "
                              << n_thresholds << " thresholds, histogram of " << histogram.size() << ")";
          EXPECT_EQ(out.name, info.name);
          EXPECT_EQ(out.model, info.model);
          EXPECT_EQ(out.thresholds.size(), info.thresholds.size());
          EXPECT_EQ(out.cluster_size_histogram, histogram);
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 8 * 9 * 3 * 2);
}

}  // namespace
}  // namespace sqz::storage
