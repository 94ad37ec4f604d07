// BuildContext (sqz/build.h): lossless round trip through a reopened
// database, manifest contents, and every failure leaving the database as it
// was.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <ctime>
#include <limits>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "index/calibrate.h"
#include "sqz/build.h"
#include "sqz/db.h"
#include "tests/index_test_util.h"
#include "tests/kmeans_test_backend.h"
#include "tests/test_util.h"
#include "util/half.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;
using index_test::RawTensor;
using index_test::SafetensorsBytes;
using index_test::WriteFile;
using sqz::testing::ScopedTempDir;

std::unique_ptr<DB> OpenDb(const std::string& path) {
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), path, &db);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return db;
}

BuildOptions SmallOptions() {
  BuildOptions o;
  o.window = 64;
  o.n_sinks = 4;
  o.kmeans_iters = 4;
  return o;
}

struct RoundTripCase {
  DType dtype;
  int n_kv_heads, n_q_heads;
  int q_window;
  bool from_file;
  int page_rows;  // BuildOptions::page_rows
};

// Readable test names (the struct's padding bytes would otherwise be printed).
void PrintTo(const RoundTripCase& c, std::ostream* os) {
  *os << DTypeName(c.dtype) << " kv" << c.n_kv_heads << " q" << c.n_q_heads << " window_q" << c.q_window
      << (c.from_file ? " file" : " memory") << " page_rows" << c.page_rows;
}

class IndexBuildRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(IndexBuildRoundTrip, LosslessAfterReopen) {
  const RoundTripCase& tc = GetParam();
  ScopedTempDir dir("sqz-build");
  KvSpec spec;
  spec.n_layers = 2;
  spec.n_kv_heads = tc.n_kv_heads;
  spec.n_q_heads = tc.n_q_heads;
  spec.n_tokens = 2500;
  spec.head_dim = 32;
  spec.dtype = tc.dtype;
  spec.q_window = tc.q_window;
  KvData data(spec);
  std::unique_ptr<KvSource> src;
  if (tc.from_file) {
    const std::string path = dir.Sub("kv.safetensors");
    WriteFile(path, SafetensorsBytes(index_test::KvTensors(data), index_test::KvMetadata(data)));
    ASSERT_TRUE(OpenSafetensorsKvSource(path, &src).ok());
  } else {
    src = data.Source();
  }
  BuildOptions o = SmallOptions();
  o.page_rows = tc.page_rows;
  std::vector<BuildProgress> progress;
  o.on_progress = [&](const BuildProgress& p) { progress.push_back(p); };
  BuildStats stats;
  {
    auto db = OpenDb(dir.Sub("db"));
    Status s = BuildContext(db.get(), "ctx", src.get(), o, &stats);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }  // handle destroyed: everything below is read back from disk

  const int64_t nc = spec.n_tokens - o.window - o.n_sinks;
  const int heads = spec.n_layers * spec.n_kv_heads;
  ASSERT_EQ(progress.size(), static_cast<size_t>(heads));
  for (size_t i = 0; i < progress.size(); ++i) {
    EXPECT_EQ(progress[i].heads_done, static_cast<int64_t>(i + 1));
    EXPECT_EQ(progress[i].heads_total, heads);
    EXPECT_EQ(progress[i].layer, static_cast<int>(i) / spec.n_kv_heads);
    EXPECT_EQ(progress[i].head, static_cast<int>(i) % spec.n_kv_heads);
    EXPECT_GE(progress[i].eta_seconds, 0);
  }
  EXPECT_DOUBLE_EQ(progress.back().eta_seconds, 0);
  EXPECT_EQ(stats.keys_clustered, nc * heads);
  // K+V of every row, in pages of page_rows rows: the clustered run and the
  // always run each padded up to whole pages.
  const int64_t pages_per_head =
      (nc + tc.page_rows - 1) / tc.page_rows + (spec.n_tokens - nc + tc.page_rows - 1) / tc.page_rows;
  const uint64_t page_bytes = 2ull * tc.page_rows * spec.head_dim * DTypeSize(spec.dtype);
  EXPECT_EQ(stats.kv_bytes, static_cast<uint64_t>(heads * pages_per_head) * page_bytes);
  EXPECT_GE(stats.kv_bytes, 2ull * heads * spec.n_tokens * spec.head_dim * DTypeSize(spec.dtype));
  EXPECT_GT(stats.index_bytes, 0u);
  EXPECT_GT(stats.peak_rss_bytes, 0u);
  EXPECT_GT(stats.seconds_total, 0);
  EXPECT_GE(stats.seconds_total, stats.seconds_kmeans);

