// The synthetic corpus generator: determinism, the files it writes, and the
// LLM-like structure the rest of the test suite relies on (concentrated heads
// really concentrated, spread heads not, a sink, outlier channels).
//
// Also the C++ half of the Python cross-check (scripts/pycheck.sh): with
// SQZ_PYCHECK_DIR set, PyCheck.WriteCppFiles writes safetensors files and
// dumps of what SafetensorsFile reads from them for Python to compare, and
// PyCheck.ReadPythonFiles reads files written by Python's safetensors.

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "synth/synthetic.h"
#include "tests/test_util.h"
#include "util/half.h"
#include "util/safetensors.h"

namespace sqz::synth {
namespace {

using sqz::testing::ScopedTempDir;

Spec SmallSpec() {
  Spec s;
  s.n_layers = 2;
  s.n_kv_heads = 2;
  s.n_q_heads = 8;
  s.n_tokens = 4096;
  s.head_dim = 64;
  s.q_window = 32;
  s.n_queries = 16;
  s.n_topics = 64;
  s.seed = 11;
  return s;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(SynthTest, DeterministicInSeedAndLayer) {
  const Spec spec = SmallSpec();
  Layer a, b;
  GenerateLayer(spec, 1, &a);
  GenerateLayer(spec, 1, &b);
  EXPECT_TRUE(SameBits(a.k, b.k));
  EXPECT_TRUE(SameBits(a.v, b.v));
  EXPECT_TRUE(SameBits(a.q_window, b.q_window));
  EXPECT_TRUE(SameBits(a.queries, b.queries));

  Layer other_layer;
  GenerateLayer(spec, 0, &other_layer);
  EXPECT_FALSE(SameBits(a.k, other_layer.k));
  EXPECT_FALSE(SameBits(a.v, other_layer.v));
  EXPECT_FALSE(SameBits(a.queries, other_layer.queries));

  Spec s2 = spec;
  s2.seed = spec.seed + 1;
  Layer c;
  GenerateLayer(s2, 1, &c);
  EXPECT_FALSE(SameBits(a.k, c.k));
  EXPECT_FALSE(SameBits(a.v, c.v));
  EXPECT_FALSE(SameBits(a.q_window, c.q_window));
  EXPECT_FALSE(SameBits(a.queries, c.queries));

  // Streams are independent: asking for more fresh queries changes neither
  // the KV nor the window queries, and extends the fresh queries.
  Spec s3 = spec;
  s3.n_queries = spec.n_queries + 5;
  Layer d;
  GenerateLayer(s3, 1, &d);
  EXPECT_TRUE(SameBits(a.k, d.k));
  EXPECT_TRUE(SameBits(a.v, d.v));
  EXPECT_TRUE(SameBits(a.q_window, d.q_window));
  const size_t dim = spec.head_dim;
  for (int h = 0; h < spec.n_q_heads; ++h) {
    ASSERT_EQ(std::memcmp(a.queries.data() + h * spec.n_queries * dim, d.queries.data() + h * s3.n_queries * dim,
                          spec.n_queries * dim * sizeof(float)),
              0)
        << h;
  }
}

TEST(SynthTest, ShapesAndFiniteness) {
  Spec spec = SmallSpec();
  spec.n_tokens = 1000;
  Layer l;
  GenerateLayer(spec, 0, &l);
  const size_t d = spec.head_dim;
  EXPECT_EQ(l.k.size(), spec.n_kv_heads * 1000 * d);
  EXPECT_EQ(l.v.size(), spec.n_kv_heads * 1000 * d);
  EXPECT_EQ(l.q_window.size(), spec.n_q_heads * spec.q_window * d);
  EXPECT_EQ(l.queries.size(), spec.n_q_heads * spec.n_queries * d);
  for (const auto* t : {&l.k, &l.v, &l.q_window, &l.queries}) {
    EXPECT_TRUE(AllFinite(t->data(), DType::kF32, t->size()));
  }
  // Values are standard normal.
  double sum = 0, sq = 0;
  for (float x : l.v) {
    sum += x;
    sq += double(x) * x;
  }
  const double mean = sum / l.v.size(), var = sq / l.v.size() - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(var, 1.0, 0.02);

  spec.q_window = 0;
  spec.n_queries = 0;
  GenerateLayer(spec, 0, &l);
  EXPECT_TRUE(l.q_window.empty());
  EXPECT_TRUE(l.queries.empty());
}

TEST(SynthTest, HeadKinds) {
  Spec spec = SmallSpec();
  for (int layer = 0; layer < 6; ++layer) {
    int conc = 0;
    for (int h = 0; h < spec.n_q_heads; ++h) {
      const HeadKind k = KindOf(spec, layer, h);
      EXPECT_EQ(k, KindOf(spec, layer, h));
      conc += k == HeadKind::kConcentrated;
    }
    EXPECT_EQ(conc, 4) << "concentrated_fraction 0.5 of 8 heads, layer " << layer;
  }
  spec.concentrated_fraction = 0.0;
  for (int h = 0; h < spec.n_q_heads; ++h) EXPECT_EQ(KindOf(spec, 0, h), HeadKind::kSpread);
  spec.concentrated_fraction = 1.0;
  for (int h = 0; h < spec.n_q_heads; ++h) EXPECT_EQ(KindOf(spec, 0, h), HeadKind::kConcentrated);
  EXPECT_STREQ(HeadKindName(HeadKind::kConcentrated), "concentrated");
  EXPECT_STREQ(HeadKindName(HeadKind::kSpread), "spread");
}

// ---------------------------------------------------------------------------
// Structure: true softmax attention, computed in double.
// ---------------------------------------------------------------------------

struct QueryStats {
  double top_mass;   // mass of the top 12.5% keys
  double sink_mass;  // mass of token 0
  double sink_gap;   // sink logit minus the median logit
};

QueryStats Attention(const float* q, const float* keys, int64_t n, int d) {
  std::vector<double> logit(n);
  const double scale = 1.0 / std::sqrt(double(d));
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += double(q[j]) * keys[i * d + j];
    logit[i] = s * scale;
  }
  const double m = *std::max_element(logit.begin(), logit.end());
  std::vector<double> p(n);
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += (p[i] = std::exp(logit[i] - m));
  for (double& x : p) x /= z;
  QueryStats st;
  st.sink_mass = p[0];
  std::vector<double> sorted_logit = logit;
  std::nth_element(sorted_logit.begin(), sorted_logit.begin() + n / 2, sorted_logit.end());
  st.sink_gap = logit[0] - sorted_logit[n / 2];
  const int64_t top = (n + 7) / 8;
  std::partial_sort(p.begin(), p.begin() + top, p.end(), std::greater<double>());
  st.top_mass = std::accumulate(p.begin(), p.begin() + top, 0.0);
  return st;
}

TEST(SynthTest, ConcentratedAndSpreadHeads) {
  const Spec spec = SmallSpec();
  const int group = spec.n_q_heads / spec.n_kv_heads;
  const int d = spec.head_dim;
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    Layer l;
    GenerateLayer(spec, layer, &l);
    for (int h = 0; h < spec.n_q_heads; ++h) {
      const HeadKind kind = KindOf(spec, layer, h);
      const float* keys = l.k.data() + static_cast<size_t>(h / group) * spec.n_tokens * d;
      std::vector<QueryStats> stats;
      for (int i = 0; i < spec.q_window; ++i) {
        stats.push_back(
            Attention(l.q_window.data() + (static_cast<size_t>(h) * spec.q_window + i) * d, keys, spec.n_tokens, d));
      }
      for (int i = 0; i < spec.n_queries; ++i) {
        stats.push_back(
            Attention(l.queries.data() + (static_cast<size_t>(h) * spec.n_queries + i) * d, keys, spec.n_tokens, d));
      }
      double top = 0, top_min = 1, sink = 0, gap_min = 1e9;
      for (const QueryStats& s : stats) {
        top += s.top_mass;
        top_min = std::min(top_min, s.top_mass);
        sink += s.sink_mass;
        gap_min = std::min(gap_min, s.sink_gap);
      }
      top /= stats.size();
      sink /= stats.size();
      SCOPED_TRACE(::testing::Message() << "layer " << layer << " head " << h << " (" << HeadKindName(kind)
                                        << "): top-12.5% mass mean " << top << " min " << top_min << ", sink mass "
                                        << sink << ", min sink gap " << gap_min);
      if (std::getenv("SQZ_SYNTH_VERBOSE")) {
        std::printf("layer %d head %d %-12s top12.5%% mean %.3f min %.3f sink %.3f gap_min %.2f\n", layer, h,
                    HeadKindName(kind), top, top_min, sink, gap_min);
      }
      if (kind == HeadKind::kConcentrated) {
        EXPECT_GE(top, 0.8);
        EXPECT_GE(top_min, 0.6);
      } else {
        EXPECT_LE(top, 0.6);
      }
      // Every query favours the sink over a typical key, and on average the
      // sink takes a noticeable share of the mass.
      EXPECT_GE(gap_min, 2.0);
      EXPECT_GE(sink, 0.02);
      EXPECT_LE(sink, 0.6);
    }
  }
}

TEST(SynthTest, OutlierChannels) {
  const Spec spec = SmallSpec();
  Layer l;
  GenerateLayer(spec, 0, &l);
  const int d = spec.head_dim;
  for (int g = 0; g < spec.n_kv_heads; ++g) {
    std::vector<double> mean_abs(d, 0.0);
    for (int64_t t = 0; t < spec.n_tokens; ++t) {
      for (int j = 0; j < d; ++j) mean_abs[j] += std::fabs(l.k[(g * spec.n_tokens + t) * d + j]);
    }
    std::vector<double> sorted = mean_abs;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[d / 2];
    int n_outliers = 0;
    for (double m : mean_abs) n_outliers += m > 5 * median;
    EXPECT_GE(n_outliers, 2) << "kv head " << g;
    EXPECT_LE(n_outliers, 4) << "kv head " << g;
    // Outliers are shared by all keys: the channel keeps its sign everywhere.
    for (int j = 0; j < d; ++j) {
      if (mean_abs[j] <= 5 * median) continue;
      int positive = 0;
      for (int64_t t = 0; t < spec.n_tokens; ++t) positive += l.k[(g * spec.n_tokens + t) * d + j] > 0;
      EXPECT_TRUE(positive == 0 || positive == spec.n_tokens) << "kv head " << g << " channel " << j;
    }
  }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

void CheckTensor(const SafetensorsFile& f, const std::string& name, DType dtype, std::vector<int64_t> shape,
                 const std::vector<float>& expect) {
  SCOPED_TRACE(name);
  const SafetensorsEntry* e = f.Find(name);
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(e->dtype_supported);
  EXPECT_EQ(e->dtype, dtype);
  EXPECT_EQ(e->shape, shape);
  std::vector<float> got(expect.size());
  ASSERT_EQ(e->nbytes, expect.size() * DTypeSize(dtype));
  ASSERT_TRUE(f.ReadFloat(*e, got.data()).ok());
  // The file holds the generator's floats rounded to the file dtype.
  std::vector<uint8_t> narrow(expect.size() * DTypeSize(dtype));
  std::vector<float> rounded(expect.size());
  ConvertFromFloat(expect.data(), expect.size(), dtype, narrow.data());
  ConvertToFloat(narrow.data(), dtype, expect.size(), rounded.data());
  EXPECT_TRUE(SameBits(got, rounded));
}

TEST(SynthTest, WriteContextFiles) {
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(dtype));
    ScopedTempDir dir;
    Spec spec = SmallSpec();
    spec.n_tokens = 700;
    spec.n_layers = 3;
    spec.dtype = dtype;
    const std::string kv = dir.Sub("ctx.safetensors"), qf = dir.Sub("q.safetensors");
    Status s = WriteContextFiles(spec, kv, qf);
    ASSERT_TRUE(s.ok()) << s.ToString();

    std::unique_ptr<SafetensorsFile> kf, qfile;
    ASSERT_TRUE(SafetensorsFile::Open(kv, &kf).ok());
    ASSERT_TRUE(SafetensorsFile::Open(qf, &qfile).ok());
    std::string kinds;
    for (int l = 0; l < spec.n_layers; ++l) {
      for (int h = 0; h < spec.n_q_heads; ++h) kinds += KindOf(spec, l, h) == HeadKind::kConcentrated ? 'C' : 'S';
    }
    for (const SafetensorsFile* f : {kf.get(), qfile.get()}) {
      EXPECT_EQ(f->metadata().at("n_q_heads"), "8");
      EXPECT_EQ(f->metadata().at("synthetic"), "true");
      EXPECT_EQ(f->metadata().at("model"), "synthetic");
      EXPECT_EQ(f->metadata().at("seed"), "11");
      EXPECT_EQ(f->metadata().at("head_kinds"), kinds);
    }
    EXPECT_EQ(kf->entries().size(), 3u * spec.n_layers);
    EXPECT_EQ(qfile->entries().size(), 1u * spec.n_layers);
    const int64_t d = spec.head_dim;
    for (int l = 0; l < spec.n_layers; ++l) {
      Layer layer;
      GenerateLayer(spec, l, &layer);
      const std::string p = "layers." + std::to_string(l) + ".";
      CheckTensor(*kf, p + "k", dtype, {spec.n_kv_heads, spec.n_tokens, d}, layer.k);
      CheckTensor(*kf, p + "v", dtype, {spec.n_kv_heads, spec.n_tokens, d}, layer.v);
      CheckTensor(*kf, p + "q_window", dtype, {spec.n_q_heads, spec.q_window, d}, layer.q_window);
      CheckTensor(*qfile, p + "q", dtype, {spec.n_q_heads, spec.n_queries, d}, layer.queries);
    }
  }
}

