// Issue 9, items 1-3: no data loss from a damaged directory, repair, backup
// and restore, run as a user runs sqctl (the built binary, exit codes and
// messages; real RocksDB files damaged underneath).
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sqz/build.h"
#include "sqz/c.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "storage/format.h"
#include "synth/synthetic.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using sqz::testing::RunCommand;
using sqz::testing::ScopedTempDir;
using sqz::testing::ShellQuote;
using sqz::testing::SqctlPath;

using sqz::testing::DirectorySnapshot;

class SqctlRecovery : public ::testing::Test {
 protected:
  void SetUp() override {
    synth::Spec spec;
    spec.n_layers = 2;
    spec.n_kv_heads = 2;
    spec.n_q_heads = 4;
    spec.n_tokens = 3000;
    spec.head_dim = 64;
    spec.q_window = 32;
    spec.n_queries = 4;
    std::vector<std::string> paths;
    ASSERT_TRUE(synth::WriteCorpus(spec, 2, dir_.Sub("c"), &paths).ok());
  }
  int Run(const std::string& args, std::string* out) {
    out->clear();
    return RunCommand(SqctlPath() + " " + args, out);
  }
  void Build(const std::string& db) {
    std::string out;
    ASSERT_EQ(Run("build-index --quiet --iters 2 --db " + db + " --corpus " + dir_.Sub("c"), &out), 0) << out;
  }
  std::string Q(int i = 0) const { return dir_.Sub("c/queries/ctx_00" + std::to_string(i) + ".safetensors"); }
  ScopedTempDir dir_{"sqz-recovery"};
};

// Item 1, the reproduction: CURRENT missing. list used to say there was no
// database; build-index then wrote an empty CURRENT/MANIFEST and the next
// open deleted every table file. Now every command refuses, names the
// problem and `sqctl repair`, and the directory is left byte for byte.
TEST_F(SqctlRecovery, MissingCurrentIsRefusedAndNothingIsTouched) {
  const std::string db = dir_.Sub("d");
  Build(db);
  std::filesystem::remove(db + "/CURRENT");
  const auto before = DirectorySnapshot(db);
  for (const std::string& cmd :
       {"list --db " + db, "verify --db " + db, "info --db " + db + " --context ctx_000",
        "drop --db " + db + " --context ctx_000",
        "query --db " + db + " --context ctx_000 --queries " + Q() + " --out " + dir_.Sub("o.safetensors"),
        "build-index --quiet --iters 2 --db " + db + " --kv " + dir_.Sub("c/ctx_000.safetensors") + " --name again"}) {
    std::string out;
    EXPECT_EQ(Run(cmd, &out), 1) << cmd << "\n" << out;
    EXPECT_NE(out.find("CURRENT file is missing"), std::string::npos) << cmd << "\n" << out;
    EXPECT_NE(out.find("sqctl repair --db " + db), std::string::npos) << cmd << "\n" << out;
    EXPECT_EQ(out.find("build one"), std::string::npos) << cmd << "\n" << out;
  }
  EXPECT_EQ(DirectorySnapshot(db), before) << "a refused command changed the damaged directory";
}

