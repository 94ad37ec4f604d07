// Storage layer: format version, keys, atomic commit, orphan cleanup, drop,
// verify. Contexts here are written record by record through the storage
// interface (storage/store.h; no index build) so the storage contract is
// tested on its own; raw RocksDB access (through DBImpl's view) inspects and
// damages the records underneath.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "storage/db_impl.h"
#include "storage/format.h"
#include "storage/records.h"
#include "tests/test_util.h"
#include "util/crc32c.h"

namespace sqz::storage {
namespace {

using sqz::testing::ScopedTempDir;

constexpr const char* kEnvCrashDb = "SQZ_STORAGE_CRASH_DB";

// A tiny hand-made context: 1 layer, 1 KV head, d = 4, 6 tokens, window 2,
// no sinks, two fine clusters {1,0} and {2,3} (permutation 1,0,2,3), one
// coarse cluster, F32 values. With page_rows 2 its pages are exactly the old
// blocks: page 0 = cluster 0 (tokens 1,0), page 1 = cluster 1 (tokens 2,3),
// page 2 = the always set (tokens 4,5). With page_rows 3: page 0 = tokens
// 1,0,2; page 1 = token 3 + two zero rows; page 2 = tokens 4,5 + a zero row.
struct TinyContext {
  static constexpr int kD = 4;
  static constexpr int kTokens = 6;
  ContextInfo info;      // the manifest to commit (id filled in)
  HeadIndexRecord head;  // the head index (page CRCs filled in)
  std::vector<std::string> pages;
};

// Value of element c of token t's K (kv = 0) or V (kv = 1) row.
float TinyValue(float base, int kv, int t, int c) { return base + kv * 100 + t * 10 + c; }

// One page: K plane [P, d] then V plane, rows of `tokens` (-1: zero padding).
std::string PageBytes(const std::vector<int>& tokens, float base) {
  std::vector<float> v;
  for (int kv = 0; kv < 2; ++kv) {
    for (int t : tokens) {
      for (int c = 0; c < TinyContext::kD; ++c) v.push_back(t < 0 ? 0.0f : TinyValue(base, kv, t, c));
    }
  }
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

TinyContext MakeTiny(const std::string& name, uint64_t id, float base = 0, int page_rows = 2) {
  TinyContext t;
  ContextInfo& m = t.info;
  m.name = name;
  m.id = id;
  m.model = "tiny";
  m.n_layers = 1;
  m.n_kv_heads = 1;
  m.n_q_heads = 1;
  m.head_dim = TinyContext::kD;
  m.n_tokens = TinyContext::kTokens;
  m.dtype = DType::kF32;
  m.window = 2;
  m.n_sinks = 0;
  m.n_clustered = 4;
  m.fine_ratio = 0.5;
  m.coarse_ratio = 0.25;
  m.kmeans_iters = 1;
  m.seed = 1;
  m.fine_clusters = {2};
  m.coarse_clusters = {1};
  m.page_rows = page_rows;
  m.clustered_pages = PagesFor(m.n_clustered, page_rows);
  m.always_pages = PagesFor(m.n_always(), page_rows);
  // Rows in the stored order, cut into pages per run.
  const std::vector<int> clustered = {1, 0, 2, 3}, always = {4, 5};
  for (const auto* run : {&clustered, &always}) {
    for (size_t first = 0; first < run->size(); first += page_rows) {
      std::vector<int> rows;
      for (size_t i = first; i < first + page_rows; ++i) rows.push_back(i < run->size() ? (*run)[i] : -1);
      t.pages.push_back(PageBytes(rows, base));
    }
  }
  m.kv_bytes = t.pages.size() * t.pages[0].size();
  HeadIndexRecord& h = t.head;
  h.layer = 0;
  h.head = 0;
  h.fine_centroids.assign(2 * TinyContext::kD, 0.5f);
  h.fine_offsets = {0, 2, 4};
  h.coarse_centroids.assign(TinyContext::kD, 0.5f);
  h.coarse_child_offsets = {0, 2};
  h.permutation = {1, 0, 2, 3};
  for (const auto& p : t.pages) h.page_crc.push_back(Crc32c(p.data(), p.size()));
  return t;
}

// Starts a writer for `name`, writes the tiny context's records and returns
// them in *t (with the writer's id).
Status BeginTiny(DB* db, const std::string& name, bool replace, float base, int page_rows,
                 std::unique_ptr<ContextWriter>* w, TinyContext* t) {
  TinyContext shape = MakeTiny(name, 0, base, page_rows);
  shape.info.fine_clusters.clear();  // known at commit only
  shape.info.coarse_clusters.clear();
  SQZ_RETURN_IF_ERROR(db->store()->BeginContext(name, replace, shape.info, w));
  *t = MakeTiny(name, (*w)->id(), base, page_rows);
  SQZ_RETURN_IF_ERROR((*w)->PutHeadIndex(t->head));
  for (size_t p = 0; p < t->pages.size(); ++p) SQZ_RETURN_IF_ERROR((*w)->PutPage(0, 0, p, t->pages[p]));
  return Status::OK();
}

// Writes and commits a tiny context; returns its id.
uint64_t WriteTiny(DB* db, const std::string& name, bool replace = false, float base = 0, int page_rows = 2) {
  std::unique_ptr<ContextWriter> w;
  TinyContext t;
  Status s = BeginTiny(db, name, replace, base, page_rows, &w, &t);
  EXPECT_TRUE(s.ok()) << s.ToString();
  if (!s.ok()) return 0;
  s = w->Commit(t.info, replace);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return w->id();
}

std::shared_ptr<RocksView> View(DB* db) { return static_cast<DBImpl*>(db)->view(); }

// Number of records in a column family whose key starts with context id `ctx`.
int CountRecords(DB* db, rocksdb::ColumnFamilyHandle* RocksView::*cf, uint64_t ctx) {
  auto v = View(db);
  std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), (*v).*cf));
  std::string prefix = ContextPrefix(ctx);
  int n = 0;
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) ++n;
  EXPECT_TRUE(it->status().ok());
  return n;
}

