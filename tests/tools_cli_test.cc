// sqctl's management commands, run as a user would run them: the built
// binary, its exit codes and its messages.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "tests/test_util.h"
#include "synth/synthetic.h"

namespace sqz {
namespace {

using sqz::testing::RunCommand;
using sqz::testing::ScopedTempDir;
using sqz::testing::SqctlPath;

class SqctlCli : public ::testing::Test {
 protected:
  void SetUp() override {
    synth::Spec spec;
    spec.n_layers = 2;
    spec.n_kv_heads = 2;
    spec.n_q_heads = 4;
    spec.n_tokens = 2048;
    spec.head_dim = 64;
    spec.q_window = 32;
    spec.n_queries = 4;
    std::vector<std::string> paths;
    ASSERT_TRUE(synth::WriteCorpus(spec, 2, dir_.Sub("corpus"), &paths).ok());
  }
  int Run(const std::string& args, std::string* out) {
    out->clear();
    return RunCommand(SqctlPath() + " " + args, out);
  }
  std::string Db() const { return dir_.Sub("db"); }
  ScopedTempDir dir_;
};

TEST_F(SqctlCli, HelpIsGeneratedForEveryCommand) {
  std::string out;
  ASSERT_EQ(Run("--help", &out), 0) << out;
  for (const char* cmd : {"build-index", "list", "info", "drop", "verify", "query", "eval", "demo", "synth"}) {
    EXPECT_NE(out.find(cmd), std::string::npos) << cmd << " missing from:\n" << out;
    std::string help;
    EXPECT_EQ(Run(std::string(cmd) + " --help", &help), 0) << help;
    EXPECT_NE(help.find("Usage: sqctl " + std::string(cmd)), std::string::npos) << help;
  }
  EXPECT_EQ(Run("", &out), 2);
  EXPECT_EQ(Run("frobnicate", &out), 2);
  EXPECT_NE(out.find("unknown command 'frobnicate'"), std::string::npos) << out;
}

TEST_F(SqctlCli, UsageErrorsExitTwoAndSayWhat) {
  std::string out;
  EXPECT_EQ(Run("list", &out), 2);
  EXPECT_NE(out.find("missing required option --db"), std::string::npos) << out;
  EXPECT_EQ(Run("build-index --db " + Db(), &out), 2);
  EXPECT_NE(out.find("exactly one of --kv FILE or --corpus DIR"), std::string::npos) << out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv x --bogus", &out), 2);
  EXPECT_NE(out.find("unknown option '--bogus'"), std::string::npos) << out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv x --window abc", &out), 1);
  EXPECT_NE(out.find("--window expects an integer"), std::string::npos) << out;
}

TEST_F(SqctlCli, BuildListInfoVerifyDrop) {
  std::string out;
  ASSERT_EQ(Run("build-index --db " + Db() + " --corpus " + dir_.Sub("corpus") + " --iters 2", &out), 0) << out;
  EXPECT_NE(out.find("built 'ctx_000'"), std::string::npos) << out;
  EXPECT_NE(out.find("built 'ctx_001'"), std::string::npos) << out;

  ASSERT_EQ(Run("list --db " + Db() + " --json", &out), 0) << out;
  EXPECT_NE(out.find("\"name\":\"ctx_000\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"name\":\"ctx_001\""), std::string::npos) << out;

  ASSERT_EQ(Run("info --db " + Db() + " --context ctx_001 --json", &out), 0) << out;
  EXPECT_NE(out.find("\"n_tokens\":2048"), std::string::npos) << out;
  EXPECT_NE(out.find("\"calibration_queries\":32"), std::string::npos) << out;
  EXPECT_NE(out.find("\"quantile\":0.9"), std::string::npos) << out;
  ASSERT_EQ(Run("info --db " + Db() + " --context ctx_001", &out), 0) << out;
  EXPECT_NE(out.find("calibrated on 32 window queries"), std::string::npos) << out;

  ASSERT_EQ(Run("verify --db " + Db(), &out), 0) << out;
  EXPECT_NE(out.find("ctx_000"), std::string::npos);

  // Building an existing name needs --replace.
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("corpus/ctx_000.safetensors") + " --iters 2", &out), 1);
  EXPECT_NE(out.find("already exists"), std::string::npos) << out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("corpus/ctx_000.safetensors") +
                    " --iters 2 --replace --quiet",
                &out),
            0)
      << out;

  ASSERT_EQ(Run("drop --db " + Db() + " --context ctx_000", &out), 0) << out;
  EXPECT_EQ(Run("info --db " + Db() + " --context ctx_000", &out), 1);
  EXPECT_NE(out.find("no context named 'ctx_000'"), std::string::npos) << out;
  EXPECT_EQ(Run("drop --db " + Db() + " --context ctx_000", &out), 1);
  ASSERT_EQ(Run("list --db " + Db(), &out), 0) << out;
  EXPECT_EQ(out.find("ctx_000"), std::string::npos) << out;
}

TEST_F(SqctlCli, BadInputNamesTheFileAndLeavesTheDatabaseAlone) {
  std::string out;
  ASSERT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("corpus/ctx_000.safetensors") + " --iters 2 --quiet",
                &out),
            0)
      << out;
  {
    std::ofstream f(dir_.Sub("garbage.safetensors"), std::ios::binary);
    f << "this is not a safetensors file at all";
  }
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("garbage.safetensors"), &out), 1);
  EXPECT_NE(out.find("garbage.safetensors"), std::string::npos) << out;
  EXPECT_NE(out.find("not a valid safetensors file"), std::string::npos) << out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("missing.safetensors"), &out), 1);
  EXPECT_NE(out.find("cannot open"), std::string::npos) << out;
  ASSERT_EQ(Run("list --db " + Db(), &out), 0);
  EXPECT_NE(out.find("ctx_000"), std::string::npos);
  EXPECT_EQ(out.find("garbage"), std::string::npos) << out;
  ASSERT_EQ(Run("verify --db " + Db(), &out), 0) << out;
  // A database directory that does not exist is not created by read commands.
  EXPECT_EQ(Run("list --db " + dir_.Sub("nowhere"), &out), 1);
  EXPECT_NE(out.find("no squeeze database"), std::string::npos) << out;
}

}  // namespace
}  // namespace sqz
