// sqctl's management commands, run as a user would run them: the built
// binary, its exit codes and its messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "synth/synthetic.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using sqz::testing::RunCommand;
using sqz::testing::RunCommandSplit;
using sqz::testing::ScopedTempDir;
using sqz::testing::ShellQuote;
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
  // Runs `sqctl <args>` and parses its stdout as JSON (a parse failure is a
  // discarded value, reported with the text).
  int RunJson(const std::string& args, nlohmann::json* j, std::string* err) {
    std::string out;
    const int rc = RunCommandSplit(SqctlPath() + " " + args, &out, err);
    *j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
    if (j->is_discarded()) *err += "\nnot valid JSON:\n" + out;
    return rc;
  }
  std::string Db() const { return dir_.Sub("db"); }
  std::string Kv(int i) const { return dir_.Sub("corpus/ctx_00" + std::to_string(i) + ".safetensors"); }
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
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv x --window abc", &out), 2);
  EXPECT_NE(out.find("--window expects an integer"), std::string::npos) << out;
}

// Every numeric option is checked against the range of the field it feeds:
// a value out of range is a usage error (exit 2) naming the flag, the value
// and the allowed range, never silently wrapped or cast.
TEST_F(SqctlCli, NumericOptionsAreRangeChecked) {
  struct Case {
    std::string args;
    std::vector<std::string> expect;  // substrings of the message
  };
  const std::string build = "build-index --db " + Db() + " --kv " + Kv(0) + " --quiet ";
  const std::vector<Case> cases = {
      // An int field: 2^32 + 100 used to become 100.
      {build + "--window 4294967396", {"--window 4294967396 is out of range", "[0, 2147483647]"}},
      {build + "--window 2147483648", {"--window 2147483648 is out of range", "[0, 2147483647]"}},
      {build + "--window 99999999999999999999999", {"--window 99999999999999999999999", "[0, 2147483647]"}},
      {build + "--sinks -1", {"--sinks -1 is out of range", "[0, 2147483647]"}},
      {build + "--iters 0", {"--iters 0 is out of range", "[1, 2147483647]"}},
      // Malformed integers.
      {build + "--iters 2.5", {"--iters expects an integer in [1, 2147483647], got '2.5'"}},
      {build + "--window=", {"--window expects an integer", "got ''"}},
      {build + "--window 12abc", {"--window expects an integer", "got '12abc'"}},
      // A uint64 seed: no negative values, no wrap-around.
      {build + "--seed -1", {"--seed -1 is out of range", "[0, 18446744073709551615]"}},
      {build + "--seed 18446744073709551616", {"--seed 18446744073709551616 is out of range"}},
      // Doubles: NaN, infinities and values outside the option's domain.
      {build + "--fine nan", {"--fine nan is out of range", "(0, 1]"}},
      {build + "--fine inf", {"--fine inf is out of range", "(0, 1]"}},
      {build + "--coarse 0", {"--coarse 0 is out of range", "(0, 1]"}},
      {build + "--coarse 1.5", {"--coarse 1.5 is out of range", "(0, 1]"}},
      {build + "--fine x", {"--fine expects a number in (0, 1], got 'x'"}},
      {build + "--quantiles 0.5,1", {"--quantiles 1 is out of range", "(0, 1)"}},
      {build + "--quantiles 0,0.5", {"--quantiles 0 is out of range", "(0, 1)"}},
      {build + "--quantiles 0.5,NaN", {"--quantiles NaN is out of range", "(0, 1)"}},
      {build + "--quantiles 0.5,,0.9", {"--quantiles expects a number"}},
      // synth and demo.
      {"synth --out " + dir_.Sub("s") + " --contexts 0", {"--contexts 0 is out of range", "[1, 2147483647]"}},
      {"synth --out " + dir_.Sub("s") + " --tokens 0", {"--tokens 0 is out of range", "[1, 9223372036854775807]"}},
      {"synth --out " + dir_.Sub("s") + " --head-dim 4294967424",
       {"--head-dim 4294967424 is out of range", "[1, 2147483647]"}},
      {"synth --out " + dir_.Sub("s") + " --layers -3", {"--layers -3 is out of range"}},
      {"synth --out " + dir_.Sub("s") + " --window -1", {"--window -1 is out of range", "[0, 2147483647]"}},
      {"synth --out " + dir_.Sub("s") + " --seed -7", {"--seed -7 is out of range"}},
      {"synth --out " + dir_.Sub("s") + " --q-heads 6 --kv-heads 4", {"--q-heads must be a multiple of --kv-heads"}},
      {"demo --dir " + dir_.Sub("demo") + " --tokens 1000", {"--tokens 1000 is out of range", "[1024, "}},
  };
  for (const Case& c : cases) {
    std::string out;
    EXPECT_EQ(Run(c.args, &out), 2) << c.args << "\n" << out;
    for (const auto& e : c.expect) EXPECT_NE(out.find(e), std::string::npos) << c.args << "\n" << out;
    EXPECT_NE(out.find("--help"), std::string::npos) << out;
  }
  // Nothing was created by the refused commands.
  EXPECT_FALSE(std::filesystem::exists(Db()));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("s")));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("demo")));

  // The ends of the ranges are accepted: the largest seed is stored as given.
  std::string err;
  nlohmann::json j;
  ASSERT_EQ(RunJson(build + "--seed 18446744073709551615 --window 2147483647 --sinks 0 --iters 1 --fine 1 --coarse 1",
                    &j, &err),
            0)
      << err;
  ASSERT_EQ(RunJson("info --db " + Db() + " --context ctx_000 --json", &j, &err), 0) << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  EXPECT_EQ(j["seed"].get<uint64_t>(), 18446744073709551615ull);
  EXPECT_EQ(j["n_sinks"], 0);
  EXPECT_EQ(j["kmeans_iters"], 1);
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
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + dir_.Sub("corpus/ctx_000.safetensors") + " --iters 2", &out),
            1);
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
  ASSERT_EQ(
      Run("build-index --db " + Db() + " --kv " + dir_.Sub("corpus/ctx_000.safetensors") + " --iters 2 --quiet", &out),
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

// list, info, verify, query and eval open the database read-only: on a path
// with no database they say so and exit 1, and create nothing.
TEST_F(SqctlCli, ReadCommandsNeedADatabaseAndCreateNothing) {
  const std::string q = " --queries " + dir_.Sub("corpus/queries/ctx_000.safetensors");
  const std::string empty = dir_.Sub("empty");
  std::filesystem::create_directories(empty);
  for (const std::string& path : {dir_.Sub("nowhere"), empty}) {
    for (const std::string& cmd :
         {"list --db " + path, "list --db " + path + " --json", "info --db " + path + " --context ctx_000",
          "verify --db " + path, "query --db " + path + " --context ctx_000" + q + " --out " + dir_.Sub("o"),
          "eval --db " + path + " --context ctx_000" + q, "drop --db " + path + " --context ctx_000"}) {
      std::string out;
      EXPECT_EQ(Run(cmd, &out), 1) << cmd << "\n" << out;
      EXPECT_NE(out.find("no squeeze database"), std::string::npos) << cmd << "\n" << out;
    }
  }
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("nowhere")));
  EXPECT_TRUE(std::filesystem::is_empty(empty));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("o")));
}