Status RawPut(DB* db, rocksdb::ColumnFamilyHandle* RocksView::*cf, const std::string& key, const std::string& value) {
  auto v = View(db);
  return FromRocks(v->db->Put(rocksdb::WriteOptions(), (*v).*cf, key, value), "test put");
}

Status RawDelete(DB* db, rocksdb::ColumnFamilyHandle* RocksView::*cf, const std::string& key) {
  auto v = View(db);
  return FromRocks(v->db->Delete(rocksdb::WriteOptions(), (*v).*cf, key), "test delete");
}

std::unique_ptr<DB> OpenOrDie(const std::string& path) {
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), path, &db);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return db;
}

// Reads pages `ids` of (0, 0) of context `name` through a fresh snapshot.
Status ReadTinyPages(DB* db, const std::string& name, const std::vector<uint32_t>& ids, std::vector<std::string>* out) {
  std::unique_ptr<ContextSnapshot> snap;
  SQZ_RETURN_IF_ERROR(db->store()->OpenSnapshot(name, &snap));
  PageSet set;
  SQZ_RETURN_IF_ERROR(snap->ReadPages(0, 0, ids.data(), ids.size(), &set));
  out->clear();
  for (size_t i = 0; i < set.size(); ++i) {
    out->emplace_back(reinterpret_cast<const char*>(set.data(i)), snap->info().page_bytes());
  }
  return Status::OK();
}

TEST(StorageKeys, OrderPreservingAndRoundTrip) {
  EXPECT_LT(PageKey(1, 0, 0, 0xFFFFFFFF), PageKey(1, 0, 1, 0));
  EXPECT_LT(PageKey(1, 0, 7, 5), PageKey(1, 1, 0, 0));
  EXPECT_LT(PageKey(1, 255, 0, 0), PageKey(1, 256, 0, 0));  // big endian, not little
  EXPECT_LT(PageKey(1, 0, 0, 255), PageKey(1, 0, 0, 256));
  EXPECT_LT(HeadKey(2, 9, 9), ContextPrefix(3));
  EXPECT_LT(PageKey(2, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), ContextEnd(2));
  EXPECT_EQ(ContextEnd(2), ContextPrefix(3));
  EXPECT_EQ(PageKey(1, 2, 3, 4).substr(0, 16), HeadKey(1, 2, 3));  // a head's pages follow its index key
  uint64_t c;
  uint32_t l, h, p;
  ASSERT_TRUE(DecodePageKey(PageKey(0x0102030405060708ull, 3, 4, 5), &c, &l, &h, &p));
  EXPECT_EQ(c, 0x0102030405060708ull);
  EXPECT_EQ(l, 3u);
  EXPECT_EQ(h, 4u);
  EXPECT_EQ(p, 5u);
  EXPECT_FALSE(DecodePageKey(HeadKey(1, 2, 3), &c, &l, &h, &p));
  ASSERT_TRUE(DecodeContextId(HeadKey(77, 1, 1), &c));
  EXPECT_EQ(c, 77u);
  ASSERT_TRUE(DecodeReclaimKey(ReclaimKey(0x0a0b0c0d0e0f1011ull), &c));
  EXPECT_EQ(c, 0x0a0b0c0d0e0f1011ull);
  EXPECT_FALSE(DecodeReclaimKey(ContextPrefix(5), &c));
}

