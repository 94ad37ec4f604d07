// Helpers of the index test suites (tests/index_*_test.cc, slow_build_test.cc):
// deterministic synthetic KV data, hand-written safetensors files (so the
// tests do not depend on the writer under test), raw database inspection.
#pragma once

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "format_generated.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "storage/db_impl.h"
#include "storage/format.h"
#include "util/crc32c.h"
#include "util/half.h"

namespace sqz::index_test {

// --- Deterministic fast random numbers -----------------------------------------

inline uint64_t SplitMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// Uniform in [-1, 1) from a counter.
inline float Uni(uint64_t seed, uint64_t i) {
  return static_cast<float>(static_cast<double>(SplitMix(seed * 0x100000001B3ull + i) >> 11) * 0x1.0p-52 - 1.0);
}
// Roughly normal (sum of 4 uniforms, variance 4/3).
inline float Gauss(uint64_t seed, uint64_t i) {
  return Uni(seed, 4 * i) + Uni(seed, 4 * i + 1) + Uni(seed, 4 * i + 2) + Uni(seed, 4 * i + 3);
}

// --- Synthetic KV layers ---------------------------------------------------------

struct KvSpec {
  int n_layers = 2;
  int n_kv_heads = 2;
  int n_q_heads = 4;
  int64_t n_tokens = 2048;
  int head_dim = 32;
  DType dtype = DType::kF16;
  int q_window = 0;  // W' (0: none)
  int n_topics = 16;
  uint64_t seed = 1;
};

// Keys of (layer, head, token): a topic direction (tokens come in runs of
// 64 per topic, like paragraphs) times a magnitude, plus noise; token 0 is a
// large "sink". Values are noise. Window queries point at random topics.
inline void GenerateLayerFloat(const KvSpec& s, int layer, std::vector<float>* k, std::vector<float>* v,
                               std::vector<float>* q) {
  const int d = s.head_dim;
  const size_t n = static_cast<size_t>(s.n_kv_heads) * s.n_tokens * d;
  k->resize(n);
  v->resize(n);
  const uint64_t base = s.seed * 1000003 + static_cast<uint64_t>(layer) * 7919;
  for (int h = 0; h < s.n_kv_heads; ++h) {
    const uint64_t hs = base * 31 + h;
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      const int topic = static_cast<int>(SplitMix(hs * 131 + t / 64) % s.n_topics);
      const float mag = 1.0f + 0.5f * Uni(hs + 5, t);
      float* kr = k->data() + (static_cast<size_t>(h) * s.n_tokens + t) * d;
      float* vr = v->data() + (static_cast<size_t>(h) * s.n_tokens + t) * d;
      for (int c = 0; c < d; ++c) {
        const float dir = Gauss(hs * 977 + topic, c);
        kr[c] = 2.0f * mag * dir + 0.3f * Gauss(hs + 1, static_cast<uint64_t>(t) * d + c);
        if (t == 0) kr[c] *= 8.0f;
        vr[c] = Gauss(hs + 2, static_cast<uint64_t>(t) * d + c);
      }
    }
  }
  if (q) {
    q->assign(static_cast<size_t>(s.n_q_heads) * s.q_window * d, 0.0f);
    const int g = s.n_q_heads / s.n_kv_heads;
    for (int qh = 0; qh < s.n_q_heads; ++qh) {
      const uint64_t hs = base * 31 + qh / g;
      for (int w = 0; w < s.q_window; ++w) {
        const int topic = static_cast<int>(SplitMix(base * 17 + qh * 1000 + w) % s.n_topics);
        for (int c = 0; c < d; ++c) {
          (*q)[(static_cast<size_t>(qh) * s.q_window + w) * d + c] =
              Gauss(hs * 977 + topic, c) + 0.5f * Gauss(base + 99 + qh, static_cast<uint64_t>(w) * d + c);
        }
      }
    }
  }
}

inline std::vector<uint8_t> ToDType(const std::vector<float>& x, DType t) {
  std::vector<uint8_t> out(x.size() * DTypeSize(t));
  ConvertFromFloat(x.data(), x.size(), t, out.data());
  return out;
}

// All layers in memory, in the stored dtype (the expected bytes of a build).
struct KvData {
  KvSpec spec;
  std::vector<std::vector<uint8_t>> k, v;  // per layer, [H, N, d] in spec.dtype
  std::vector<std::vector<float>> q;       // per layer, [Hq, W, d] (empty if none)

  explicit KvData(const KvSpec& s) : spec(s) {
    for (int l = 0; l < s.n_layers; ++l) {
      std::vector<float> kf, vf, qf;
      GenerateLayerFloat(s, l, &kf, &vf, s.q_window > 0 ? &qf : nullptr);
      k.push_back(ToDType(kf, s.dtype));
      v.push_back(ToDType(vf, s.dtype));
      q.push_back(std::move(qf));
    }
  }