// Read-only commands take no lock: they run while a writer holds the
// database open. Skipped while the storage layer ignores Options::read_only.
TEST_F(SqctlCli, ReadCommandsRunBesideAWriter) {
  std::string out;
  ASSERT_EQ(Run("build-index --db " + Db() + " --kv " + Kv(0) + " --iters 2 --quiet", &out), 0) << out;
  {
    Options ro;
    ro.read_only = true;
    std::unique_ptr<DB> probe;
    Status s = DB::Open(ro, Db(), &probe);
    ASSERT_TRUE(s.ok()) << s.ToString();
    if (!probe->read_only()) GTEST_SKIP() << "the storage layer does not implement Options::read_only yet";
  }
  std::unique_ptr<DB> writer;
  Status s = DB::Open(Options(), Db(), &writer);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::string q = " --queries " + dir_.Sub("corpus/queries/ctx_000.safetensors");
  for (const std::string& cmd :
       {"list --db " + Db(), "info --db " + Db() + " --context ctx_000", "verify --db " + Db(),
        "query --db " + Db() + " --context ctx_000" + q + " --out " + dir_.Sub("o.safetensors"),
        "eval --db " + Db() + " --context ctx_000" + q}) {
    EXPECT_EQ(Run(cmd, &out), 0) << cmd << "\n" << out;
  }
  // Writers still need the lock.
  EXPECT_EQ(Run("drop --db " + Db() + " --context ctx_000", &out), 1) << out;
}