TEST(StoragePages, Geometry) {
  TinyContext t = MakeTiny("g", 1, 0, 3);
  const ContextInfo& m = t.info;
  EXPECT_EQ(PagesFor(0, 3), 0);
  EXPECT_EQ(PagesFor(4, 3), 2);
  EXPECT_EQ(PagesFor(6, 3), 2);
  EXPECT_EQ(m.clustered_pages, 2);
  EXPECT_EQ(m.always_pages, 1);
  EXPECT_EQ(m.page_bytes(), 2u * 3 * 4 * 4);
  // Clustered rows 0..3 -> pages 0, 0, 0, 1; always rows 4, 5 -> page 2.
  const int64_t page[] = {0, 0, 0, 1, 2, 2}, slot[] = {0, 1, 2, 0, 0, 1};
  for (int r = 0; r < 6; ++r) {
    EXPECT_EQ(PageOfRow(m, r), page[r]) << "row " << r;
    EXPECT_EQ(SlotOfRow(m, r), slot[r]) << "row " << r;
  }
  ContextInfo x = m;
  x.format_version = kFormatVersion;
  Status s = ValidateManifest(x);
  EXPECT_TRUE(s.ok()) << s.ToString();
  // Page counts that do not match the rows are refused.
  x.always_pages = 2;
  EXPECT_TRUE(ValidateManifest(x).IsCorruption());
  x = m;
  x.format_version = kFormatVersion;
  x.page_rows = 0;
  EXPECT_TRUE(ValidateManifest(x).IsCorruption());
}

TEST(StorageDb, CreateReopenAndMissing) {
  ScopedTempDir dir;
  {
    auto db = OpenOrDie(dir.Sub("db"));
    std::vector<std::string> names;
    ASSERT_TRUE(db->ListContexts(&names).ok());
    EXPECT_TRUE(names.empty());
  }
  auto db = OpenOrDie(dir.Sub("db"));
  // A second read-write handle on the same directory is refused (RocksDB lock).
  std::unique_ptr<DB> second;
  Status s = DB::Open(Options(), dir.Sub("db"), &second);
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
  EXPECT_NE(s.message().find("open read-write in another process"), std::string::npos) << s.ToString();

  Options no_create;
  no_create.create_if_missing = false;
  std::unique_ptr<DB> none;
  s = DB::Open(no_create, dir.Sub("nothing"), &none);
  EXPECT_TRUE(s.IsNotFound()) << s.ToString();
}

// Writes `version` as the database's format version with plain RocksDB.
void SetFormatVersion(const std::string& path, uint32_t version) {
  rocksdb::Options o;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{kCfDefault, {}}, {kCfManifest, {}}, {kCfIndex, {}}, {kCfKv, {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> hs;
  rocksdb::DB* raw;
  ASSERT_TRUE(rocksdb::DB::Open(o, path, cfs, &hs, &raw).ok());
  ASSERT_TRUE(raw->Put(rocksdb::WriteOptions(), hs[0], kFormatVersionKey, EncodeBE(version, 4)).ok());
  for (auto* h : hs) ASSERT_TRUE(raw->DestroyColumnFamilyHandle(h).ok());
  delete raw;
}

TEST(StorageDb, NewerFormatVersionIsRefused) {
  ScopedTempDir dir;
  { auto db = OpenOrDie(dir.Sub("db")); }
  // Pretend a future build wrote the database.
  SetFormatVersion(dir.Sub("db"), kFormatVersion + 1);
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), dir.Sub("db"), &db);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("version " + std::to_string(kFormatVersion + 1)), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("Upgrade"), std::string::npos);
}