  auto db = OpenDb(dir.Sub("db"));
  index_test::ExpectRoundTrip(db.get(), "ctx", data, o.window, o.n_sinks);

  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("ctx", &info).ok());
  EXPECT_EQ(info.name, "ctx");
  EXPECT_EQ(info.model, "test-model");
  EXPECT_EQ(info.n_layers, spec.n_layers);
  EXPECT_EQ(info.n_kv_heads, spec.n_kv_heads);
  EXPECT_EQ(info.n_q_heads, spec.n_q_heads);
  EXPECT_EQ(info.head_dim, spec.head_dim);
  EXPECT_EQ(info.n_tokens, spec.n_tokens);
  EXPECT_EQ(info.dtype, spec.dtype);
  EXPECT_EQ(info.window, o.window);
  EXPECT_EQ(info.n_sinks, o.n_sinks);
  EXPECT_EQ(info.n_clustered, nc);
  EXPECT_EQ(info.fine_ratio, o.fine_ratio);
  EXPECT_EQ(info.coarse_ratio, o.coarse_ratio);
  EXPECT_EQ(info.kmeans_iters, o.kmeans_iters);
  EXPECT_EQ(info.seed, o.seed);
  EXPECT_EQ(info.format_version, storage::kFormatVersion);
  EXPECT_EQ(info.page_rows, tc.page_rows);
  EXPECT_EQ(info.pages_per_head(), pages_per_head);
  EXPECT_EQ(info.page_bytes(), page_bytes);
  ASSERT_EQ(info.fine_clusters.size(), static_cast<size_t>(heads));
  ASSERT_EQ(info.coarse_clusters.size(), static_cast<size_t>(heads));
  for (int i = 0; i < heads; ++i) {
    EXPECT_GE(info.fine_clusters[i], 1);
    EXPECT_LE(info.fine_clusters[i], std::ceil(o.fine_ratio * nc));
    EXPECT_GE(info.coarse_clusters[i], 1);
    EXPECT_LE(info.coarse_clusters[i], info.fine_clusters[i]);
  }
  EXPECT_EQ(info.kv_bytes, stats.kv_bytes);
  EXPECT_EQ(info.index_bytes, stats.index_bytes);
  EXPECT_GT(info.build_seconds, 0);
  EXPECT_GT(info.created_unix, 1700000000);
  EXPECT_LE(info.created_unix, static_cast<int64_t>(std::time(nullptr)));
  if (tc.q_window > 0) {
    EXPECT_EQ(info.calibration_queries, tc.q_window);
    ASSERT_EQ(info.thresholds.size(), o.quantiles.size());
    for (size_t i = 0; i < o.quantiles.size(); ++i) {
      EXPECT_EQ(info.thresholds[i].quantile, o.quantiles[i]);
      EXPECT_GT(info.thresholds[i].flat, 0);
      EXPECT_GE(info.thresholds[i].coarse, 0);
      EXPECT_GE(info.thresholds[i].fine, 0);
      if (i > 0) {
        EXPECT_GE(info.thresholds[i].flat, info.thresholds[i - 1].flat);
      }
    }
  } else {
    EXPECT_EQ(info.calibration_queries, 0);
    EXPECT_TRUE(info.thresholds.empty());
  }
  // The manifest record as stored.
  const std::string mbytes = index_test::RawManifest(db.get(), "ctx");
  const fb::Manifest* m = fb::GetManifest(mbytes.data());
  EXPECT_EQ(m->format_version(), storage::kFormatVersion);
  EXPECT_EQ(m->name()->str(), "ctx");
  EXPECT_EQ(m->context_id(), info.id);
  EXPECT_EQ(m->page_rows(), tc.page_rows);
  EXPECT_EQ(m->clustered_pages() + m->always_pages(), pages_per_head);

  // Centroids are stored rounded to the keys' 16-bit type (docs/FORMAT.md,
  // "Centroids"): every value exact in it. fp32 keys keep the plain means,
  // which bf16 does not hold exactly.
  {
    std::unique_ptr<storage::ContextSnapshot> snap;
    ASSERT_TRUE(db->store()->OpenSnapshot("ctx", &snap).ok());
    const DType t16 = spec.dtype == DType::kF32 ? DType::kBF16 : spec.dtype;
    int64_t values = 0, inexact = 0;
    for (int l = 0; l < spec.n_layers; ++l) {
      for (int h = 0; h < spec.n_kv_heads; ++h) {
        storage::HeadIndexRecord rec;
        ASSERT_TRUE(snap->GetHeadIndex(l, h, &rec).ok());
        for (const std::vector<float>* c : {&rec.fine_centroids, &rec.coarse_centroids}) {
          std::vector<uint16_t> r(c->size());
          std::vector<float> back(c->size());
          ConvertFromFloat(c->data(), c->size(), t16, r.data());
          ConvertToFloat(r.data(), t16, r.size(), back.data());
          for (size_t i = 0; i < c->size(); ++i) inexact += std::memcmp(&back[i], &(*c)[i], sizeof(float)) != 0;
          values += static_cast<int64_t>(c->size());
        }
      }
    }
    ASSERT_GT(values, 0);
    if (spec.dtype == DType::kF32) {
      EXPECT_GT(inexact, values / 2) << "fp32 keys: centroids are the unrounded means";
    } else {
      EXPECT_EQ(inexact, 0) << "centroid values not exact in " << DTypeName(spec.dtype);
    }
  }

  VerifyReport vr;
  Status vs = db->VerifyContext("ctx", &vr);
  EXPECT_TRUE(vs.ok()) << vs.ToString();
  EXPECT_EQ(vr.records_checked, 1 + heads);  // the manifest and every head index
  EXPECT_EQ(vr.kv_pages_checked, heads * pages_per_head);
  EXPECT_EQ(vr.bytes_checked, stats.kv_bytes);
}