TEST(SynthTest, WriteWithoutWindowOrQueriesFile) {
  ScopedTempDir dir;
  Spec spec = SmallSpec();
  spec.n_tokens = 300;
  spec.q_window = 0;
  ASSERT_TRUE(WriteContextFiles(spec, dir.Sub("kv.safetensors"), "").ok());
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1);
  std::unique_ptr<SafetensorsFile> f;
  ASSERT_TRUE(SafetensorsFile::Open(dir.Sub("kv.safetensors"), &f).ok());
  EXPECT_EQ(f->entries().size(), 2u * spec.n_layers);
  EXPECT_EQ(f->Find("layers.0.q_window"), nullptr);

  ASSERT_TRUE(WriteContextFiles(spec, "", dir.Sub("q.safetensors")).ok());
  ASSERT_TRUE(SafetensorsFile::Open(dir.Sub("q.safetensors"), &f).ok());
  EXPECT_EQ(f->entries().size(), 1u * spec.n_layers);
  EXPECT_NE(f->Find("layers.1.q"), nullptr);
}

TEST(SynthTest, InvalidSpecs) {
  ScopedTempDir dir;
  const std::string p = dir.Sub("x.safetensors");
  auto expect_invalid = [&](Spec s, const char* what) {
    Status st = WriteContextFiles(s, p, "");
    EXPECT_TRUE(st.IsInvalidArgument()) << what << ": " << st.ToString();
    std::vector<std::string> paths;
    st = WriteCorpus(s, 1, dir.Sub("corpus"), &paths);
    EXPECT_TRUE(st.IsInvalidArgument()) << what << ": " << st.ToString();
  };
  Spec s = SmallSpec();
  s.n_q_heads = 6;
  s.n_kv_heads = 4;
  expect_invalid(s, "GQA group not integral");
  s = SmallSpec();
  s.n_tokens = 0;
  expect_invalid(s, "no tokens");
  s = SmallSpec();
  s.head_dim = 0;
  expect_invalid(s, "head_dim 0");
  s = SmallSpec();
  s.n_layers = 0;
  expect_invalid(s, "no layers");
  s = SmallSpec();
  s.q_window = -1;
  expect_invalid(s, "negative window");
  s = SmallSpec();
  s.concentrated_fraction = 1.5;
  expect_invalid(s, "fraction > 1");
  EXPECT_FALSE(std::filesystem::exists(p));
}

