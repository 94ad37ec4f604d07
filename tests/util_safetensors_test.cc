// Safetensors reader and writer: round trips, and every kind of damaged input
// giving a clean error (a Status, never a crash or an over-allocation).

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "util/half.h"
#include "util/safetensors.h"

namespace sqz {
namespace {

using testing::ScopedTempDir;

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFileBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string LengthPrefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(n >> (8 * i));
  return s;
}

// A file made of a length prefix, `header` and `data`.
std::string RawFile(const std::string& header, const std::string& data = "") {
  return LengthPrefix(header.size()) + header + data;
}

Status OpenBytes(const ScopedTempDir& dir, const std::string& bytes, std::unique_ptr<SafetensorsFile>* f) {
  const std::string path = dir.Sub("raw.safetensors");
  WriteFileBytes(path, bytes);
  return SafetensorsFile::Open(path, f);
}

std::vector<float> Iota(size_t n, float start, float step) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + step * static_cast<float>(i);
  return v;
}

TEST(SafetensorsTest, RoundTripAllDtypesAndMetadata) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("rt.safetensors");
  SafetensorsWriter w;
  w.SetMetadata("n_q_heads", "32");
  w.SetMetadata("model", "quote\" backslash\\ newline\n tab\t ctrl\x01 utf8 \xc3\xa9\xe2\x82\xac");
  w.SetMetadata("", "empty key");
  w.SetMetadata("empty value", "");

  const std::vector<float> f32 = Iota(2 * 3 * 5, -7.25f, 0.5f);
  std::vector<uint16_t> f16(4 * 6), bf16(3 * 7);
  const std::vector<float> src16 = Iota(f16.size(), -3.0f, 0.37f);
  const std::vector<float> srcbf = Iota(bf16.size(), 1000.0f, -97.1f);
  ConvertFromFloat(src16.data(), f16.size(), DType::kF16, f16.data());
  ConvertFromFloat(srcbf.data(), bf16.size(), DType::kBF16, bf16.data());
  const float scalar = 42.5f;

  w.Add("layers.0.k", DType::kF32, {2, 3, 5}, f32.data());
  w.Add("layers.0.v", DType::kF16, {4, 6}, f16.data());
  w.Add("weird \"name\"/\\", DType::kBF16, {3, 7}, bf16.data());
  w.Add("scalar", DType::kF32, {}, &scalar);
  w.Add("empty", DType::kF16, {3, 0, 2}, nullptr);
  ASSERT_TRUE(w.WriteFile(path).ok());
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  // The data section starts 8-byte aligned (the writer pads the header).
  const std::string bytes = ReadFileBytes(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + header_len) % 8, 0u);

  std::unique_ptr<SafetensorsFile> f;
  Status s = SafetensorsFile::Open(path, &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->metadata().size(), 4u);
  EXPECT_EQ(f->metadata().at("n_q_heads"), "32");
  EXPECT_EQ(f->metadata().at("model"), "quote\" backslash\\ newline\n tab\t ctrl\x01 utf8 \xc3\xa9\xe2\x82\xac");
  EXPECT_EQ(f->metadata().at(""), "empty key");
  EXPECT_EQ(f->metadata().at("empty value"), "");
  ASSERT_EQ(f->entries().size(), 5u);
  EXPECT_EQ(f->Find("missing"), nullptr);
  EXPECT_EQ(f->Find("__metadata__"), nullptr);

  const SafetensorsEntry* k = f->Find("layers.0.k");
  ASSERT_NE(k, nullptr);
  EXPECT_EQ(k->dtype_name, "F32");
  EXPECT_TRUE(k->dtype_supported);
  EXPECT_EQ(k->dtype, DType::kF32);
  EXPECT_EQ(k->shape, (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(k->nbytes, f32.size() * 4);
  std::vector<float> got(f32.size());
  ASSERT_TRUE(f->ReadFloat(*k, got.data()).ok());
  EXPECT_EQ(got, f32);

  const SafetensorsEntry* v = f->Find("layers.0.v");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->dtype, DType::kF16);
  EXPECT_EQ(v->dtype_name, "F16");
  EXPECT_EQ(v->shape, (std::vector<int64_t>{4, 6}));
  std::vector<uint16_t> raw16(f16.size());
  ASSERT_TRUE(f->ReadRaw(*v, raw16.data()).ok());
  EXPECT_EQ(raw16, f16);
  got.resize(f16.size());
  ASSERT_TRUE(f->ReadFloat(*v, got.data()).ok());
  for (size_t i = 0; i < f16.size(); ++i) EXPECT_EQ(got[i], HalfToFloat(f16[i])) << i;

  const SafetensorsEntry* b = f->Find("weird \"name\"/\\");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_EQ(b->dtype_name, "BF16");
  got.resize(bf16.size());
  ASSERT_TRUE(f->ReadFloat(*b, got.data()).ok());
  for (size_t i = 0; i < bf16.size(); ++i) EXPECT_EQ(got[i], Bf16ToFloat(bf16[i])) << i;

  const SafetensorsEntry* sc = f->Find("scalar");
  ASSERT_NE(sc, nullptr);
  EXPECT_TRUE(sc->shape.empty());
  EXPECT_EQ(sc->nbytes, 4u);
  float x = 0;
  ASSERT_TRUE(f->ReadFloat(*sc, &x).ok());
  EXPECT_EQ(x, 42.5f);

  const SafetensorsEntry* e = f->Find("empty");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, (std::vector<int64_t>{3, 0, 2}));
  EXPECT_EQ(e->nbytes, 0u);
  EXPECT_TRUE(f->ReadFloat(*e, &x).ok());

  // Tensors are laid out in Add order, contiguously, inside the file.
  uint64_t expect_offset = 8 + header_len;
  for (const auto& entry : f->entries()) {
    EXPECT_EQ(entry.offset, expect_offset) << entry.name;
    expect_offset += entry.nbytes;
  }
  EXPECT_EQ(expect_offset, bytes.size());
}