INSTANTIATE_TEST_SUITE_P(Cases, IndexBuildRoundTrip,
                         ::testing::Values(RoundTripCase{DType::kF16, 2, 2, 0, false, 32},    // MHA
                                           RoundTripCase{DType::kBF16, 2, 8, 16, false, 7},   // GQA, calibrated
                                           RoundTripCase{DType::kF32, 1, 4, 8, true, 1},      // file, GQA
                                           RoundTripCase{DType::kF16, 2, 6, 10, true, 64}));  // file, GQA

TEST(IndexBuildTest, DeterministicForASeed) {
  ScopedTempDir dir("sqz-build");
  KvSpec spec;
  spec.n_tokens = 2000;
  spec.q_window = 8;
  KvData data(spec);
  auto db = OpenDb(dir.Sub("db"));
  BuildOptions o = SmallOptions();
  for (const char* name : {"a", "b"}) {
    auto src = data.Source();
    ASSERT_TRUE(BuildContext(db.get(), name, src.get(), o).ok());
  }
  ContextInfo ia, ib;
  ASSERT_TRUE(db->DescribeContext("a", &ia).ok());
  ASSERT_TRUE(db->DescribeContext("b", &ib).ok());
  EXPECT_EQ(ia.fine_clusters, ib.fine_clusters);
  ASSERT_EQ(ia.thresholds.size(), ib.thresholds.size());
  for (size_t i = 0; i < ia.thresholds.size(); ++i) {
    EXPECT_EQ(ia.thresholds[i].flat, ib.thresholds[i].flat);
    EXPECT_EQ(ia.thresholds[i].coarse, ib.thresholds[i].coarse);
    EXPECT_EQ(ia.thresholds[i].fine, ib.thresholds[i].fine);
  }
  for (int l = 0; l < spec.n_layers; ++l) {
    for (int h = 0; h < spec.n_kv_heads; ++h) {
      // The index records are byte-identical (their page CRCs included).
      const std::string xa = index_test::RawHeadIndex(db.get(), ia.id, l, h);
      const std::string xb = index_test::RawHeadIndex(db.get(), ib.id, l, h);
      EXPECT_FALSE(xa.empty());
      EXPECT_EQ(xa, xb) << "layer " << l << " head " << h;
    }
  }
}

