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

#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "storage/db_impl.h"
#include "storage/format.h"
#include "format_generated.h"
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
      t.push_back({p + "q_window", "F32", data.QShape(),
                   std::string(reinterpret_cast<const char*>(q.data()), q.size() * 4)});
    }
  }
  return t;
}

inline std::map<std::string, std::string> KvMetadata(const KvData& data) {
  return {{"n_q_heads", std::to_string(data.spec.n_q_heads)}, {"model", "test-model"}};
}

// --- Raw database inspection ---------------------------------------------------

// Context ids present in the index and kv column families.
inline std::set<uint64_t> RawContextIds(DB* db) {
  storage::DBImpl* impl = storage::Impl(db);
  std::set<uint64_t> ids;
  for (auto* cf : {impl->cf_index(), impl->cf_kv()}) {
    std::unique_ptr<rocksdb::Iterator> it(impl->raw()->NewIterator(rocksdb::ReadOptions(), cf));
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
    std::string bytes;
    EXPECT_TRUE(storage::Impl(db)->GetManifest(n, &bytes).ok());
    ids.insert(fb::GetManifest(bytes.data())->context_id());
  }
  return ids;
}

// Checks that every stored K/V value of context `name` equals `data` bit for
// bit (through the head index, the permutation and the always block), plus
// block CRCs and the structure of every head index.
inline void ExpectRoundTrip(DB* db, const std::string& name, const KvData& data, int window, int n_sinks) {
  storage::DBImpl* impl = storage::Impl(db);
  std::string mbytes;
  ASSERT_TRUE(impl->GetManifest(name, &mbytes).ok());
  const fb::Manifest* m = fb::GetManifest(mbytes.data());
  const KvSpec& s = data.spec;
  const int64_t n = s.n_tokens;
  const int64_t sinks = std::min<int64_t>(n_sinks, n);
  const int64_t win = std::min<int64_t>(window, n - sinks);
  const int64_t nc = n - sinks - win;
  ASSERT_EQ(m->n_layers(), s.n_layers);
  ASSERT_EQ(m->n_kv_heads(), s.n_kv_heads);
  ASSERT_EQ(m->n_clustered(), nc);
  const size_t row = static_cast<size_t>(s.head_dim) * DTypeSize(s.dtype);
  for (int l = 0; l < s.n_layers; ++l) {
    for (int h = 0; h < s.n_kv_heads; ++h) {
      SCOPED_TRACE("layer " + std::to_string(l) + " head " + std::to_string(h));
      std::string ib;
      ASSERT_TRUE(impl->GetHeadIndex(m->context_id(), l, h, &ib).ok());
      const fb::HeadIndex* hi = flatbuffers::GetRoot<fb::HeadIndex>(ib.data());
      ASSERT_EQ(hi->layer(), l);
      ASSERT_EQ(hi->head(), h);
      ASSERT_EQ(hi->head_dim(), s.head_dim);
      ASSERT_EQ(hi->n_clustered(), nc);
      const auto* fo = hi->fine_offsets();
      const auto* perm = hi->permutation();
      const auto* always = hi->always_positions();
      const auto* crc = hi->block_crc();
      const int64_t k2 = static_cast<int64_t>(fo->size()) - 1;
      ASSERT_EQ(m->fine_clusters()->Get(l * s.n_kv_heads + h), k2);
      ASSERT_EQ(m->coarse_clusters()->Get(l * s.n_kv_heads + h),
                static_cast<int64_t>(hi->coarse_child_offsets()->size()) - 1);
      ASSERT_EQ(static_cast<int64_t>(perm->size()), nc);
      ASSERT_EQ(static_cast<int64_t>(always->size()), sinks + win);
      ASSERT_EQ(static_cast<int64_t>(crc->size()), k2 + 1);
      // Every token exactly once: clustered via the permutation, else always.
      std::vector<int> seen(static_cast<size_t>(n), 0);
      for (uint32_t p : *perm) {
        ASSERT_GE(p, sinks);
        ASSERT_LT(p, n - win);
        ++seen[p];
      }
      for (int64_t i = 0; i < sinks + win; ++i) {
        const int64_t expect = i < sinks ? i : n - win + (i - sinks);
        ASSERT_EQ(always->Get(static_cast<uint32_t>(i)), expect);
        ++seen[expect];
      }
      for (int64_t t = 0; t < n; ++t) ASSERT_EQ(seen[t], 1) << "token " << t;

      std::vector<uint32_t> ids;
      for (int64_t j = 0; j < k2; ++j) ids.push_back(static_cast<uint32_t>(j));
      ids.push_back(storage::kAlwaysBlock);
      std::vector<rocksdb::PinnableSlice> blocks;
      ASSERT_TRUE(impl->MultiGetBlocks(m->context_id(), l, h, ids.data(), ids.size(), &blocks).ok());
      const uint8_t* kin = data.k[l].data() + static_cast<size_t>(h) * n * row;
      const uint8_t* vin = data.v[l].data() + static_cast<size_t>(h) * n * row;
      for (int64_t j = 0; j <= k2; ++j) {
        std::vector<int64_t> pos;
        if (j < k2) {
          for (uint32_t p = fo->Get(j); p < fo->Get(j + 1); ++p) pos.push_back(perm->Get(p));
        } else {
          for (uint32_t p : *always) pos.push_back(p);
        }
        const rocksdb::PinnableSlice& b = blocks[j];
        ASSERT_EQ(b.size(), 2 * pos.size() * row) << "block " << j;
        ASSERT_EQ(Crc32c(b.data(), b.size()), crc->Get(j)) << "block " << j;
        for (size_t i = 0; i < pos.size(); ++i) {
          ASSERT_EQ(0, std::memcmp(b.data() + i * row, kin + pos[i] * row, row)) << "K block " << j << " row " << i;
          ASSERT_EQ(0, std::memcmp(b.data() + (pos.size() + i) * row, vin + pos[i] * row, row))
              << "V block " << j << " row " << i;
        }
      }
    }
  }
}

}  // namespace sqz::index_test
