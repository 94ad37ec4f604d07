// Crash safety of BuildContext: a process killed (SIGKILL) in the middle of a
// build leaves no visible context, and the next Open removes its records.
//
// The build runs in a child process started with fork() + exec of this very
// test binary (filter IndexCrashChild.*, testing::RunSelfChild): exec gives
// the child a clean process (RocksDB's background threads do not survive a
// bare fork).
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;
using sqz::testing::ScopedTempDir;

constexpr const char* kEnvDb = "SQZ_INDEX_CRASH_DB";
constexpr int kKillAfterHeads = 6;

// Generates each layer when it is read, so the child holds one layer only.
class GeneratedSource final : public KvSource {
 public:
  explicit GeneratedSource(const KvSpec& spec) : spec_(spec) {
    shape_.n_layers = spec.n_layers;
    shape_.n_kv_heads = spec.n_kv_heads;
    shape_.n_q_heads = spec.n_q_heads;
    shape_.n_tokens = spec.n_tokens;
    shape_.head_dim = spec.head_dim;
    shape_.dtype = spec.dtype;
  }
  const KvShape& shape() const override { return shape_; }
  Status ReadLayer(int layer, std::vector<uint8_t>* k, std::vector<uint8_t>* v) override {
    std::vector<float> kf, vf;
    index_test::GenerateLayerFloat(spec_, layer, &kf, &vf, nullptr);
    *k = index_test::ToDType(kf, spec_.dtype);
    *v = index_test::ToDType(vf, spec_.dtype);
    return Status::OK();
  }
  Status ReadQWindow(int, std::vector<float>*) override { return Status::NotFound("none"); }
  std::string Describe() const override { return "generated"; }

 private:
  KvSpec spec_;
  KvShape shape_;
};

// Runs only as the child of CrashMidBuild (disabled otherwise).
TEST(IndexCrashChild, DISABLED_BuildAndDie) {
  const char* path = std::getenv(kEnvDb);
  if (path == nullptr) GTEST_SKIP() << "only run by IndexCrashTest.CrashMidBuild";
  std::unique_ptr<DB> db;
  ASSERT_TRUE(DB::Open(Options(), path, &db).ok());
  // 32 MiB of K+V per head (F32): several writer batches and memtables reach
  // RocksDB before the kill.
  KvSpec spec;
  spec.n_layers = 4;
  spec.n_kv_heads = 4;
  spec.n_q_heads = 4;
  spec.n_tokens = 32768;
  spec.head_dim = 128;
  spec.dtype = DType::kF32;
  GeneratedSource src(spec);
  BuildOptions o;
  o.fine_ratio = 0.005;
  o.coarse_ratio = 0.001;
  o.kmeans_iters = 2;
  o.on_progress = [](const BuildProgress& p) {
    if (p.heads_done == kKillAfterHeads) {
      // Give background flushes a moment so records are on disk, not only in
      // the (lost) memtable; then die without any cleanup.
      std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      raise(SIGKILL);
    }
  };
  Status s = BuildContext(db.get(), "doomed", &src, o);
  FAIL() << "the build should have been killed; it returned " << s.ToString();
}

// Number of raw kv/index records per context id, read with plain RocksDB
// (before sqz's Open removes orphans).
std::map<uint64_t, int64_t> RawRecordCounts(const std::string& path) {
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {storage::kCfDefault, {}}, {storage::kCfManifest, {}}, {storage::kCfIndex, {}}, {storage::kCfKv, {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::OpenForReadOnly(rocksdb::DBOptions(), path, cfs, &handles, &raw);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::map<uint64_t, int64_t> counts;
  if (!s.ok()) return counts;
  for (int i : {2, 3}) {
    std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), handles[i]));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      uint64_t id = 0;
      storage::DecodeContextId(it->key().ToStringView(), &id);
      ++counts[id];
    }
  }
  for (auto* h : handles) raw->DestroyColumnFamilyHandle(h);
  delete raw;
  return counts;
}

TEST(IndexCrashTest, CrashMidBuild) {
  ScopedTempDir dir("sqz-crash");
  const std::string path = dir.Sub("db");
  KvSpec spec;
  spec.n_tokens = 1500;
  spec.q_window = 8;
  KvData keep1(spec);
  spec.seed = 2;
  spec.dtype = DType::kBF16;
  KvData keep2(spec);
  BuildOptions o;
  o.kmeans_iters = 3;
  std::set<uint64_t> live_before;
  {
    std::unique_ptr<DB> db;
    ASSERT_TRUE(DB::Open(Options(), path, &db).ok());
    auto s1 = keep1.Source();
    auto s2 = keep2.Source();
    ASSERT_TRUE(BuildContext(db.get(), "keep1", s1.get(), o).ok());
    ASSERT_TRUE(BuildContext(db.get(), "keep2", s2.get(), o).ok());
    live_before = index_test::LiveContextIds(db.get());
  }

  // Child: this binary again, on the disabled child test.
  const int status =
      sqz::testing::RunSelfChild("IndexCrashChild.DISABLED_BuildAndDie", {std::string(kEnvDb) + "=" + path}, 5 * 60);
  ASSERT_NE(status, -1) << "the child build could not run or did not finish in time";
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "child did not die by SIGKILL (exit status " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1) << ")";

  // The killed build left records behind (otherwise this test proves nothing).
  auto counts = RawRecordCounts(path);
  int64_t orphan_records = 0;
  for (const auto& [id, c] : counts) {
    if (!live_before.count(id)) orphan_records += c;
  }
  EXPECT_GT(orphan_records, 0) << "no records of the killed build reached the disk";
  std::printf("[ info ] records of the killed build on disk before reopen: %lld\n",
              static_cast<long long>(orphan_records));

  // Reopen: committed contexts intact, the killed one invisible, no orphans.
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), path, &db);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"keep1", "keep2"}));
  for (const char* name : {"keep1", "keep2"}) {
    VerifyReport vr;
    Status vs = db->VerifyContext(name, &vr);
    EXPECT_TRUE(vs.ok()) << name << ": " << vs.ToString();
  }
  index_test::ExpectRoundTrip(db.get(), "keep1", keep1, o.window, o.n_sinks);
  index_test::ExpectRoundTrip(db.get(), "keep2", keep2, o.window, o.n_sinks);
  EXPECT_EQ(index_test::RawContextIds(db.get()), live_before);

  // The database is fully usable: a new build commits with a fresh id.
  auto s3 = keep1.Source();
  ASSERT_TRUE(BuildContext(db.get(), "after", s3.get(), o).ok());
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("after", &info).ok());
  EXPECT_EQ(live_before.count(info.id), 0u);
  EXPECT_EQ(index_test::RawContextIds(db.get()), index_test::LiveContextIds(db.get()));
}

}  // namespace
}  // namespace sqz
