#include "engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "query/attention.h"
#include "db_impl.h"
#include "format_generated.h"
#include "util/half.h"

namespace sqz {

int64_t AttendStats::keys_selected() const {
  int64_t n = 0;
  for (const HeadStats& h : heads) n += h.keys_selected;
  return n;
}

uint64_t AttendStats::bytes_read() const {
  uint64_t n = 0;
  for (const HeadStats& h : heads) n += h.bytes_read;
  return n;
}

Status ContextHandle::Open(DB* db, const std::string& name, std::unique_ptr<ContextHandle>* out) {
  std::unique_ptr<query::ContextHandleImpl> impl;
  SQZ_RETURN_IF_ERROR(query::ContextHandleImpl::Open(db, name, &impl));
  *out = std::move(impl);
  return Status::OK();
}

}  // namespace sqz

namespace sqz::query {

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

template <typename T>
void CopyVector(const flatbuffers::Vector<T>* src, std::vector<T>* dst) {
  dst->clear();
  if (src) dst->assign(src->begin(), src->end());
}

// True if offsets is a CSR table 0 = o[0] < o[1] < ... < o[n] = last.
bool ValidCsr(const std::vector<uint32_t>& offsets, size_t n, uint64_t last) {
  if (offsets.size() != n + 1 || offsets[0] != 0 || offsets[n] != last) return false;
  for (size_t i = 0; i < n; ++i) {
    if (offsets[i + 1] <= offsets[i]) return false;
  }
  return true;
}

std::string FormatQuantiles(const std::vector<ThresholdInfo>& ts) {
  std::ostringstream os;
  for (size_t i = 0; i < ts.size(); ++i) os << (i ? ", " : "") << ts[i].quantile;
  return os.str();
}

// KvRows of blocks from ContextHandleImpl::ReadBlocks (always block first iff
// h.n_always > 0, then one block per requested cluster); bytes_read is left
// to the caller.
void ConvertBlocks(const HeadData& h, const std::vector<RowBlock>& blocks, DType dtype, int d, KvRows* out) {
  const size_t first = h.n_always > 0 ? 1 : 0;
  out->n_always = h.n_always;
  out->cluster_begin.resize(blocks.size() - first + 1);
  int64_t rows = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (b >= first) out->cluster_begin[b - first] = rows;
    rows += blocks[b].n;
  }
  out->cluster_begin.back() = rows;
  out->rows = rows;
  out->k.resize(static_cast<size_t>(rows) * d);
  out->v.resize(static_cast<size_t>(rows) * d);
  int64_t row = 0;
  for (const RowBlock& b : blocks) {
    const size_t count = static_cast<size_t>(b.n) * d;
    ConvertToFloat(b.k, dtype, count, out->k.data() + row * d);
    ConvertToFloat(b.v, dtype, count, out->v.data() + row * d);
    row += b.n;
  }
}

// Scratch of one AttendHead call (see there).
struct Scratch {
  KvRows kv;
  std::vector<RowBlock> blocks;
  std::vector<float> qm, om, lm, ks, vs, scores;

  size_t Bytes() const {
    return 4 * (kv.k.capacity() + kv.v.capacity() + qm.capacity() + om.capacity() + lm.capacity() +
                ks.capacity() + vs.capacity() + scores.capacity());
  }
  void TrimTo(size_t keep) {
    if (Bytes() <= keep) return;
    *this = Scratch();
  }
};

// A decode step at budget 1/8 of a 128K context needs 16 MiB per KV head;
// a dense call on it 128 MiB, which is given back rather than kept per thread.
constexpr size_t kScratchKeepBytes = size_t{64} << 20;

}  // namespace

std::string ContextHandleImpl::Where(int layer, int kv_head) const {
  return "context '" + info_.name + "' layer " + std::to_string(layer) + " KV head " + std::to_string(kv_head);
}