  std::vector<int64_t> KvShape() const { return {spec.n_kv_heads, spec.n_tokens, spec.head_dim}; }
  std::vector<int64_t> QShape() const { return {spec.n_q_heads, spec.q_window, spec.head_dim}; }

  std::unique_ptr<KvSource> Source(const std::string& model = "test-model") const {
    std::vector<KvLayerView> layers;
    for (int l = 0; l < spec.n_layers; ++l) {
      KvLayerView lv;
      lv.k = {k[l].data(), spec.dtype, KvShape()};
      lv.v = {v[l].data(), spec.dtype, KvShape()};
      if (spec.q_window > 0) lv.q_window = {q[l].data(), DType::kF32, QShape()};
      layers.push_back(lv);
    }
    std::unique_ptr<KvSource> src;
    Status s = MakeInMemoryKvSource(spec.n_q_heads, std::move(layers), model, &src);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return src;
  }
};

// --- Hand-written safetensors files ------------------------------------------

struct RawTensor {
  std::string name;
  std::string dtype;  // as written in the header
  std::vector<int64_t> shape;
  std::string bytes;
};

inline std::string JsonShape(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(s[i]);
  }
  return out + "]";
}

// The complete file: 8-byte little-endian header length, JSON header, data.
inline std::string SafetensorsBytes(const std::vector<RawTensor>& tensors,
                                    const std::map<std::string, std::string>& metadata) {
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool f2 = true;
    for (const auto& [k, v] : metadata) {
      header += (f2 ? "\"" : ",\"") + k + "\":\"" + v + "\"";
      f2 = false;
    }
    header += "}";
    first = false;
  }
  uint64_t off = 0;
  for (const RawTensor& t : tensors) {
    header += (first ? "\"" : ",\"") + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + JsonShape(t.shape) +
              ",\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + t.bytes.size()) + "]}";
    off += t.bytes.size();
    first = false;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::string out(8, '\0');
  uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out += header;
  for (const RawTensor& t : tensors) out += t.bytes;
  return out;
}

inline void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

inline std::string Str(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

// The tensors of a well-formed KV file for `data` (window queries in F32).
inline std::vector<RawTensor> KvTensors(const KvData& data) {
  std::vector<RawTensor> t;
  const char* dt = DTypeName(data.spec.dtype);
  for (int l = 0; l < data.spec.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    t.push_back({p + "k", dt, data.KvShape(), Str(data.k[l])});
    t.push_back({p + "v", dt, data.KvShape(), Str(data.v[l])});
    if (data.spec.q_window > 0) {
      const auto& q = data.q[l];
      t.push_back(
          {p + "q_window", "F32", data.QShape(), std::string(reinterpret_cast<const char*>(q.data()), q.size() * 4)});
    }
  }
  return t;
}

inline std::map<std::string, std::string> KvMetadata(const KvData& data) {
  return {{"n_q_heads", std::to_string(data.spec.n_q_heads)}, {"model", "test-model"}};
}

// --- Raw database inspection ---------------------------------------------------

// The RocksDB instance under `db` (test-only downcast: library code reaches
// storage through DB::store()).
inline std::shared_ptr<storage::RocksView> RawView(DB* db) { return static_cast<storage::DBImpl*>(db)->view(); }

// Context ids present in the index and kv column families.
inline std::set<uint64_t> RawContextIds(DB* db) {
  auto v = RawView(db);
  std::set<uint64_t> ids;
  for (auto* cf : {v->cf_index, v->cf_kv}) {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), cf));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      uint64_t id = 0;
      EXPECT_TRUE(storage::DecodeContextId(it->key().ToStringView(), &id));
      ids.insert(id);
    }
    EXPECT_TRUE(it->status().ok());
  }
  return ids;
}

// Context ids of the committed manifests.
inline std::set<uint64_t> LiveContextIds(DB* db) {
  std::vector<std::string> names;
  EXPECT_TRUE(db->ListContexts(&names).ok());
  std::set<uint64_t> ids;
  for (const auto& n : names) {
    ContextInfo info;
    Status s = db->DescribeContext(n, &info);
    EXPECT_TRUE(s.ok()) << s.ToString();
    ids.insert(info.id);
  }
  return ids;
}

// The raw manifest record of context `name` (a Manifest FlatBuffer).
inline std::string RawManifest(DB* db, const std::string& name) {
  auto v = RawView(db);
  std::string bytes;
  rocksdb::Status s = v->db->Get(rocksdb::ReadOptions(), v->cf_manifest, name, &bytes);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return bytes;
}

// The raw head index record of (context id, layer, head) (a HeadIndex FlatBuffer).
inline std::string RawHeadIndex(DB* db, uint64_t id, int layer, int head) {
  auto v = RawView(db);
  std::string bytes;
  rocksdb::Status s = v->db->Get(rocksdb::ReadOptions(), v->cf_index, storage::HeadKey(id, layer, head), &bytes);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return bytes;
}