TEST(IndexBuildTest, KMeansBackendGetsWholeLayers) {
  // BuildOptions::kmeans: every KV head of a layer in one Run call per
  // level, and the same context as with the default (FAISS) backend.
  ScopedTempDir dir("sqz-build");
  KvSpec spec;
  spec.n_layers = 3;
  spec.n_kv_heads = 3;
  spec.n_q_heads = 6;
  spec.n_tokens = 1500;
  spec.q_window = 8;
  KvData data(spec);
  auto db = OpenDb(dir.Sub("db"));
  BuildOptions o = SmallOptions();
  {
    auto src = data.Source();
    ASSERT_TRUE(BuildContext(db.get(), "default", src.get(), o).ok());
  }
  index_test::RecordingKMeansBackend rec;
  o.kmeans = &rec;
  std::vector<BuildProgress> progress;
  o.on_progress = [&](const BuildProgress& p) { progress.push_back(p); };
  {
    auto src = data.Source();
    Status s = BuildContext(db.get(), "custom", src.get(), o);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  ASSERT_EQ(rec.calls.size(), static_cast<size_t>(2 * spec.n_layers));
  for (size_t i = 0; i < rec.calls.size(); ++i) {
    ASSERT_EQ(rec.calls[i].problems.size(), static_cast<size_t>(spec.n_kv_heads)) << "call " << i;
    EXPECT_EQ(rec.calls[i].params.iters, o.kmeans_iters);
    for (const auto& p : rec.calls[i].problems) EXPECT_EQ(p.weighted, i % 2 == 1) << "fine, then coarse";
  }
  ASSERT_EQ(progress.size(), static_cast<size_t>(spec.n_layers * spec.n_kv_heads));
  for (size_t i = 0; i < progress.size(); ++i) {
    EXPECT_EQ(progress[i].heads_done, static_cast<int64_t>(i + 1));
    EXPECT_EQ(progress[i].layer, static_cast<int>(i) / spec.n_kv_heads);
    EXPECT_EQ(progress[i].head, static_cast<int>(i) % spec.n_kv_heads);
  }
  ContextInfo a, b;
  ASSERT_TRUE(db->DescribeContext("default", &a).ok());
  ASSERT_TRUE(db->DescribeContext("custom", &b).ok());
  EXPECT_EQ(a.fine_clusters, b.fine_clusters);
  EXPECT_EQ(a.coarse_clusters, b.coarse_clusters);
  ASSERT_EQ(a.thresholds.size(), b.thresholds.size());
  for (size_t i = 0; i < a.thresholds.size(); ++i) {
    EXPECT_EQ(a.thresholds[i].flat, b.thresholds[i].flat);
    EXPECT_EQ(a.thresholds[i].coarse, b.thresholds[i].coarse);
    EXPECT_EQ(a.thresholds[i].fine, b.thresholds[i].fine);
  }
  for (int l = 0; l < spec.n_layers; ++l) {
    for (int h = 0; h < spec.n_kv_heads; ++h) {
      const std::string xa = index_test::RawHeadIndex(db.get(), a.id, l, h);
      EXPECT_FALSE(xa.empty());
      EXPECT_EQ(xa, index_test::RawHeadIndex(db.get(), b.id, l, h)) << "layer " << l << " head " << h;
    }
  }
  // Batches of one head (kmeans_batch_bytes below one head's keys) and no
  // read-ahead: one Run per head and level, the same context again.
  index_test::RecordingKMeansBackend rec1;
  o.kmeans = &rec1;
  o.kmeans_batch_bytes = 1;
  o.read_ahead = false;
  progress.clear();
  {
    auto src = data.Source();
    Status s = BuildContext(db.get(), "one_by_one", src.get(), o);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  ASSERT_EQ(rec1.calls.size(), static_cast<size_t>(2 * spec.n_layers * spec.n_kv_heads));
  for (const auto& call : rec1.calls) EXPECT_EQ(call.problems.size(), 1u);
  ASSERT_EQ(progress.size(), static_cast<size_t>(spec.n_layers * spec.n_kv_heads));
  ContextInfo c;
  ASSERT_TRUE(db->DescribeContext("one_by_one", &c).ok());
  for (int l = 0; l < spec.n_layers; ++l) {
    for (int h = 0; h < spec.n_kv_heads; ++h) {
      EXPECT_EQ(index_test::RawHeadIndex(db.get(), a.id, l, h), index_test::RawHeadIndex(db.get(), c.id, l, h))
          << "layer " << l << " head " << h;
    }
  }
  index_test::ExpectRoundTrip(db.get(), "custom", data, o.window, o.n_sinks);
}

TEST(IndexBuildTest, ThresholdsMatchCalibratorOnStoredIndex) {
  // The builder's wiring (query-head groups, two passes, read-back) gives
  // exactly what the Calibrator computes from the stored records.
  ScopedTempDir dir("sqz-build");
  KvSpec spec;
  spec.n_layers = 3;
  spec.n_kv_heads = 2;
  spec.n_q_heads = 6;
  spec.n_tokens = 1800;
  spec.q_window = 12;
  KvData data(spec);
  auto db = OpenDb(dir.Sub("db"));
  BuildOptions o = SmallOptions();
  o.quantiles = {0.6, 0.9};
  o.coarse_share = 0.4;
  auto src = data.Source();
  ASSERT_TRUE(BuildContext(db.get(), "c", src.get(), o).ok());
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("c", &info).ok());

  index::Calibrator cal(o.quantiles, o.coarse_share);
  const int g = spec.n_q_heads / spec.n_kv_heads;
  std::unique_ptr<storage::ContextSnapshot> snap;
  ASSERT_TRUE(db->store()->OpenSnapshot("c", &snap).ok());
  ASSERT_EQ(snap->info().id, info.id);
  for (int pass = 0; pass < 2; ++pass) {
    for (int l = 0; l < spec.n_layers; ++l) {
      for (int h = 0; h < spec.n_kv_heads; ++h) {
        storage::HeadIndexRecord rec;
        Status rs = snap->GetHeadIndex(l, h, &rec);
        ASSERT_TRUE(rs.ok()) << rs.ToString();
        index::HeadView v;
        v.dim = spec.head_dim;
        v.k2 = rec.n_fine();
        v.k1 = rec.n_coarse();
        v.fine_centroids = rec.fine_centroids.data();
        v.fine_offsets = rec.fine_offsets.data();
        v.coarse_centroids = rec.coarse_centroids.data();
        v.coarse_child_offsets = rec.coarse_child_offsets.data();
        const float* q = data.q[l].data() + static_cast<size_t>(h) * g * spec.q_window * spec.head_dim;
        if (pass == 0) {
          cal.AddFirstPass(v, q, g, spec.q_window);
        } else {
          cal.AddSecondPass(v, q, g, spec.q_window);
        }
      }
    }
    if (pass == 0) cal.FinishFirstPass();
  }
  auto want = cal.Finish();
  ASSERT_EQ(info.thresholds.size(), want.size());
  EXPECT_EQ(info.calibration_queries, spec.q_window);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(info.thresholds[i].quantile, want[i].quantile);
    EXPECT_EQ(info.thresholds[i].flat, want[i].flat);
    EXPECT_EQ(info.thresholds[i].coarse, want[i].coarse);
    EXPECT_EQ(info.thresholds[i].fine, want[i].fine);
  }
}