IndexView ContextHandleImpl::View(int layer, int kv_head) const {
  const HeadData& h = head(layer, kv_head);
  IndexView v;
  v.head_dim = info_.head_dim;
  v.n_clustered = info_.n_clustered;
  v.k2 = h.k2;
  v.k1 = h.k1;
  v.fine_centroids = h.fine_centroids.data();
  v.fine_sizes = h.fine_sizes.data();
  v.coarse_centroids = h.coarse_centroids.data();
  v.coarse_sizes = h.coarse_sizes.data();
  v.coarse_child_offsets = h.coarse_child_offsets.data();
  return v;
}

Status ContextHandleImpl::Open(DB* db, const std::string& name, std::unique_ptr<ContextHandleImpl>* out) {
  if (db == nullptr) return Status::InvalidArgument("ContextHandle::Open: db is null");
  std::unique_ptr<ContextHandleImpl> h(new ContextHandleImpl());
  h->db_ = storage::Impl(db);

  // One read of the manifest: the id and the shapes come from the same
  // version even if the context is replaced meanwhile.
  std::string bytes;
  SQZ_RETURN_IF_ERROR(h->db_->GetManifest(name, &bytes));
  const fb::Manifest* m = fb::GetManifest(bytes.data());
  ContextInfo& info = h->info_;
  info.name = name;
  info.id = m->context_id();
  info.model = m->model() ? m->model()->str() : "";
  info.n_layers = m->n_layers();
  info.n_kv_heads = m->n_kv_heads();
  info.n_q_heads = m->n_q_heads();
  info.head_dim = m->head_dim();
  info.n_tokens = m->n_tokens();
  info.dtype = static_cast<DType>(m->dtype());
  info.window = m->window();
  info.n_sinks = m->n_sinks();
  info.n_clustered = m->n_clustered();
  info.fine_ratio = m->fine_ratio();
  info.coarse_ratio = m->coarse_ratio();
  info.kmeans_iters = m->kmeans_iters();
  info.seed = m->seed();
  CopyVector(m->fine_clusters(), &info.fine_clusters);
  CopyVector(m->coarse_clusters(), &info.coarse_clusters);
  info.calibration_queries = m->calibration_queries();
  if (m->thresholds()) {
    for (const fb::Threshold* t : *m->thresholds()) {
      info.thresholds.push_back({t->quantile(), t->flat(), t->coarse(), t->fine()});
    }
  }
  info.kv_bytes = m->kv_bytes();
  info.index_bytes = m->index_bytes();
  info.build_seconds = m->build_seconds();
  info.created_unix = m->created_unix();

  const std::string ctx = "context '" + name + "'";
  if (info.n_layers <= 0 || info.n_kv_heads <= 0 || info.n_q_heads <= 0 || info.head_dim <= 0 ||
      info.n_q_heads % info.n_kv_heads != 0 || info.n_tokens <= 0 || info.n_clustered < 0 ||
      info.n_clustered > info.n_tokens) {
    return Status::Corruption(ctx + ": manifest has inconsistent shapes");
  }
  if (m->dtype() > static_cast<uint8_t>(DType::kBF16)) {
    return Status::Corruption(ctx + ": manifest has unknown dtype " + std::to_string(m->dtype()));
  }
  const size_t n_heads = static_cast<size_t>(info.n_layers) * info.n_kv_heads;
  if ((!info.fine_clusters.empty() && info.fine_clusters.size() != n_heads) ||
      (!info.coarse_clusters.empty() && info.coarse_clusters.size() != n_heads)) {
    return Status::Corruption(ctx + ": manifest cluster-count tables have the wrong length");
  }

  h->heads_.resize(n_heads);
  for (int layer = 0; layer < info.n_layers; ++layer) {
    for (int g = 0; g < info.n_kv_heads; ++g) {
      std::string rec;
      Status s = h->db_->GetHeadIndex(info.id, layer, g, &rec);
      if (!s.ok()) return s.WithPrefix(ctx);
      SQZ_RETURN_IF_ERROR(h->LoadHead(layer, g, rec, &h->heads_[layer * info.n_kv_heads + g]));
    }
  }
  *out = std::move(h);
  return Status::OK();
}

