// `sqctl query` and `sqctl eval`, run as the built binary on a small
// synthetic database.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "synth/synthetic.h"
#include "tests/test_util.h"
#include "util/safetensors.h"

namespace sqz {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class QueryCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(testing::SqctlPath()))
        << testing::SqctlPath() << " is not built (ninja sqctl): the CLI tests run the binary";
    dir_ = new testing::ScopedTempDir("sqz-query-cli");
    synth::Spec spec;
    spec.n_layers = 2;
    spec.n_kv_heads = 2;
    spec.n_q_heads = 4;
    spec.n_tokens = 2048;
    spec.head_dim = 64;
    spec.q_window = 50;
    spec.n_queries = 4;
    Status s = synth::WriteContextFiles(spec, dir_->Sub("kv.safetensors"), dir_->Sub("q.safetensors"));
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::string out;
    const int rc = testing::RunCommand(testing::SqctlPath() + " build-index --db " + Db() + " --kv " +
                                           dir_->Sub("kv.safetensors") + " --name ctx --quiet",
                                       &out);
    ASSERT_EQ(rc, 0) << out;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  static std::string Db() { return dir_->Sub("db"); }
  static std::string Queries() { return dir_->Sub("q.safetensors"); }

  // Runs `sqctl <args>`; returns the exit code, output in *out.
  static int Sqctl(const std::string& args, std::string* out) {
    out->clear();
    return testing::RunCommand(testing::SqctlPath() + " " + args, out);
  }
  // Runs `sqctl <args>` and parses its stdout as JSON (discarded if invalid).
  static int SqctlJson(const std::string& args, nlohmann::json* j, std::string* err) {
    std::string out;
    const int rc = testing::RunCommandSplit(testing::SqctlPath() + " " + args, &out, err);
    *j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
    if (j->is_discarded()) *err += "\nnot valid JSON:\n" + out;
    return rc;
  }
  static std::string Base(const std::string& cmd) {
    return cmd + " --db " + Db() + " --context ctx --queries " + Queries();
  }

  static testing::ScopedTempDir* dir_;
};

testing::ScopedTempDir* QueryCliTest::dir_ = nullptr;

TEST_F(QueryCliTest, QueryWritesOAndLse) {
  std::string out;
  const std::string o_path = dir_->Sub("o.safetensors");
  ASSERT_EQ(Sqctl(Base("query") + " --out " + o_path, &out), 0) << out;
  EXPECT_NE(out.find("keys read"), std::string::npos) << out;
  EXPECT_NE(out.find("bytes read"), std::string::npos) << out;
  std::unique_ptr<SafetensorsFile> f;
  Status s = SafetensorsFile::Open(o_path, &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "layers." + std::to_string(layer);
    const SafetensorsEntry* o = f->Find(p + ".o");
    const SafetensorsEntry* lse = f->Find(p + ".lse");
    ASSERT_TRUE(o && lse) << p;
    EXPECT_EQ(o->dtype_name, "F32");
    EXPECT_EQ(o->shape, (std::vector<int64_t>{4, 4, 64}));
    EXPECT_EQ(lse->dtype_name, "F32");
    EXPECT_EQ(lse->shape, (std::vector<int64_t>{4, 4}));
    std::vector<float> values(4 * 4 * 64);
    ASSERT_TRUE(f->ReadFloat(*o, values.data()).ok());
    for (float x : values) ASSERT_TRUE(std::isfinite(x));
  }

  nlohmann::json j;
  std::string err;
  ASSERT_EQ(SqctlJson(Base("query") + " --out " + o_path + " --dense --json", &j, &err), 0) << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  EXPECT_EQ(j["keys_fraction"], 1.0) << j.dump();
  EXPECT_EQ(j["context"], "ctx");
  EXPECT_EQ(j["queries"], Queries());
  EXPECT_EQ(j["out"], o_path);
  EXPECT_EQ(j["selection"], "dense");
  EXPECT_EQ(j["queries_total"], 2 * 4 * 4);  // layers x query heads x T
  ASSERT_TRUE(j["layers"].is_array());
  ASSERT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["layers"][1]["layer"], 1);
  EXPECT_EQ(j["layers"][1]["T"], 4);
  EXPECT_EQ(j["layers"][1]["keys_fraction"], 1.0);
  for (const char* field : {"keys_selected", "bytes_read", "bytes_fraction", "seconds_score", "seconds_read",
                            "seconds_attend", "seconds_wall"}) {
    EXPECT_TRUE(j.contains(field) && j[field].is_number()) << field << " in " << j.dump();
  }
  ASSERT_EQ(SqctlJson(Base("query") + " --out " + o_path +
                          " --threshold-quantile 0.9 --hierarchical --gqa per-head --per-query --json",
                      &j, &err),
            0)
      << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  EXPECT_TRUE(j["bytes_read"].is_number_unsigned()) << j.dump();
  EXPECT_LT(j["keys_fraction"].get<double>(), 1.0) << j.dump();
  ASSERT_EQ(
      Sqctl(Base("query") + " --out " + o_path + " --threshold 0.0005 --hierarchical --threshold-coarse 0.0001", &out),
      0)
      << out;
}

