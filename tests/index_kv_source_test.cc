// KV sources (sqz/kv_source.h): the safetensors KV file format and the
// in-memory source, including every validation error. The files are written
// by hand (tests/index_test_util.h) so they do not depend on the writer.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "sqz/kv_source.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;
using index_test::RawTensor;
using index_test::SafetensorsBytes;
using index_test::WriteFile;
using sqz::testing::ScopedTempDir;

std::string F16Bytes(size_t n, float value = 0.5f) {
  std::vector<float> f(n, value);
  return index_test::Str(index_test::ToDType(f, DType::kF16));
}

// A two-layer F16 file with 2 KV heads, 3 tokens, head_dim 4.
std::vector<RawTensor> TinyTensors() {
  std::vector<RawTensor> t;
  for (int l = 0; l < 2; ++l) {
    for (const char* s : {"k", "v"}) {
      t.push_back({"layers." + std::to_string(l) + "." + s, "F16", {2, 3, 4}, F16Bytes(24)});
    }
  }
  return t;
}

Status OpenBytes(const ScopedTempDir& dir, const std::string& bytes, std::unique_ptr<KvSource>* src,
                 std::string* path_out = nullptr) {
  const std::string path = dir.Sub("kv.safetensors");
  WriteFile(path, bytes);
  if (path_out) *path_out = path;
  return OpenSafetensorsKvSource(path, src);
}

void ExpectError(const Status& s, const std::vector<std::string>& needles) {
  ASSERT_FALSE(s.ok());
  for (const auto& n : needles)
    EXPECT_NE(s.message().find(n), std::string::npos) << s.ToString() << " lacks '" << n << "'";
}

TEST(IndexKvSourceTest, ReadsWhatWasWritten) {
  ScopedTempDir dir("sqz-kvsrc");
  KvSpec spec;
  spec.n_layers = 3;
  spec.n_kv_heads = 2;
  spec.n_q_heads = 6;
  spec.n_tokens = 50;
  spec.head_dim = 8;
  spec.q_window = 5;
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
    spec.dtype = dt;
    KvData data(spec);
    std::unique_ptr<KvSource> src;
    std::string path;
    ASSERT_TRUE(
        OpenBytes(dir, SafetensorsBytes(index_test::KvTensors(data), index_test::KvMetadata(data)), &src, &path).ok());
    const KvShape& s = src->shape();
    EXPECT_EQ(s.n_layers, 3);
    EXPECT_EQ(s.n_kv_heads, 2);
    EXPECT_EQ(s.n_q_heads, 6);
    EXPECT_EQ(s.n_tokens, 50);
    EXPECT_EQ(s.head_dim, 8);
    EXPECT_EQ(s.dtype, dt);
    EXPECT_EQ(s.q_window_len, 5);
    EXPECT_EQ(s.model, "test-model");
    EXPECT_EQ(src->Describe(), path);
    for (int l = 0; l < 3; ++l) {
      std::vector<uint8_t> k, v;
      ASSERT_TRUE(src->ReadLayer(l, &k, &v).ok());
      EXPECT_EQ(k, data.k[l]);
      EXPECT_EQ(v, data.v[l]);
      std::vector<float> q;
      ASSERT_TRUE(src->ReadQWindow(l, &q).ok());
      EXPECT_EQ(q, data.q[l]);
    }
    EXPECT_TRUE(src->ReadLayer(3, nullptr, nullptr).IsInvalidArgument());

    // The in-memory source sees the same.
    auto mem = data.Source();
    EXPECT_EQ(mem->shape().n_tokens, 50);
    EXPECT_EQ(mem->shape().q_window_len, 5);
    std::vector<uint8_t> k, v;
    ASSERT_TRUE(mem->ReadLayer(2, &k, &v).ok());
    EXPECT_EQ(k, data.k[2]);
    std::vector<float> q;
    ASSERT_TRUE(mem->ReadQWindow(1, &q).ok());
    EXPECT_EQ(q, data.q[1]);
  }
}

TEST(IndexKvSourceTest, NoWindowQueriesAndExtraTensors) {
  ScopedTempDir dir("sqz-kvsrc");
  auto t = TinyTensors();
  t.push_back({"lm_head.weight", "I32", {2}, std::string(8, '\0')});      // unknown: ignored
  t.push_back({"layers.0.attn_bias", "F16", {1}, std::string(2, '\0')});  // unknown suffix: ignored
  std::unique_ptr<KvSource> src;
  ASSERT_TRUE(OpenBytes(dir, SafetensorsBytes(t, {{"n_q_heads", "4"}}), &src).ok());
  EXPECT_EQ(src->shape().n_layers, 2);
  EXPECT_EQ(src->shape().q_window_len, 0);
  EXPECT_EQ(src->shape().model, "");
  std::vector<float> q;
  EXPECT_TRUE(src->ReadQWindow(0, &q).IsNotFound());
}

