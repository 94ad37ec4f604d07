// Issue 9, items 5-7: every bad input sqctl can be handed is refused with a
// clear message and exit 1: never a crash, a hang, an uncaught exception, a
// silent misreading or a database created for nothing. Run as a user runs
// sqctl: the built binary, its exit codes and its messages.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "synth/synthetic.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using index_test::RawTensor;
using index_test::SafetensorsBytes;
using sqz::testing::RunCommand;
using sqz::testing::ScopedTempDir;
using sqz::testing::ShellQuote;
using sqz::testing::SqctlPath;

std::string F32Bytes(size_t n, float value) {
  std::vector<float> f(n, value);
  return std::string(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(float));
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A database with ctx_000 (2 layers, 2 KV heads, 4 query heads, d = 64),
// built once for the suite.
class SqctlInput : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScopedTempDir("sqz-input");
    synth::Spec spec;
    spec.n_layers = 2;
    spec.n_kv_heads = 2;
    spec.n_q_heads = 4;
    spec.n_tokens = 2048;
    spec.head_dim = 64;
    spec.q_window = 32;
    spec.n_queries = 4;
    std::vector<std::string> paths;
    ASSERT_TRUE(synth::WriteCorpus(spec, 1, dir_->Sub("corpus"), &paths).ok());
    std::string out;
    ASSERT_EQ(RunCommand(SqctlPath() + " build-index --quiet --iters 2 --db " + Db() + " --kv " + paths[0], &out), 0)
        << out;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string Db() { return dir_->Sub("db"); }
  static std::string Sub(const std::string& name) { return dir_->Sub(name); }
  static std::string Kv() { return dir_->Sub("corpus/ctx_000.safetensors"); }
  static std::string Queries() { return dir_->Sub("corpus/queries/ctx_000.safetensors"); }
  int Run(const std::string& args, std::string* out) {
    out->clear();
    return RunCommand(SqctlPath() + " " + args, out);
  }
  static ScopedTempDir* dir_;
};
ScopedTempDir* SqctlInput::dir_ = nullptr;

// Item 5: a queries header declaring T = 2^30 over a sparse file passes every
// size check against the file; it used to crash query and eval with an
// uncaught std::bad_alloc. Refused before any allocation.
TEST_F(SqctlInput, QueriesDeclaringHugeTAreRefusedBeforeAllocating) {
  const std::string path = Sub("sparse_q.safetensors");
  const uint64_t T = uint64_t{1} << 30, bytes = 4 * T * 64 * 4;
  const std::string header = "{\"layers.0.q\":{\"dtype\":\"F32\",\"shape\":[4," + std::to_string(T) +
                             ",64],\"data_offsets\":[0," + std::to_string(bytes) + "]}}";
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  WriteBytes(path, prefix + header);
  std::filesystem::resize_file(path, 8 + header.size() + bytes);  // sparse: no disk used
  for (const std::string& cmd : {"query --db " + Db() + " --context ctx_000 --queries " + path + " --out " + Sub("o"),
                                 "eval --db " + Db() + " --context ctx_000 --queries " + path}) {
    std::string out;
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(Run(cmd, &out), 1) << cmd << "\n" << out;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20)) << cmd;
    EXPECT_NE(out.find("layers.0.q"), std::string::npos) << out;
    EXPECT_NE(out.find("MiB of memory"), std::string::npos) << out;
    EXPECT_NE(out.find("split the queries"), std::string::npos) << out;
  }
  EXPECT_FALSE(std::filesystem::exists(Sub("o")));
  std::filesystem::remove(path);
}

