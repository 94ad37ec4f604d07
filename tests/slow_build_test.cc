// Slow (label "slow"): builds a 128K-token, 2-layer, 8-KV-head, d = 128 F16
// context from a safetensors file and checks that the builder streams: its
// peak memory is about one layer of K+V plus per-head working buffers and
// storage buffers, and the resident set does not grow from layer to layer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"
#include "util/half.h"

namespace sqz {
namespace {

using sqz::testing::ScopedTempDir;

constexpr int kLayers = 2, kHeads = 8, kDim = 128;
constexpr int64_t kTokens = 128 * 1024;

uint64_t CurrentRssBytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

double MiB(uint64_t b) { return static_cast<double>(b) / (1 << 20); }

// Writes the KV file tensor by tensor, head by head, so generating it takes
// only one head of memory (this process's peak must stay the builder's).
void WriteLargeKvFile(const std::string& path) {
  const int64_t per_head = kTokens * kDim;
  const uint64_t tensor_bytes = static_cast<uint64_t>(kHeads) * per_head * 2;
  std::vector<index_test::RawTensor> header_only;
  for (int l = 0; l < kLayers; ++l) {
    for (const char* s : {"k", "v"}) {
      header_only.push_back({"layers." + std::to_string(l) + "." + s, "F16", {kHeads, kTokens, kDim}, ""});
    }
  }
  // Header with the real offsets (SafetensorsBytes derives offsets from the
  // byte strings, so build the JSON here).
  std::string header = "{\"__metadata__\":{\"n_q_heads\":\"32\",\"model\":\"slow-synthetic\"}";
  uint64_t off = 0;
  for (const auto& t : header_only) {
    header += ",\"" + t.name + "\":{\"dtype\":\"F16\",\"shape\":" + index_test::JsonShape(t.shape) +
              ",\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + tensor_bytes) + "]}";
    off += tensor_bytes;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  uint64_t len = header.size();
  char lenb[8];
  for (int i = 0; i < 8; ++i) lenb[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  f.write(lenb, 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::vector<float> x(static_cast<size_t>(per_head));
  std::vector<uint16_t> h(static_cast<size_t>(per_head));
  std::vector<float> topics(32 * kDim);
  for (int l = 0; l < kLayers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int head = 0; head < kHeads; ++head) {
        const uint64_t seed = (static_cast<uint64_t>(l) * 16 + head) * 2 + kv;
        for (size_t i = 0; i < topics.size(); ++i) topics[i] = index_test::Gauss(seed * 7 + 1, i);
        for (int64_t t = 0; t < kTokens; ++t) {
          const int topic = static_cast<int>(index_test::SplitMix(seed * 1000003 + t / 64) % 32);
          for (int c = 0; c < kDim; ++c) {
            const float noise = index_test::Uni(seed, static_cast<uint64_t>(t) * kDim + c);
            x[t * kDim + c] = kv == 0 ? 2.0f * topics[topic * kDim + c] + 0.5f * noise : noise;
          }
        }
        ConvertFromFloat(x.data(), x.size(), DType::kF16, h.data());
        f.write(reinterpret_cast<const char*>(h.data()), static_cast<std::streamsize>(h.size() * 2));
      }
    }
  }
  ASSERT_TRUE(f.good());
}

TEST(SlowBuildTest, MemoryDoesNotGrowWithLayers) {
  ScopedTempDir dir("sqz-slow");
  const std::string kv = dir.Sub("kv.safetensors");
  WriteLargeKvFile(kv);
  std::unique_ptr<KvSource> src;
  ASSERT_TRUE(OpenSafetensorsKvSource(kv, &src).ok());
  std::unique_ptr<DB> db;
  ASSERT_TRUE(DB::Open(Options(), dir.Sub("db"), &db).ok());

  const uint64_t layer_bytes = 2ull * kHeads * kTokens * kDim * 2;  // K + V of one layer, F16
  const uint64_t rss_before = CurrentRssBytes();
  std::vector<uint64_t> rss_after_layer;
  BuildOptions o;
  o.kmeans_iters = 2;
  o.read_ahead = false;                     // the strict one-layer bound below
  o.kmeans_batch_bytes = size_t{64} << 20;  // one head of 128K x 128 per k-means batch
  o.fine_ratio = 0.01;
  o.coarse_ratio = 0.002;
  o.on_progress = [&](const BuildProgress& p) {
    std::printf("[ progress ] layer %d head %d: %lld/%lld heads, %.0f keys/s, eta %.0f s, rss %.0f MiB\n", p.layer,
                p.head, static_cast<long long>(p.heads_done), static_cast<long long>(p.heads_total), p.keys_per_second,
                p.eta_seconds, MiB(CurrentRssBytes()));
    std::fflush(stdout);
    if (p.head == p.n_kv_heads - 1) rss_after_layer.push_back(CurrentRssBytes());
  };
  BuildStats st;
  Status s = BuildContext(db.get(), "big", src.get(), o, &st);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(rss_after_layer.size(), static_cast<size_t>(kLayers));

  const uint64_t growth = st.peak_rss_bytes > rss_before ? st.peak_rss_bytes - rss_before : 0;
  std::printf(
      "[ info ] one layer K+V: %.0f MiB; RSS before build %.0f MiB; peak RSS %.0f MiB (growth %.0f MiB = %.2f "
      "layers); RSS after layer 0: %.0f MiB, after layer 1: %.0f MiB; index %.1f MiB\n",
      MiB(layer_bytes), MiB(rss_before), MiB(st.peak_rss_bytes), MiB(growth), static_cast<double>(growth) / layer_bytes,
      MiB(rss_after_layer[0]), MiB(rss_after_layer[1]), MiB(st.index_bytes));
  std::printf("[ info ] seconds: total %.1f, read %.1f, kmeans %.1f, calibrate %.1f, write %.1f; %lld keys clustered\n",
              st.seconds_total, st.seconds_read, st.seconds_kmeans, st.seconds_calibrate, st.seconds_write,
              static_cast<long long>(st.keys_clustered));

  // Without read-ahead (set above): one layer (K and V) + one k-means batch
  // of float keys and its normalised copy (2 x kmeans_batch_bytes) + the
  // writer batch and RocksDB memtables (256 MiB). Holding every layer would
  // need >= 2 layers on its own. (read_ahead adds exactly one more layer.)
  EXPECT_LT(growth, layer_bytes + 2 * o.kmeans_batch_bytes + (uint64_t{256} << 20) + st.index_bytes);
  // Streaming: the second layer does not add resident memory.
  EXPECT_LT(rss_after_layer[1], rss_after_layer[0] + layer_bytes / 4);

  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("big", &info).ok());
  EXPECT_EQ(info.n_tokens, kTokens);
  EXPECT_EQ(info.n_clustered, kTokens - o.window - o.n_sinks);
  VerifyReport vr;
  Status vs = db->VerifyContext("big", &vr);
  EXPECT_TRUE(vs.ok()) << vs.ToString();
}

}  // namespace
}  // namespace sqz