TEST(IndexKvSourceTest, MalformedFiles) {
  ScopedTempDir dir("sqz-kvsrc");
  std::unique_ptr<KvSource> src;
  std::string path;
  const std::string good = SafetensorsBytes(TinyTensors(), {{"n_q_heads", "4"}});

  // Truncated: the data section is cut short.
  ExpectError(OpenBytes(dir, good.substr(0, good.size() - 10), &src, &path), {"kv.safetensors", "truncated"});
  // Garbage header.
  std::string garbage(8, '\0');
  garbage[0] = 24;
  garbage += "this is not json at all!";
  garbage += std::string(64, 'x');
  ExpectError(OpenBytes(dir, garbage, &src), {"kv.safetensors", "JSON"});
  // Garbage length.
  ExpectError(OpenBytes(dir, std::string(100, '\xff'), &src), {"kv.safetensors", "header length"});
  // Header offsets beyond the file.
  std::string header =
      "{\"__metadata__\":{\"n_q_heads\":\"4\"},\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[2,3,4],"
      "\"data_offsets\":[0,48]},\"layers.0.v\":{\"dtype\":\"F16\",\"shape\":[2,3,4],"
      "\"data_offsets\":[48000,48048]}}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  bytes += header + std::string(96, '\0');
  ExpectError(OpenBytes(dir, bytes, &src), {"layers.0.v", "beyond"});
  // Missing file.
  ExpectError(OpenSafetensorsKvSource(dir.Sub("nope.safetensors"), &src), {"nope.safetensors"});
}

TEST(IndexKvSourceTest, ValidationErrors) {
  ScopedTempDir dir("sqz-kvsrc");
  std::unique_ptr<KvSource> src;
  const std::map<std::string, std::string> meta = {{"n_q_heads", "4"}};

  // Wrong dtype.
  auto t = TinyTensors();
  t[0].dtype = "I32";
  t[0].bytes = std::string(24 * 4, '\0');
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src),
              {"kv.safetensors", "layers.0.k has dtype I32; expected F16, BF16 or F32"});
  // Mixed dtypes.
  t = TinyTensors();
  t[3].dtype = "BF16";
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.1.v", "BF16", "F16"});
  // Inconsistent shapes across layers.
  t = TinyTensors();
  t[2].shape = {2, 4, 4};
  t[2].bytes = F16Bytes(32);
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.1.k", "[2, 4, 4]", "shapes must match"});
  // k vs v mismatch.
  t = TinyTensors();
  t[1].shape = {2, 3, 2};
  t[1].bytes = F16Bytes(12);
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.0.v", "shapes must match"});
  // Wrong rank.
  t = TinyTensors();
  for (auto& x : t) x.shape = {6, 4};
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src),
              {"layers.0.k", "expected [n_kv_heads, n_tokens, head_dim]"});
  // Missing layer (0 and 2 present).
  t = TinyTensors();
  t[2].name = "layers.2.k";
  t[3].name = "layers.2.v";
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"missing layer 1", "layers.1.k"});
  // Missing v of a layer.
  t = TinyTensors();
  t.pop_back();
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"missing layer 1", "layers.1.v"});
  // No KV tensors at all.
  ExpectError(OpenBytes(dir, SafetensorsBytes({}, meta), &src), {"no KV tensors"});
  // n_q_heads missing, invalid, not a multiple.
  ExpectError(OpenBytes(dir, SafetensorsBytes(TinyTensors(), {}), &src), {"n_q_heads"});
  ExpectError(OpenBytes(dir, SafetensorsBytes(TinyTensors(), {{"n_q_heads", "four"}}), &src),
              {"n_q_heads", "four", "not a positive integer"});
  ExpectError(OpenBytes(dir, SafetensorsBytes(TinyTensors(), {{"n_q_heads", "0"}}), &src), {"n_q_heads"});
  ExpectError(OpenBytes(dir, SafetensorsBytes(TinyTensors(), {{"n_q_heads", "3"}}), &src),
              {"n_q_heads 3 is not a multiple of n_kv_heads 2"});
  // Empty context and head_dim 0.
  t = TinyTensors();
  for (auto& x : t) {
    x.shape = {2, 0, 4};
    x.bytes.clear();
  }
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"empty context", "0 tokens"});
  t = TinyTensors();
  for (auto& x : t) {
    x.shape = {2, 3, 0};
    x.bytes.clear();
  }
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"head_dim is 0"});
  // q_window in one layer only, or with a wrong shape.
  t = TinyTensors();
  t.push_back({"layers.0.q_window", "F32", {4, 2, 4}, std::string(4 * 2 * 4 * 4, '\0')});
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"missing layers.1.q_window"});
  t.push_back({"layers.1.q_window", "F32", {4, 3, 4}, std::string(4 * 3 * 4 * 4, '\0')});
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.1.q_window", "same window length"});
  t.back() = {"layers.1.q_window", "F32", {2, 2, 4}, std::string(2 * 2 * 4 * 4, '\0')};
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.1.q_window", "n_q_heads=4"});
  t.back() = {"layers.1.q_window", "F32", {4, 2, 4}, std::string(4 * 2 * 4 * 4, '\0')};
  ASSERT_TRUE(OpenBytes(dir, SafetensorsBytes(t, meta), &src).ok());
  EXPECT_EQ(src->shape().q_window_len, 2);
}

