// DBImpl::VerifyContext: reads every record of a context and checks it.
#include <rocksdb/db.h>

#include <cmath>
#include <vector>

#include "db_impl.h"
#include "util/crc32c.h"

namespace sqz::storage {

namespace {

// Checks the structure of one HeadIndex against the manifest.
Status CheckHeadIndex(const fb::Manifest& m, const fb::HeadIndex& h, int layer, int head, const std::string& where) {
  auto bad = [&](const std::string& what) { return Status::Corruption(where + ": " + what); };
  const int64_t d = m.head_dim();
  if (h.layer() != layer || h.head() != head) return bad("record names a different layer/head");
  if (h.head_dim() != d) return bad("head_dim differs from the manifest");
  if (h.n_clustered() != m.n_clustered()) return bad("n_clustered differs from the manifest");
  const int64_t n = h.n_clustered();
  if (!h.fine_offsets() || !h.fine_centroids() || !h.coarse_centroids() || !h.coarse_child_offsets() ||
      !h.permutation() || !h.always_positions() || !h.block_crc()) {
    return bad("a required vector is missing");
  }
  const auto& fo = *h.fine_offsets();
  if (fo.size() < 1) return bad("fine_offsets is empty");
  const int64_t k2 = static_cast<int64_t>(fo.size()) - 1;
  const size_t cell = static_cast<size_t>(layer) * m.n_kv_heads() + head;
  if (!m.fine_clusters() || cell >= m.fine_clusters()->size() || m.fine_clusters()->Get(cell) != k2) {
    return bad("fine cluster count differs from the manifest");
  }
  if (fo.Get(0) != 0 || static_cast<int64_t>(fo.Get(fo.size() - 1)) != n) return bad("fine_offsets do not span 0..n");
  for (int64_t j = 0; j < k2; ++j) {
    if (fo.Get(j + 1) <= fo.Get(j)) return bad("fine_offsets not strictly increasing (empty cluster " +
                                                std::to_string(j) + ")");
  }
  if (static_cast<int64_t>(h.fine_centroids()->size()) != k2 * d) return bad("fine_centroids has the wrong size");
  for (float x : *h.fine_centroids()) {
    if (!std::isfinite(x)) return bad("non-finite fine centroid");
  }
  const auto& co = *h.coarse_child_offsets();
  if (co.size() < 1) return bad("coarse_child_offsets is empty");
  const int64_t k1 = static_cast<int64_t>(co.size()) - 1;
  if (!m.coarse_clusters() || cell >= m.coarse_clusters()->size() || m.coarse_clusters()->Get(cell) != k1) {
    return bad("coarse cluster count differs from the manifest");
  }
  if (co.Get(0) != 0 || static_cast<int64_t>(co.Get(co.size() - 1)) != k2) return bad("coarse_child_offsets do not span 0..K2");
  for (int64_t a = 0; a < k1; ++a) {
    if (co.Get(a + 1) <= co.Get(a)) return bad("empty coarse cluster " + std::to_string(a));
  }
  if (static_cast<int64_t>(h.coarse_centroids()->size()) != k1 * d) return bad("coarse_centroids has the wrong size");
  for (float x : *h.coarse_centroids()) {
    if (!std::isfinite(x)) return bad("non-finite coarse centroid");
  }
  // The permutation must be a bijection onto the clustered positions.
  const auto& perm = *h.permutation();
  if (static_cast<int64_t>(perm.size()) != n) return bad("permutation has the wrong size");
  const int64_t first = m.n_sinks(), last = m.n_tokens() - m.window();  // clustered: [first, last)
  std::vector<bool> seen(static_cast<size_t>(n), false);
  for (uint32_t p : perm) {
    if (p < first || p >= last || seen[p - first]) return bad("permutation is not a permutation of the clustered tokens");
    seen[p - first] = true;
  }
  const auto& always = *h.always_positions();
  if (static_cast<int64_t>(always.size()) != m.n_sinks() + m.window()) return bad("always_positions has the wrong size");
  for (int i = 0; i < m.n_sinks(); ++i) {
    if (always.Get(i) != static_cast<uint32_t>(i)) return bad("always_positions: wrong sink position");
  }
  for (int i = 0; i < m.window(); ++i) {
    if (always.Get(m.n_sinks() + i) != static_cast<uint32_t>(last + i)) return bad("always_positions: wrong window position");
  }
  if (static_cast<int64_t>(h.block_crc()->size()) != k2 + 1) return bad("block_crc has the wrong size");
  return Status::OK();
}

}  // namespace

Status DBImpl::VerifyContext(const std::string& name, VerifyReport* report) {
  VerifyReport local;
  if (!report) report = &local;
  *report = VerifyReport();
  std::string mbytes;
  SQZ_RETURN_IF_ERROR(GetManifest(name, &mbytes));
  const fb::Manifest* m = fb::GetManifest(mbytes.data());
  report->records_checked++;
  const std::string ctxw = "context '" + name + "'";
  if (m->format_version() == 0 || m->format_version() > kFormatVersion) {
    return Status::Corruption(ctxw + ": manifest has an unknown format version");
  }
  DType dtype;
  if (m->dtype() > static_cast<uint8_t>(DType::kBF16)) return Status::Corruption(ctxw + ": unknown dtype");
  dtype = static_cast<DType>(m->dtype());
  if (m->n_layers() <= 0 || m->n_kv_heads() <= 0 || m->head_dim() <= 0 || m->n_tokens() <= 0 ||
      m->n_q_heads() <= 0 || m->n_q_heads() % m->n_kv_heads() != 0 || m->window() < 0 || m->n_sinks() < 0 ||
      m->n_clustered() != m->n_tokens() - m->window() - m->n_sinks() || m->n_clustered() < 0) {
    return Status::Corruption(ctxw + ": manifest shapes are inconsistent");
  }
  const size_t row_bytes = static_cast<size_t>(m->head_dim()) * DTypeSize(dtype);
  const uint64_t ctx = m->context_id();

  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.fill_cache = false;
  for (int layer = 0; layer < m->n_layers(); ++layer) {
    for (int head = 0; head < m->n_kv_heads(); ++head) {
      const std::string where = ctxw + " layer " + std::to_string(layer) + " head " + std::to_string(head);
      std::string hbytes;
      SQZ_RETURN_IF_ERROR(GetHeadIndex(ctx, layer, head, &hbytes).WithPrefix(ctxw));
      report->records_checked++;
      report->bytes_checked += hbytes.size();
      const fb::HeadIndex* h = flatbuffers::GetRoot<fb::HeadIndex>(hbytes.data());
      SQZ_RETURN_IF_ERROR(CheckHeadIndex(*m, *h, layer, head, where));
      const auto& fo = *h->fine_offsets();
      const uint32_t k2 = fo.size() - 1;
      // Walk the head's key range: exactly blocks 0..K2-1 then the always block.
      std::string begin = HeadKey(ctx, layer, head);
      std::string end = head + 1 < m->n_kv_heads() ? HeadKey(ctx, layer, head + 1) : HeadKey(ctx, layer + 1, 0);
      rocksdb::Slice upper(end);
      rocksdb::ReadOptions iro = ro;
      iro.iterate_upper_bound = &upper;
      std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(iro, cf_kv_));
      uint32_t expect = 0;
      for (it->Seek(begin); it->Valid(); it->Next()) {
        uint64_t c;
        uint32_t l, hh, block;
        if (!DecodeBlockKey(it->key().ToStringView(), &c, &l, &hh, &block)) {
          return Status::Corruption(where + ": malformed KV block key");
        }
        uint32_t want = expect < k2 ? expect : kAlwaysBlock;
        if (expect > k2 || block != want) {
          return Status::Corruption(where + ": unexpected KV block " + std::to_string(block) + " (expected " +
                                    std::to_string(want) + ")");
        }
        uint64_t rows = block == kAlwaysBlock ? static_cast<uint64_t>(m->n_sinks() + m->window())
                                              : fo.Get(block + 1) - fo.Get(block);
        rocksdb::Slice v = it->value();
        if (v.size() != 2 * rows * row_bytes) {
          return Status::Corruption(where + ": KV block " + std::to_string(block) + " has " + std::to_string(v.size()) +
                                    " bytes, expected " + std::to_string(2 * rows * row_bytes));
        }
        uint32_t crc_index = block == kAlwaysBlock ? k2 : block;
        if (Crc32c(v.data(), v.size()) != h->block_crc()->Get(crc_index)) {
          return Status::Corruption(where + ": KV block " + std::to_string(block) + " fails its CRC32C check");
        }
        report->kv_pages_checked++;
        report->bytes_checked += v.size();
        ++expect;
      }
      SQZ_RETURN_IF_ERROR(FromRocks(it->status(), where + ": reading KV blocks"));
      if (expect != k2 + 1) {
        return Status::Corruption(where + ": " + std::to_string(k2 + 1 - expect) + " KV block(s) missing");
      }
    }
  }
  return Status::OK();
}

}  // namespace sqz::storage