TEST(SynthTest, WriteCorpus) {
  ScopedTempDir dir;
  Spec spec = SmallSpec();
  spec.n_tokens = 256;
  spec.n_layers = 1;
  std::vector<std::string> paths;
  const std::string root = dir.Sub("corpus");
  Status s = WriteCorpus(spec, 3, root, &paths);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(paths.size(), 3u);
  std::vector<float> first_k;
  for (int i = 0; i < 3; ++i) {
    char name[32];
    std::snprintf(name, sizeof(name), "ctx_%03d.safetensors", i);
    EXPECT_EQ(paths[i], root + "/" + name);
    std::unique_ptr<SafetensorsFile> kf, qf;
    ASSERT_TRUE(SafetensorsFile::Open(paths[i], &kf).ok());
    ASSERT_TRUE(SafetensorsFile::Open(root + "/queries/" + name, &qf).ok());
    EXPECT_EQ(kf->metadata().at("seed"), std::to_string(spec.seed + i));
    EXPECT_EQ(qf->metadata().at("seed"), std::to_string(spec.seed + i));
    EXPECT_NE(qf->Find("layers.0.q"), nullptr);
    // Context i is exactly the single context of seed + i.
    Spec si = spec;
    si.seed = spec.seed + i;
    Layer l;
    GenerateLayer(si, 0, &l);
    CheckTensor(*kf, "layers.0.k", spec.dtype, {spec.n_kv_heads, spec.n_tokens, spec.head_dim}, l.k);
  }
  // An unwritable location is an IOError, not a crash.
  const std::string blocker = dir.Sub("file");
  std::ofstream(blocker) << "x";
  s = WriteCorpus(spec, 1, blocker + "/sub", &paths);
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
}