Status ContextHandleImpl::LoadHead(int layer, int kv_head, const std::string& bytes, HeadData* h) const {
  const fb::HeadIndex* r = flatbuffers::GetRoot<fb::HeadIndex>(bytes.data());
  const std::string where = Where(layer, kv_head);
  const int d = info_.head_dim;
  if (r->layer() != layer || r->head() != kv_head || r->head_dim() != d || r->n_clustered() != info_.n_clustered) {
    return Status::Corruption(where + ": index record does not match the manifest (layer/head/head_dim/n_clustered)");
  }
  CopyVector(r->fine_centroids(), &h->fine_centroids);
  CopyVector(r->fine_offsets(), &h->fine_offsets);
  CopyVector(r->coarse_centroids(), &h->coarse_centroids);
  CopyVector(r->coarse_child_offsets(), &h->coarse_child_offsets);
  // No clusters at all (n_clustered == 0) may come with empty tables.
  if (h->fine_offsets.empty()) h->fine_offsets.push_back(0);
  if (h->coarse_child_offsets.empty()) h->coarse_child_offsets.push_back(0);
  h->k2 = static_cast<int32_t>(h->fine_offsets.size() - 1);
  h->k1 = static_cast<int32_t>(h->coarse_child_offsets.size() - 1);
  CopyVector(r->always_positions(), &h->always_positions);
  h->n_always = static_cast<int64_t>(h->always_positions.size());

  const size_t idx = static_cast<size_t>(layer) * info_.n_kv_heads + kv_head;
  if (!ValidCsr(h->fine_offsets, h->k2, static_cast<uint64_t>(info_.n_clustered)) ||
      h->fine_centroids.size() != static_cast<size_t>(h->k2) * d ||
      (!info_.fine_clusters.empty() && info_.fine_clusters[idx] != h->k2)) {
    return Status::Corruption(where + ": fine level of the index is inconsistent (offsets, centroids or count)");
  }
  if (!ValidCsr(h->coarse_child_offsets, h->k1, static_cast<uint64_t>(h->k2)) ||
      h->coarse_centroids.size() != static_cast<size_t>(h->k1) * d ||
      (!info_.coarse_clusters.empty() && info_.coarse_clusters[idx] != h->k1)) {
    return Status::Corruption(where + ": coarse level of the index is inconsistent (offsets, centroids or count)");
  }
  if (h->n_always != info_.n_tokens - info_.n_clustered) {
    return Status::Corruption(where + ": always set has " + std::to_string(h->n_always) + " positions, expected " +
                              std::to_string(info_.n_tokens - info_.n_clustered));
  }
  h->fine_sizes.resize(h->k2);
  for (int32_t j = 0; j < h->k2; ++j) h->fine_sizes[j] = h->fine_offsets[j + 1] - h->fine_offsets[j];
  h->coarse_sizes.resize(h->k1);
  for (int32_t a = 0; a < h->k1; ++a) {
    h->coarse_sizes[a] = h->fine_offsets[h->coarse_child_offsets[a + 1]] - h->fine_offsets[h->coarse_child_offsets[a]];
  }
  return Status::OK();
}

Status ContextHandleImpl::CheckQueries(int layer, const float* q, int T) const {
  const std::string ctx = "context '" + info_.name + "'";
  if (layer < 0 || layer >= info_.n_layers) {
    return Status::InvalidArgument(ctx + ": layer " + std::to_string(layer) + " out of range [0, " +
                                   std::to_string(info_.n_layers) + ")");
  }
  if (T < 1) return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": T must be >= 1, got " +
                                            std::to_string(T));
  if (q == nullptr) return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": queries are null");
  const int64_t per_head = static_cast<int64_t>(T) * info_.head_dim;
  const int64_t n = per_head * info_.n_q_heads;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(q[i])) {
      return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": query head " +
                                     std::to_string(i / per_head) + " token " +
                                     std::to_string((i % per_head) / info_.head_dim) + " has a NaN/Inf value");
    }
  }
  return Status::OK();
}