// Item 1: build-index into a non-empty directory that is not a database used
// to turn it into one silently.
TEST_F(SqctlRecovery, BuildIntoAForeignDirectoryIsRefused) {
  const std::string mine = dir_.Sub("mine");
  std::filesystem::create_directories(mine);
  { std::ofstream(mine + "/thesis.tex") << "chapter 1"; }
  const auto before = DirectorySnapshot(mine);
  std::string out;
  EXPECT_EQ(Run("build-index --quiet --iters 2 --db " + mine + " --corpus " + dir_.Sub("c"), &out), 1) << out;
  EXPECT_NE(out.find("not a squeeze database"), std::string::npos) << out;
  EXPECT_NE(out.find("thesis.tex"), std::string::npos) << out;
  EXPECT_EQ(DirectorySnapshot(mine), before);
  EXPECT_EQ(Run("list --db " + mine, &out), 1) << out;
  EXPECT_NE(out.find("not a squeeze database"), std::string::npos) << out;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// One table file of a healthy database: its column family and the context
// ids of its first and last keys (0 for the default and manifest families).
struct TableFile {
  std::string name;  // "000012.sst"
  std::string cf;
  uint64_t first_id = 0, last_id = 0;
  bool copy_only = false;  // holds nothing but a manifest copy (index family)
};

std::vector<TableFile> TableFiles(const std::string& db) {
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{"default", {}}, {"manifest", {}}, {"index", {}}, {"kv", {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> hs;
  rocksdb::DB* raw = nullptr;
  std::vector<TableFile> out;
  rocksdb::Status s = rocksdb::DB::OpenForReadOnly(rocksdb::DBOptions(), db, cfs, &hs, &raw);
  EXPECT_TRUE(s.ok()) << s.ToString();
  if (!s.ok()) return out;
  std::vector<rocksdb::LiveFileMetaData> md;
  raw->GetLiveFilesMetaData(&md);
  for (const auto& m : md) {
    TableFile t;
    t.name = m.name.substr(m.name.find_last_of('/') + 1);
    t.cf = m.column_family_name;
    if (t.cf == "index" || t.cf == "kv") {
      storage::DecodeContextId(m.smallestkey, &t.first_id);
      storage::DecodeContextId(m.largestkey, &t.last_id);
      t.copy_only = storage::IsManifestCopyKey(m.smallestkey) && m.smallestkey == m.largestkey;
    }
    out.push_back(t);
  }
  for (auto* h : hs) raw->DestroyColumnFamilyHandle(h);
  delete raw;
  return out;
}

class SqctlDamage : public SqctlRecovery {
 protected:
  // Three contexts a, b, c built one after the other, and the output of a
  // query on each (the reference every later answer must equal).
  void SetUp() override {
    SqctlRecovery::SetUp();
    for (const char* n : {"a", "b", "c"}) {
      std::string out;
      const std::string kv = std::string(n) == "b" ? "c/ctx_001.safetensors" : "c/ctx_000.safetensors";
      ASSERT_EQ(Run("build-index --quiet --iters 2 --db " + Db() + " --kv " + dir_.Sub(kv) + " --name " + n +
                        (std::string(n) == "c" ? " --seed 9" : ""),
                    &out),
                0)
          << out;
      ASSERT_EQ(Query(Db(), n, &reference_[n]), 0);
    }
  }
  std::string Db() const { return dir_.Sub("base"); }
  // Runs sqctl query on context `name` of `db`; *bytes = the output file.
  int Query(const std::string& db, const std::string& name, std::string* bytes) {
    const std::string o = dir_.Sub("q_out.safetensors");
    std::filesystem::remove(o);
    std::string out;
    const int rc =
        Run("query --db " + db + " --context " + name + " --queries " + Q(name == "b" ? 1 : 0) + " --out " + o, &out);
    *bytes = rc == 0 ? ReadAll(o) : out;
    return rc;
  }
  // Every context of `db` verifies and answers exactly as before the damage.
  void ExpectIntact(const std::string& db, const std::set<std::string>& names, const std::string& what) {
    std::string out;
    EXPECT_EQ(Run("verify --db " + db, &out), 0) << what << "\n" << out;
    EXPECT_EQ(Run("list --db " + db + " --json", &out), 0) << what << "\n" << out;
    for (const auto& n : names) {
      EXPECT_NE(out.find("\"name\":\"" + n + "\""), std::string::npos) << what << ": " << n << " missing\n" << out;
      std::string bytes;
      EXPECT_EQ(Query(db, n, &bytes), 0) << what << ": " << bytes;
      EXPECT_TRUE(bytes == reference_[n]) << what << ": context " << n << " answers differently";
    }
  }
  std::map<std::string, std::string> reference_;
};

// Item 3 (issue text): backup while readers run, restore, restore an older
// backup; both refuse to write into a directory that holds files.
TEST_F(SqctlDamage, BackupWhileReadersRunAndRestore) {
  std::string out;
  // A reader process queries in a loop during the backups.
  int reader_rc = -1;
  std::string reader_out;
  std::thread reader([&] {
    reader_rc = RunCommand("bash -c " + ShellQuote("for i in $(seq 15); do " + SqctlPath() + " query --db " + Db() +
                                                   " --context a --queries " + Q(0) + " --out " +
                                                   dir_.Sub("reader.safetensors") + " >/dev/null || exit 1; done"),
                           &reader_out);
  });
  ASSERT_EQ(Run("backup --db " + Db() + " --to " + dir_.Sub("bk"), &out), 0) << out;
  EXPECT_NE(out.find("backup 1 of"), std::string::npos) << out;
  EXPECT_NE(out.find("3 context(s)"), std::string::npos) << out;
  ASSERT_EQ(Run("drop --db " + Db() + " --context b", &out), 0) << out;
  ASSERT_EQ(Run("backup --db " + Db() + " --to " + dir_.Sub("bk"), &out), 0) << out;
  EXPECT_NE(out.find("backup 2 of"), std::string::npos) << out;
  reader.join();
  EXPECT_EQ(reader_rc, 0) << reader_out;

  ASSERT_EQ(Run("restore --from " + dir_.Sub("bk") + " --db " + dir_.Sub("r_latest"), &out), 0) << out;
  EXPECT_NE(out.find("2 context(s)"), std::string::npos) << out;
  ExpectIntact(dir_.Sub("r_latest"), {"a", "c"}, "latest backup");
  ASSERT_EQ(Run("restore --from " + dir_.Sub("bk") + " --backup-id 1 --db " + dir_.Sub("r_first"), &out), 0) << out;
  ExpectIntact(dir_.Sub("r_first"), {"a", "b", "c"}, "first backup");

  // Never over files: a restore into a database or a directory of other
  // files, a backup into a directory of other files.
  const std::string mine = dir_.Sub("mine");
  std::filesystem::create_directories(mine);
  { std::ofstream(mine + "/keep.txt") << "keep"; }
  EXPECT_EQ(Run("restore --from " + dir_.Sub("bk") + " --db " + mine, &out), 1) << out;
  EXPECT_NE(out.find("new or empty directory"), std::string::npos) << out;
  EXPECT_EQ(Run("restore --from " + dir_.Sub("bk") + " --db " + dir_.Sub("r_first"), &out), 1) << out;
  EXPECT_EQ(Run("backup --db " + Db() + " --to " + mine, &out), 1) << out;
  EXPECT_EQ(DirectorySnapshot(mine).size(), 1u);
  EXPECT_EQ(Run("restore --from " + mine + " --db " + dir_.Sub("r_none"), &out), 1) << out;
  EXPECT_NE(out.find("not a backup directory"), std::string::npos) << out;
  ExpectIntact(dir_.Sub("r_first"), {"a", "b", "c"}, "first backup after refused restores");
}

// Item 2, the repairable metadata: CURRENT missing, the RocksDB MANIFEST
// damaged, the manifest family's tables damaged. sqctl repair recovers every
// context (the manifests from their copies) into a new directory and leaves
// the damaged one byte for byte.
TEST_F(SqctlDamage, RepairRecoversEveryContextFromDamagedMetadata) {
  const auto tables = TableFiles(Db());
  std::vector<std::pair<std::string, std::string>> cases;  // (what, file)
  cases.push_back({"delete", "CURRENT"});
  for (const auto& n : std::filesystem::directory_iterator(Db())) {
    const std::string f = n.path().filename().string();
    if (f.rfind("MANIFEST-", 0) == 0) cases.push_back({"flip", f});
  }
  for (const auto& t : tables) {
    if (t.cf == "manifest") cases.push_back({"flip", t.name});
  }
  ASSERT_GE(cases.size(), 3u);
  int i = 0;
  for (const auto& [how, file] : cases) {
    // (Appends, not "w" + std::to_string(i): a false -Wrestrict from GCC 12 in Release.)
    const std::string what = how + " " + file, w = dir_.Sub(std::string("w").append(std::to_string(i))),
                      r = dir_.Sub(std::string("r").append(std::to_string(i)));
    ++i;
    std::filesystem::copy(Db(), w);
    if (how == "delete") {
      std::filesystem::remove(w + "/" + file);
    } else {
      std::string bytes = ReadAll(w + "/" + file);
      bytes[bytes.size() / 2] ^= 0x55;
      std::ofstream(w + "/" + file, std::ios::binary | std::ios::trunc) << bytes;
    }
    const auto before = DirectorySnapshot(w);
    std::string out;
    const int rc = Run("list --db " + w, &out);
    EXPECT_EQ(rc, 1) << what << "\n" << out;  // refused, never a short list
    EXPECT_NE(out.find("sqctl repair --db " + w), std::string::npos) << what << "\n" << out;
    ASSERT_EQ(Run("repair --db " + w + " --out " + r, &out), 0) << what << "\n" << out;
    EXPECT_EQ(out.find("LOST"), std::string::npos) << what << "\n" << out;
    EXPECT_EQ(DirectorySnapshot(w), before) << what << ": repair changed the damaged directory";
    ExpectIntact(r, {"a", "b", "c"}, what);
  }
}

// Item 2, damage to one context's data files (a flipped byte, the file
// deleted, the file truncated): the others stay listable, verifiable and
// queryable with identical answers, in place; the damaged one is reported
// (list marks it, verify fails it, a query refuses it: never a wrong
// answer), a new context can be built beside it, it can be dropped, after
// which the database is healthy again; and repair reports exactly it as
// lost. A missing or truncated file fails RocksDB's paranoid open: the
// database then opens degraded (docs/RELIABILITY.md).
TEST_F(SqctlDamage, DamagedDataFileHitsOnlyItsContext) {
  const auto tables = TableFiles(Db());
  // b is the second context built: id 2.
  std::vector<std::pair<std::string, std::string>> cases;
  std::set<std::string> copy_only;  // damage to these loses a redundant copy only
  for (const auto& t : tables) {
    if ((t.cf == "index" || t.cf == "kv") && t.first_id == 2 && t.last_id == 2) {
      for (const char* how : {"flip", "delete", "truncate"}) cases.push_back({how, t.name});
      if (t.copy_only) copy_only.insert(t.name);
    }
    if ((t.cf == "index" || t.cf == "kv") && t.first_id != t.last_id) {
      ADD_FAILURE() << t.name << " (" << t.cf << ") holds contexts " << t.first_id << ".." << t.last_id;
    }
  }
  ASSERT_GE(cases.size(), 3u);
  // The answer of a context "d" built from a's KV, in a healthy database.
  const std::string build_d =
      "build-index --quiet --iters 2 --kv " + dir_.Sub("c/ctx_000.safetensors") + " --name d --db ";
  std::string d_reference, log;
  ASSERT_EQ(Run(build_d + dir_.Sub("d_ref"), &log), 0) << log;
  ASSERT_EQ(Query(dir_.Sub("d_ref"), "d", &d_reference), 0) << d_reference;
  int i = 0;
  for (const auto& [how, file] : cases) {
    // (Appends, not "w" + std::to_string(i): a false -Wrestrict from GCC 12 in Release.)
    const std::string what = how + " " + file, w = dir_.Sub(std::string("w").append(std::to_string(i))),
                      r = dir_.Sub(std::string("r").append(std::to_string(i)));
    ++i;
    std::filesystem::copy(Db(), w);
    const std::string f = w + "/" + file;
    if (how == "delete") {
      std::filesystem::remove(f);
    } else if (how == "truncate") {
      std::filesystem::resize_file(f, std::filesystem::file_size(f) / 2);
    } else {
      std::string bytes = ReadAll(f);
      bytes[bytes.size() / 3] ^= 0x55;
      std::ofstream(f, std::ios::binary | std::ios::trunc) << bytes;
    }
    std::string out;
    const int list_rc = Run("list --db " + w, &out);
    // A missing or truncated file is found at open and named.
    if (how != "flip") {
      EXPECT_EQ(list_rc, 0) << what << "\n" << out;
      EXPECT_NE(out.find("context b is damaged: its table file " + file), std::string::npos) << what << "\n" << out;
      // The C API's context info carries the same damage (read-only: w is
      // used as it is below).
      sqz_db_options copt;
      ASSERT_EQ(sqz_db_options_init(&copt), SQZ_OK);
      copt.read_only = 1;
      sqz_db* cdb = nullptr;
      ASSERT_EQ(sqz_db_open(w.c_str(), &copt, &cdb), SQZ_OK) << what << ": " << sqz_last_error();
      sqz_context_info ia{}, ib{};
      EXPECT_EQ(sqz_db_describe_context(cdb, "a", &ia), SQZ_OK) << what;
      EXPECT_EQ(sqz_db_describe_context(cdb, "b", &ib), SQZ_OK) << what;
      EXPECT_TRUE(ia.damage != nullptr && std::string(ia.damage).empty()) << what;
      EXPECT_TRUE(ib.damage != nullptr && std::string(ib.damage).find(file) != std::string::npos)
          << what << ": " << (ib.damage ? ib.damage : "(null)");
      sqz_context_info_free(&ia);
      sqz_context_info_free(&ib);
      sqz_db_close(cdb);
    }
    if (list_rc == 0) {
      // Opens: every context listed, b's damage reported by verify.
      for (const char* n : {"a", "b", "c"}) EXPECT_NE(out.find(n), std::string::npos) << what << "\n" << out;
      EXPECT_EQ(Run("verify --db " + w, &out), 1) << what << "\n" << out;
      EXPECT_NE(out.find("b                                FAILED"), std::string::npos) << what << "\n" << out;
      for (const char* n : {"a", "c"}) {
        std::string bytes;
        EXPECT_EQ(Query(w, n, &bytes), 0) << what << ": " << bytes;
        EXPECT_TRUE(bytes == reference_[n]) << what << ": " << n << " answers differently";
      }
      std::string bytes;
      const int qrc = Query(w, "b", &bytes);
      EXPECT_TRUE(qrc == 1 || bytes == reference_["b"]) << what << ": b answered wrongly (rc " << qrc << ")";
      // A context can be built beside the damaged one; the damaged one can
      // be dropped, after which everything verifies and answers as before.
      const std::string wd = w + "_drop";
      std::filesystem::copy(w, wd);
      ASSERT_EQ(Run(build_d + wd, &out), 0) << what << "\n" << out;
      EXPECT_EQ(Run("drop --db " + wd + " --context b", &out), 0) << what << "\n" << out;
      ExpectIntact(wd, {"a", "c"}, what + ", after dropping b");
      std::string d_bytes;
      EXPECT_EQ(Query(wd, "d", &d_bytes), 0) << what << ": " << d_bytes;
      EXPECT_TRUE(d_bytes == d_reference) << what << ": d answers differently than in a healthy database";
    } else {
      EXPECT_EQ(list_rc, 1) << what << "\n" << out;
      EXPECT_NE(out.find("sqctl repair --db " + w), std::string::npos) << what << "\n" << out;
    }
    const int repair_rc = Run("repair --db " + w + " --out " + r + " --json", &out);
    if (copy_only.count(file)) {
      // Only b's redundant manifest copy was in the file: nothing is lost.
      ASSERT_EQ(repair_rc, 0) << what << "\n" << out;
      ExpectIntact(r, {"a", "b", "c"}, what + ", repaired");
      continue;
    }
    ASSERT_EQ(repair_rc, 1) << what << "\n" << out;
    EXPECT_NE(out.find("\"recovered\":[\"a\",\"c\"]"), std::string::npos) << what << "\n" << out;
    EXPECT_NE(out.find("\"lost\":[{\"name\":\"b\""), std::string::npos) << what << "\n" << out;
    ExpectIntact(r, {"a", "c"}, what + ", repaired");
  }
}

// Item 2, random damage: one byte flipped at a random offset of each file of
// the closed database in turn (every file type: table files of the four
// families, MANIFEST, CURRENT, OPTIONS, IDENTITY, SQUEEZE), then of random
// files: SQZ_CORRUPTION_FLIPS flips in all (default: one per file; set it
// higher for a long run; the seed is printed, SQZ_CORRUPTION_SEED replays
// it). Whatever is hit: no command
// crashes or hangs, every answer given equals the undamaged one, a list is
// never short, a flip in one context's table file leaves every other context
// answering (containment), and repair recovers every context or reports it
// lost, by name.
TEST_F(SqctlDamage, RandomByteFlipsNeverGiveAWrongAnswer) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(Db())) {
    const std::string f = e.path().filename().string();
    if (e.is_regular_file() && std::filesystem::file_size(e.path()) > 0 && f != "LOCK" && f.rfind("LOG", 0) != 0) {
      files.push_back(f);
    }
  }
  std::sort(files.begin(), files.end());
  // The context a data table file belongs to (a, b, c were built in that
  // order: ids 1, 2, 3); absent for every other file.
  std::map<std::string, std::string> owner;
  for (const auto& t : TableFiles(Db())) {
    if ((t.cf == "index" || t.cf == "kv") && t.first_id == t.last_id && t.first_id >= 1 && t.first_id <= 3) {
      owner[t.name] = std::string(1, static_cast<char>('a' + t.first_id - 1));
    }
  }
  const char* env = std::getenv("SQZ_CORRUPTION_FLIPS");
  const int flips = env ? std::atoi(env) : static_cast<int>(files.size());
  // SQZ_CORRUPTION_SEED: replay a printed seed.
  const char* seed_env = std::getenv("SQZ_CORRUPTION_SEED");
  const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10) : std::random_device()();
  std::printf("[ info ] %d flips over %zu files, seed %llu\n", flips, files.size(),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < flips; ++i) {
    const size_t pick = static_cast<size_t>(i) < files.size() ? static_cast<size_t>(i) : rng() % files.size();
    const std::string file = files[pick], w = dir_.Sub("rw" + std::to_string(i)),
                      r = dir_.Sub("rr" + std::to_string(i));
    std::filesystem::copy(Db(), w);
    std::string bytes = ReadAll(w + "/" + file);
    const size_t at = rng() % bytes.size();
    bytes[at] = static_cast<char>(bytes[at] ^ (1 + rng() % 255));
    std::ofstream(w + "/" + file, std::ios::binary | std::ios::trunc) << bytes;
    const std::string what = "seed " + std::to_string(seed) + ": byte " + std::to_string(at) + " of " + file;
    std::string out;
    const int list_rc = Run("list --db " + w, &out);
    ASSERT_TRUE(list_rc == 0 || list_rc == 1) << what << "\n" << out;
    if (list_rc == 0) {
      for (const char* n : {"a", "b", "c"}) {
        EXPECT_NE(out.find(n), std::string::npos) << what << ": short list\n" << out;
      }
    }
    const auto hit = owner.find(file);
    for (const char* n : {"a", "b", "c"}) {
      std::string answer;
      const int rc = Query(w, n, &answer);
      ASSERT_TRUE(rc == 0 || rc == 1) << what << ": query " << n << " exit " << rc << "\n" << answer;
      if (rc == 0) {
        EXPECT_TRUE(answer == reference_[n]) << what << ": context " << n << " answered wrongly";
      }
      if (hit != owner.end() && hit->second != n) {
        EXPECT_EQ(rc, 0) << what << " (a table file of context " << hit->second << "): context " << n
                         << " is not answered\n"
                         << answer;
      }
    }
    const int repair_rc = Run("repair --db " + w + " --out " + r + " --json", &out);
    ASSERT_TRUE(repair_rc == 0 || repair_rc == 1) << what << "\n" << out;
    std::set<std::string> recovered;
    for (const char* n : {"a", "b", "c"}) {
      // Quoted names built by appending (a literal + std::string gives a false
      // -Wrestrict from GCC 12 in Release builds).
      std::string quoted = "\"", entry = "{\"name\":\"";
      quoted.append(n).append("\"");
      entry.append(n).append("\"");
      const bool ok = out.find(quoted, out.find("\"recovered\"")) < out.find("\"lost\"");
      const bool lost = out.find(entry) != std::string::npos;
      EXPECT_TRUE(ok != lost) << what << ": context " << n << " neither recovered nor reported lost\n" << out;
      if (ok) recovered.insert(n);
    }
    ExpectIntact(r, recovered, what + ", repaired");
    std::filesystem::remove_all(w);
    std::filesystem::remove_all(r);
  }
}