// Big shapes are cheap to generate (opt in: SQZ_SYNTH_BENCH=1).
TEST(SynthTest, GenerationSpeed) {
  if (!std::getenv("SQZ_SYNTH_BENCH")) GTEST_SKIP() << "set SQZ_SYNTH_BENCH=1 to time a 128K x 8 x 128 layer";
  Spec spec;
  spec.n_kv_heads = 8;
  spec.n_q_heads = 32;
  spec.n_tokens = 131072;
  spec.head_dim = 128;
  Layer l;
  const auto t0 = std::chrono::steady_clock::now();
  GenerateLayer(spec, 0, &l);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("GenerateLayer 128K tokens x 8 KV heads x 128: %.2f s\n", sec);
  EXPECT_LT(sec, 20.0);
}

// ---------------------------------------------------------------------------
// Python cross-check (driven by scripts/pycheck.sh; skipped otherwise).
//
// Both directions use the same manifest format, one record per line, names
// and metadata hex-encoded so that any bytes survive:
//   tensor <file> <hex name> <dtype> <dims, comma-separated, "-" if none> <f32 dump or "-"> <raw dump>
//   meta <file> <hex key> <hex value>
// The dumps are raw little-endian bytes: the tensor's stored bytes (.raw) and
// its values as float32 (.f32, only for F32/F16/BF16).
// ---------------------------------------------------------------------------

