// Storage layer: format version, atomic commit, orphan cleanup, drop, verify.
// Contexts here are written record by record (no index build) so the storage
// contract is tested on its own.
#include <flatbuffers/flatbuffers.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "storage/db_impl.h"
#include "storage/format.h"
#include "tests/test_util.h"
#include "util/crc32c.h"

namespace sqz::storage {
namespace {

using sqz::testing::ScopedTempDir;

// A tiny hand-made context: 1 layer, 1 KV head, d = 4, 6 tokens, window 2,
// two fine clusters {1,0} and {2,3}, one coarse cluster, F32 values.
struct TinyContext {
  static constexpr int kD = 4;
  std::vector<std::string> blocks;  // block 0, block 1, always block
  std::string head_index;
  std::string manifest;
};

std::string BlockBytes(const std::vector<int>& rows, float base) {
  std::vector<float> v;
  for (int kv = 0; kv < 2; ++kv) {
    for (int r : rows) {
      for (int c = 0; c < TinyContext::kD; ++c) v.push_back(base + kv * 100 + r * 10 + c);
    }
  }
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

TinyContext MakeTiny(const std::string& name, uint64_t id, float base = 0) {
  TinyContext t;
  t.blocks = {BlockBytes({1, 0}, base), BlockBytes({2, 3}, base), BlockBytes({4, 5}, base)};
  std::vector<uint32_t> crc;
  for (const auto& b : t.blocks) crc.push_back(Crc32c(b.data(), b.size()));
  {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<float> fine(2 * TinyContext::kD, 0.5f), coarse(TinyContext::kD, 0.5f);
    auto hi = fb::CreateHeadIndex(fbb, 0, 0, TinyContext::kD, 4, fbb.CreateVector(fine),
                                  fbb.CreateVector(std::vector<uint32_t>{0, 2, 4}), fbb.CreateVector(coarse),
                                  fbb.CreateVector(std::vector<uint32_t>{0, 2}),
                                  fbb.CreateVector(std::vector<uint32_t>{1, 0, 2, 3}),
                                  fbb.CreateVector(std::vector<uint32_t>{4, 5}), fbb.CreateVector(crc));
    fbb.Finish(hi);
    t.head_index.assign(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    auto m = fb::CreateManifest(fbb, kFormatVersion, id, fbb.CreateString(name), fbb.CreateString("tiny"), 1, 1, 1,
                                TinyContext::kD, 6, static_cast<uint8_t>(DType::kF32), 2, 0, 4, 0.5, 0.25, 1, 1,
                                fbb.CreateVector(std::vector<int32_t>{2}), fbb.CreateVector(std::vector<int32_t>{1}));
    fbb.Finish(m);
    t.manifest.assign(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
  }
  return t;
}

// Writes and commits a tiny context; returns its id.
uint64_t WriteTiny(DB* db, const std::string& name, bool replace = false, Status* commit_status = nullptr,
                   float base = 0) {
  DBImpl* impl = Impl(db);
  std::unique_ptr<ContextWriter> w;
  EXPECT_TRUE(impl->BeginContext(&w).ok());
  TinyContext t = MakeTiny(name, w->id(), base);
  EXPECT_TRUE(w->PutBlock(0, 0, 0, t.blocks[0]).ok());
  EXPECT_TRUE(w->PutBlock(0, 0, 1, t.blocks[1]).ok());
  EXPECT_TRUE(w->PutBlock(0, 0, kAlwaysBlock, t.blocks[2]).ok());
  EXPECT_TRUE(w->PutHeadIndex(0, 0, t.head_index).ok());
  Status s = impl->CommitContext(w.get(), name, t.manifest, replace);
  if (commit_status) {
    *commit_status = s;
    if (!s.ok()) {
      EXPECT_TRUE(impl->AbortContext(w.get()).ok());
    }
  } else {
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  return w->id();
}

// Number of records in a column family whose key starts with context id `ctx`.
int CountRecords(DB* db, rocksdb::ColumnFamilyHandle* cf, uint64_t ctx) {
  std::unique_ptr<rocksdb::Iterator> it(Impl(db)->raw()->NewIterator(rocksdb::ReadOptions(), cf));
  std::string prefix = ContextPrefix(ctx);
  int n = 0;
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) ++n;
  return n;
}

std::unique_ptr<DB> OpenOrDie(const std::string& path) {
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), path, &db);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return db;
}

TEST(StorageKeys, OrderPreservingAndRoundTrip) {
  EXPECT_LT(BlockKey(1, 0, 0, 0xFFFFFFFF), BlockKey(1, 0, 1, 0));
  EXPECT_LT(BlockKey(1, 0, 7, 5), BlockKey(1, 1, 0, 0));
  EXPECT_LT(BlockKey(1, 255, 0, 0), BlockKey(1, 256, 0, 0));  // big endian, not little
  EXPECT_LT(HeadKey(2, 9, 9), ContextPrefix(3));
  uint64_t c;
  uint32_t l, h, b;
  ASSERT_TRUE(DecodeBlockKey(BlockKey(0x0102030405060708ull, 3, 4, 5), &c, &l, &h, &b));
  EXPECT_EQ(c, 0x0102030405060708ull);
  EXPECT_EQ(l, 3u);
  EXPECT_EQ(h, 4u);
  EXPECT_EQ(b, 5u);
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
  // A second handle on the same directory is refused (RocksDB lock).
  std::unique_ptr<DB> second;
  Status s = DB::Open(Options(), dir.Sub("db"), &second);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("in use"), std::string::npos) << s.ToString();

  Options no_create;
  no_create.create_if_missing = false;
  std::unique_ptr<DB> none;
  s = DB::Open(no_create, dir.Sub("nothing"), &none);
  EXPECT_TRUE(s.IsNotFound()) << s.ToString();
}

TEST(StorageDb, NewerFormatVersionIsRefused) {
  ScopedTempDir dir;
  { auto db = OpenOrDie(dir.Sub("db")); }
  {
    // Pretend a future build wrote the database.
    rocksdb::Options o;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{kCfDefault, {}}, {kCfManifest, {}}, {kCfIndex, {}}, {kCfKv, {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> hs;
    rocksdb::DB* raw;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir.Sub("db"), cfs, &hs, &raw).ok());
    std::string v = {0, 0, 0, static_cast<char>(kFormatVersion + 1)};
    ASSERT_TRUE(raw->Put(rocksdb::WriteOptions(), hs[0], kFormatVersionKey, v).ok());
    for (auto* h : hs) raw->DestroyColumnFamilyHandle(h);
    delete raw;
  }
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), dir.Sub("db"), &db);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("version " + std::to_string(kFormatVersion + 1)), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("Upgrade"), std::string::npos);
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
  EXPECT_EQ(info.n_tokens, 6);
  EXPECT_EQ(info.n_clustered, 4);
  EXPECT_EQ(info.fine_clusters, std::vector<int32_t>{2});
  VerifyReport r;
  Status s = db->VerifyContext("doc", &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r.kv_pages_checked, 3);
  TinyContext t = MakeTiny("doc", id);
  std::vector<rocksdb::PinnableSlice> vals;
  uint32_t want[] = {1, kAlwaysBlock};
  ASSERT_TRUE(Impl(db.get())->MultiGetBlocks(id, 0, 0, want, 2, &vals).ok());
  EXPECT_EQ(vals[0].ToString(), t.blocks[1]);
  EXPECT_EQ(vals[1].ToString(), t.blocks[2]);
  uint32_t missing = 7;
  EXPECT_TRUE(Impl(db.get())->MultiGetBlocks(id, 0, 0, &missing, 1, &vals).IsCorruption());
  EXPECT_TRUE(db->DescribeContext("nope", &info).IsNotFound());
}