TEST(SafetensorsTest, EmptyWriterWritesAValidFile) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("empty.safetensors");
  ASSERT_TRUE(SafetensorsWriter().WriteFile(path).ok());
  std::unique_ptr<SafetensorsFile> f;
  ASSERT_TRUE(SafetensorsFile::Open(path, &f).ok());
  EXPECT_TRUE(f->entries().empty());
  EXPECT_TRUE(f->metadata().empty());
}

TEST(SafetensorsTest, WriterReplacesAnExistingFile) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("x.safetensors");
  WriteFileBytes(path, "old junk");
  SafetensorsWriter w;
  const float one = 1.0f;
  w.Add("t", DType::kF32, {1}, &one);
  ASSERT_TRUE(w.WriteFile(path).ok());
  std::unique_ptr<SafetensorsFile> f;
  ASSERT_TRUE(SafetensorsFile::Open(path, &f).ok());
  ASSERT_NE(f->Find("t"), nullptr);
}

// Issue 9, item 4: the writer never replaces what is not a regular file,
// and never follows a link through its temporary file.
TEST(SafetensorsTest, WriterRefusesToReplaceLinksDirectoriesAndDevices) {
  ScopedTempDir dir;
  SafetensorsWriter w;
  const float one = 1.0f;
  w.Add("t", DType::kF32, {1}, &one);
  const std::string target = dir.Sub("target.bin"), link = dir.Sub("link.safetensors");
  WriteFileBytes(target, "precious");
  std::filesystem::create_symlink(target, link);
  Status s = w.WriteFile(link);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("symbolic link"), std::string::npos) << s.ToString();
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  std::ifstream in(target);
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "precious");

  std::filesystem::create_directory(dir.Sub("d"));
  s = w.WriteFile(dir.Sub("d"));
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_TRUE(std::filesystem::is_directory(dir.Sub("d")));

  s = w.WriteFile("/dev/null");
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("not a regular file"), std::string::npos) << s.ToString();

  // A stale "<path>.tmp" symlink (the old temporary name) is neither
  // followed nor needed.
  const std::string out = dir.Sub("out.safetensors");
  std::filesystem::create_symlink(target, out + ".tmp");
  ASSERT_TRUE(w.WriteFile(out).ok());
  std::ifstream again(target);
  std::string after((std::istreambuf_iterator<char>(again)), std::istreambuf_iterator<char>());
  EXPECT_EQ(after, "precious");
  std::unique_ptr<SafetensorsFile> f;
  ASSERT_TRUE(SafetensorsFile::Open(out, &f).ok());
  EXPECT_NE(f->Find("t"), nullptr);
  // No temporary left behind.
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))
    files += e.path().string().find(".tmp.") != std::string::npos;
  EXPECT_EQ(files, 0);
}