TEST(IndexBuildTest, WindowAndSinkClamps) {
  ScopedTempDir dir("sqz-build");
  auto db = OpenDb(dir.Sub("db"));
  KvSpec spec;
  spec.n_layers = 1;
  spec.n_tokens = 40;
  spec.head_dim = 8;
  KvData data(spec);
  struct Case {
    int window, sinks;
  };
  int i = 0;
  for (Case c : {Case{100, 0}, Case{30, 20}, Case{0, 100}, Case{0, 0}, Case{10, 5}}) {
    BuildOptions o = SmallOptions();
    o.window = c.window;
    o.n_sinks = c.sinks;
    o.fine_ratio = 0.2;
    o.coarse_ratio = 0.1;
    auto src = data.Source();
    const std::string name = "c" + std::to_string(i++);
    Status s = BuildContext(db.get(), name, src.get(), o);
    ASSERT_TRUE(s.ok()) << s.ToString();
    SCOPED_TRACE(name);
    index_test::ExpectRoundTrip(db.get(), name, data, c.window, c.sinks);
    ContextInfo info;
    ASSERT_TRUE(db->DescribeContext(name, &info).ok());
    const int sinks = std::min(c.sinks, 40);
    EXPECT_EQ(info.n_sinks, sinks);
    EXPECT_EQ(info.window, std::min(c.window, 40 - sinks));
    if (info.n_clustered == 0) {
      EXPECT_EQ(info.fine_clusters[0], 0);
      EXPECT_EQ(info.clustered_pages, 0);
    }
    VerifyReport vr;
    Status vs = db->VerifyContext(name, &vr);
    EXPECT_TRUE(vs.ok()) << vs.ToString();
  }
}