std::string PyCheckDir() {
  const char* d = std::getenv("SQZ_PYCHECK_DIR");
  return d ? d : "";
}

std::string Hex(const std::string& s) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out.empty() ? "-" : out;
}

std::string Unhex(const std::string& h) {
  if (h == "-") return "";
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void Spill(const std::string& path, const void* data, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  ASSERT_TRUE(out.good()) << path;
}

// Dumps what SafetensorsFile reads from dir/file into dir and the manifest.
void DumpForPython(const std::string& dir, const std::string& file, std::ofstream* manifest) {
  std::unique_ptr<SafetensorsFile> f;
  Status s = SafetensorsFile::Open(dir + "/" + file, &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (const auto& [k, v] : f->metadata()) *manifest << "meta " << file << " " << Hex(k) << " " << Hex(v) << "\n";
  int i = 0;
  for (const SafetensorsEntry& e : f->entries()) {
    const std::string base = file + "." + std::to_string(i++);
    std::vector<uint8_t> raw(e.nbytes);
    ASSERT_TRUE(f->ReadRaw(e, raw.data()).ok());
    Spill(dir + "/" + base + ".raw", raw.data(), raw.size());
    std::string f32_name = "-";
    if (e.dtype_supported) {
      std::vector<float> vals(e.nbytes / DTypeSize(e.dtype));
      ASSERT_TRUE(f->ReadFloat(e, vals.data()).ok());
      f32_name = base + ".f32";
      Spill(dir + "/" + f32_name, vals.data(), vals.size() * sizeof(float));
    }
    std::string dims;
    for (size_t j = 0; j < e.shape.size(); ++j) {
      if (j) dims += ',';
      dims += std::to_string(e.shape[j]);
    }
    *manifest << "tensor " << file << " " << Hex(e.name) << " " << e.dtype_name << " " << (dims.empty() ? "-" : dims)
              << " " << f32_name << " " << base << ".raw\n";
  }
}

// Values that exercise rounding, subnormals, overflow and NaN in every dtype.
std::vector<float> SpecialValues() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          0.1f,
                          3.14159265f,
                          65504.0f,
                          65519.0f,
                          65520.0f,
                          1e6f,
                          -1e30f,
                          1e-8f,
                          -1e-8f,
                          0x1p-24f,
                          0x1p-25f,
                          3 * 0x1p-25f,
                          0x1p-14f,
                          1.0f + 0x1p-11f,
                          1.0f + 3 * 0x1p-11f,
                          1.0f + 0x1p-8f,
                          1.0f + 3 * 0x1p-8f,
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::min(),
                          inf,
                          -inf,
                          std::numeric_limits<float>::quiet_NaN()};
  return v;
}