// Checks that every stored K/V row of context `name` equals `data` bit for
// bit, in the page layout of format version 2: per (layer, KV head) the rows
// in the permuted order (clustered row r = token permutation[r], fine
// clusters contiguous; then the always set: sinks, then the window) cut into
// pages of page_rows rows, K plane then V plane, the last page of each run
// zero-padded, clustered pages first. Also checks the manifest's page
// geometry, that the kv column family holds exactly those pages (and the
// index family one record per head), every page's size and CRC32C, and the
// structure of every head index (every token stored exactly once).
inline void ExpectRoundTrip(DB* db, const std::string& name, const KvData& data, int window, int n_sinks) {
  std::unique_ptr<storage::ContextSnapshot> snap;
  Status st = db->store()->OpenSnapshot(name, &snap);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const ContextInfo& m = snap->info();
  const KvSpec& s = data.spec;
  const int64_t n = s.n_tokens;
  const int64_t sinks = std::min<int64_t>(n_sinks, n);
  const int64_t win = std::min<int64_t>(window, n - sinks);
  const int64_t nc = n - sinks - win;
  const int64_t na = sinks + win;
  ASSERT_EQ(m.format_version, storage::kFormatVersion);
  ASSERT_EQ(m.name, name);
  ASSERT_EQ(m.n_layers, s.n_layers);
  ASSERT_EQ(m.n_kv_heads, s.n_kv_heads);
  ASSERT_EQ(m.n_q_heads, s.n_q_heads);
  ASSERT_EQ(m.head_dim, s.head_dim);
  ASSERT_EQ(m.n_tokens, n);
  ASSERT_EQ(m.dtype, s.dtype);
  ASSERT_EQ(m.n_sinks, sinks);
  ASSERT_EQ(m.window, win);
  ASSERT_EQ(m.n_clustered, nc);
  // Page geometry.
  const int64_t P = m.page_rows;
  ASSERT_GE(P, storage::kMinPageRows);
  ASSERT_LE(P, storage::kMaxPageRows);
  const int64_t cp = (nc + P - 1) / P, ap = (na + P - 1) / P;
  ASSERT_EQ(m.clustered_pages, cp);
  ASSERT_EQ(m.always_pages, ap);
  const size_t row = static_cast<size_t>(s.head_dim) * DTypeSize(s.dtype);
  const size_t plane = static_cast<size_t>(P) * row;
  ASSERT_EQ(m.page_bytes(), 2 * plane);
  const int64_t heads = static_cast<int64_t>(s.n_layers) * s.n_kv_heads;
  EXPECT_EQ(m.kv_bytes, static_cast<uint64_t>(heads * (cp + ap)) * 2 * plane);

  // The column families hold exactly the context's records: one index record
  // per head and pages 0 .. cp + ap - 1 of every head, in key order.
  {
    auto v = RawView(db);
    const std::string begin = storage::ContextPrefix(m.id), end = storage::ContextEnd(m.id);
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_kv));
    int64_t i = 0;
    for (it->Seek(begin); it->Valid() && it->key().ToString() < end; it->Next(), ++i) {
      uint64_t c;
      uint32_t l, h, p;
      ASSERT_TRUE(storage::DecodePageKey(it->key().ToStringView(), &c, &l, &h, &p)) << "kv record " << i;
      const int64_t per_head = cp + ap;
      ASSERT_EQ(c, m.id);
      ASSERT_EQ(static_cast<int64_t>(l), i / (s.n_kv_heads * per_head)) << "kv record " << i;
      ASSERT_EQ(static_cast<int64_t>(h), (i / per_head) % s.n_kv_heads) << "kv record " << i;
      ASSERT_EQ(static_cast<int64_t>(p), i % per_head) << "kv record " << i;
      ASSERT_EQ(it->value().size(), 2 * plane) << "kv record " << i;
    }
    ASSERT_TRUE(it->status().ok());
    EXPECT_EQ(i, heads * (cp + ap)) << "pages in the kv column family";
    it.reset(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_index));
    i = 0;
    for (it->Seek(begin);
         it->Valid() && it->key().ToString() < end && !storage::IsManifestCopyKey(it->key().ToStringView());
         it->Next(), ++i) {
      ASSERT_EQ(it->key().ToString(), storage::HeadKey(m.id, static_cast<uint32_t>(i / s.n_kv_heads),
                                                       static_cast<uint32_t>(i % s.n_kv_heads)));
    }
    ASSERT_TRUE(it->status().ok());
    EXPECT_EQ(i, heads) << "records in the index column family";
    // Then the redundant copy of the manifest, last in the context's range.
    ASSERT_TRUE(it->Valid());
    EXPECT_EQ(it->key().ToString(), storage::ManifestCopyKey(m.id));
    it->Next();
    EXPECT_TRUE(!it->Valid() || it->key().ToString() >= end);
  }

  for (int l = 0; l < s.n_layers; ++l) {
    for (int h = 0; h < s.n_kv_heads; ++h) {
      SCOPED_TRACE("layer " + std::to_string(l) + " head " + std::to_string(h));
      storage::HeadIndexRecord rec;
      st = snap->GetHeadIndex(l, h, &rec);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_EQ(rec.layer, l);
      ASSERT_EQ(rec.head, h);
      const int64_t k2 = rec.n_fine(), k1 = rec.n_coarse();
      ASSERT_EQ(m.fine_clusters[l * s.n_kv_heads + h], k2);
      ASSERT_EQ(m.coarse_clusters[l * s.n_kv_heads + h], k1);
      ASSERT_EQ(static_cast<int64_t>(rec.fine_centroids.size()), k2 * s.head_dim);
      ASSERT_EQ(static_cast<int64_t>(rec.coarse_centroids.size()), k1 * s.head_dim);
      // Fine clusters: contiguous, non-empty runs of rows covering [0, nc).
      if (nc > 0) {
        ASSERT_GE(k2, 1);
        ASSERT_EQ(rec.fine_offsets.front(), 0u);
        ASSERT_EQ(rec.fine_offsets.back(), static_cast<uint32_t>(nc));
        for (int64_t j = 0; j < k2; ++j) ASSERT_LT(rec.fine_offsets[j], rec.fine_offsets[j + 1]);
        ASSERT_EQ(rec.coarse_child_offsets.front(), 0u);
        ASSERT_EQ(rec.coarse_child_offsets.back(), static_cast<uint32_t>(k2));
        for (int64_t a = 0; a < k1; ++a) ASSERT_LT(rec.coarse_child_offsets[a], rec.coarse_child_offsets[a + 1]);
      }
      ASSERT_EQ(static_cast<int64_t>(rec.permutation.size()), nc);
      ASSERT_EQ(static_cast<int64_t>(rec.page_crc.size()), cp + ap);
      // Token of every stored row; every token exactly once: clustered via
      // the permutation, else in the always set.
      std::vector<int64_t> token(static_cast<size_t>(n));
      std::vector<int> seen(static_cast<size_t>(n), 0);
      for (int64_t r = 0; r < nc; ++r) {
        const uint32_t p = rec.permutation[r];
        ASSERT_GE(p, sinks);
        ASSERT_LT(p, n - win);
        token[r] = p;
        ++seen[p];
      }
      for (int64_t i = 0; i < na; ++i) {
        token[nc + i] = i < sinks ? i : n - win + (i - sinks);
        ++seen[token[nc + i]];
      }
      for (int64_t t = 0; t < n; ++t) ASSERT_EQ(seen[t], 1) << "token " << t;

      std::vector<uint32_t> ids;
      for (int64_t p = 0; p < cp + ap; ++p) ids.push_back(static_cast<uint32_t>(p));
      storage::PageSet pages;
      st = snap->ReadPages(l, h, ids.data(), ids.size(), &pages);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_EQ(pages.size(), ids.size());
      const uint8_t* kin = data.k[l].data() + static_cast<size_t>(h) * n * row;
      const uint8_t* vin = data.v[l].data() + static_cast<size_t>(h) * n * row;
      std::vector<uint8_t> expect(2 * plane);
      for (int64_t p = 0; p < cp + ap; ++p) {
        // Rows of page p: clustered rows [p * P, ...) or always rows.
        const bool clustered = p < cp;
        const int64_t first = clustered ? p * P : nc + (p - cp) * P;
        const int64_t used = std::min<int64_t>(P, (clustered ? nc : n) - first);
        ASSERT_GT(used, 0);
        std::fill(expect.begin(), expect.end(), 0);  // padding rows are zero
        for (int64_t i = 0; i < used; ++i) {
          std::memcpy(expect.data() + i * row, kin + token[first + i] * row, row);
          std::memcpy(expect.data() + plane + i * row, vin + token[first + i] * row, row);
        }
        const uint8_t* got = pages.data(static_cast<size_t>(p));
        ASSERT_EQ(Crc32c(got, 2 * plane), rec.page_crc[p]) << "page " << p;
        for (int64_t i = 0; i < P; ++i) {
          ASSERT_EQ(0, std::memcmp(got + i * row, expect.data() + i * row, row))
              << "K page " << p << " slot " << i << (i < used ? "" : " (padding)");
          ASSERT_EQ(0, std::memcmp(got + plane + i * row, expect.data() + plane + i * row, row))
              << "V page " << p << " slot " << i << (i < used ? "" : " (padding)");
        }
      }
    }
  }
}

}  // namespace sqz::index_test