// The files that differ between two DirectorySnapshots (changed, added or
// removed): what a failure prints instead of the files' bytes.
std::vector<std::string> ChangedFiles(const std::map<std::string, std::string>& before,
                                      const std::map<std::string, std::string>& after) {
  std::vector<std::string> changed;
  for (const auto& [name, bytes] : before) {
    const auto it = after.find(name);
    if (it == after.end()) {
      changed.push_back(name + " (removed)");
    } else if (it->second != bytes) {
      changed.push_back(name + " (changed)");
    }
  }
  for (const auto& [name, bytes] : after) {
    if (!before.count(name)) changed.push_back(name + " (added)");
  }
  return changed;
}

// One physical record of a RocksDB log file (the MANIFEST is one): 32 KiB
// blocks, each record a 7-byte header (CRC32C 4 bytes, length 2 bytes little
// endian, type 1 byte) and its payload; a block's last 6 bytes or fewer are
// padding.
struct LogRecord {
  size_t offset = 0;  // of the header
  size_t length = 0;  // of the payload
};

std::vector<LogRecord> LogRecords(const std::string& bytes) {
  constexpr size_t kBlock = 32768, kHeader = 7;
  std::vector<LogRecord> out;
  size_t at = 0;
  while (at + kHeader <= bytes.size()) {
    if (kBlock - at % kBlock < kHeader) {
      at += kBlock - at % kBlock;
      continue;
    }
    LogRecord r;
    r.offset = at;
    r.length =
        static_cast<unsigned char>(bytes[at + 4]) | static_cast<size_t>(static_cast<unsigned char>(bytes[at + 5])) << 8;
    if (r.length == 0 && bytes[at + 6] == 0) break;  // zero fill: the end of what was written
    out.push_back(r);
    at += kHeader + r.length;
  }
  return out;
}