// Item 5: a KV header naming layers.9999999.k used to take 3.3 GB and 7.8 s
// to report a missing layer. Now immediate, and no database is created.
TEST_F(SqctlInput, HugeLayerIndexFailsFastAndCreatesNothing) {
  std::vector<RawTensor> t;
  for (const char* s : {"k", "v"}) t.push_back({std::string("layers.0.") + s, "F32", {2, 16, 8}, F32Bytes(256, 0.5f)});
  t.push_back({"layers.9999999.k", "F32", {2, 16, 8}, F32Bytes(256, 0.5f)});
  WriteBytes(Sub("huge_layer.safetensors"), SafetensorsBytes(t, {{"n_q_heads", "2"}}));
  std::string out;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(Run("build-index --db " + Sub("new_db") + " --kv " + Sub("huge_layer.safetensors"), &out), 1) << out;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_NE(out.find("layers.9999999.k"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(Sub("new_db"))) << "bad input created a database";
}

// Item 6: layers.01.k used to be ignored (a 2-layer file built as 1 layer);
// layers.4294967296.q in a queries file used to be ignored with exit 0.
TEST_F(SqctlInput, NonCanonicalLayerNamesAreErrors) {
  std::vector<RawTensor> t;
  for (const char* l : {"0", "01"}) {
    for (const char* s : {"k", "v"}) {
      t.push_back({std::string("layers.") + l + "." + s, "F32", {2, 16, 8}, F32Bytes(256, 0.5f)});
    }
  }
  WriteBytes(Sub("l01.safetensors"), SafetensorsBytes(t, {{"n_q_heads", "2"}}));
  std::string out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + Sub("l01.safetensors"), &out), 1) << out;
  EXPECT_NE(out.find("'layers.01.k' is not a valid layer tensor name"), std::string::npos) << out;
  ASSERT_EQ(Run("list --db " + Db(), &out), 0) << out;
  EXPECT_EQ(out.find("l01"), std::string::npos) << out;

  const std::string q = F32Bytes(4 * 2 * 64, 0.1f);
  for (const char* bad : {"layers.4294967296.q", "layers.01.q", "layers.2.q", "layers.-1.q", "layers.x.q"}) {
    WriteBytes(Sub("q_bad.safetensors"),
               SafetensorsBytes({{"layers.0.q", "F32", {4, 2, 64}, q}, {bad, "F32", {4, 2, 64}, q}}, {}));
    for (const std::string& cmd :
         {"query --db " + Db() + " --context ctx_000 --queries " + Sub("q_bad.safetensors") + " --out " + Sub("o"),
          "eval --db " + Db() + " --context ctx_000 --queries " + Sub("q_bad.safetensors")}) {
      EXPECT_EQ(Run(cmd, &out), 1) << bad << ": " << cmd << "\n" << out;
      EXPECT_NE(out.find(bad), std::string::npos) << out;
    }
  }
  EXPECT_FALSE(std::filesystem::exists(Sub("o")));
}