TEST(IndexKvSourceTest, InMemoryValidation) {
  std::vector<uint16_t> buf(2 * 3 * 4, 0);
  std::vector<uint16_t> bad(2 * 5 * 4, 0);
  std::unique_ptr<KvSource> src;
  auto layer = [&](const void* k, std::vector<int64_t> ks) {
    KvLayerView l;
    l.k = {k, DType::kF16, ks};
    l.v = {buf.data(), DType::kF16, {2, 3, 4}};
    return l;
  };
  ASSERT_TRUE(MakeInMemoryKvSource(4, {layer(buf.data(), {2, 3, 4})}, "m", &src).ok());
  EXPECT_NE(src->Describe().find("in-memory"), std::string::npos);
  ExpectError(MakeInMemoryKvSource(3, {layer(buf.data(), {2, 3, 4})}, "m", &src), {"not a multiple"});
  ExpectError(MakeInMemoryKvSource(0, {layer(buf.data(), {2, 3, 4})}, "m", &src), {"n_q_heads"});
  ExpectError(MakeInMemoryKvSource(4, {layer(bad.data(), {2, 5, 4})}, "m", &src), {"layers.0.v", "shapes must match"});
  ExpectError(MakeInMemoryKvSource(4, {}, "m", &src), {"no KV tensors"});
  KvLayerView l = layer(buf.data(), {2, 3, 4});
  l.k.dtype = DType::kF32;
  ExpectError(MakeInMemoryKvSource(4, {l}, "m", &src), {"dtype"});
}

// Issue 9, items 5 and 6: a KV tensor name with a non-canonical or huge
// layer index is an error, never ignored (layers.01.k used to turn a 2-layer
// file into a 1-layer context) and never sized by (layers.9999999.k used to
// allocate ten million layer slots, 3.3 GB, before reporting a gap).
TEST(IndexKvSourceTest, LayerNamesAreCanonicalAndBounded) {
  ScopedTempDir dir("sqz-kvsrc");
  std::unique_ptr<KvSource> src;
  const std::map<std::string, std::string> meta = {{"n_q_heads", "4"}};
  for (const char* bad : {"layers.01.k", "layers.00.v", "layers.+1.k", "layers.1x.k", "layers..k", "layers.9999999.k",
                          "layers.1048576.v", "layers.99999999999999999999.k", "layers.01.q_window"}) {
    auto t = TinyTensors();
    t.push_back({bad, "F16", {2, 3, 4}, F16Bytes(24)});
    ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"kv.safetensors", bad, "not a valid layer tensor"});
    EXPECT_EQ(src, nullptr) << bad;
  }
  // The 2-layer file written with layers.01.* for layer 1: refused, not 1 layer.
  auto t = TinyTensors();
  t[2].name = "layers.01.k";
  t[3].name = "layers.01.v";
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"layers.01.k", "not a valid layer tensor"});
  // A gap up to a large (valid) index is reported from the names alone.
  t = TinyTensors();
  t.push_back({"layers.1000000.k", "F16", {2, 3, 4}, F16Bytes(24)});
  ExpectError(OpenBytes(dir, SafetensorsBytes(t, meta), &src), {"missing layer 2", "highest layer present is 1000000"});
  // Other tensors under layers.* are still ignored.
  t = TinyTensors();
  t.push_back({"layers.0.attn.k", "F16", {1}, F16Bytes(1)});
  t.push_back({"layers.x.bias", "F16", {1}, F16Bytes(1)});
  ASSERT_TRUE(OpenBytes(dir, SafetensorsBytes(t, meta), &src).ok());
  EXPECT_EQ(src->shape().n_layers, 2);
}

// Issue 9, item 6: tensors whose bytes overlap (v pointing at k's bytes) or
// leave gaps are refused: the format forbids them.
TEST(IndexKvSourceTest, AliasedOrGappedDataIsRefused) {
  ScopedTempDir dir("sqz-kvsrc");
  std::unique_ptr<KvSource> src;
  const std::string header =
      "{\"__metadata__\":{\"n_q_heads\":\"4\"},\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[2,3,4],"
      "\"data_offsets\":[0,48]},\"layers.0.v\":{\"dtype\":\"F16\",\"shape\":[2,3,4],"
      "\"data_offsets\":[0,48]}}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  ExpectError(OpenBytes(dir, bytes + header + F16Bytes(24), &src), {"layers.0.v", "overlaps", "layers.0.k"});
}

}  // namespace
}  // namespace sqz