TEST(SafetensorsTest, WriterReportsIOError) {
  ScopedTempDir dir;
  SafetensorsWriter w;
  Status s = w.WriteFile(dir.Sub("no/such/dir/x.safetensors"));
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
  EXPECT_NE(s.message().find("no/such/dir"), std::string::npos) << s.ToString();
}

TEST(SafetensorsTest, OpenErrorsOnMissingPathAndDirectory) {
  ScopedTempDir dir;
  std::unique_ptr<SafetensorsFile> f;
  Status s = SafetensorsFile::Open(dir.Sub("absent.safetensors"), &f);
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
  EXPECT_NE(s.message().find("absent.safetensors"), std::string::npos);
  EXPECT_EQ(f, nullptr);
  s = SafetensorsFile::Open(dir.path(), &f);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(f, nullptr);
}

// Unsupported-but-valid dtypes are listed and readable raw, not as float.
TEST(SafetensorsTest, ListsOtherDtypes) {
  ScopedTempDir dir;
  const std::string data(4 * 3 + 8 + 5, '\x01');
  const std::string header = R"({"ids":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},)"
                             R"("d":{"dtype":"F64","shape":[1],"data_offsets":[12,20]},)"
                             R"("odd":{"dtype":"NOT_A_DTYPE","shape":[5],"data_offsets":[20,25]}})";
  std::unique_ptr<SafetensorsFile> f;
  Status s = OpenBytes(dir, RawFile(header, data), &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(f->entries().size(), 3u);
  for (const auto& e : f->entries()) {
    EXPECT_FALSE(e.dtype_supported) << e.name;
    std::vector<float> out(8);
    Status r = f->ReadFloat(e, out.data());
    EXPECT_TRUE(r.IsInvalidArgument()) << e.name << " " << r.ToString();
    EXPECT_NE(r.message().find(e.dtype_name), std::string::npos) << r.ToString();
  }
  const SafetensorsEntry* ids = f->Find("ids");
  ASSERT_NE(ids, nullptr);
  EXPECT_EQ(ids->dtype_name, "I32");
  std::vector<uint8_t> raw(ids->nbytes);
  ASSERT_TRUE(f->ReadRaw(*ids, raw.data()).ok());
  EXPECT_EQ(raw, std::vector<uint8_t>(12, 1));
  EXPECT_EQ(f->Find("odd")->dtype_name, "NOT_A_DTYPE");
}

struct BadCase {
  const char* what;
  std::string bytes;
};

std::vector<BadCase> BadFiles() {
  const std::string ok_tensor = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data8(8, '\0');
  std::vector<BadCase> c;
  c.push_back({"empty file", ""});
  c.push_back({"truncated length prefix", std::string("\x10\x00\x00", 3)});
  c.push_back({"7-byte file", std::string(7, '\0')});
  c.push_back({"zero header length", LengthPrefix(0)});
  c.push_back({"header length larger than the file", LengthPrefix(1000) + "{}"});
  c.push_back({"header length 2^63", LengthPrefix(uint64_t{1} << 63) + "{}"});
  c.push_back({"header length 2^64-1", LengthPrefix(~uint64_t{0}) + "{}"});
  c.push_back({"garbage JSON", RawFile("this is not json at all")});
  c.push_back({"truncated JSON", RawFile(R"({"t":{"dtype":"F32","shape":[2],)")});
  c.push_back({"trailing garbage after JSON", RawFile("{} x")});
  c.push_back({"binary header", RawFile(std::string("\xff\xfe\x00\x01{}", 6))});
  c.push_back({"JSON array", RawFile("[1,2,3]")});
  c.push_back({"JSON string", RawFile(R"("hello")")});
  c.push_back({"JSON number", RawFile("12")});
  c.push_back({"deeply nested JSON", RawFile(std::string(100000, '[') + std::string(100000, ']'))});
  c.push_back({"entry not an object", RawFile(R"({"t":[1,2]})")});
  c.push_back({"missing dtype", RawFile(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", data8)});
  c.push_back({"dtype not a string", RawFile(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", data8)});
  c.push_back({"missing shape", RawFile(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", data8)});
  c.push_back({"shape not an array", RawFile(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", data8)});
  c.push_back({"missing data_offsets", RawFile(R"({"t":{"dtype":"F32","shape":[2]}})", data8)});
  c.push_back({"one data offset", RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", data8)});
  c.push_back({"three data offsets", RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", data8)});
  c.push_back({"string data offsets", RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}})", data8)});
  c.push_back({"negative offset", RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", data8)});
  c.push_back({"fractional offset", RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}})", data8)});
  c.push_back({"begin > end", RawFile(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data8)});
  c.push_back(
      {"offsets beyond the file", RawFile(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data8)});
  c.push_back({"offsets far beyond the file",
               RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[4611686018427387904,4611686018427387912]}})",
                       data8)});
  c.push_back({"offset beyond int64",
               RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551624]}})", data8)});
  c.push_back(
      {"size not numel * element size", RawFile(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8)});
  c.push_back({"F16 size mismatch", RawFile(R"({"t":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", data8)});
  c.push_back({"I32 size mismatch", RawFile(R"({"t":{"dtype":"I32","shape":[1],"data_offsets":[0,8]}})", data8)});
  c.push_back({"negative dimension", RawFile(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8)});
  c.push_back({"negative dimension with a zero",
               RawFile(R"({"t":{"dtype":"F32","shape":[0,-1],"data_offsets":[0,0]}})", data8)});
  c.push_back({"fractional dimension", RawFile(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", data8)});
  c.push_back({"string dimension", RawFile(R"({"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", data8)});
  c.push_back({"dimension beyond int64",
               RawFile(R"({"t":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]}})", data8)});
  c.push_back({"overflowing shape (product wraps)",
               RawFile(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}})", data8)});
  c.push_back({"overflowing shape (int64 max)",
               RawFile(R"({"t":{"dtype":"F32","shape":[9223372036854775807],"data_offsets":[0,0]}})", data8)});
  // numel = 2^62 passes a numel-only bound, but numel * 4 bytes wraps to 0
  // in 64 bits and would then "match" empty data_offsets.
  c.push_back({"overflowing byte size (F32, 2^62 elements)",
               RawFile(R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", data8)});
  c.push_back({"overflowing byte size (F64, 2^61 * 2 elements)",
               RawFile(R"({"t":{"dtype":"F64","shape":[2305843009213693952,2],"data_offsets":[0,0]}})", data8)});
  c.push_back({"overflowing byte size (F16, 2^63 elements)",
               RawFile(R"({"t":{"dtype":"F16","shape":[4294967296,2147483648],"data_offsets":[0,0]}})", data8)});
  c.push_back({"duplicate tensor names", RawFile("{" + ok_tensor + "," + ok_tensor + "}", data8)});
  c.push_back({"duplicate __metadata__", RawFile(R"({"__metadata__":{},"__metadata__":{}})")});
  c.push_back({"__metadata__ not an object", RawFile(R"({"__metadata__":"x"})")});
  c.push_back({"__metadata__ value not a string", RawFile(R"({"__metadata__":{"n_q_heads":32}})")});
  c.push_back({"unterminated string", RawFile(R"({"t)")});
  c.push_back({"bad escape", RawFile(R"({"t\q":1})")});
  c.push_back({"truncated unicode escape", RawFile(R"({"\u12)")});
  // Issue 9, item 6: the tensors must tile the data section exactly.
  c.push_back({"second tensor aliases the first", RawFile(R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                                          R"("v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                                          data8)});
  c.push_back({"overlapping tensors", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                              R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                              std::string(12, '\0'))});
  c.push_back({"gap between tensors", RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                              R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                              std::string(12, '\0'))});
  c.push_back(
      {"gap before the first tensor", RawFile(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data8)});
  c.push_back(
      {"bytes after the last tensor", RawFile(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", data8)});
  c.push_back({"data but no tensor", RawFile("{}", data8)});
  return c;
}

TEST(SafetensorsTest, CorruptInputsGiveCleanErrors) {
  ScopedTempDir dir;
  for (const BadCase& c : BadFiles()) {
    std::unique_ptr<SafetensorsFile> f;
    Status s = OpenBytes(dir, c.bytes, &f);
    EXPECT_FALSE(s.ok()) << c.what;
    EXPECT_TRUE(s.IsCorruption()) << c.what << ": " << s.ToString();
    EXPECT_EQ(f, nullptr) << c.what;
    // The message names the file.
    EXPECT_NE(s.message().find("raw.safetensors"), std::string::npos) << c.what << ": " << s.ToString();
  }
}

// The tiling rule in the messages, and what it still accepts (zero-size
// tensors, any order in the header).
TEST(SafetensorsTest, DataSectionMustBeTiledExactly) {
  ScopedTempDir dir;
  std::unique_ptr<SafetensorsFile> f;
  Status s = OpenBytes(dir,
                       RawFile(R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                               std::string(8, '\0')),
                       &f);
  EXPECT_NE(s.message().find("tensor 'v' (data_offsets [0, 8)) overlaps tensor 'k'"), std::string::npos)
      << s.ToString();
  s = OpenBytes(dir, RawFile(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(8, '\0')), &f);
  EXPECT_NE(s.message().find("4 byte(s) after the last tensor"), std::string::npos) << s.ToString();
  s = OpenBytes(dir,
                RawFile(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"e":{"dtype":"F32","shape":[0],)"
                        R"("data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                        std::string(8, '\0')),
                &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(f->entries().size(), 3u);
}

// Issue 9, item 7: a FIFO (or any non-regular file) is refused at once: the
// open does not wait for a writer.
TEST(SafetensorsTest, FifoIsRefusedWithoutBlocking) {
  ScopedTempDir dir;
  const std::string fifo = dir.Sub("pipe.safetensors");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::unique_ptr<SafetensorsFile> f;
  const auto t0 = std::chrono::steady_clock::now();
  Status s = SafetensorsFile::Open(fifo, &f);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("a FIFO"), std::string::npos) << s.ToString();
  s = SafetensorsFile::Open("/dev/null", &f);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("a device"), std::string::npos) << s.ToString();
}

// A valid file with its data section cut short at every length.
TEST(SafetensorsTest, TruncatedDataSection) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("full.safetensors");
  SafetensorsWriter w;
  const std::vector<float> a = Iota(10, 0, 1), b = Iota(6, 5, 1);
  w.Add("a", DType::kF32, {10}, a.data());
  w.Add("b", DType::kF32, {2, 3}, b.data());
  ASSERT_TRUE(w.WriteFile(path).ok());
  const std::string full = ReadFileBytes(path);
  const size_t data_bytes = (a.size() + b.size()) * 4;
  for (size_t cut = 1; cut <= data_bytes + 8; ++cut) {
    std::unique_ptr<SafetensorsFile> f;
    Status s = OpenBytes(dir, full.substr(0, full.size() - cut), &f);
    EXPECT_FALSE(s.ok()) << cut;
    EXPECT_EQ(f, nullptr);
  }
}

// A file that shrinks after Open: reads fail cleanly.
TEST(SafetensorsTest, FileTruncatedAfterOpen) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("shrink.safetensors");
  SafetensorsWriter w;
  const std::vector<float> a = Iota(1000, 0, 1);
  w.Add("a", DType::kF32, {1000}, a.data());
  w.Add("h", DType::kF16, {1000}, std::vector<uint16_t>(1000, 0x3c00).data());
  ASSERT_TRUE(w.WriteFile(path).ok());
  std::unique_ptr<SafetensorsFile> f;
  ASSERT_TRUE(SafetensorsFile::Open(path, &f).ok());
  std::filesystem::resize_file(path, f->Find("a")->offset + 10);
  std::vector<float> out(1000);
  Status s = f->ReadFloat(*f->Find("a"), out.data());
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  s = f->ReadFloat(*f->Find("h"), out.data());
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
}

// Random byte damage to a valid file's length prefix and header: Open must
// return OK or an error, and whatever it accepts must be readable within the
// file's bounds.
TEST(SafetensorsTest, FuzzedHeadersNeverCrash) {
  ScopedTempDir dir;
  const std::string path = dir.Sub("valid.safetensors");
  SafetensorsWriter w;
  w.SetMetadata("n_q_heads", "8");
  w.SetMetadata("model", "fuzz");
  const std::vector<float> a = Iota(24, -1, 0.25f);
  std::vector<uint16_t> h(24), bf(10);
  ConvertFromFloat(a.data(), 24, DType::kF16, h.data());
  ConvertFromFloat(a.data(), 10, DType::kBF16, bf.data());
  w.Add("layers.0.k", DType::kF16, {2, 3, 4}, h.data());
  w.Add("layers.0.v", DType::kF32, {2, 3, 4}, a.data());
  w.Add("layers.0.q_window", DType::kBF16, {2, 5}, bf.data());
  ASSERT_TRUE(w.WriteFile(path).ok());
  const std::string valid = ReadFileBytes(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(valid[i]);
  const size_t span = 8 + header_len;

  // Bytes that make structurally interesting JSON more likely than noise.
  const std::string interesting = "{}[]\",:0123456789-.eE \\u\x00\xff";
  std::mt19937_64 rng(20240601);  // mt19937_64's output sequence is fixed by the standard
  int opened = 0;
  const int kIterations = 3000;
  for (int it = 0; it < kIterations; ++it) {
    std::string bytes = valid;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const size_t pos = rng() % span;
      switch (rng() % 3) {
        case 0:
          bytes[pos] = static_cast<char>(bytes[pos] ^ (1u << (rng() % 8)));
          break;
        case 1:
          bytes[pos] = static_cast<char>(rng());
          break;
        default:
          bytes[pos] = interesting[rng() % interesting.size()];
          break;
      }
    }
    if (rng() % 8 == 0) bytes.resize(rng() % (bytes.size() + 1));  // and sometimes truncate
    std::unique_ptr<SafetensorsFile> f;
    Status s = OpenBytes(dir, bytes, &f);
    if (!s.ok()) {
      ASSERT_EQ(f, nullptr);
      ASSERT_FALSE(s.message().empty());
      continue;
    }
    ++opened;
    ASSERT_NE(f, nullptr);
    for (const SafetensorsEntry& e : f->entries()) {
      ASSERT_LE(e.offset + e.nbytes, bytes.size()) << e.name;
      std::vector<uint8_t> raw(e.nbytes);
      ASSERT_TRUE(f->ReadRaw(e, raw.data()).ok()) << e.name;
      if (e.dtype_supported) {
        std::vector<float> out(e.nbytes / DTypeSize(e.dtype) + 1);
        ASSERT_TRUE(f->ReadFloat(e, out.data()).ok()) << e.name;
      }
    }
  }
  // Some damage is harmless (e.g. inside a metadata string): both paths ran.
  EXPECT_GT(opened, 0);
  EXPECT_LT(opened, kIterations);
}

}  // namespace
}  // namespace sqz