// a and b are built by sqctl, c by the library in this process, which notes
// where in RocksDB's MANIFEST c's build began (the read-write open writes a
// new MANIFEST; every record after it is a change made by c's build or by
// its close).
class SqctlLostCommit : public SqctlDamage {
 protected:
  void SetUp() override {
    SqctlRecovery::SetUp();
    std::string out;
    for (const char* n : {"a", "b"}) {
      const std::string kv = std::string(n) == "b" ? "c/ctx_001.safetensors" : "c/ctx_000.safetensors";
      ASSERT_EQ(Run("build-index --quiet --iters 2 --db " + Db() + " --kv " + dir_.Sub(kv) + " --name " + n, &out), 0)
          << out;
    }
    {
      Options o;
      o.create_if_missing = false;
      std::unique_ptr<DB> db;
      ASSERT_TRUE(DB::Open(o, Db(), &db).ok());
      std::ifstream(Db() + "/CURRENT") >> manifest_;
      c_begins_at_ = std::filesystem::file_size(Db() + "/" + manifest_);
      std::unique_ptr<KvSource> src;
      ASSERT_TRUE(OpenSafetensorsKvSource(dir_.Sub("c/ctx_000.safetensors"), &src).ok());
      BuildOptions bo;
      bo.kmeans_iters = 2;
      bo.seed = 9;
      const Status s = BuildContext(db.get(), "c", src.get(), bo);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    std::string current;
    std::ifstream(Db() + "/CURRENT") >> current;
    ASSERT_EQ(current, manifest_) << "c's build changed the MANIFEST file";
    for (const char* n : {"a", "b", "c"}) ASSERT_EQ(Query(Db(), n, &reference_[n]), 0) << reference_[n];
  }
  // Copies the database into `w` and makes RocksDB's MANIFEST lose every
  // record from `rec` on the way a crash-torn tail does: the record's length
  // enlarged past the end of the file (the flip of the random test's seed
  // 2861303079: 116 bytes became 10,612), or the file cut in the record.
  void TearManifest(const std::string& w, const LogRecord& rec, bool truncate) {
    std::filesystem::copy(Db(), w);
    const std::string f = w + "/" + manifest_;
    std::string bytes = ReadAll(f);
    if (truncate) {
      bytes.resize(rec.offset + 7 + rec.length / 2);
    } else {
      bytes[rec.offset + 5] = static_cast<char>(0x29);  // the length's high byte
      ASSERT_GT(rec.offset + 7 + (rec.length & 0xff) + (size_t{0x29} << 8), bytes.size());
    }
    std::ofstream(f, std::ios::binary | std::ios::trunc) << bytes;
  }
  // The records of the MANIFEST written after c's build began.
  std::vector<LogRecord> RecordsOfC() {
    std::vector<LogRecord> out;
    for (const auto& r : LogRecords(ReadAll(Db() + "/" + manifest_))) {
      if (r.offset >= c_begins_at_) out.push_back(r);
    }
    return out;
  }
  std::string manifest_;    // "MANIFEST-000012"
  size_t c_begins_at_ = 0;  // its size when c's build began
};

// The deterministic reproduction of seed 2861303079 (docs/RELIABILITY.md): the
// MANIFEST loses every change from the start of c's build on, as a torn tail.
// RocksDB opens the older version (a and b) without an error; c's table files
// are still in the directory, unreferenced. Every command refuses, naming c
// and sqctl repair (it used to list a and b with exit 0), and changes no
// file: a read-write open would have deleted c's files as obsolete. repair
// runs RocksDB's RepairDB and recovers a, b and c, answering as before.
TEST_F(SqctlLostCommit, TornManifestIsRefusedAndRepairRecoversTheLostContext) {
  const std::vector<LogRecord> records = RecordsOfC();
  ASSERT_FALSE(records.empty());
  int i = 0;
  for (const bool truncate : {false, true}) {
    const std::string what = truncate ? "MANIFEST cut in c's first record" : "c's first MANIFEST record too long";
    const std::string w = dir_.Sub(std::string("w").append(std::to_string(i))),
                      r = dir_.Sub(std::string("r").append(std::to_string(i)));
    ++i;
    ASSERT_NO_FATAL_FAILURE(TearManifest(w, records.front(), truncate));
    // The damage is the one of the seed: RocksDB's version is whole (every
    // file it names is there) and lacks c (id 3), whose table files are in
    // the directory.
    std::set<std::string> referenced;
    for (const auto& t : TableFiles(w)) {
      referenced.insert(t.name);
      EXPECT_NE(t.last_id, 3u) << what << ": the version still references c's " << t.name;
    }
    size_t unreferenced = 0;
    for (const auto& e : std::filesystem::directory_iterator(w)) {
      const std::string f = e.path().filename().string();
      if (f.size() > 4 && f.substr(f.size() - 4) == ".sst" && !referenced.count(f)) ++unreferenced;
    }
    ASSERT_GT(unreferenced, 0u) << what;

    const auto before = DirectorySnapshot(w);
    for (const std::string& cmd :
         {"list --db " + w, "list --db " + w + " --json", "info --db " + w + " --context a", "verify --db " + w,
          "query --db " + w + " --context a --queries " + Q(0) + " --out " + dir_.Sub("o.safetensors"),
          "query --db " + w + " --context c --queries " + Q(0) + " --out " + dir_.Sub("o.safetensors"),
          "drop --db " + w + " --context a",
          "build-index --quiet --iters 2 --db " + w + " --kv " + dir_.Sub("c/ctx_001.safetensors") + " --name d"}) {
      std::string out;
      EXPECT_EQ(Run(cmd, &out), 1) << what << ": " << cmd << "\n" << out;
      EXPECT_NE(out.find("lost the commit of context 'c' (id 3"), std::string::npos) << what << ": " << cmd << "\n"
                                                                                     << out;
      EXPECT_NE(out.find("sqctl repair --db " + w + " --out NEW_DIR"), std::string::npos) << what << ": " << cmd << "\n"
                                                                                          << out;
    }
    // The library's opens, read-only and read-write, say the same.
    for (const bool read_only : {true, false}) {
      Options o;
      o.read_only = read_only;
      o.create_if_missing = false;
      std::unique_ptr<DB> db;
      const Status s = DB::Open(o, w, &db);
      EXPECT_TRUE(s.IsCorruption()) << what << ": " << s.ToString();
    }
    EXPECT_EQ(ChangedFiles(before, DirectorySnapshot(w)), std::vector<std::string>{})
        << what << ": a refused command changed the damaged directory";

    std::string out;
    ASSERT_EQ(Run("repair --db " + w + " --out " + r + " --json", &out), 0) << what << "\n" << out;
    EXPECT_NE(out.find("\"recovered\":[\"a\",\"b\",\"c\"]"), std::string::npos) << what << "\n" << out;
    EXPECT_NE(out.find("\"lost\":[]"), std::string::npos) << what << "\n" << out;
    EXPECT_EQ(ChangedFiles(before, DirectorySnapshot(w)), std::vector<std::string>{})
        << what << ": repair changed the damaged directory";
    ExpectIntact(r, {"a", "b", "c"}, what + ", repaired");
  }
}

// Wherever in c's build and close the MANIFEST is torn, the database either
// still lists a, b and c (the lost changes were not c's commit), or refuses
// naming sqctl repair, which recovers all three: never a short list.
TEST_F(SqctlLostCommit, ManifestTornAtAnyRecordOfABuildNeverListsTooFew) {
  const std::vector<LogRecord> records = RecordsOfC();
  ASSERT_FALSE(records.empty());
  for (size_t i = 0; i < records.size(); ++i) {
    const std::string what = "MANIFEST torn at record " + std::to_string(i) + " of c's build (offset " +
                             std::to_string(records[i].offset) + ")";
    const std::string w = dir_.Sub(std::string("w").append(std::to_string(i))),
                      r = dir_.Sub(std::string("r").append(std::to_string(i)));
    ASSERT_NO_FATAL_FAILURE(TearManifest(w, records[i], /*truncate=*/false));
    std::string out;
    const int rc = Run("list --db " + w, &out);
    std::printf("[ info ] %s: list exit %d\n", what.c_str(), rc);
    if (rc == 0) {
      for (const char* n : {"a", "b", "c"}) {
        EXPECT_NE(out.find(n), std::string::npos) << what << ": short list\n" << out;
      }
      ExpectIntact(w, {"a", "b", "c"}, what);
    } else {
      EXPECT_EQ(rc, 1) << what << "\n" << out;
      EXPECT_NE(out.find("sqctl repair --db " + w + " --out NEW_DIR"), std::string::npos) << what << "\n" << out;
      ASSERT_EQ(Run("repair --db " + w + " --out " + r + " --json", &out), 0) << what << "\n" << out;
      EXPECT_NE(out.find("\"recovered\":[\"a\",\"b\",\"c\"]"), std::string::npos) << what << "\n" << out;
      ExpectIntact(r, {"a", "b", "c"}, what + ", repaired");
    }
    std::filesystem::remove_all(w);
    std::filesystem::remove_all(r);
  }
}

// Unreferenced table files alone prove nothing. A build killed after its
// records reached table files but before its commit, seen from a version
// older than those files (what a crash leaves when a flush's output was
// written but not the MANIFEST record that adds it): the database opens as
// before, read-only without changing a file, and a read-write open removes
// them (RocksDB deletes the table files its version does not reference).
TEST_F(SqctlDamage, UnreferencedTablesOfAnUnfinishedBuildStillOpen) {
  const std::string older = dir_.Sub("older");
  std::filesystem::copy(Db(), older);
  std::string out;
  ASSERT_EQ(RunCommand("SQZ_KILL_POINT=commit:flushed " + SqctlPath() + " build-index --quiet --iters 2 --db " + Db() +
                           " --kv " + dir_.Sub("c/ctx_001.safetensors") + " --name d",
                       &out),
            128 + 9)
      << "the build was not killed at its kill point\n"
      << out;
  // d (id 4): its records in table files, no manifest, no manifest copy.
  std::vector<std::string> leftovers;
  for (const auto& t : TableFiles(Db())) {
    if (t.first_id == 4 && t.last_id == 4 && !std::filesystem::exists(older + "/" + t.name)) {
      std::filesystem::copy_file(Db() + "/" + t.name, older + "/" + t.name);
      leftovers.push_back(t.name);
    }
  }
  ASSERT_FALSE(leftovers.empty());
  const auto before = DirectorySnapshot(older);
  ASSERT_EQ(Run("list --db " + older, &out), 0) << out;
  EXPECT_EQ(out.find("d "), std::string::npos) << out;
  ExpectIntact(older, {"a", "b", "c"}, "beside the unfinished build's table files");
  EXPECT_EQ(ChangedFiles(before, DirectorySnapshot(older)), std::vector<std::string>{})
      << "a read-only command changed the directory";
  ASSERT_EQ(Run("drop --db " + older + " --context b", &out), 0) << out;
  for (const auto& f : leftovers) EXPECT_FALSE(std::filesystem::exists(older + "/" + f)) << f << " was not removed";
  ExpectIntact(older, {"a", "c"}, "after a read-write open");
}

// The table files of a dropped and of a replaced context left on disk after
// their reclaim (RocksDB deletes a file that another thread is reading at the
// end of a compaction only at its next obsolete-file scan; a crash before it
// leaves the file): they hold manifest copies of contexts the version no
// longer has, yet prove no loss. The database opens as before.
TEST_F(SqctlDamage, FilesOfDroppedAndReplacedContextsLeftOnDiskStillOpen) {
  const std::string aside = dir_.Sub("aside");
  std::filesystem::create_directories(aside);
  std::vector<std::string> old_files;  // b's (id 2) and c's (id 3)
  for (const auto& t : TableFiles(Db())) {
    if (t.first_id == t.last_id && (t.first_id == 2 || t.first_id == 3)) {
      std::filesystem::copy_file(Db() + "/" + t.name, aside + "/" + t.name);
      old_files.push_back(t.name);
    }
  }
  ASSERT_FALSE(old_files.empty());
  std::string out;
  ASSERT_EQ(Run("drop --db " + Db() + " --context c", &out), 0) << out;
  ASSERT_EQ(Run("build-index --quiet --iters 2 --seed 5 --replace --db " + Db() + " --kv " +
                    dir_.Sub("c/ctx_001.safetensors") + " --name b",
                &out),
            0)
      << out;
  ASSERT_EQ(Query(Db(), "b", &reference_["b"]), 0) << reference_["b"];
  for (const auto& f : old_files) {
    ASSERT_FALSE(std::filesystem::exists(Db() + "/" + f)) << f << " was not reclaimed";
    std::filesystem::copy_file(aside + "/" + f, Db() + "/" + f);
  }
  const auto before = DirectorySnapshot(Db());
  ASSERT_EQ(Run("list --db " + Db(), &out), 0) << out;
  EXPECT_EQ(out.find("c "), std::string::npos) << out;
  ExpectIntact(Db(), {"a", "b"}, "beside the old files");
  EXPECT_EQ(ChangedFiles(before, DirectorySnapshot(Db())), std::vector<std::string>{})
      << "a read-only command changed the directory";
  ASSERT_EQ(Run("drop --db " + Db() + " --context a", &out), 0) << out;
  for (const auto& f : old_files) EXPECT_FALSE(std::filesystem::exists(Db() + "/" + f)) << f << " was not removed";
  ExpectIntact(Db(), {"b"}, "after a read-write open");
}

}  // namespace
}  // namespace sqz