TEST(PyCheck, WriteCppFiles) {
  const std::string root = PyCheckDir();
  if (root.empty()) GTEST_SKIP() << "run by scripts/pycheck.sh (SQZ_PYCHECK_DIR unset)";
  const std::string dir = root + "/cpp";
  std::filesystem::create_directories(dir);
  std::ofstream manifest(dir + "/manifest.txt");

  const std::vector<float> special = SpecialValues();
  std::vector<float> random(3 * 17 * 5);
  uint64_t x = 88172645463325252ull;  // xorshift64: a fixed sequence
  for (float& r : random) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r = (static_cast<float>(x >> 40) * 0x1p-24f - 0.5f) * 200.0f;
  }
  const float scalar = -2.75f;
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    SafetensorsWriter w;
    w.SetMetadata("n_q_heads", "8");
    w.SetMetadata("model", "c++ writer: \"quotes\" \\ back\nslash \xc3\xa9\xe2\x82\xac");
    w.SetMetadata("dtype", DTypeName(t));
    auto add = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& vals) {
      std::vector<uint8_t> buf(vals.size() * DTypeSize(t));
      ConvertFromFloat(vals.data(), vals.size(), t, buf.data());
      w.Add(name, t, std::move(shape), buf.data());
    };
    add("special", {static_cast<int64_t>(special.size())}, special);
    add("layers.0.random", {3, 17, 5}, random);
    add("scalar", {}, {scalar});
    add("empty", {0, 4}, {});
    add("weird \"n\xc3\xa4me\" \\", {2, 2}, {1, 2, 3, 4});
    const std::string file = std::string("cpp_") + DTypeName(t) + ".safetensors";
    ASSERT_TRUE(w.WriteFile(dir + "/" + file).ok());
    DumpForPython(dir, file, &manifest);
  }

  Spec spec;
  spec.n_layers = 2;
  spec.n_kv_heads = 2;
  spec.n_q_heads = 4;
  spec.n_tokens = 96;
  spec.head_dim = 16;
  spec.q_window = 8;
  spec.n_queries = 3;
  spec.n_topics = 4;
  ASSERT_TRUE(WriteContextFiles(spec, dir + "/synth.safetensors", dir + "/synth_q.safetensors").ok());
  DumpForPython(dir, "synth.safetensors", &manifest);
  DumpForPython(dir, "synth_q.safetensors", &manifest);
  manifest.close();
  ASSERT_TRUE(manifest.good());
}