TEST_F(QueryCliTest, EvalReportsPerConfigurationAndHeadKind) {
  std::string out;
  ASSERT_EQ(Sqctl(Base("eval") + " --budgets 0.125", &out), 0) << out;
  EXPECT_NE(out.find("budget=0.125 flat"), std::string::npos) << out;
  EXPECT_NE(out.find("budget=0.125 hier"), std::string::npos) << out;
  EXPECT_NE(out.find("tau@0.9 flat"), std::string::npos) << out;
  EXPECT_NE(out.find("concentrated"), std::string::npos) << out;
  std::string err;
  nlohmann::json j;
  ASSERT_EQ(SqctlJson(Base("eval") + " --budgets 0.05,0.25 --json", &j, &err), 0) << err;
  ASSERT_FALSE(j.is_discarded()) << err;
  EXPECT_EQ(j["context"], "ctx");
  ASSERT_TRUE(j["configs"].is_array());
  // dense, 2 budgets x flat/hier, then the calibrated thresholds x flat/hier.
  ASSERT_GE(j["configs"].size(), 5u);
  EXPECT_EQ(j["configs"][0]["mode"], "dense");
  EXPECT_NEAR(j["configs"][0]["all"]["recall_mean"].get<double>(), 1.0, 1e-9);
  EXPECT_NEAR(j["configs"][0]["all"]["recall_over_oracle"].get<double>(), 1.0, 1e-9);
  EXPECT_EQ(j["configs"][1]["name"], "budget=0.05 flat");
  EXPECT_EQ(j["configs"][2]["hierarchical"], true);
  EXPECT_NEAR(j["configs"][1]["read_fraction"].get<double>(), 0.05, 0.02);
  EXPECT_TRUE(j["configs"][1]["spread"].contains("samples"));
  ASSERT_TRUE(j["heads"].is_array());
  EXPECT_EQ(j["heads"].size(), static_cast<size_t>(j["heads_concentrated"].get<int>() + j["heads_spread"].get<int>()));
  // Per (layer, query head): every head has as many samples, so their mean is
  // the overall mean; dense recalls everything.
  for (const auto& c : j["configs"]) {
    ASSERT_EQ(c["head_recall"].size(), j["heads"].size()) << c["name"];
    ASSERT_EQ(c["head_oracle"].size(), j["heads"].size()) << c["name"];
    double sum = 0;
    for (const auto& r : c["head_recall"]) sum += r.get<double>();
    EXPECT_NEAR(sum / static_cast<double>(j["heads"].size()), c["all"]["recall_mean"].get<double>(), 1e-9) << c["name"];
  }
  for (const auto& r : j["configs"][0]["head_recall"]) EXPECT_NEAR(r.get<double>(), 1.0, 1e-9);
}