// --- Failures leave the database unchanged ------------------------------------

class IndexBuildFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<ScopedTempDir>("sqz-buildfail");
    db_ = OpenDb(dir_->Sub("db"));
    KvSpec spec;
    spec.n_tokens = 600;
    spec.head_dim = 16;
    base_ = std::make_unique<KvData>(spec);
    auto src = base_->Source();
    ASSERT_TRUE(BuildContext(db_.get(), "base", src.get(), SmallOptions()).ok());
    ASSERT_TRUE(db_->ListContexts(&names_before_).ok());
    ids_before_ = index_test::RawContextIds(db_.get());
    ASSERT_EQ(ids_before_, index_test::LiveContextIds(db_.get()));
  }

  // The database is exactly as after SetUp: same contexts, no new records.
  void ExpectUnchanged() {
    std::vector<std::string> names;
    ASSERT_TRUE(db_->ListContexts(&names).ok());
    EXPECT_EQ(names, names_before_);
    EXPECT_EQ(index_test::RawContextIds(db_.get()), ids_before_);
    VerifyReport vr;
    EXPECT_TRUE(db_->VerifyContext("base", &vr).ok());
  }

  std::string WriteKv(const std::vector<RawTensor>& t, const std::map<std::string, std::string>& meta) {
    const std::string path = dir_->Sub("bad.safetensors");
    WriteFile(path, SafetensorsBytes(t, meta));
    return path;
  }

  // Opens `path` and builds it as "new"; returns the first error.
  Status OpenAndBuild(const std::string& path) {
    std::unique_ptr<KvSource> src;
    SQZ_RETURN_IF_ERROR(OpenSafetensorsKvSource(path, &src));
    return BuildContext(db_.get(), "new", src.get(), SmallOptions());
  }

  static void ExpectMentions(const Status& s, const std::vector<std::string>& needles) {
    ASSERT_FALSE(s.ok());
    for (const auto& n : needles)
      EXPECT_NE(s.message().find(n), std::string::npos) << s.ToString() << " lacks '" << n << "'";
  }

  std::unique_ptr<ScopedTempDir> dir_;
  std::unique_ptr<DB> db_;
  std::unique_ptr<KvData> base_;
  std::vector<std::string> names_before_;
  std::set<uint64_t> ids_before_;
};

KvData BadData(int n_layers = 4) {
  KvSpec spec;
  spec.n_layers = n_layers;
  spec.n_tokens = 800;
  spec.head_dim = 16;
  spec.dtype = DType::kF16;
  return KvData(spec);
}