Status ContextHandleImpl::Resolve(const QueryOptions& options, SelectionParams* p) const {
  const std::string ctx = "context '" + info_.name + "'";
  *p = SelectionParams();
  p->mode = options.mode;
  p->hierarchical = options.hierarchical;
  p->gqa = options.gqa;
  p->per_query = options.per_query_selection;
  p->budget = options.budget;
  p->coarse_budget_factor = options.coarse_budget_factor;
  if (!std::isfinite(options.softmax_scale) || options.softmax_scale < 0) {
    return Status::InvalidArgument("softmax_scale must be finite and >= 0 (0: 1/sqrt(head_dim))");
  }
  p->scale = options.softmax_scale > 0 ? options.softmax_scale
                                       : static_cast<float>(1.0 / std::sqrt(static_cast<double>(info_.head_dim)));
  switch (options.mode) {
    case SelectionMode::kDense:
      return Status::OK();
    case SelectionMode::kBudget:
      if (!std::isfinite(options.budget)) return Status::InvalidArgument("budget must be a finite number");
      if (options.hierarchical && !(std::isfinite(options.coarse_budget_factor) && options.coarse_budget_factor > 0)) {
        return Status::InvalidArgument("coarse_budget_factor must be finite and > 0");
      }
      return Status::OK();
    case SelectionMode::kThreshold:
      break;
    default:
      return Status::InvalidArgument("unknown selection mode " + std::to_string(static_cast<int>(options.mode)));
  }
  if (options.threshold_quantile >= 0) {
    if (info_.calibration_queries == 0 || info_.thresholds.empty()) {
      return Status::InvalidArgument(ctx +
                                     " is not calibrated (built without window queries): "
                                     "use budget mode or an explicit threshold");
    }
    for (const ThresholdInfo& t : info_.thresholds) {
      if (std::fabs(t.quantile - options.threshold_quantile) < 1e-9) {
        p->tau_flat = t.flat;
        p->tau_coarse = t.coarse;
        p->tau_fine = t.fine;
        return Status::OK();
      }
    }
    std::ostringstream os;
    os << ctx << " has no threshold calibrated at quantile " << options.threshold_quantile
       << " (calibrated: " << FormatQuantiles(info_.thresholds) << ")";
    return Status::InvalidArgument(os.str());
  }
  if (!std::isfinite(options.threshold) || !std::isfinite(options.threshold_coarse)) {
    return Status::InvalidArgument("threshold must be finite");
  }
  p->tau_flat = options.threshold;
  p->tau_fine = options.threshold;
  p->tau_coarse = options.threshold_coarse;
  return Status::OK();
}

Status ContextHandleImpl::SelectLayer(int layer, const float* q, int T, const QueryOptions& options,
                                      std::vector<HeadSelection>* out) const {
  SQZ_RETURN_IF_ERROR(CheckQueries(layer, q, T));
  SelectionParams params;
  SQZ_RETURN_IF_ERROR(Resolve(options, &params));
  const int G = group_size();
  out->assign(info_.n_kv_heads, HeadSelection());
  for (int g = 0; g < info_.n_kv_heads; ++g) {
    SelectHead(View(layer, g), q + static_cast<int64_t>(g) * G * T * info_.head_dim, G, T, params, &(*out)[g]);
  }
  return Status::OK();
}

Status ContextHandleImpl::ReadBlocks(int layer, int kv_head, const std::vector<uint32_t>& clusters,
                                     std::vector<rocksdb::PinnableSlice>* values, std::vector<RowBlock>* blocks,
                                     uint64_t* bytes) const {
  const HeadData& h = head(layer, kv_head);
  const int d = info_.head_dim;
  const size_t esize = DTypeSize(info_.dtype);

  std::vector<uint32_t> ids;
  ids.reserve(clusters.size() + 1);
  // An empty always set may have no block on disk: do not ask for it.
  if (h.n_always > 0) ids.push_back(storage::kAlwaysBlock);
  for (uint32_t j : clusters) {
    if (j >= static_cast<uint32_t>(h.k2)) {
      return Status::InvalidArgument(Where(layer, kv_head) + ": cluster id " + std::to_string(j) + " out of range");
    }
    ids.push_back(j);
  }
  Status s = db_->MultiGetBlocks(info_.id, layer, kv_head, ids.data(), ids.size(), values);
  if (!s.ok()) return s.WithPrefix(Where(layer, kv_head));
  blocks->resize(ids.size());
  *bytes = 0;
  for (size_t b = 0; b < ids.size(); ++b) {
    const int64_t n = ids[b] == storage::kAlwaysBlock ? h.n_always : h.fine_sizes[ids[b]];
    const size_t half = static_cast<size_t>(n) * d * esize;
    const rocksdb::PinnableSlice& value = (*values)[b];
    if (value.size() != 2 * half) {
      return Status::Corruption(Where(layer, kv_head) + ": KV block " +
                                (ids[b] == storage::kAlwaysBlock ? std::string("always") : std::to_string(ids[b])) +
                                " has " + std::to_string(value.size()) + " bytes, expected " +
                                std::to_string(2 * half));
    }
    (*blocks)[b] = RowBlock{value.data(), value.data() + half, n};
    *bytes += value.size();
  }
  return Status::OK();
}

