// What the fuzz targets (fuzz/fuzz_*.cc) and their seed writer
// (fuzz/make_seeds.cc) share: the in-memory file an input is opened as, the
// check that turns a broken promise of the library into a crash libFuzzer
// records, and the layout of the inputs that carry a context's shapes in
// front of the file or record they feed (docs/RELIABILITY.md, "Fuzzing").
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "storage/store.h"

// Aborts, naming the condition, when an invariant the library promises does
// not hold: libFuzzer saves the input as a crash. (Not assert(): the fuzz
// build is RelWithDebInfo, which defines NDEBUG.)
#define SQZ_FUZZ_CHECK(cond)                                                                 \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

namespace sqz::fuzz {

// The input as a file the readers can open by path: a memfd, named
// /proc/self/fd/N (a regular file to fstat; nothing touches the disk).
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t size) {
    fd_ = memfd_create("sqz-fuzz-input", MFD_CLOEXEC);
    SQZ_FUZZ_CHECK(fd_ >= 0);
    for (size_t done = 0; done < size;) {
      const ssize_t w = ::write(fd_, data + done, size - done);
      SQZ_FUZZ_CHECK(w > 0);
      done += static_cast<size_t>(w);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// --- fuzz_queries: a context's shapes, then a safetensors queries file ------
// Byte 0: n_layers - 1 (mod 8); 1: n_kv_heads - 1 (mod 4); 2: query heads
// per KV head - 1 (mod 4); 3: head_dim - 1 (mod 16). ReadQueriesFile reads
// only these fields (and the name, for messages).
inline constexpr size_t kQueriesPrefixBytes = 4;

inline ContextInfo QueriesContext(const uint8_t* p) {
  ContextInfo info;
  info.name = "fuzz";
  info.n_layers = 1 + p[0] % 8;
  info.n_kv_heads = 1 + p[1] % 4;
  info.n_q_heads = info.n_kv_heads * (1 + p[2] % 4);
  info.head_dim = 1 + p[3] % 16;
  return info;
}

// The prefix QueriesContext turns back into info's shapes; false when they
// lie outside its ranges.
inline bool QueriesPrefix(const ContextInfo& info, std::string* out) {
  if (info.n_layers < 1 || info.n_layers > 8 || info.n_kv_heads < 1 || info.n_kv_heads > 4 ||
      info.n_q_heads % info.n_kv_heads != 0 || info.n_q_heads / info.n_kv_heads > 4 || info.head_dim < 1 ||
      info.head_dim > 16) {
    return false;
  }
  *out = {static_cast<char>(info.n_layers - 1), static_cast<char>(info.n_kv_heads - 1),
          static_cast<char>(info.n_q_heads / info.n_kv_heads - 1), static_cast<char>(info.head_dim - 1)};
  return true;
}

// --- fuzz_records ------------------------------------------------------------
// Byte 0 picks the decoder: even, DecodeManifest of the bytes after it; odd,
// DecodeHeadIndex of the bytes after a kHeadIndexPrefixBytes prefix that
// gives the context (always a valid manifest, as storage only ever decodes a
// head index against a validated one) and the (layer, head, full) asked for:
//   0 n_layers - 1 (mod 4)      1 n_kv_heads - 1 (mod 4)   2 query heads per KV head - 1 (mod 4)
//   3 head_dim - 1 (mod 16)     4 n_sinks (mod 8)          5 window (mod 32; 1 when the context would be empty)
//   6 n_clustered (0..255)      7 page_rows - 1 (mod 64)   8 layer (mod n_layers)   9 head (mod n_kv_heads)
//   10 flags: bit 0 full; bit 1 decode against the context without its cluster counts (the
//      shape a writer reads back before its commit); bits 2-3 dtype (mod 3)
//   11 K2 - 1 (mod n_clustered), 12 K1 - 1 (mod K2): every (layer, head)'s cluster counts
inline constexpr size_t kHeadIndexPrefixBytes = 13;

struct HeadIndexCall {
  ContextInfo info;  // a valid manifest: cluster counts included
  int layer = 0;
  int head = 0;
  bool full = false;
  bool without_counts = false;  // decode against info less its cluster counts

  // The context the record is decoded against.
  ContextInfo Context() const {
    ContextInfo m = info;
    if (without_counts) {
      m.fine_clusters.clear();
      m.coarse_clusters.clear();
    }
    return m;
  }
};

inline HeadIndexCall HeadIndexContext(const uint8_t* p) {
  HeadIndexCall c;
  ContextInfo& m = c.info;
  m.name = "fuzz";
  m.id = 1;
  m.format_version = storage::kFormatVersion;
  m.n_layers = 1 + p[0] % 4;
  m.n_kv_heads = 1 + p[1] % 4;
  m.n_q_heads = m.n_kv_heads * (1 + p[2] % 4);
  m.head_dim = 1 + p[3] % 16;
  m.n_sinks = p[4] % 8;
  m.window = p[5] % 32;
  m.n_clustered = p[6];
  if (m.n_sinks + m.window + m.n_clustered == 0) m.window = 1;
  m.n_tokens = m.n_sinks + m.window + m.n_clustered;
  m.page_rows = 1 + p[7] % 64;
  m.clustered_pages = storage::PagesFor(m.n_clustered, m.page_rows);
  m.always_pages = storage::PagesFor(m.n_always(), m.page_rows);
  c.layer = p[8] % m.n_layers;
  c.head = p[9] % m.n_kv_heads;
  c.full = (p[10] & 1) != 0;
  c.without_counts = (p[10] & 2) != 0;
  m.dtype = static_cast<DType>((p[10] >> 2) % 3);
  const int32_t k2 = m.n_clustered > 0 ? 1 + p[11] % static_cast<int>(m.n_clustered) : 0;
  const int32_t k1 = k2 > 0 ? 1 + p[12] % k2 : 0;
  const size_t cells = static_cast<size_t>(m.n_layers) * m.n_kv_heads;
  m.fine_clusters.assign(cells, k2);
  m.coarse_clusters.assign(cells, k1);
  return c;
}

// The prefix HeadIndexContext turns back into c (its context's shapes, page
// geometry and the cluster counts of (c.layer, c.head), which it gives every
// head); false when they lie outside its ranges.
inline bool HeadIndexPrefix(const HeadIndexCall& c, std::string* out) {
  const ContextInfo& m = c.info;
  if (m.n_layers < 1 || m.n_layers > 4 || m.n_kv_heads < 1 || m.n_kv_heads > 4 || m.n_q_heads % m.n_kv_heads != 0 ||
      m.n_q_heads / m.n_kv_heads > 4 || m.head_dim < 1 || m.head_dim > 16 || m.n_sinks < 0 || m.n_sinks > 7 ||
      m.window < 0 || m.window > 31 || m.n_clustered < 0 || m.n_clustered > 255 ||
      m.n_tokens != m.n_sinks + m.window + m.n_clustered || m.n_tokens == 0 || m.page_rows < 1 || m.page_rows > 64 ||
      c.layer < 0 || c.layer >= m.n_layers || c.head < 0 || c.head >= m.n_kv_heads) {
    return false;
  }
  const size_t cell = static_cast<size_t>(c.layer) * m.n_kv_heads + c.head;
  if (cell >= m.fine_clusters.size() || cell >= m.coarse_clusters.size()) return false;
  const int k2 = m.fine_clusters[cell], k1 = m.coarse_clusters[cell];
  if ((m.n_clustered > 0) != (k2 > 0) || k2 > m.n_clustered || (k2 > 0) != (k1 > 0) || k1 > k2) return false;
  const uint8_t flags =
      static_cast<uint8_t>((c.full ? 1 : 0) | (c.without_counts ? 2 : 0) | (static_cast<int>(m.dtype) << 2));
  const int bytes[kHeadIndexPrefixBytes] = {m.n_layers - 1,
                                            m.n_kv_heads - 1,
                                            m.n_q_heads / m.n_kv_heads - 1,
                                            m.head_dim - 1,
                                            m.n_sinks,
                                            m.window,
                                            static_cast<int>(m.n_clustered),
                                            m.page_rows - 1,
                                            c.layer,
                                            c.head,
                                            flags,
                                            k2 > 0 ? k2 - 1 : 0,
                                            k1 > 0 ? k1 - 1 : 0};
  out->clear();
  for (int b : bytes) out->push_back(static_cast<char>(b));
  return true;
}

}  // namespace sqz::fuzz