TEST_F(IndexBuildFailureTest, TruncatedFile) {
  KvData d = BadData(2);
  std::string bytes = SafetensorsBytes(index_test::KvTensors(d), index_test::KvMetadata(d));
  const std::string path = dir_->Sub("bad.safetensors");
  WriteFile(path, bytes.substr(0, bytes.size() - 1000));
  ExpectMentions(OpenAndBuild(path), {"bad.safetensors", "truncated"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, GarbageHeader) {
  const std::string path = dir_->Sub("bad.safetensors");
  std::string bytes("\x10\0\0\0\0\0\0\0", 8);  // header length 16
  bytes += "{\"layers.0.k\":[[[" + std::string(200, '\x01');
  WriteFile(path, bytes);
  ExpectMentions(OpenAndBuild(path), {"bad.safetensors", "not a valid safetensors file"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, OffsetsBeyondFile) {
  KvData d = BadData(1);
  auto t = index_test::KvTensors(d);
  std::string bytes = SafetensorsBytes(t, index_test::KvMetadata(d));
  // Drop the v data: its header offsets now point past the end.
  const std::string path = dir_->Sub("bad.safetensors");
  WriteFile(path, bytes.substr(0, bytes.size() - t[1].bytes.size()));
  ExpectMentions(OpenAndBuild(path), {"bad.safetensors", "layers.0.v", "beyond"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, WrongDtype) {
  KvData d = BadData(2);
  auto t = index_test::KvTensors(d);
  t[2].dtype = "I16";
  ExpectMentions(OpenAndBuild(WriteKv(t, index_test::KvMetadata(d))),
                 {"layers.1.k has dtype I16; expected F16, BF16 or F32"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, InconsistentShapes) {
  KvData d = BadData(3);
  auto t = index_test::KvTensors(d);
  t[4].shape = {2, 400, 32};  // same byte count, different shape
  ExpectMentions(OpenAndBuild(WriteKv(t, index_test::KvMetadata(d))), {"layers.2.k", "shapes must match"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, MissingLayer) {
  KvData d = BadData(4);
  auto t = index_test::KvTensors(d);
  t.erase(t.begin() + 4, t.begin() + 6);  // layer 2
  ExpectMentions(OpenAndBuild(WriteKv(t, index_test::KvMetadata(d))), {"missing layer 2"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, NaNInALateLayer) {
  // Layers 0..2 are clustered and written before layer 3's NaN is found.
  KvData d = BadData(4);
  const uint16_t nan = 0x7e00;
  std::memcpy(d.v[3].data() + 2 * (800 * 16 + 123 * 16 + 5), &nan, 2);  // head 1, token 123
  auto t = index_test::KvTensors(d);
  int heads_seen = 0;
  std::unique_ptr<KvSource> src;
  ASSERT_TRUE(OpenSafetensorsKvSource(WriteKv(t, index_test::KvMetadata(d)), &src).ok());
  BuildOptions o = SmallOptions();
  o.on_progress = [&](const BuildProgress&) { ++heads_seen; };
  Status s = BuildContext(db_.get(), "new", src.get(), o);
  ExpectMentions(s, {"bad.safetensors", "layers.3.v", "NaN or Inf", "KV head 1, token 123"});
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_EQ(heads_seen, 6) << "the earlier layers were built (and then removed)";
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, InfInMemorySource) {
  KvData d = BadData(3);
  const uint16_t inf = 0xfc00;                   // -inf in fp16
  std::memcpy(d.k[2].data() + 2 * 17, &inf, 2);  // head 0, token 1
  auto src = d.Source();
  Status s = BuildContext(db_.get(), "new", src.get(), SmallOptions());
  ExpectMentions(s, {"in-memory KV", "layers.2.k", "NaN or Inf", "KV head 0, token 1"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, NaNInWindowQueries) {
  KvSpec spec;
  spec.n_layers = 2;
  spec.n_tokens = 500;
  spec.head_dim = 16;
  spec.q_window = 4;
  KvData d(spec);
  d.q[1][7] = std::numeric_limits<float>::quiet_NaN();
  auto src = d.Source();
  ExpectMentions(BuildContext(db_.get(), "new", src.get(), SmallOptions()), {"layers.1.q_window", "NaN or Inf"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, NQHeadsNotAMultiple) {
  KvData d = BadData(1);
  ExpectMentions(OpenAndBuild(WriteKv(index_test::KvTensors(d), {{"n_q_heads", "5"}})),
                 {"bad.safetensors", "n_q_heads 5 is not a multiple of n_kv_heads 2"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, MissingNQHeads) {
  KvData d = BadData(1);
  ExpectMentions(OpenAndBuild(WriteKv(index_test::KvTensors(d), {{"model", "x"}})), {"bad.safetensors", "n_q_heads"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, EmptyContext) {
  std::vector<RawTensor> t = {{"layers.0.k", "F16", {2, 0, 16}, ""}, {"layers.0.v", "F16", {2, 0, 16}, ""}};
  ExpectMentions(OpenAndBuild(WriteKv(t, {{"n_q_heads", "2"}})), {"bad.safetensors", "empty context"});
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, BadOptions) {
  auto src = base_->Source();
  auto expect_bad = [&](BuildOptions o, const std::string& needle) {
    Status s = BuildContext(db_.get(), "new", src.get(), o);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  };
  BuildOptions o = SmallOptions();
  o.window = -1;
  expect_bad(o, "window");
  o = SmallOptions();
  o.n_sinks = -2;
  expect_bad(o, "n_sinks");
  o = SmallOptions();
  o.fine_ratio = 0;
  expect_bad(o, "fine_ratio");
  o = SmallOptions();
  o.coarse_ratio = 1.5;
  expect_bad(o, "coarse_ratio");
  o = SmallOptions();
  o.kmeans_iters = 0;
  expect_bad(o, "kmeans_iters");
  o = SmallOptions();
  o.quantiles = {0.5, 1.0};
  expect_bad(o, "quantiles");
  o = SmallOptions();
  o.fine_ratio = std::numeric_limits<double>::quiet_NaN();
  expect_bad(o, "fine_ratio");
  o = SmallOptions();
  o.coarse_share = 0;
  expect_bad(o, "coarse_share");
  o = SmallOptions();
  o.page_rows = 0;
  expect_bad(o, "page_rows");
  o = SmallOptions();
  o.page_rows = storage::kMaxPageRows + 1;
  expect_bad(o, "page_rows");
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, KMeansBackendFails) {
  // A backend error (here in layer 1's coarse batch) or a bad result fails
  // the build, naming the layer, and leaves the database as it was.
  auto data = BadData();
  for (int mode = 0; mode < 2; ++mode) {
    SCOPED_TRACE(mode == 0 ? "backend error" : "invalid label");
    index_test::RecordingKMeansBackend rec;
    rec.after = [mode](size_t call, KMeansResult* results, size_t n) {
      if (call != 3) return Status::OK();
      if (mode == 0) return Status::Aborted("device lost");
      results[n - 1].labels[0] = -7;
      return Status::OK();
    };
    BuildOptions o = SmallOptions();
    o.kmeans = &rec;
    auto src = data.Source();
    Status s = BuildContext(db_.get(), "new", src.get(), o);
    EXPECT_TRUE(s.IsAborted()) << s.ToString();
    ExpectMentions(s, {"layer 1", mode == 0 ? "device lost" : "head 1"});
    EXPECT_EQ(rec.calls.size(), 4u);
    ExpectUnchanged();
  }
}

TEST_F(IndexBuildFailureTest, ExistingNameWithoutReplace) {
  auto src = base_->Source();
  Status s = BuildContext(db_.get(), "base", src.get(), SmallOptions());
  EXPECT_TRUE(s.IsAlreadyExists()) << s.ToString();
  EXPECT_NE(s.message().find("base"), std::string::npos);
  ExpectUnchanged();
}

TEST_F(IndexBuildFailureTest, ReplaceIsAtomic) {
  ContextInfo old_info;
  ASSERT_TRUE(db_->DescribeContext("base", &old_info).ok());
  KvSpec spec;
  spec.n_layers = 3;
  spec.n_tokens = 700;
  spec.head_dim = 16;
  spec.dtype = DType::kBF16;
  spec.seed = 77;
  KvData next(spec);
  // A failing replace keeps the old context intact.
  {
    KvData broken = next;
    const uint16_t nan = 0x7fc0;  // bf16 NaN
    std::memcpy(broken.k[2].data(), &nan, 2);
    auto src = broken.Source();
    BuildOptions o = SmallOptions();
    o.replace = true;
    EXPECT_TRUE(BuildContext(db_.get(), "base", src.get(), o).IsInvalidArgument());
    ExpectUnchanged();
    index_test::ExpectRoundTrip(db_.get(), "base", *base_, o.window, o.n_sinks);
  }
  auto src = next.Source();
  BuildOptions o = SmallOptions();
  o.replace = true;
  ASSERT_TRUE(BuildContext(db_.get(), "base", src.get(), o).ok());
  std::vector<std::string> names;
  ASSERT_TRUE(db_->ListContexts(&names).ok());
  EXPECT_EQ(names, names_before_);
  ContextInfo info;
  ASSERT_TRUE(db_->DescribeContext("base", &info).ok());
  EXPECT_NE(info.id, old_info.id);
  EXPECT_EQ(info.n_layers, 3);
  EXPECT_EQ(info.dtype, DType::kBF16);
  // Old records are gone; the new ones read back exactly.
  EXPECT_EQ(index_test::RawContextIds(db_.get()), std::set<uint64_t>{info.id});
  index_test::ExpectRoundTrip(db_.get(), "base", next, o.window, o.n_sinks);
}

}  // namespace
}  // namespace sqz