// --json output is real JSON whatever the context name holds: long names
// (a fixed buffer used to cut them), quotes, backslashes, newlines and other
// control characters come back intact.
TEST_F(SqctlCli, JsonOutputParsesWithAnyContextName) {
  const std::string long_name(1000, 'n');
  const std::string odd_name = std::string("say \"hi\" C:\\dir\\ it's\nline two\ttab") + char(1) + "/x";
  std::string err;
  nlohmann::json j;
  for (const std::string& name : {long_name, odd_name}) {
    ASSERT_EQ(RunJson("build-index --db " + Db() + " --kv " + Kv(0) + " --iters 2 --json --name " + ShellQuote(name),
                      &j, &err),
              0)
        << err;
    ASSERT_FALSE(j.is_discarded()) << err;
    ASSERT_TRUE(j.is_array() && j.size() == 1) << j.dump();
    EXPECT_EQ(j[0]["name"], name);
    for (const char* field : {"seconds", "seconds_read", "seconds_kmeans", "seconds_calibrate", "seconds_write",
                              "keys_clustered", "keys_per_second", "kv_bytes", "index_bytes", "peak_rss_bytes"}) {
      EXPECT_TRUE(j[0].contains(field) && j[0][field].is_number()) << field << " in " << j.dump();
    }
    EXPECT_GT(j[0]["keys_clustered"].get<int64_t>(), 0);

    ASSERT_EQ(RunJson("info --db " + Db() + " --json --context " + ShellQuote(name), &j, &err), 0) << err;
    ASSERT_FALSE(j.is_discarded()) << err;
    EXPECT_EQ(j["name"], name);
    EXPECT_EQ(j["n_tokens"], 2048);
    EXPECT_EQ(j["n_layers"], 2);
    EXPECT_EQ(j["dtype"], "F16");
    EXPECT_EQ(j["calibration_queries"], 32);
    ASSERT_TRUE(j["fine_clusters"].is_array());
    EXPECT_EQ(j["fine_clusters"].size(), 4u);  // 2 layers x 2 KV heads
    ASSERT_TRUE(j["thresholds"].is_array());
    ASSERT_EQ(j["thresholds"].size(), 5u);
    EXPECT_DOUBLE_EQ(j["thresholds"][3]["quantile"].get<double>(), 0.9);
    EXPECT_TRUE(j["thresholds"][3]["flat"].is_number());

    // The text form is not cut either; control characters and backslashes
    // are escaped there so the name stays on its line.
    std::string out;
    ASSERT_EQ(Run("info --db " + Db() + " --context " + ShellQuote(name), &out), 0) << out;
    const std::string shown = name == long_name ? name : "say \"hi\" C:\\\\dir\\\\ it's\\nline two\\ttab\\x01/x";
    EXPECT_NE(out.find(shown + " (id "), std::string::npos) << out;
  }
  ASSERT_EQ(RunJson("list --db " + Db() + " --json", &j, &err), 0) << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  ASSERT_TRUE(j.is_array() && j.size() == 2) << j.dump();
  std::vector<std::string> names;
  for (const auto& c : j) {
    names.push_back(c["name"]);
    EXPECT_EQ(c["n_layers"], 2);
    EXPECT_EQ(c["n_tokens"], 2048);
    EXPECT_TRUE(c["bytes_on_disk"].is_number_unsigned());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{long_name, odd_name}));

  // Several contexts in one build: one array element each.
  ASSERT_EQ(RunJson("build-index --db " + dir_.Sub("db2") + " --corpus " + dir_.Sub("corpus") + " --iters 2 --json", &j,
                    &err),
            0)
      << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  ASSERT_TRUE(j.is_array() && j.size() == 2) << j.dump();
  EXPECT_EQ(j[0]["name"], "ctx_000");
  EXPECT_EQ(j[1]["name"], "ctx_001");
}

TEST_F(SqctlCli, PageRowsOptionAndPageGeometryInInfo) {
  std::string err;
  nlohmann::json j;
  ASSERT_EQ(
      RunJson("build-index --db " + Db() + " --kv " + Kv(0) + " --iters 2 --page-rows 7 --json --name p7", &j, &err), 0)
      << err;
  ASSERT_EQ(RunJson("info --db " + Db() + " --json --context p7", &j, &err), 0) << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  const int64_t n_clustered = j["n_clustered"].get<int64_t>();
  const int64_t n_always = j["n_tokens"].get<int64_t>() - n_clustered;
  EXPECT_EQ(j["format_version"], 2);
  EXPECT_EQ(j["page_rows"], 7);
  EXPECT_EQ(j["clustered_pages"].get<int64_t>(), (n_clustered + 6) / 7);
  EXPECT_EQ(j["always_pages"].get<int64_t>(), (n_always + 6) / 7);
  EXPECT_EQ(j["page_bytes"].get<int64_t>(), 2 * 7 * j["head_dim"].get<int64_t>() * 2);  // fp16 K and V planes
  // The histogram counts every fine cluster of every (layer, head) once.
  int64_t clusters = 0, hist = 0;
  for (const auto& c : j["fine_clusters"]) clusters += c.get<int64_t>();
  for (const auto& c : j["cluster_size_histogram"]) hist += c.get<int64_t>();
  EXPECT_EQ(hist, clusters);
  // Pages are what verify walks: heads * pages per head.
  std::string out;
  ASSERT_EQ(Run("verify --db " + Db() + " --context p7", &out), 0) << out;
  const int64_t pages = (j["clustered_pages"].get<int64_t>() + j["always_pages"].get<int64_t>()) *
                        j["n_layers"].get<int64_t>() * j["n_kv_heads"].get<int64_t>();
  EXPECT_NE(out.find(std::to_string(pages) + " KV pages"), std::string::npos) << out;
  // Out of range: usage error, nothing built.
  ASSERT_EQ(Run("build-index --db " + Db() + " --kv " + Kv(0) + " --page-rows 4097 --name big", &out), 2) << out;
  EXPECT_NE(out.find("--page-rows 4097 is out of range"), std::string::npos) << out;
  ASSERT_EQ(Run("list --db " + Db(), &out), 0);
  EXPECT_EQ(out.find("big"), std::string::npos) << out;
}

}  // namespace
}  // namespace sqz