TEST(StorageDb, OlderFormatVersionIsRefused) {
  ScopedTempDir dir;
  { auto db = OpenOrDie(dir.Sub("db")); }
  // Version 1 (one KV block per cluster) cannot be read by this build.
  SetFormatVersion(dir.Sub("db"), kFormatVersion - 1);
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), dir.Sub("db"), &db);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("version " + std::to_string(kFormatVersion - 1)), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("Rebuild"), std::string::npos) << s.ToString();
}

// A manifest whose records are gone (damage, not a race with the writer):
// a read-only open gives up after catching up and says what to run.
TEST(StorageDb, ReadOnlyOpenRefusesAManifestWithoutRecords) {
  ScopedTempDir dir;
  {
    auto db = OpenOrDie(dir.Sub("db"));
    const uint64_t id = WriteTiny(db.get(), "doc");
    auto v = View(db.get());
    ASSERT_TRUE(v->db->DeleteRange(rocksdb::WriteOptions(), v->cf_index, ContextPrefix(id), ContextEnd(id)).ok());
    ASSERT_TRUE(v->db->DeleteRange(rocksdb::WriteOptions(), v->cf_kv, ContextPrefix(id), ContextEnd(id)).ok());
  }
  Options ro;
  ro.read_only = true;
  std::unique_ptr<DB> db;
  Status s = DB::Open(ro, dir.Sub("db"), &db);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("'doc' has a manifest but its records are missing"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("sqctl drop"), std::string::npos) << s.ToString();
}

TEST(StorageDb, CommitDescribeVerifyReadBack) {
  ScopedTempDir dir;
  uint64_t id;
  {
    auto db = OpenOrDie(dir.Sub("db"));
    id = WriteTiny(db.get(), "doc");
  }
  auto db = OpenOrDie(dir.Sub("db"));
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"doc"});
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("doc", &info).ok());
  EXPECT_EQ(info.id, id);
  EXPECT_EQ(info.format_version, kFormatVersion);
  EXPECT_EQ(info.n_tokens, 6);
  EXPECT_EQ(info.n_clustered, 4);
  EXPECT_EQ(info.fine_clusters, std::vector<int32_t>{2});
  EXPECT_EQ(info.page_rows, 2);
  EXPECT_EQ(info.clustered_pages, 2);
  EXPECT_EQ(info.always_pages, 1);
  EXPECT_GT(info.bytes_on_disk, 0u);
  VerifyReport r;
  Status s = db->VerifyContext("doc", &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r.records_checked, 2);
  EXPECT_EQ(r.kv_pages_checked, 3);
  EXPECT_EQ(r.bytes_checked, 3 * info.page_bytes());
  TinyContext t = MakeTiny("doc", id);
  // The head index reads back as written.
  std::unique_ptr<ContextSnapshot> snap;
  ASSERT_TRUE(db->store()->OpenSnapshot("doc", &snap).ok());
  EXPECT_EQ(snap->info().id, id);
  HeadIndexRecord h;
  ASSERT_TRUE(snap->GetHeadIndex(0, 0, &h).ok());
  EXPECT_EQ(h.fine_offsets, t.head.fine_offsets);
  EXPECT_EQ(h.coarse_child_offsets, t.head.coarse_child_offsets);
  EXPECT_EQ(h.permutation, t.head.permutation);
  EXPECT_EQ(h.page_crc, t.head.page_crc);
  EXPECT_EQ(h.fine_centroids, t.head.fine_centroids);
  EXPECT_EQ(h.coarse_centroids, t.head.coarse_centroids);
  EXPECT_TRUE(snap->GetHeadIndex(0, 1, &h).IsInvalidArgument());
  // Pages read back bit for bit, in the order asked.
  std::vector<std::string> vals;
  ASSERT_TRUE(ReadTinyPages(db.get(), "doc", {2, 1}, &vals).ok());
  ASSERT_EQ(vals.size(), 2u);
  EXPECT_EQ(vals[0], t.pages[2]);
  EXPECT_EQ(vals[1], t.pages[1]);
  EXPECT_TRUE(ReadTinyPages(db.get(), "doc", {7}, &vals).IsInvalidArgument());  // past the last page
  EXPECT_TRUE(db->DescribeContext("nope", &info).IsNotFound());
  EXPECT_TRUE(db->store()->OpenSnapshot("nope", &snap).IsNotFound());
}