// Item 6: overlapping data_offsets (v pointing at k's bytes) are refused.
TEST_F(SqctlInput, AliasedTensorBytesAreRefused) {
  const std::string header =
      "{\"__metadata__\":{\"n_q_heads\":\"2\"},\"layers.0.k\":{\"dtype\":\"F32\",\"shape\":[2,16,8],"
      "\"data_offsets\":[0,1024]},\"layers.0.v\":{\"dtype\":\"F32\",\"shape\":[2,16,8],\"data_offsets\":[0,1024]}}";
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  WriteBytes(Sub("alias.safetensors"), prefix + header + F32Bytes(256, 0.5f));
  std::string out;
  EXPECT_EQ(Run("build-index --db " + Sub("alias_db") + " --kv " + Sub("alias.safetensors"), &out), 1) << out;
  EXPECT_NE(out.find("overlaps tensor 'layers.0.k'"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(Sub("alias_db")));
}

// Item 7: --kv or --queries naming a FIFO used to hang forever.
TEST_F(SqctlInput, FifoInputsAreRefusedAtOnce) {
  const std::string fifo = Sub("pipe.safetensors");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::string out;
  EXPECT_EQ(Run("build-index --db " + Db() + " --kv " + fifo, &out), 1) << out;
  EXPECT_NE(out.find("FIFO"), std::string::npos) << out;
  EXPECT_EQ(Run("query --db " + Db() + " --context ctx_000 --queries " + fifo + " --out " + Sub("o"), &out), 1) << out;
  EXPECT_NE(out.find("FIFO"), std::string::npos) << out;
  std::filesystem::remove(fifo);
}

// Item 7: under `ulimit -f` the build used to die of SIGXFSZ without a word.
TEST_F(SqctlInput, FileSizeLimitIsAnErrorWithAMessage) {
  std::string out;
  const int rc = RunCommand("bash -c " + ShellQuote("ulimit -f 512; exec " + SqctlPath() + " build-index --db " +
                                                    Sub("fsize_db") + " --kv " + Kv() + " --quiet --iters 2"),
                            &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("File too large"), std::string::npos) << out;
  EXPECT_NE(out.find("ctx_000"), std::string::npos) << out;
}

// Item 7: finite F32 queries of 1e38 overflow the scores: NaN/Inf in O and
// LSE used to come back with exit 0.
TEST_F(SqctlInput, QueriesThatOverflowAreAnError) {
  WriteBytes(Sub("q_big.safetensors"), SafetensorsBytes({{"layers.1.q", "F32", {4, 2, 64}, F32Bytes(512, 1e38f)}}, {}));
  std::string out;
  EXPECT_EQ(Run("query --db " + Db() + " --context ctx_000 --queries " + Sub("q_big.safetensors") + " --out " +
                    Sub("o_big.safetensors"),
                &out),
            1)
      << out;
  // The library refuses the overflowed answer (ContextHandle::Attend), naming the layer.
  EXPECT_NE(out.find("layer 1: attention scores overflow float32"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(Sub("o_big.safetensors")));
  EXPECT_EQ(Run("eval --db " + Db() + " --context ctx_000 --queries " + Sub("q_big.safetensors"), &out), 1) << out;
  EXPECT_NE(out.find("overflow float32"), std::string::npos) << out;
  // Large but safe queries still work.
  WriteBytes(Sub("q_ok.safetensors"), SafetensorsBytes({{"layers.1.q", "F32", {4, 2, 64}, F32Bytes(512, 1e3f)}}, {}));
  EXPECT_EQ(Run("query --db " + Db() + " --context ctx_000 --queries " + Sub("q_ok.safetensors") + " --out " +
                    Sub("o_ok.safetensors"),
                &out),
            0)
      << out;
}

// Item 7: a newline in a context name used to break list's one-line-per-
// context output (and verify's). Text output escapes it; --json keeps it.
TEST_F(SqctlInput, ControlCharactersInNamesAreEscapedInTextOutput) {
  const std::string name = std::string("two\nlines\tand\\") + char(1);
  std::string out;
  ASSERT_EQ(
      Run("build-index --quiet --iters 2 --db " + Sub("names_db") + " --kv " + Kv() + " --name " + ShellQuote(name),
          &out),
      0)
      << out;
  ASSERT_EQ(Run("build-index --quiet --iters 2 --db " + Sub("names_db") + " --kv " + Kv() + " --name plain", &out), 0)
      << out;
  for (const char* cmd : {"list", "verify"}) {
    ASSERT_EQ(Run(std::string(cmd) + " --db " + Sub("names_db"), &out), 0) << out;
    std::vector<std::string> lines;
    for (size_t b = 0, e; b < out.size(); b = e + 1) {
      e = out.find('\n', b);
      if (e == std::string::npos) e = out.size();
      lines.push_back(out.substr(b, e - b));
    }
    if (!lines.empty() && lines.back().empty()) lines.pop_back();
    ASSERT_EQ(lines.size(), 2u) << cmd << ":\n" << out;
    EXPECT_EQ(lines[1].rfind("two\\nlines\\tand\\\\\\x01 ", 0), 0u) << cmd << ":\n" << out;
    EXPECT_EQ(lines[0].rfind("plain ", 0), 0u) << cmd << ":\n" << out;
  }
  ASSERT_EQ(Run("info --db " + Sub("names_db") + " --context " + ShellQuote(name), &out), 0) << out;
  EXPECT_NE(out.find("two\\nlines\\tand\\\\\\x01 (id "), std::string::npos) << out;
}

// No exception escapes sqctl: with every allocation of at least N bytes
// failing (an LD_PRELOAD shim; the sizes cover the layer buffers, k-means,
// the queries and their outputs), each command either succeeds or exits 1
// naming the failure; never a signal (std::terminate is SIGABRT).
TEST_F(SqctlInput, AllocationFailureIsAnErrorNeverACrash) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the shim cannot be preloaded before the ASan runtime";
#else
  const std::string shim = sqz::testing::AllocShimPath();
  if (shim.empty()) GTEST_SKIP() << "no allocation-failure shim (" << SQZ_ALLOC_SHIM_PATH << "; set SQZ_ALLOC_SHIM)";
  const std::vector<std::string> cmds = {
      "build-index --quiet --iters 2 --db " + Sub("alloc_db") + " --kv " + Kv() + " --name n",
      "query --db " + Db() + " --context ctx_000 --queries " + Queries() + " --out " + Sub("alloc_o.safetensors"),
      "eval --db " + Db() + " --context ctx_000 --queries " + Queries(),
      "verify --db " + Db(),
  };
  int failed_cleanly = 0;
  // Below about 16 KiB RocksDB's own background threads, which are not
  // exception-safe, abort: that is RocksDB's limit, not ours.
  for (uint64_t at_least :
       {uint64_t{16} << 10, uint64_t{64} << 10, uint64_t{256} << 10, uint64_t{1} << 20, uint64_t{4} << 20}) {
    for (const std::string& cmd : cmds) {
      std::string out;
      const int rc = RunCommand("env LD_PRELOAD=" + shim + " SQZ_FAIL_NEW_AT_LEAST=" + std::to_string(at_least) + " " +
                                    SqctlPath() + " " + cmd,
                                &out);
      EXPECT_TRUE(rc == 0 || rc == 1) << "allocations >= " << at_least << " failing: " << cmd << " -> " << rc << "\n"
                                      << out;
      if (rc == 1) {
        ++failed_cleanly;
        EXPECT_NE(out.find("sqctl "), std::string::npos) << out;
      }
    }
    std::filesystem::remove_all(Sub("alloc_db"));
  }
  EXPECT_GT(failed_cleanly, 0) << "the injection never made a command fail: this test proves nothing";
#endif
}

}  // namespace
}  // namespace sqz
