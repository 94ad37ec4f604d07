// Issue 9, item 1: squeeze never creates a database over, or opens for
// writing, a directory that is not a healthy squeeze database: a directory
// of other files, a plain RocksDB database, a database whose CURRENT file is
// missing. Each is refused with a message saying what is wrong and what to
// run, and nothing in the directory changes (names, sizes and bytes).
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "storage/directory.h"
#include "tests/test_util.h"

namespace sqz::storage {
namespace {

using sqz::testing::ScopedTempDir;

using sqz::testing::DirectorySnapshot;

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

Status OpenRw(const std::string& path, std::unique_ptr<DB>* db) { return DB::Open(Options(), path, db); }
Status OpenRo(const std::string& path, std::unique_ptr<DB>* db) {
  Options o;
  o.read_only = true;
  return DB::Open(o, path, db);
}

// A database with one committed record of each kind, closed.
void MakeDatabase(const std::string& path) {
  std::unique_ptr<DB> db;
  ASSERT_TRUE(OpenRw(path, &db).ok());
}

TEST(StorageDir, CreatesOnlyInANewOrEmptyDirectoryAndWritesItsIdentity) {
  ScopedTempDir dir;
  MakeDatabase(dir.Sub("new"));
  EXPECT_TRUE(std::filesystem::exists(dir.Sub("new/SQUEEZE")));
  std::filesystem::create_directories(dir.Sub("empty"));
  MakeDatabase(dir.Sub("empty"));
  EXPECT_TRUE(std::filesystem::exists(dir.Sub("empty/CURRENT")));
  // A creation killed after the identity file, before RocksDB wrote anything.
  std::filesystem::create_directories(dir.Sub("killed"));
  WriteText(dir.Sub("killed/SQUEEZE"), "x");
  MakeDatabase(dir.Sub("killed"));
  EXPECT_TRUE(std::filesystem::exists(dir.Sub("killed/CURRENT")));
}

TEST(StorageDir, DirectoryOfOtherFilesIsNeverCreatedOver) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("mine");
  std::filesystem::create_directories(path + "/sub");
  WriteText(path + "/notes.txt", "my notes");
  WriteText(path + "/sub/data.bin", "data");
  const auto before = DirectorySnapshot(path);
  std::unique_ptr<DB> db;
  for (bool ro : {false, true}) {
    Status s = ro ? OpenRo(path, &db) : OpenRw(path, &db);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find("not a squeeze database"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("othing was changed"), std::string::npos) << s.ToString();
  }
  EXPECT_EQ(DirectorySnapshot(path), before);
  // A regular file is not a directory.
  WriteText(dir.Sub("file"), "x");
  Status s = OpenRw(dir.Sub("file"), &db);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
}

TEST(StorageDir, PlainRocksDbIsNotConverted) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("plain");
  {
    rocksdb::Options o;
    o.create_if_missing = true;
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, path, &raw).ok());
    ASSERT_TRUE(raw->Put(rocksdb::WriteOptions(), "k", "v").ok());
    delete raw;
  }
  const auto before = DirectorySnapshot(path);
  std::unique_ptr<DB> db;
  Status s = OpenRw(path, &db);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("not a squeeze database"), std::string::npos) << s.ToString();
  // RocksDB rewrites nothing of the user's data: the same files, and the same
  // bytes except the info log.
  auto after = DirectorySnapshot(path);
  for (auto* m : {&after}) {
    for (auto it = m->begin(); it != m->end();) it = it->first.rfind("LOG", 0) == 0 ? m->erase(it) : std::next(it);
  }
  auto b = before;
  for (auto it = b.begin(); it != b.end();) it = it->first.rfind("LOG", 0) == 0 ? b.erase(it) : std::next(it);
  EXPECT_EQ(after, b);
}

// The reproduction of item 1: CURRENT missing (a partial copy). Open used to
// report "no database" and a build then left an empty CURRENT/MANIFEST, after
// which the next open deleted every table file.
TEST(StorageDir, MissingCurrentIsDamageNotAbsence) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("db");
  MakeDatabase(path);
  {
    // Some data in table files.
    rocksdb::Options o;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{"default", {}}, {"manifest", {}}, {"index", {}}, {"kv", {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> hs;
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, path, cfs, &hs, &raw).ok());
    ASSERT_TRUE(raw->Put(rocksdb::WriteOptions(), hs[3], std::string(20, 'x'), "page").ok());
    ASSERT_TRUE(raw->Flush(rocksdb::FlushOptions(), hs[3]).ok());
    for (auto* h : hs) ASSERT_TRUE(raw->DestroyColumnFamilyHandle(h).ok());
    delete raw;
  }
  std::filesystem::remove(path + "/CURRENT");
  const auto before = DirectorySnapshot(path);
  std::unique_ptr<DB> db;
  for (bool ro : {false, true}) {
    Status s = ro ? OpenRo(path, &db) : OpenRw(path, &db);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("CURRENT file is missing"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("sqctl repair --db " + path), std::string::npos) << s.ToString();
  }
  Options create;
  create.create_if_missing = true;
  EXPECT_FALSE(DB::Open(create, path, &db).ok());
  EXPECT_EQ(DirectorySnapshot(path), before) << "a refused open changed the directory";
  DirState st;
  EXPECT_TRUE(InspectDatabaseDir(path, &st).IsCorruption());
}

}  // namespace
}  // namespace sqz::storage