TEST(StorageDb, UncommittedRecordsAreInvisibleAndRemovedOnOpen) {
  ScopedTempDir dir;
  uint64_t orphan;
  {
    auto db = OpenOrDie(dir.Sub("db"));
    WriteTiny(db.get(), "kept");
    std::unique_ptr<ContextWriter> w;
    ASSERT_TRUE(Impl(db.get())->BeginContext(&w).ok());
    orphan = w->id();
    TinyContext t = MakeTiny("lost", orphan);
    ASSERT_TRUE(w->PutBlock(0, 0, 0, t.blocks[0]).ok());
    ASSERT_TRUE(w->PutHeadIndex(0, 0, t.head_index).ok());
    ASSERT_TRUE(w->Flush().ok());
    ASSERT_TRUE(Impl(db.get())->raw()->FlushWAL(true).ok());
    rocksdb::FlushOptions fo;
    ASSERT_TRUE(Impl(db.get())->raw()->Flush(fo, {Impl(db.get())->cf_kv(), Impl(db.get())->cf_index()}).ok());
    EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_kv(), orphan), 1);
    std::vector<std::string> names;
    ASSERT_TRUE(db->ListContexts(&names).ok());
    EXPECT_EQ(names, std::vector<std::string>{"kept"});
    // The handle goes away without a commit, as after a crash.
  }
  auto db = OpenOrDie(dir.Sub("db"));
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_kv(), orphan), 0);
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_index(), orphan), 0);
  ASSERT_TRUE(db->VerifyContext("kept", nullptr).ok());
  // New ids never reuse an id seen on disk.
  std::unique_ptr<ContextWriter> w;
  ASSERT_TRUE(Impl(db.get())->BeginContext(&w).ok());
  EXPECT_GT(w->id(), orphan);
}