Status ContextHandleImpl::ReadRows(int layer, int kv_head, const std::vector<uint32_t>& clusters,
                                   KvRows* out) const {
  std::vector<rocksdb::PinnableSlice> values;
  std::vector<RowBlock> blocks;
  SQZ_RETURN_IF_ERROR(ReadBlocks(layer, kv_head, clusters, &values, &blocks, &out->bytes_read));
  ConvertBlocks(head(layer, kv_head), blocks, info_.dtype, info_.head_dim, out);
  return Status::OK();
}

Status ContextHandleImpl::AttendHead(int layer, int kv_head, const float* q, int T, const SelectionParams& params,
                                     float* o, float* lse, HeadStats* hs, double seconds[3]) const {
  const int G = group_size();
  const int d = info_.head_dim;
  const HeadData& h = head(layer, kv_head);

  auto t0 = Clock::now();
  HeadSelection sel;
  SelectHead(View(layer, kv_head), q, G, T, params, &sel);
  seconds[0] += Since(t0);

  // Per-thread scratch, reused by the next call on the same thread: a decode
  // step would otherwise spend a large share of its time faulting in and
  // zeroing fresh megabytes. Only this call on this thread touches it.
  thread_local Scratch scratch_tls;
  Scratch& sc = scratch_tls;
  struct Release {  // do not keep the buffers of an exceptionally large call
    Scratch& sc;
    ~Release() { sc.TrimTo(kScratchKeepBytes); }
  } release{sc};

  t0 = Clock::now();
  // The blocks stay pinned in the block cache until this call returns.
  std::vector<rocksdb::PinnableSlice> values;
  std::vector<RowBlock>& blocks = sc.blocks;
  uint64_t bytes = 0;
  SQZ_RETURN_IF_ERROR(ReadBlocks(layer, kv_head, sel.read, &values, &blocks, &bytes));
  seconds[1] += Since(t0);

  t0 = Clock::now();
  int64_t rows = 0;
  for (const RowBlock& b : blocks) rows += b.n;
  hs->clusters_selected = static_cast<int64_t>(sel.read.size());
  hs->keys_selected = rows - h.n_always;
  hs->bytes_read = bytes;
  hs->clusters_scored = sel.dot_products / T;
  hs->keys_attended = 0;

  // Decode with one set, which is then everything read (every query head
  // attends all blocks): attention straight from the stored blocks, no float
  // copy of K and V (it would cost more memory traffic than the reads).
  if (T == 1 && sel.sets.size() == 1) {
    if (AttendBlocks(q, G, blocks.data(), blocks.size(), info_.dtype, d, params.scale, o, lse, &sc.scores)) {
      hs->keys_attended = static_cast<int64_t>(G) * rows;
      seconds[2] += Since(t0);
      return Status::OK();
    }
    // A row's float scores overflowed: the general path below (double fallback).
  }
  KvRows& kv = sc.kv;
  ConvertBlocks(h, blocks, info_.dtype, d, &kv);
  kv.bytes_read = bytes;

  std::vector<float>&qm = sc.qm, &om = sc.om, &lm = sc.lm, &ks = sc.ks, &vs = sc.vs, &scratch = sc.scores;
  std::vector<int64_t> members;
  for (size_t si = 0; si < sel.sets.size(); ++si) {
    members.clear();
    for (int64_t r = 0; r < static_cast<int64_t>(G) * T; ++r) {
      if (sel.set_of[r] == static_cast<int32_t>(si)) members.push_back(r);
    }
    if (members.empty()) continue;
    const std::vector<uint32_t>& set = sel.sets[si];
    // The rows of this set: all rows read when it is the union (the common
    // case), else a gathered copy of the always rows plus its clusters.
    const float* k = kv.k.data();
    const float* v = kv.v.data();
    int64_t n = kv.rows;
    if (set.size() != sel.read.size()) {
      n = kv.n_always;
      for (uint32_t j : set) n += h.fine_sizes[j];
      ks.resize(static_cast<size_t>(n) * d);
      vs.resize(static_cast<size_t>(n) * d);
      std::copy_n(kv.k.data(), kv.n_always * d, ks.data());
      std::copy_n(kv.v.data(), kv.n_always * d, vs.data());
      int64_t row = kv.n_always;
      for (uint32_t j : set) {
        const size_t pos = std::lower_bound(sel.read.begin(), sel.read.end(), j) - sel.read.begin();
        const int64_t b = kv.cluster_begin[pos], e = kv.cluster_begin[pos + 1];
        std::copy_n(kv.k.data() + b * d, (e - b) * d, ks.data() + row * d);
        std::copy_n(kv.v.data() + b * d, (e - b) * d, vs.data() + row * d);
        row += e - b;
      }
      k = ks.data();
      v = vs.data();
    }
    const int64_t m = static_cast<int64_t>(members.size());
    qm.resize(static_cast<size_t>(m) * d);
    om.resize(static_cast<size_t>(m) * d);
    lm.resize(m);
    for (int64_t i = 0; i < m; ++i) std::copy_n(q + members[i] * d, d, qm.data() + i * d);
    AttendRows(qm.data(), m, k, v, n, d, params.scale, om.data(), lm.data(),
               T == 1 ? Kernel::kLoops : Kernel::kBlas, &scratch);
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(om.data() + i * d, d, o + members[i] * d);
      lse[members[i]] = lm[i];
    }
    hs->keys_attended += m * n;
  }
  seconds[2] += Since(t0);
  return Status::OK();
}