TEST(StorageDb, PartialPagesAreZeroPadded) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  const uint64_t id = WriteTiny(db.get(), "p3", false, 0, /*page_rows=*/3);
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("p3", &info).ok());
  EXPECT_EQ(info.id, id);
  EXPECT_EQ(info.clustered_pages, 2);
  EXPECT_EQ(info.always_pages, 1);
  VerifyReport r;
  Status s = db->VerifyContext("p3", &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r.kv_pages_checked, 3);
  std::vector<std::string> vals;
  ASSERT_TRUE(ReadTinyPages(db.get(), "p3", {0, 1, 2}, &vals).ok());
  // Page 1: token 3 then two zero rows, in both planes.
  const float* f = reinterpret_cast<const float*>(vals[1].data());
  for (int kv = 0; kv < 2; ++kv) {
    for (int slot = 0; slot < 3; ++slot) {
      for (int c = 0; c < 4; ++c) {
        EXPECT_EQ(f[(kv * 3 + slot) * 4 + c], slot == 0 ? TinyValue(0, kv, 3, c) : 0.0f);
      }
    }
  }
  const std::vector<std::string> want = MakeTiny("p3", id, 0, 3).pages;
  EXPECT_EQ(vals, want);
}

// Runs only as the child of UncommittedRecordsAreInvisibleAndRemovedOnOpen
// (disabled otherwise): writes records of a context that never commits,
// makes them durable and dies without any cleanup.
TEST(StorageCrashChild, DISABLED_WriteAndDie) {
  const char* path = std::getenv(kEnvCrashDb);
  if (path == nullptr) GTEST_SKIP() << "only run by StorageDb.UncommittedRecordsAreInvisibleAndRemovedOnOpen";
  auto db = OpenOrDie(path);
  std::unique_ptr<ContextWriter> w;
  TinyContext t;
  Status s = BeginTiny(db.get(), "lost", false, 0, 2, &w, &t);
  ASSERT_TRUE(s.ok()) << s.ToString();
  // Reading a record back pushes the writer's batch into RocksDB; a flush
  // puts the memtables on disk.
  HeadIndexRecord back;
  s = w->GetHeadIndex(0, 0, &back);
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto v = View(db.get());
  rocksdb::FlushOptions fo;
  ASSERT_TRUE(v->db->Flush(fo, {v->cf_kv, v->cf_index}).ok());
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, w->id()), 3);
  // Uncommitted records are invisible.
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"kept"});
  ContextInfo info;
  EXPECT_TRUE(db->DescribeContext("lost", &info).IsNotFound());
  std::printf("[ child ] orphan id %llu\n", static_cast<unsigned long long>(w->id()));
  std::fflush(stdout);
  raise(SIGKILL);
}

// Number of index/kv records per context id, read with plain RocksDB (before
// sqz's Open removes orphans).
std::map<uint64_t, int> RawRecordCounts(const std::string& path) {
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{kCfDefault, {}}, {kCfManifest, {}}, {kCfIndex, {}}, {kCfKv, {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::OpenForReadOnly(rocksdb::DBOptions(), path, cfs, &handles, &raw);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::map<uint64_t, int> counts;
  if (!s.ok()) return counts;
  for (int i : {2, 3}) {
    std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), handles[i]));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      uint64_t id = 0;
      EXPECT_TRUE(DecodeContextId(it->key().ToStringView(), &id));
      ++counts[id];
    }
  }
  for (auto* h : handles) EXPECT_TRUE(raw->DestroyColumnFamilyHandle(h).ok());
  delete raw;
  return counts;
}