TEST(StorageDb, ExistingNameNeedsReplaceAndReplaceIsAtomic) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  uint64_t first = WriteTiny(db.get(), "doc");
  Status s;
  uint64_t second = WriteTiny(db.get(), "doc", /*replace=*/false, &s);
  EXPECT_TRUE(s.IsAlreadyExists()) << s.ToString();
  EXPECT_NE(s.message().find("--replace"), std::string::npos);
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_kv(), second), 0);
  ContextInfo info;
  ASSERT_TRUE(db->DescribeContext("doc", &info).ok());
  EXPECT_EQ(info.id, first);

  uint64_t third = WriteTiny(db.get(), "doc", /*replace=*/true, nullptr, /*base=*/1000);
  ASSERT_TRUE(db->DescribeContext("doc", &info).ok());
  EXPECT_EQ(info.id, third);
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_kv(), first), 0);
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_index(), first), 0);
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
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
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_kv(), a), 0);
  EXPECT_EQ(CountRecords(db.get(), Impl(db.get())->cf_index(), a), 0);
  ASSERT_TRUE(db->VerifyContext("b", nullptr).ok());
}

TEST(StorageDb, VerifyDetectsDamagedRecords) {
  ScopedTempDir dir;
  auto db = OpenOrDie(dir.Sub("db"));
  uint64_t id = WriteTiny(db.get(), "doc");
  DBImpl* impl = Impl(db.get());
  TinyContext t = MakeTiny("doc", id);

  // A flipped byte in a KV block fails the CRC.
  std::string bad = t.blocks[1];
  bad[5] ^= 0x40;
  ASSERT_TRUE(impl->raw()->Put(rocksdb::WriteOptions(), impl->cf_kv(), BlockKey(id, 0, 0, 1), bad).ok());
  Status s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_NE(s.message().find("CRC32C"), std::string::npos) << s.ToString();

  // A block of the wrong size.
  ASSERT_TRUE(impl->raw()->Put(rocksdb::WriteOptions(), impl->cf_kv(), BlockKey(id, 0, 0, 1), "short").ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_NE(s.message().find("bytes, expected"), std::string::npos) << s.ToString();

  // A missing block.
  ASSERT_TRUE(impl->raw()->Put(rocksdb::WriteOptions(), impl->cf_kv(), BlockKey(id, 0, 0, 1), t.blocks[1]).ok());
  ASSERT_TRUE(db->VerifyContext("doc", nullptr).ok());
  ASSERT_TRUE(impl->raw()->Delete(rocksdb::WriteOptions(), impl->cf_kv(), BlockKey(id, 0, 0, 0)).ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();

  // An index record that is not a FlatBuffer.
  ASSERT_TRUE(impl->raw()->Put(rocksdb::WriteOptions(), impl->cf_index(), HeadKey(id, 0, 0), "garbage!").ok());
  s = db->VerifyContext("doc", nullptr);
  EXPECT_NE(s.message().find("FlatBuffers"), std::string::npos) << s.ToString();

  // A manifest that is not a FlatBuffer: the context cannot be described.
  ASSERT_TRUE(impl->raw()->Put(rocksdb::WriteOptions(), impl->cf_manifest(), "doc", "xx").ok());
  ContextInfo info;
  EXPECT_TRUE(db->DescribeContext("doc", &info).IsCorruption());
}

}  // namespace
}  // namespace sqz::storage