TEST_F(QueryCliTest, EvalPlot) {
  std::string out;
  const std::string png = dir_->Sub("recall.png");
  // No interpreter: a clear error naming what --plot needs, exit 1, no crash.
  EXPECT_EQ(testing::RunCommand("SQZ_PYTHON=/nonexistent/python " + testing::SqctlPath() + " " + Base("eval") +
                                    " --budgets 0.125 --plot " + png,
                                &out),
            1)
      << out;
  EXPECT_NE(out.find("--plot needs the squeeze Python package"), std::string::npos) << out;
  // With the project's venv (scripts/setup.sh installs the package there): a PNG.
  const std::string py = std::string(SQZ_SOURCE_DIR) + "/.venv/bin/python";
  if (!std::filesystem::exists(py) ||
      testing::RunCommand(py + " -c 'import squeeze.plot, matplotlib' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << py << " lacks the squeeze package or matplotlib (scripts/setup.sh installs both)";
  }
  ASSERT_EQ(testing::RunCommand("SQZ_PYTHON=" + py + " " + testing::SqctlPath() + " " + Base("eval") +
                                    " --budgets 0.125,0.25 --plot " + png,
                                &out),
            0)
      << out;
  std::ifstream f(png, std::ios::binary);
  char magic[8] = {};
  f.read(magic, 8);
  EXPECT_EQ(std::string(magic + 1, 3), "PNG") << out;
}

TEST_F(QueryCliTest, DeviceOption) {
  std::string out;
  const std::string o_path = dir_->Sub("o_dev.safetensors");
  EXPECT_EQ(Sqctl(Base("query") + " --out " + o_path + " --device gpu", &out), 2) << out;
  EXPECT_NE(out.find("--device expects cpu, cuda or cuda:N"), std::string::npos) << out;
  EXPECT_EQ(Sqctl(Base("eval") + " --device cuda:x", &out), 2) << out;
  ASSERT_EQ(Sqctl(Base("query") + " --out " + o_path + " --device cpu", &out), 0) << out;
  if (gpu::DeviceCount() == 0) {
    // No GPU here: a clear runtime error, nothing written.
    const std::string o2 = dir_->Sub("o_cuda.safetensors");
    EXPECT_EQ(Sqctl(Base("query") + " --out " + o2 + " --device cuda", &out), 1) << out;
    // Either reason: no device here, or a build without the CUDA layer.
    EXPECT_TRUE(out.find("no CUDA device") != std::string::npos || out.find("no CUDA layer") != std::string::npos)
        << out;
    EXPECT_FALSE(std::filesystem::exists(o2));
  } else {
    ASSERT_EQ(Sqctl(Base("query") + " --out " + dir_->Sub("o_cuda.safetensors") + " --device cuda", &out), 0) << out;
  }
}

// Issue 9, item 4: --out never destroys the input nor replaces a link.
TEST_F(QueryCliTest, OutNeverReplacesTheQueriesOrALink) {
  std::string out;
  const std::string before = ReadAll(Queries());
  EXPECT_EQ(Sqctl(Base("query") + " --out " + Queries(), &out), 2) << out;
  EXPECT_NE(out.find("is the queries file"), std::string::npos) << out;
  EXPECT_EQ(ReadAll(Queries()), before);
  const std::string target = dir_->Sub("keep.txt"), link = dir_->Sub("o_link.safetensors");
  std::ofstream(target) << "keep me";
  std::filesystem::create_symlink(target, link);
  EXPECT_EQ(Sqctl(Base("query") + " --out " + link, &out), 1) << out;
  EXPECT_NE(out.find("symbolic link"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  EXPECT_EQ(ReadAll(target), "keep me");
}

TEST_F(QueryCliTest, ErrorsNameTheCulpritAndExitNonZero) {
  std::string out;
  const std::string o_path = dir_->Sub("o_err.safetensors");

  // Not a safetensors file.
  const std::string garbage = dir_->Sub("garbage.safetensors");
  std::ofstream(garbage) << "this is not a safetensors file at all";
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context ctx --queries " + garbage + " --out " + o_path, &out), 1);
  EXPECT_NE(out.find(garbage), std::string::npos) << out;
  EXPECT_EQ(Sqctl("eval --db " + Db() + " --context ctx --queries " + garbage, &out), 1);
  EXPECT_NE(out.find(garbage), std::string::npos) << out;

  // Missing file.
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context ctx --queries " + dir_->Sub("nope") + " --out " + o_path, &out),
            1);
  EXPECT_NE(out.find(dir_->Sub("nope")), std::string::npos) << out;

  // Wrong head_dim, then a layer the context lacks.
  const std::string wrong = dir_->Sub("wrong.safetensors");
  {
    std::vector<float> q(4 * 2 * 32, 0.5f);
    SafetensorsWriter w;
    w.Add("layers.0.q", DType::kF32, {4, 2, 32}, q.data());
    ASSERT_TRUE(w.WriteFile(wrong).ok());
  }
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context ctx --queries " + wrong + " --out " + o_path, &out), 1);
  EXPECT_NE(out.find("layers.0.q"), std::string::npos) << out;
  EXPECT_NE(out.find("does not match"), std::string::npos) << out;
  {
    std::vector<float> q(4 * 2 * 64, 0.5f);
    SafetensorsWriter w;
    w.Add("layers.7.q", DType::kF32, {4, 2, 64}, q.data());
    ASSERT_TRUE(w.WriteFile(wrong).ok());
  }
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context ctx --queries " + wrong + " --out " + o_path, &out), 1);
  EXPECT_NE(out.find("layers.7.q"), std::string::npos) << out;
  {
    std::vector<float> q(4 * 2 * 64, NAN);
    SafetensorsWriter w;
    w.Add("layers.1.q", DType::kF32, {4, 2, 64}, q.data());
    ASSERT_TRUE(w.WriteFile(wrong).ok());
  }
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context ctx --queries " + wrong + " --out " + o_path, &out), 1);
  EXPECT_NE(out.find("NaN"), std::string::npos) << out;

  // Unknown context; uncalibrated quantile.
  EXPECT_EQ(Sqctl("query --db " + Db() + " --context other --queries " + Queries() + " --out " + o_path, &out), 1);
  EXPECT_NE(out.find("other"), std::string::npos) << out;
  EXPECT_EQ(Sqctl(Base("query") + " --out " + o_path + " --threshold-quantile 0.33", &out), 1);
  EXPECT_NE(out.find("0.33"), std::string::npos) << out;

  // Usage errors.
  EXPECT_EQ(Sqctl(Base("query") + " --out " + o_path + " --budget 0.1 --dense", &out), 2) << out;
  EXPECT_EQ(Sqctl(Base("query") + " --out " + o_path + " --gqa sideways", &out), 2) << out;
  EXPECT_EQ(Sqctl(Base("query") + " --out " + o_path + " --budget 1.5", &out), 2) << out;
  EXPECT_EQ(Sqctl(Base("query"), &out), 2) << out;  // no --out
  EXPECT_EQ(Sqctl(Base("eval") + " --budgets 0.1,x", &out), 2) << out;
  EXPECT_EQ(Sqctl(Base("eval") + " --budgets 0", &out), 2) << out;
}

// Floating-point options: NaN and infinities are refused, and so is a value
// outside the option's domain; the message names the flag, the value and
// what is allowed (exit 2, nothing written).
TEST_F(QueryCliTest, FloatingPointOptionsAreRangeChecked) {
  const std::string o_path = dir_->Sub("o_range.safetensors");
  const std::string query = Base("query") + " --out " + o_path;
  struct Case {
    std::string args;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {query + " --budget 0", {"--budget 0 is out of range", "(0, 1]"}},
      {query + " --budget 1.0001", {"--budget 1.0001 is out of range", "(0, 1]"}},
      {query + " --budget nan", {"--budget nan is out of range", "(0, 1]"}},
      {query + " --budget inf", {"--budget inf is out of range", "(0, 1]"}},
      {query + " --budget 1e999", {"--budget 1e999 is out of range", "(0, 1]"}},
      {query + " --budget half", {"--budget expects a number in (0, 1], got 'half'"}},
      {query + " --threshold-quantile 0", {"--threshold-quantile 0 is out of range", "(0, 1)"}},
      {query + " --threshold-quantile 1", {"--threshold-quantile 1 is out of range", "(0, 1)"}},
      {query + " --threshold-quantile -nan", {"--threshold-quantile -nan is out of range", "(0, 1)"}},
      {query + " --threshold nan", {"--threshold nan is out of range", "any finite number"}},
      {query + " --threshold -inf", {"--threshold -inf is out of range", "any finite number"}},
      {query + " --threshold 0.001 --hierarchical --threshold-coarse infinity",
       {"--threshold-coarse infinity is out of range", "any finite number"}},
      {Base("eval") + " --budgets 0.125,nan", {"--budgets nan is out of range", "(0, 1]"}},
      {Base("eval") + " --budgets 0.125,2", {"--budgets 2 is out of range", "(0, 1]"}},
      {Base("eval") + " --budgets -0.5", {"--budgets -0.5 is out of range", "(0, 1]"}},
  };
  for (const Case& c : cases) {
    std::string out;
    EXPECT_EQ(Sqctl(c.args, &out), 2) << c.args << "\n" << out;
    for (const auto& e : c.expect) EXPECT_NE(out.find(e), std::string::npos) << c.args << "\n" << out;
  }
  EXPECT_FALSE(std::filesystem::exists(o_path));
  // The closed end of (0, 1] is accepted.
  std::string out;
  EXPECT_EQ(Sqctl(query + " --budget 1", &out), 0) << out;
}

}  // namespace
}  // namespace sqz