struct Expected {
  std::string name, dtype, dims, f32, raw;
};

TEST(PyCheck, ReadPythonFiles) {
  const std::string root = PyCheckDir();
  if (root.empty()) GTEST_SKIP() << "run by scripts/pycheck.sh (SQZ_PYCHECK_DIR unset)";
  const std::string dir = root + "/py";
  std::ifstream manifest(dir + "/manifest.txt");
  ASSERT_TRUE(manifest.good()) << "no " << dir << "/manifest.txt: did the Python side run?";
  std::map<std::string, std::vector<Expected>> tensors;
  std::map<std::string, std::map<std::string, std::string>> metas;
  std::string line;
  while (std::getline(manifest, line)) {
    std::istringstream in(line);
    std::string kind, file;
    in >> kind >> file;
    if (kind == "tensor") {
      Expected e;
      in >> e.name >> e.dtype >> e.dims >> e.f32 >> e.raw;
      e.name = Unhex(e.name);
      tensors[file].push_back(e);
    } else if (kind == "meta") {
      std::string k, v;
      in >> k >> v;
      metas[file][Unhex(k)] = Unhex(v);
    } else {
      FAIL() << "bad manifest line: " << line;
    }
  }
  ASSERT_GE(tensors.size(), 2u);
  int checked = 0;
  for (const auto& [file, expect] : tensors) {
    SCOPED_TRACE(file);
    std::unique_ptr<SafetensorsFile> f;
    Status s = SafetensorsFile::Open(dir + "/" + file, &f);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(f->metadata(), metas[file]);
    EXPECT_EQ(f->entries().size(), expect.size());
    for (const Expected& e : expect) {
      SCOPED_TRACE(e.name);
      const SafetensorsEntry* entry = f->Find(e.name);
      ASSERT_NE(entry, nullptr);
      EXPECT_EQ(entry->dtype_name, e.dtype);
      std::string dims;
      for (size_t j = 0; j < entry->shape.size(); ++j) {
        if (j) dims += ',';
        dims += std::to_string(entry->shape[j]);
      }
      EXPECT_EQ(dims.empty() ? "-" : dims, e.dims);
      const std::string raw = Slurp(dir + "/" + e.raw);
      ASSERT_EQ(entry->nbytes, raw.size());
      std::string got(raw.size(), '\0');
      ASSERT_TRUE(f->ReadRaw(*entry, got.data()).ok());
      EXPECT_TRUE(got == raw);
      const bool ours = e.dtype == "F32" || e.dtype == "F16" || e.dtype == "BF16";
      EXPECT_EQ(entry->dtype_supported, ours);
      if (!ours) continue;
      const std::string f32 = Slurp(dir + "/" + e.f32);
      std::vector<float> want(f32.size() / 4), vals(entry->nbytes / DTypeSize(entry->dtype));
      std::memcpy(want.data(), f32.data(), f32.size());
      ASSERT_EQ(vals.size(), want.size());
      ASSERT_TRUE(f->ReadFloat(*entry, vals.data()).ok());
      for (size_t i = 0; i < vals.size(); ++i) {
        if (std::isnan(want[i])) {
          EXPECT_TRUE(std::isnan(vals[i])) << i;
        } else {
          uint32_t a, b;
          std::memcpy(&a, &vals[i], 4);
          std::memcpy(&b, &want[i], 4);
          EXPECT_EQ(a, b) << i << ": " << vals[i] << " vs " << want[i];
        }
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

}  // namespace
}  // namespace sqz::synth
