#include "records.h"

#include <flatbuffers/flatbuffers.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "format_generated.h"

size_t sqz::ContextInfo::page_bytes() const {
  return 2 * static_cast<size_t>(page_rows) * static_cast<size_t>(head_dim) * DTypeSize(dtype);
}

namespace sqz::storage {

namespace {

template <typename T>
void CopyVector(const flatbuffers::Vector<T>* src, std::vector<T>* dst) {
  dst->clear();
  if (src) dst->assign(src->begin(), src->end());
}

// FlatBuffers needs its scalars aligned; RocksDB values carry no alignment
// guarantee, so decode from an aligned copy.
struct Aligned {
  explicit Aligned(std::string_view bytes) : buf((bytes.size() + 7) / 8) {
    if (!bytes.empty()) std::memcpy(buf.data(), bytes.data(), bytes.size());
    size = bytes.size();
  }
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(buf.data()); }
  std::vector<uint64_t> buf;
  size_t size;
};

// FlatBuffers' Verifier (2.0) checks a vector's length field for 4-byte
// alignment but not its elements for theirs: the elements of an [int64]
// vector can start 4 bytes off an 8-byte boundary, which no builder writes
// and which reading would be an unaligned load (undefined behaviour). Such a
// vector fails verification like any other malformed buffer (found by
// fuzz/fuzz_records). An empty one has nothing to read, and the builder does
// not align it (FlatBufferBuilder::PreAlign skips zero lengths), so it passes.
template <typename T>
bool ElementsAligned(const flatbuffers::Vector<T>* v) {
  return v == nullptr || v->size() == 0 || reinterpret_cast<uintptr_t>(v->data()) % alignof(T) == 0;
}

bool ValidCsr(const std::vector<uint32_t>& o, uint64_t last) {
  if (o.empty() || o[0] != 0 || o.back() != last) return false;
  for (size_t i = 0; i + 1 < o.size(); ++i) {
    if (o[i + 1] <= o[i]) return false;
  }
  return true;
}

bool AllFinite(const std::vector<float>& v) {
  for (float x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace

Status ContextExistsError(const std::string& name, const std::string& db_path) {
  return Status::AlreadyExists("context '" + name + "' already exists in " + db_path +
                               " (rebuild it with --replace / BuildOptions::replace, or drop it first)");
}

int64_t PagesFor(int64_t rows, int page_rows) { return page_rows > 0 ? (rows + page_rows - 1) / page_rows : 0; }

int64_t PageOfRow(const ContextInfo& info, int64_t row) {
  if (row < info.n_clustered) return row / info.page_rows;
  return info.clustered_pages + (row - info.n_clustered) / info.page_rows;
}

int64_t SlotOfRow(const ContextInfo& info, int64_t row) {
  if (row < info.n_clustered) return row % info.page_rows;
  return (row - info.n_clustered) % info.page_rows;
}

Status ValidateManifest(const ContextInfo& m) {
  const std::string ctx = "context '" + m.name + "'";
  auto bad = [&](const std::string& what) { return Status::Corruption(ctx + ": manifest: " + what); };
  if (m.format_version != kFormatVersion) {
    return Status::NotSupported(ctx + ": written in format version " + std::to_string(m.format_version) +
                                "; this build reads version " + std::to_string(kFormatVersion));
  }
  if (m.id == 0) return bad("context id 0");
  if (m.n_layers <= 0 || m.n_kv_heads <= 0 || m.head_dim <= 0 || m.n_tokens <= 0 || m.n_q_heads <= 0 ||
      m.n_q_heads % m.n_kv_heads != 0) {
    return bad("shapes are inconsistent");
  }
  if (m.n_tokens >= (int64_t{1} << 32)) return bad("too many tokens");
  if (static_cast<uint8_t>(m.dtype) > static_cast<uint8_t>(DType::kBF16)) return bad("unknown dtype");
  if (m.window < 0 || m.n_sinks < 0 || m.n_clustered < 0 || m.n_clustered != m.n_tokens - m.window - m.n_sinks) {
    return bad("window, sinks and n_clustered do not add up to n_tokens");
  }
  if (m.page_rows < kMinPageRows || m.page_rows > kMaxPageRows) {
    return bad("page_rows " + std::to_string(m.page_rows) + " out of range");
  }
  if (m.clustered_pages != PagesFor(m.n_clustered, m.page_rows) ||
      m.always_pages != PagesFor(m.n_always(), m.page_rows) || m.pages_per_head() >= (int64_t{1} << 32)) {
    return bad("page counts do not match n_clustered, the always set and page_rows");
  }
  const size_t cells = static_cast<size_t>(m.n_layers) * m.n_kv_heads;
  if (m.fine_clusters.size() != cells || m.coarse_clusters.size() != cells) {
    return bad("cluster-count tables have the wrong length");
  }
  for (size_t i = 0; i < cells; ++i) {
    const int64_t k2 = m.fine_clusters[i], k1 = m.coarse_clusters[i];
    if (k2 < 0 || k2 > m.n_clustered || k1 < 0 || k1 > k2 || (m.n_clustered > 0 && (k2 == 0 || k1 == 0))) {
      return bad("cluster counts out of range");
    }
  }
  for (int64_t c : m.cluster_size_histogram) {
    if (c < 0) return bad("negative cluster-size histogram entry");
  }
  if (m.calibration_queries < 0) return bad("negative calibration query count");
  for (const ThresholdInfo& t : m.thresholds) {
    if (!(t.quantile > 0 && t.quantile < 1) || !std::isfinite(t.flat) || !std::isfinite(t.coarse) ||
        !std::isfinite(t.fine)) {
      return bad("invalid threshold");
    }
  }
  return Status::OK();
}

Status ValidateHeadIndex(const ContextInfo& m, int layer, int head, const HeadIndexRecord& h, bool full,
                         const std::string& where) {
  auto bad = [&](const std::string& what) { return Status::Corruption(where + ": " + what); };
  const int64_t d = m.head_dim, n = m.n_clustered;
  if (h.layer != layer || h.head != head) return bad("record names a different layer/head");
  const int64_t k2 = h.n_fine(), k1 = h.n_coarse();
  if (layer < 0 || layer >= m.n_layers || head < 0 || head >= m.n_kv_heads) return bad("layer/head out of range");
  const size_t cell = static_cast<size_t>(layer) * m.n_kv_heads + head;
  if (!m.fine_clusters.empty() && (cell >= m.fine_clusters.size() || cell >= m.coarse_clusters.size() ||
                                   m.fine_clusters[cell] != k2 || m.coarse_clusters[cell] != k1)) {
    return bad("cluster counts differ from the manifest");
  }
  if (!ValidCsr(h.fine_offsets, static_cast<uint64_t>(n))) {
    return bad("fine offsets do not span 0..n_clustered strictly increasing");
  }
  if (!ValidCsr(h.coarse_child_offsets, static_cast<uint64_t>(k2))) {
    return bad("coarse child offsets do not span 0..K2 strictly increasing");
  }
  if (static_cast<int64_t>(h.fine_centroids.size()) != k2 * d ||
      static_cast<int64_t>(h.coarse_centroids.size()) != k1 * d) {
    return bad("centroid tables have the wrong size");
  }
  if (!AllFinite(h.fine_centroids) || !AllFinite(h.coarse_centroids)) return bad("non-finite centroid");
  if (static_cast<int64_t>(h.permutation.size()) != n) return bad("permutation has the wrong size");
  if (static_cast<int64_t>(h.page_crc.size()) != m.pages_per_head()) return bad("page CRC table has the wrong size");
  if (full) {
    const int64_t first = m.n_sinks, last = m.n_tokens - m.window;  // clustered positions: [first, last)
    std::vector<bool> seen(static_cast<size_t>(n), false);
    for (uint32_t p : h.permutation) {
      if (p < first || p >= last || seen[p - first]) {
        return bad("permutation is not a permutation of the clustered tokens");
      }
      seen[p - first] = true;
    }
  }
  return Status::OK();
}

std::string EncodeManifest(const ContextInfo& info) {
  flatbuffers::FlatBufferBuilder fbb(4096);
  std::vector<flatbuffers::Offset<fb::Threshold>> toff;
  for (const auto& t : info.thresholds) toff.push_back(fb::CreateThreshold(fbb, t.quantile, t.flat, t.coarse, t.fine));
  auto name = fbb.CreateString(info.name);
  auto model = fbb.CreateString(info.model);
  auto fine = fbb.CreateVector(info.fine_clusters);
  auto coarse = fbb.CreateVector(info.coarse_clusters);
  auto th = fbb.CreateVector(toff);
  auto hist = fbb.CreateVector(info.cluster_size_histogram);
  fb::ManifestBuilder mb(fbb);
  mb.add_format_version(info.format_version);
  mb.add_context_id(info.id);
  mb.add_name(name);
  mb.add_model(model);
  mb.add_n_layers(info.n_layers);
  mb.add_n_kv_heads(info.n_kv_heads);
  mb.add_n_q_heads(info.n_q_heads);
  mb.add_head_dim(info.head_dim);
  mb.add_n_tokens(info.n_tokens);
  mb.add_dtype(static_cast<uint8_t>(info.dtype));
  mb.add_window(info.window);
  mb.add_n_sinks(info.n_sinks);
  mb.add_n_clustered(info.n_clustered);
  mb.add_fine_ratio(info.fine_ratio);
  mb.add_coarse_ratio(info.coarse_ratio);
  mb.add_kmeans_iters(info.kmeans_iters);
  mb.add_seed(info.seed);
  mb.add_fine_clusters(fine);
  mb.add_coarse_clusters(coarse);
  mb.add_calibration_queries(info.calibration_queries);
  mb.add_thresholds(th);
  mb.add_kv_bytes(info.kv_bytes);
  mb.add_index_bytes(info.index_bytes);
  mb.add_build_seconds(info.build_seconds);
  mb.add_created_unix(info.created_unix);
  mb.add_page_rows(info.page_rows);
  mb.add_clustered_pages(info.clustered_pages);
  mb.add_always_pages(info.always_pages);
  mb.add_cluster_size_histogram(hist);
  fbb.Finish(mb.Finish());
  return std::string(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
}

Status DecodeManifest(std::string_view bytes, const std::string& where, ContextInfo* info) {
  Aligned a(bytes);
  flatbuffers::Verifier v(a.data(), a.size);
  const fb::Manifest* m = fb::VerifyManifestBuffer(v) ? fb::GetManifest(a.data()) : nullptr;
  if (m == nullptr || !ElementsAligned(m->cluster_size_histogram())) {
    return Status::Corruption(where + ": manifest fails FlatBuffers verification");
  }
  *info = ContextInfo();
  info->format_version = m->format_version();
  info->id = m->context_id();
  info->name = m->name() ? m->name()->str() : "";
  info->model = m->model() ? m->model()->str() : "";
  info->n_layers = m->n_layers();
  info->n_kv_heads = m->n_kv_heads();
  info->n_q_heads = m->n_q_heads();
  info->head_dim = m->head_dim();
  info->n_tokens = m->n_tokens();
  info->dtype = static_cast<DType>(m->dtype());
  info->window = m->window();
  info->n_sinks = m->n_sinks();
  info->n_clustered = m->n_clustered();
  info->fine_ratio = m->fine_ratio();
  info->coarse_ratio = m->coarse_ratio();
  info->kmeans_iters = m->kmeans_iters();
  info->seed = m->seed();
  CopyVector(m->fine_clusters(), &info->fine_clusters);
  CopyVector(m->coarse_clusters(), &info->coarse_clusters);
  info->calibration_queries = m->calibration_queries();
  if (m->thresholds()) {
    for (const fb::Threshold* t : *m->thresholds()) {
      info->thresholds.push_back({t->quantile(), t->flat(), t->coarse(), t->fine()});
    }
  }
  info->kv_bytes = m->kv_bytes();
  info->index_bytes = m->index_bytes();
  info->build_seconds = m->build_seconds();
  info->created_unix = m->created_unix();
  info->page_rows = m->page_rows();
  info->clustered_pages = m->clustered_pages();
  info->always_pages = m->always_pages();
  CopyVector(m->cluster_size_histogram(), &info->cluster_size_histogram);
  return ValidateManifest(*info).WithPrefix(where);
}

std::string EncodeHeadIndex(const ContextInfo& info, const HeadIndexRecord& rec) {
  flatbuffers::FlatBufferBuilder fbb(1024 + 4 * (rec.fine_centroids.size() + rec.permutation.size()));
  auto fc = fbb.CreateVector(rec.fine_centroids);
  auto fo = fbb.CreateVector(rec.fine_offsets);
  auto cc = fbb.CreateVector(rec.coarse_centroids);
  auto co = fbb.CreateVector(rec.coarse_child_offsets);
  auto perm = fbb.CreateVector(rec.permutation);
  auto crc = fbb.CreateVector(rec.page_crc);
  fb::HeadIndexBuilder b(fbb);
  b.add_layer(rec.layer);
  b.add_head(rec.head);
  b.add_head_dim(info.head_dim);
  b.add_n_clustered(info.n_clustered);
  b.add_fine_centroids(fc);
  b.add_fine_offsets(fo);
  b.add_coarse_centroids(cc);
  b.add_coarse_child_offsets(co);
  b.add_permutation(perm);
  b.add_page_crc(crc);
  fbb.Finish(b.Finish());
  return std::string(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
}

Status DecodeHeadIndex(std::string_view bytes, const ContextInfo& info, int layer, int head, bool full,
                       const std::string& where, HeadIndexRecord* rec) {
  Aligned a(bytes);
  flatbuffers::Verifier v(a.data(), a.size);
  if (!v.VerifyBuffer<fb::HeadIndex>(nullptr)) {
    return Status::Corruption(where + ": index record fails FlatBuffers verification");
  }
  const fb::HeadIndex* h = flatbuffers::GetRoot<fb::HeadIndex>(a.data());
  if (h->head_dim() != info.head_dim || h->n_clustered() != info.n_clustered) {
    return Status::Corruption(where + ": index record's head_dim/n_clustered differ from the manifest");
  }
  *rec = HeadIndexRecord();
  rec->layer = h->layer();
  rec->head = h->head();
  CopyVector(h->fine_centroids(), &rec->fine_centroids);
  CopyVector(h->fine_offsets(), &rec->fine_offsets);
  CopyVector(h->coarse_centroids(), &rec->coarse_centroids);
  CopyVector(h->coarse_child_offsets(), &rec->coarse_child_offsets);
  CopyVector(h->permutation(), &rec->permutation);
  CopyVector(h->page_crc(), &rec->page_crc);
  return ValidateHeadIndex(info, layer, head, *rec, full, where);
}

}  // namespace sqz::storage
