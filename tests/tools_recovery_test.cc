// Issue 9, items 1-3: no data loss from a damaged directory, repair, backup
// and restore, run as a user runs sqctl (the built binary, exit codes and
// messages; real RocksDB files damaged underneath).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "synth/synthetic.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using sqz::testing::RunCommand;
using sqz::testing::ScopedTempDir;
using sqz::testing::SqctlPath;

// Every file under `dir` with its bytes.
std::map<std::string, std::string> Snapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    out[std::filesystem::relative(e.path(), dir).string()] =
        std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

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
  const auto before = Snapshot(db);
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
  EXPECT_EQ(Snapshot(db), before) << "a refused command changed the damaged directory";
}

// Item 1: build-index into a non-empty directory that is not a database used
// to turn it into one silently.
TEST_F(SqctlRecovery, BuildIntoAForeignDirectoryIsRefused) {
  const std::string mine = dir_.Sub("mine");
  std::filesystem::create_directories(mine);
  { std::ofstream(mine + "/thesis.tex") << "chapter 1"; }
  const auto before = Snapshot(mine);
  std::string out;
  EXPECT_EQ(Run("build-index --quiet --iters 2 --db " + mine + " --corpus " + dir_.Sub("c"), &out), 1) << out;
  EXPECT_NE(out.find("not a squeeze database"), std::string::npos) << out;
  EXPECT_NE(out.find("thesis.tex"), std::string::npos) << out;
  EXPECT_EQ(Snapshot(mine), before);
  EXPECT_EQ(Run("list --db " + mine, &out), 1) << out;
  EXPECT_NE(out.find("not a squeeze database"), std::string::npos) << out;
}

}  // namespace
}  // namespace sqz