TEST(StorageDb, UncommittedRecordsAreInvisibleAndRemovedOnOpen) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("db");
  uint64_t kept;
  {
    auto db = OpenOrDie(path);
    kept = WriteTiny(db.get(), "kept");
  }
  // A process writes records of "lost" and is killed before its commit.
  const int status = sqz::testing::RunSelfChild("StorageCrashChild.DISABLED_WriteAndDie",
                                                {std::string(kEnvCrashDb) + "=" + path}, 120);
  ASSERT_TRUE(status != -1 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the child did not die by SIGKILL (wait status " << status << ")";
  // Its records are on disk, under an id no manifest names.
  auto counts = RawRecordCounts(path);
  uint64_t orphan = 0;
  for (const auto& [id, n] : counts) {
    if (id != kept) {
      EXPECT_EQ(orphan, 0u) << "one orphan context expected";
      orphan = id;
      EXPECT_EQ(n, 4) << "its head index and 3 pages";
    }
  }
  ASSERT_NE(orphan, 0u) << "no records of the killed writer reached the disk";
  EXPECT_GT(orphan, kept);

  auto db = OpenOrDie(path);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, orphan), 0);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_index, orphan), 0);
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"kept"});
  ASSERT_TRUE(db->VerifyContext("kept", nullptr).ok());
  // New ids never reuse an id seen on disk.
  std::unique_ptr<ContextWriter> w;
  TinyContext t;
  ASSERT_TRUE(BeginTiny(db.get(), "next", false, 0, 2, &w, &t).ok());
  EXPECT_GT(w->id(), orphan);
}

TEST(StorageDb, AbandonedWriterLeavesNothing) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  WriteTiny(db.get(), "kept");
  uint64_t id;
  {
    std::unique_ptr<ContextWriter> w;
    TinyContext t;
    ASSERT_TRUE(BeginTiny(db.get(), "lost", false, 0, 2, &w, &t).ok());
    id = w->id();
    HeadIndexRecord back;
    ASSERT_TRUE(w->GetHeadIndex(0, 0, &back).ok());  // the records reach RocksDB
    EXPECT_EQ(back.permutation, t.head.permutation);
    EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, id), 3);
    std::vector<std::string> names;
    ASSERT_TRUE(db->ListContexts(&names).ok());
    EXPECT_EQ(names, std::vector<std::string>{"kept"});
  }  // destroyed without a commit: aborted
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, id), 0);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_index, id), 0);
  ContextInfo info;
  EXPECT_TRUE(db->DescribeContext("lost", &info).IsNotFound());
  // Its id is not handed out again.
  std::unique_ptr<ContextWriter> w;
  TinyContext t;
  ASSERT_TRUE(BeginTiny(db.get(), "next", false, 0, 2, &w, &t).ok());
  EXPECT_GT(w->id(), id);
}

TEST(StorageDb, ExistingNameNeedsReplaceAndReplaceIsAtomic) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  uint64_t first = WriteTiny(db.get(), "doc");
  // Refused early, before any record is written.
  std::unique_ptr<ContextWriter> w;
  TinyContext t;
  Status s = BeginTiny(db.get(), "doc", /*replace=*/false, 0, 2, &w, &t);
  EXPECT_TRUE(s.IsAlreadyExists()) << s.ToString();
  EXPECT_NE(s.message().find("--replace"), std::string::npos);
  EXPECT_FALSE(w);
  // Refused at commit when another writer took the name meanwhile; the
  // loser's records are removed when it aborts.
  ASSERT_TRUE(BeginTiny(db.get(), "race", false, 0, 2, &w, &t).ok());
  const uint64_t loser = w->id();
  WriteTiny(db.get(), "race");
  s = w->Commit(t.info, /*replace=*/false);
  EXPECT_TRUE(s.IsAlreadyExists()) << s.ToString();
  EXPECT_NE(s.message().find("--replace"), std::string::npos);
  ASSERT_TRUE(w->Abort().ok());
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, loser), 0);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_index, loser), 0);
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("doc", &info).ok());
  EXPECT_EQ(info.id, first);

  uint64_t third = WriteTiny(db.get(), "doc", /*replace=*/true, /*base=*/1000);
  EXPECT_GT(third, first);
  ASSERT_TRUE(db->DescribeContext("doc", &info).ok());
  EXPECT_EQ(info.id, third);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, first), 0);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_index, first), 0);
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
  std::vector<std::string> vals;
  ASSERT_TRUE(ReadTinyPages(db.get(), "doc", {0, 1, 2}, &vals).ok());
  EXPECT_EQ(vals, MakeTiny("doc", third, 1000).pages);
}