Status ContextHandleImpl::Attend(int layer, const float* q, int T, const QueryOptions& options, float* o,
                                 float* lse, AttendStats* stats) const {
  SQZ_RETURN_IF_ERROR(CheckQueries(layer, q, T));
  if (o == nullptr || lse == nullptr) {
    return Status::InvalidArgument("context '" + info_.name + "' layer " + std::to_string(layer) +
                                   ": output buffers are null");
  }
  SelectionParams params;
  SQZ_RETURN_IF_ERROR(Resolve(options, &params));

  const int n_kv = info_.n_kv_heads;
  const int64_t group_rows = static_cast<int64_t>(group_size()) * T;  // query rows per KV head
  const int64_t d = info_.head_dim;
  std::vector<Status> status(n_kv);
  std::vector<HeadStats> head_stats(n_kv);
  std::vector<std::array<double, 3>> seconds(n_kv, {0, 0, 0});

  // KV heads are independent: each writes only its group's rows of o / lse
  // and its own stats, so the result does not depend on the schedule.
  // Decode (T == 1) runs the heads in parallel: its kernels are plain loops,
  // memory bound. Prefill runs them one after the other, each with threaded
  // sgemm: OpenBLAS threads inside OpenMP threads oversubscribe the cores.
#pragma omp parallel for schedule(dynamic, 1) if (n_kv > 1 && T == 1)
  for (int g = 0; g < n_kv; ++g) {
    status[g] = AttendHead(layer, g, q + g * group_rows * d, T, params, o + g * group_rows * d,
                           lse + g * group_rows, &head_stats[g], seconds[g].data());
  }
  for (int g = 0; g < n_kv; ++g) {
    if (!status[g].ok()) return status[g];
  }
  if (stats) {
    stats->heads = std::move(head_stats);
    stats->seconds_score = stats->seconds_read = stats->seconds_attend = 0;
    for (const auto& s : seconds) {
      stats->seconds_score += s[0];
      stats->seconds_read += s[1];
      stats->seconds_attend += s[2];
    }
  }
  return Status::OK();
}

}  // namespace sqz::query
