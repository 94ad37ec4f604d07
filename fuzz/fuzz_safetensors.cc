// libFuzzer target: the safetensors reader (util/include/util/safetensors.h)
// and the KV-file source built on it (sqz/kv_source.h). The input is the
// whole file.
//
// Asserts, beyond "no crash, leak, hang or unbounded allocation" (the
// sanitizers and libFuzzer's limits): every entry the reader accepts lies
// inside the file with a size that matches its shape and dtype, the entries
// tile the data section, and reading each one (raw, and as float when its
// dtype is one) succeeds; a KV source that opens has the shapes it reports
// and reads every layer at exactly those sizes.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "fuzz_common.h"
#include "sqz/kv_source.h"
#include "util/safetensors.h"

namespace sqz::fuzz {
namespace {

// Entries larger than this are checked but not read (a fast fuzzer; the
// reader already ties every size to the file's).
constexpr uint64_t kMaxReadBytes = uint64_t{64} << 20;

void CheckFile(const SafetensorsFile& f, uint64_t file_size) {
  uint64_t covered = 0, data_start = file_size;
  for (const SafetensorsEntry& e : f.entries()) {
    SQZ_FUZZ_CHECK(e.offset >= 8 && e.offset <= file_size && e.nbytes <= file_size - e.offset);
    SQZ_FUZZ_CHECK(f.Find(e.name) == &e);
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      SQZ_FUZZ_CHECK(d >= 0);
      numel *= static_cast<uint64_t>(d);  // bounded: the reader refuses shapes over 2^62 elements
    }
    if (e.dtype_supported) SQZ_FUZZ_CHECK(numel * DTypeSize(e.dtype) == e.nbytes);
    covered += e.nbytes;
    data_start = std::min(data_start, e.offset);
    if (e.nbytes > kMaxReadBytes) continue;
    std::vector<uint8_t> raw(e.nbytes);
    SQZ_FUZZ_CHECK(f.ReadRaw(e, raw.data()).ok());
    if (e.dtype_supported) {
      std::vector<float> values(numel);
      SQZ_FUZZ_CHECK(f.ReadFloat(e, values.data()).ok());
    } else {
      SQZ_FUZZ_CHECK(!f.ReadFloat(e, nullptr).ok());
    }
  }
  // No tensor shares a byte with another and none is missing: the tensors
  // cover [first offset, end of file) exactly.
  if (!f.entries().empty()) SQZ_FUZZ_CHECK(covered == file_size - data_start);
}

void CheckKvSource(KvSource* src) {
  const KvShape& s = src->shape();
  SQZ_FUZZ_CHECK(s.n_layers > 0 && s.n_kv_heads > 0 && s.n_q_heads > 0 && s.n_tokens > 0 && s.head_dim > 0);
  SQZ_FUZZ_CHECK(s.n_q_heads % s.n_kv_heads == 0 && s.q_window_len >= 0);
  const uint64_t kv_bytes =
      static_cast<uint64_t>(s.n_kv_heads) * static_cast<uint64_t>(s.n_tokens) * s.head_dim * DTypeSize(s.dtype);
  const uint64_t q_floats = static_cast<uint64_t>(s.n_q_heads) * s.q_window_len * s.head_dim;
  if (kv_bytes > kMaxReadBytes || q_floats * sizeof(float) > kMaxReadBytes) return;
  std::vector<uint8_t> k, v;
  std::vector<float> q;
  for (int layer = 0; layer < s.n_layers; ++layer) {
    SQZ_FUZZ_CHECK(src->ReadLayer(layer, &k, &v).ok());
    SQZ_FUZZ_CHECK(k.size() == kv_bytes && v.size() == kv_bytes);
    const Status qs = src->ReadQWindow(layer, &q);
    if (s.q_window_len > 0) {
      SQZ_FUZZ_CHECK(qs.ok() && q.size() == q_floats);
    } else {
      SQZ_FUZZ_CHECK(qs.IsNotFound());
    }
  }
  SQZ_FUZZ_CHECK(!src->ReadLayer(s.n_layers, &k, &v).ok());
  SQZ_FUZZ_CHECK(!src->ReadLayer(-1, &k, &v).ok());
}

}  // namespace
}  // namespace sqz::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sqz;
  fuzz::MemFile file(data, size);
  std::unique_ptr<SafetensorsFile> f;
  const Status s = SafetensorsFile::Open(file.path(), &f);
  if (s.ok()) {
    fuzz::CheckFile(*f, size);
  } else {
    SQZ_FUZZ_CHECK(!s.message().empty());
  }
  std::unique_ptr<KvSource> src;
  const Status ks = OpenSafetensorsKvSource(file.path(), &src);
  if (ks.ok()) {
    SQZ_FUZZ_CHECK(s.ok());  // a KV file is a safetensors file
    fuzz::CheckKvSource(src.get());
  }
  return 0;
}