TEST(StorageDb, DropRemovesEverything) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  uint64_t a = WriteTiny(db.get(), "a");
  WriteTiny(db.get(), "b");
  ASSERT_TRUE(db->DropContext("a").ok());
  EXPECT_TRUE(db->DropContext("a").IsNotFound());
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"b"});
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_kv, a), 0);
  EXPECT_EQ(CountRecords(db.get(), &RocksView::cf_index, a), 0);
  ASSERT_TRUE(db->VerifyContext("b", nullptr).ok());
  // A new context of the old name gets a new id.
  EXPECT_GT(WriteTiny(db.get(), "a"), a);
}

TEST(StorageDb, VerifyDetectsDamagedRecords) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  uint64_t id = WriteTiny(db.get(), "doc");
  TinyContext t = MakeTiny("doc", id);
  const auto kv = &RocksView::cf_kv;

  // A flipped byte in KV page 1 fails its CRC.
  std::string bad = t.pages[1];
  bad[5] ^= 0x40;
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 1), bad).ok());
  Status s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("KV page 1 fails its CRC32C"), std::string::npos) << s.ToString();

  // A page of the wrong size: verify and reads both refuse it.
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 1), "short").ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("KV page 1 has 5 bytes, expected 64"), std::string::npos) << s.ToString();
  std::vector<std::string> vals;
  s = ReadTinyPages(db.get(), "doc", {1}, &vals);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("KV page 1 has 5 bytes"), std::string::npos) << s.ToString();

  // A missing page.
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 1), t.pages[1]).ok());
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
  ASSERT_TRUE(RawDelete(db.get(), kv, PageKey(id, 0, 0, 0)).ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("KV page 1 (expected 0)"), std::string::npos) << s.ToString();
  s = ReadTinyPages(db.get(), "doc", {0}, &vals);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("KV page 0 is missing"), std::string::npos) << s.ToString();
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 0), t.pages[0]).ok());
  ASSERT_TRUE(RawDelete(db.get(), kv, PageKey(id, 0, 0, 2)).ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("1 KV page(s) missing"), std::string::npos) << s.ToString();

  // A page beyond the last one.
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 2), t.pages[2]).ok());
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
  ASSERT_TRUE(RawPut(db.get(), kv, PageKey(id, 0, 0, 3), t.pages[2]).ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("unexpected KV page 3"), std::string::npos) << s.ToString();
  ASSERT_TRUE(RawDelete(db.get(), kv, PageKey(id, 0, 0, 3)).ok());
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());

  // Well-formed index records that fail the validator: a permutation that
  // repeats a token (verify's full check), a page CRC table of the wrong size.
  {
    HeadIndexRecord h = t.head;
    h.permutation = {1, 1, 2, 3};
    ASSERT_TRUE(RawPut(db.get(), &RocksView::cf_index, HeadKey(id, 0, 0), EncodeHeadIndex(t.info, h)).ok());
    s = db->VerifyContext("doc", nullptr);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("permutation"), std::string::npos) << s.ToString();
    h = t.head;
    h.page_crc.pop_back();
    ASSERT_TRUE(RawPut(db.get(), &RocksView::cf_index, HeadKey(id, 0, 0), EncodeHeadIndex(t.info, h)).ok());
    s = db->VerifyContext("doc", nullptr);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("page CRC table"), std::string::npos) << s.ToString();
    ASSERT_TRUE(RawPut(db.get(), &RocksView::cf_index, HeadKey(id, 0, 0), EncodeHeadIndex(t.info, t.head)).ok());
    ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
  }

  // An index record that is not a FlatBuffer.
  ASSERT_TRUE(RawPut(db.get(), &RocksView::cf_index, HeadKey(id, 0, 0), "garbage!").ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("FlatBuffers"), std::string::npos) << s.ToString();

  // A manifest that is not a FlatBuffer: the context cannot be described.
  ASSERT_TRUE(RawPut(db.get(), &RocksView::cf_manifest, "doc", "xx").ok());
  ContextInfo info;
  EXPECT_TRUE(db->DescribeContext("doc", &info).IsCorruption());
}

}  // namespace
}  // namespace sqz::storage
