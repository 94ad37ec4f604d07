#include "engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <numeric>
#include <sstream>

#include "gpu/merge.h"
#include "gpu/streams.h"
#include "query/attention.h"
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

Status ContextHandle::Open(DB* db, const std::string& name, const OpenOptions& options,
                           std::unique_ptr<ContextHandle>* out) {
  return util::Guarded("ContextHandle::Open", [&] {
    std::unique_ptr<query::ContextHandleImpl> impl;
    SQZ_RETURN_IF_ERROR(query::ContextHandleImpl::Open(db, name, options, &impl));
    *out = std::move(impl);
    return Status::OK();
  });
}

Status ContextHandle::Open(DB* db, const std::string& name, std::unique_ptr<ContextHandle>* out) {
  return Open(db, name, OpenOptions(), out);
}

Status ContextHandle::DeviceWorkspaceBytes(int, const QueryOptions&, size_t*) const {
  return Status::NotSupported("context '" + info().name +
                              "': this handle runs on the CPU; open it with OpenOptions::device = kCuda for the "
                              "device call");
}

Status ContextHandle::AttendDevice(const DeviceAttendArgs&, const QueryOptions&) const {
  return Status::NotSupported("context '" + info().name +
                              "': this handle runs on the CPU; open it with OpenOptions::device = kCuda for the "
                              "device call");
}

namespace {
Status AttendDeviceBatchUnguarded(const std::vector<DeviceBatchItem>& items, void* stream);
}  // namespace

Status AttendDeviceBatch(const std::vector<DeviceBatchItem>& items, void* stream) {
  return util::Guarded("AttendDeviceBatch", [&] { return AttendDeviceBatchUnguarded(items, stream); });
}

namespace {
Status AttendDeviceBatchUnguarded(const std::vector<DeviceBatchItem>& items, void* stream) {
  for (size_t i = 0; i < items.size(); ++i) {
    const DeviceBatchItem& it = items[i];
    const std::string what = "batch request " + std::to_string(i);
    if (it.handle == nullptr) return Status::InvalidArgument(what + ": no handle");
    size_t need = 0;
    Status s = it.handle->DeviceWorkspaceBytes(it.args.T, it.options, &need);
    if (!s.ok()) return s.WithPrefix(what);
    if (it.args.workspace == nullptr || it.args.workspace_bytes < need) {
      return Status::InvalidArgument(what + ": workspace of " + std::to_string(it.args.workspace_bytes) +
                                     " bytes; it needs " + std::to_string(need));
    }
    if (it.args.q == nullptr || it.args.o == nullptr || it.args.lse == nullptr) {
      return Status::InvalidArgument(what + ": q, o and lse must be device pointers");
    }
    if (it.handle->device_id() != items[0].handle->device_id()) {
      return Status::InvalidArgument(what + ": its context is on CUDA device " +
                                     std::to_string(it.handle->device_id()) + ", request 0's on " +
                                     std::to_string(items[0].handle->device_id()) + " (one batch, one device)");
    }
    for (size_t j = 0; j < i; ++j) {
      if (items[j].args.workspace == it.args.workspace) {
        return Status::InvalidArgument(what + ": shares its workspace with request " + std::to_string(j));
      }
    }
  }
  // The requests are independent: forked over side streams so they overlap
  // on the GPU (one request alone leaves most SMs idle in its selection
  // kernels), joined back into `stream`.
  if (items.empty()) return Status::OK();
  return gpu::ForkJoin(items[0].handle->device_id(), stream, static_cast<int>(items.size()), [&](int i, void* side) {
    DeviceAttendArgs a = items[i].args;
    a.stream = side;
    Status s = items[i].handle->AttendDevice(a, items[i].options);
    return s.ok() ? s : s.WithPrefix("batch request " + std::to_string(i));
  });
}
}  // namespace

Status MergeAttentionStatesDevice(void* o_a, float* lse_a, const void* o_b, const float* lse_b, int64_t n, int head_dim,
                                  DType dtype, bool lse_base2, void* stream) {
  return util::Guarded("MergeAttentionStatesDevice", [&] {
    return gpu::MergeStatesDevice(o_a, lse_a, o_b, lse_b, n, head_dim, dtype, lse_base2, stream);
  });
}

}  // namespace sqz

namespace sqz::query {

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string FormatQuantiles(const std::vector<ThresholdInfo>& ts) {
  std::ostringstream os;
  for (size_t i = 0; i < ts.size(); ++i) os << (i ? ", " : "") << ts[i].quantile;
  return os.str();
}

// Scratch of one RunHead call, kept per thread between calls: a decode step
// would otherwise spend a large share of its time faulting in and zeroing
// fresh megabytes.
struct Scratch {
  std::vector<RowBlock> blocks;
  std::vector<float> qm, om, lm, k, v, scores;
  std::vector<int64_t> members;

  size_t Bytes() const {
    return 4 * (qm.capacity() + om.capacity() + lm.capacity() + k.capacity() + v.capacity() + scores.capacity());
  }
  void TrimTo(size_t keep) {
    if (Bytes() > keep) *this = Scratch();
  }
};

// A decode step at budget 1/8 of a 128K context needs 16 MiB per KV head;
// a dense prefill far more, which is given back rather than kept per thread.
constexpr size_t kScratchKeepBytes = size_t{64} << 20;

// Decode-sized row counts attend straight from the pages; more rows convert
// the set to float once and use BLAS.
constexpr int64_t kMaxLoopRows = 16;

// RowBlocks covering `segments` of a head whose pages `pages` (ascending)
// were read into `set`.
void SegmentBlocks(const ContextInfo& info, const Segment* segments, size_t n_segments, const uint32_t* pages,
                   size_t n_pages, const storage::PageSet& set, std::vector<RowBlock>* out) {
  out->clear();
  const size_t row_bytes = static_cast<size_t>(info.head_dim) * DTypeSize(info.dtype);
  const size_t plane = static_cast<size_t>(info.page_rows) * row_bytes;
  for (size_t s = 0; s < n_segments; ++s) {
    int64_t row = segments[s].first_row;
    const int64_t end = row + segments[s].n_rows;
    while (row < end) {
      const int64_t page = storage::PageOfRow(info, row);
      const int64_t slot = storage::SlotOfRow(info, row);
      // Rows of the clustered run never share a page with the always run.
      const int64_t run_end = row < info.n_clustered ? info.n_clustered : info.n_tokens;
      const int64_t n = std::min({end - row, info.page_rows - slot, run_end - row});
      const size_t idx = std::lower_bound(pages, pages + n_pages, static_cast<uint32_t>(page)) - pages;
      const uint8_t* base = set.data(idx);
      out->push_back(RowBlock{base + slot * row_bytes, base + plane + slot * row_bytes, n});
      row += n;
    }
  }
}

// What served KV head h of the table reads (keys_attended is left 0).
HeadStats ReadStats(const SegmentTable& t, int h, const ContextInfo& ci) {
  HeadStats hs;
  int64_t rows = 0;
  for (uint32_t i = t.read_offsets[h]; i < t.read_offsets[h + 1]; ++i) rows += t.read_segments[i].n_rows;
  hs.keys_selected = rows - ci.n_always();
  hs.clusters_scored = t.clusters_scored[h];
  hs.clusters_selected = t.clusters_read[h];
  hs.segments_read = t.read_offsets[h + 1] - t.read_offsets[h];
  hs.pages_read = t.page_offsets[h + 1] - t.page_offsets[h];
  hs.bytes_read = static_cast<uint64_t>(hs.pages_read) * ci.page_bytes();
  return hs;
}

// Appends the pages of `seg` to *pages (ascending; a page already last in
// *pages is not repeated). head_begin: where the current head's pages begin.
void AppendPages(const ContextInfo& info, const Segment& seg, std::vector<uint32_t>* pages, size_t head_begin = 0) {
  if (seg.n_rows == 0) return;
  const int64_t first = storage::PageOfRow(info, seg.first_row);
  const int64_t last = storage::PageOfRow(info, static_cast<int64_t>(seg.first_row) + seg.n_rows - 1);
  for (int64_t p = first; p <= last; ++p) {
    if (pages->size() == head_begin || pages->back() < p) pages->push_back(static_cast<uint32_t>(p));
  }
}

// An empty table for `layer`, T queries, n served KV heads of G query heads.
void StartTable(const ContextInfo& ci, int layer, int T, int G, int n, SegmentTable* t) {
  *t = SegmentTable();
  t->layer = layer;
  t->T = T;
  t->group_size = G;
  t->n_kv_heads = n;
  t->page_rows = ci.page_rows;
  t->set_offsets.push_back(0);
  t->read_offsets.push_back(0);
  t->page_offsets.push_back(0);
}

}  // namespace

void ClusterSegments(const HeadData& h, const std::vector<uint32_t>& ids, std::vector<Segment>* out) {
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    const uint32_t first = h.fine_offsets[ids[i]], end = h.fine_offsets[ids[j] + 1];
    out->push_back(Segment{first, end - first});
    i = j + 1;
  }
}

std::string ContextHandleImpl::Where(int layer, int kv_head) const {
  return "context '" + info().name + "' layer " + std::to_string(layer) + " KV head " + std::to_string(kv_head);
}

IndexView ContextHandleImpl::View(int layer, int local_head) const {
  const HeadData& h = head(layer, local_head);
  IndexView v;
  v.head_dim = info().head_dim;
  v.n_clustered = info().n_clustered;
  v.k2 = h.k2;
  v.k1 = h.k1;
  v.fine_centroids = h.fine_centroids.data();
  v.fine_sizes = h.fine_sizes.data();
  v.coarse_centroids = h.coarse_centroids.data();
  v.coarse_sizes = h.coarse_sizes.data();
  v.coarse_child_offsets = h.coarse_child_offsets.data();
  return v;
}

Status ContextHandleImpl::Open(DB* db, const std::string& name, const OpenOptions& options,
                               std::unique_ptr<ContextHandleImpl>* out) {
  if (db == nullptr) return Status::InvalidArgument("ContextHandle::Open: db is null");
  if (options.device != Device::kCpu && options.device != Device::kCuda) {
    return Status::InvalidArgument("ContextHandle::Open: unknown device " +
                                   std::to_string(static_cast<int>(options.device)));
  }
  if (options.device == Device::kCpu && options.residency != Residency::kStorage) {
    return Status::NotSupported("ContextHandle::Open: the CPU engine reads pages from storage (Residency::kStorage)");
  }
  std::unique_ptr<ContextHandleImpl> h(new ContextHandleImpl());
  SQZ_RETURN_IF_ERROR(db->store()->OpenSnapshot(name, &h->snap_));
  const ContextInfo& info = h->info();
  const int end = options.kv_head_end < 0 ? info.n_kv_heads : options.kv_head_end;
  if (options.kv_head_begin < 0 || options.kv_head_begin >= end || end > info.n_kv_heads) {
    return Status::InvalidArgument("context '" + name + "': KV head range [" + std::to_string(options.kv_head_begin) +
                                   ", " + std::to_string(end) + ") is not inside [0, " +
                                   std::to_string(info.n_kv_heads) + ")");
  }
  h->head_begin_ = options.kv_head_begin;
  h->head_end_ = end;
  h->heads_.resize(static_cast<size_t>(info.n_layers) * h->n_served());
  storage::HeadIndexRecord rec;
  for (int layer = 0; layer < info.n_layers; ++layer) {
    for (int g = h->head_begin_; g < h->head_end_; ++g) {
      SQZ_RETURN_IF_ERROR(h->snap_->GetHeadIndex(layer, g, &rec));
      SQZ_RETURN_IF_ERROR(h->LoadHead(rec, &h->heads_[layer * h->n_served() + (g - h->head_begin_)]));
    }
  }
  if (options.device == Device::kCuda) SQZ_RETURN_IF_ERROR(h->LoadResident(options));
  *out = std::move(h);
  return Status::OK();
}

Status ContextHandleImpl::LoadResident(const OpenOptions& options) {
  const ContextInfo& ci = info();
  const std::string ctx = "context '" + ci.name + "'";
  if (options.device_cache_bytes != 0) {
    return Status::NotSupported(ctx +
                                ": a device page cache smaller than the context (paging) is not available "
                                "yet; use device_cache_bytes = 0 (every served page resident)");
  }
  gpu::ResidentShape shape;
  shape.n_layers = ci.n_layers;
  shape.n_heads = n_served();
  shape.pages_per_head = ci.pages_per_head();
  shape.page_rows = ci.page_rows;
  shape.head_dim = ci.head_dim;
  shape.dtype = ci.dtype;
  shape.n_clustered = ci.n_clustered;
  shape.n_always = ci.n_always();
  shape.group = ci.group_size();
  shape.clustered_pages = ci.clustered_pages;
  Status s = gpu::ResidentKv::Create(options.device_id, shape, &resident_);
  if (!s.ok()) return s.WithPrefix(ctx + ": opening on device cuda:" + std::to_string(options.device_id));
  // Every page of every served head, in chunks of pages read in parallel
  // (snapshot reads are thread-safe; the uploads serialise in ResidentKv).
  const int64_t per_head = ci.pages_per_head(), chunk = 1024;
  const int64_t chunks_per_head = (per_head + chunk - 1) / chunk;
  const int n_served_heads = n_served();
  const int64_t tasks = static_cast<int64_t>(ci.n_layers) * n_served_heads * chunks_per_head;
  const size_t page_bytes = ci.page_bytes();
  std::vector<Status> status(static_cast<size_t>(tasks));
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int layer = static_cast<int>(task / (n_served_heads * chunks_per_head));
    const int h = static_cast<int>(task / chunks_per_head % n_served_heads);
    const int64_t first = task % chunks_per_head * chunk, n = std::min(chunk, per_head - first);
    try {  // no exception may leave an OpenMP region
      std::vector<uint32_t> ids(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<uint32_t>(first + i);
      storage::PageSet set;
      Status st = snap_->ReadPages(layer, head_begin_ + h, ids.data(), ids.size(), &set);
      if (st.ok()) {
        std::vector<uint8_t> host(static_cast<size_t>(n) * page_bytes);
        for (int64_t i = 0; i < n; ++i) std::memcpy(host.data() + i * page_bytes, set.data(i), page_bytes);
        st = resident_->Upload(layer, h, first, host.data(), n);
      }
      status[task] = std::move(st);
    } catch (const std::exception& e) {
      status[task] = Status::IOError(ctx + ": loading pages to the GPU: " + e.what());
    }
  }
  for (const Status& st : status) SQZ_RETURN_IF_ERROR(st);
  for (int layer = 0; layer < ci.n_layers; ++layer) {
    for (int h = 0; h < n_served_heads; ++h) {
      const HeadData& hd = head(layer, h);
      gpu::HeadIndexHost x;
      x.k2 = hd.k2;
      x.k1 = hd.k1;
      x.fine_centroids = hd.fine_centroids.data();
      x.fine_offsets = hd.fine_offsets.data();
      x.coarse_centroids = hd.coarse_centroids.data();
      x.coarse_child_offsets = hd.coarse_child_offsets.data();
      SQZ_RETURN_IF_ERROR(resident_->SetIndex(layer, h, x));
    }
  }
  return resident_->FinishIndex();
}

bool ContextHandleImpl::OnDevice(const SelectionParams& p, int T) const {
  if (!resident_ || T < 1 || T > resident_->MaxT()) return false;
  if (p.mode == SelectionMode::kDense) return true;
  return p.gqa == GqaPolicy::kUnion && (!p.per_query || T == 1);
}

gpu::SelectConfig ContextHandleImpl::DeviceConfig(const SelectionParams& p) {
  gpu::SelectConfig c;
  c.mode = static_cast<int>(p.mode);
  c.hierarchical = p.hierarchical;
  c.budget = p.budget;
  c.coarse_budget_factor = p.coarse_budget_factor;
  c.tau_flat = p.tau_flat;
  c.tau_coarse = p.tau_coarse;
  c.tau_fine = p.tau_fine;
  c.scale = p.scale;
  return c;
}

Status ContextHandleImpl::PlanResident(int layer, const float* q, int T, const SelectionParams& params, SegmentTable* t,
                                       float* o, float* lse, AttendStats* stats) const {
  const ContextInfo& ci = info();
  const int G = group_size(), n = n_served();
  const size_t rows = static_cast<size_t>(n) * G * T;
  std::vector<float> o_tmp, l_tmp;
  if (o == nullptr) {
    o_tmp.resize(rows * ci.head_dim);
    l_tmp.resize(rows);
    o = o_tmp.data();
    lse = l_tmp.data();
  }
  gpu::DeviceSelection sel;
  SQZ_RETURN_IF_ERROR(resident_->AttendHost(layer, T, q, DeviceConfig(params), o, lse, &sel));
  // The device's selection as a segment table: one set per KV head (GQA
  // union), attended by all its query rows, and what it reads.
  StartTable(ci, layer, T, G, n, t);
  if (stats) stats->heads.assign(n, HeadStats());
  for (int h = 0; h < n; ++h) {
    for (uint32_t i = sel.seg_offsets[h]; i < sel.seg_offsets[h + 1]; ++i) {
      const Segment seg{sel.seg_first[i], sel.seg_rows[i]};
      t->segments.push_back(seg);
      t->read_segments.push_back(seg);
      AppendPages(ci, seg, &t->pages, t->page_offsets.back());
    }
    t->set_offsets.push_back(static_cast<uint32_t>(t->segments.size()));
    t->read_offsets.push_back(static_cast<uint32_t>(t->read_segments.size()));
    t->page_offsets.push_back(static_cast<uint32_t>(t->pages.size()));
    t->set_kv_head.push_back(h);
    for (size_t r = 0; r < static_cast<size_t>(G) * T; ++r) t->row_set.push_back(h);
    t->clusters_scored.push_back(sel.clusters_scored[h]);
    t->clusters_read.push_back(sel.clusters_kept[h]);
    if (stats) {
      HeadStats& hs = stats->heads[h];
      hs = ReadStats(*t, h, ci);
      hs.keys_attended = (hs.keys_selected + ci.n_always()) * G * T;
    }
  }
  return Status::OK();
}

Status ContextHandleImpl::LoadHead(const storage::HeadIndexRecord& rec, HeadData* h) const {
  // The record was validated by storage (the one validator).
  h->k2 = static_cast<int32_t>(rec.n_fine());
  h->k1 = static_cast<int32_t>(rec.n_coarse());
  h->fine_centroids = rec.fine_centroids;
  h->fine_offsets = rec.fine_offsets;
  h->coarse_centroids = rec.coarse_centroids;
  h->coarse_child_offsets = rec.coarse_child_offsets;
  h->fine_sizes.resize(h->k2);
  for (int32_t j = 0; j < h->k2; ++j) h->fine_sizes[j] = h->fine_offsets[j + 1] - h->fine_offsets[j];
  h->coarse_sizes.resize(h->k1);
  for (int32_t a = 0; a < h->k1; ++a) {
    h->coarse_sizes[a] = h->fine_offsets[h->coarse_child_offsets[a + 1]] - h->fine_offsets[h->coarse_child_offsets[a]];
  }
  return Status::OK();
}

Status ContextHandleImpl::CheckQueries(int layer, const float* q, int T) const {
  const std::string ctx = "context '" + info().name + "'";
  if (layer < 0 || layer >= info().n_layers) {
    return Status::InvalidArgument(ctx + ": layer " + std::to_string(layer) + " out of range [0, " +
                                   std::to_string(info().n_layers) + ")");
  }
  if (T < 1)
    return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": T must be >= 1, got " +
                                   std::to_string(T));
  if (q == nullptr) return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": queries are null");
  const int64_t per_head = static_cast<int64_t>(T) * info().head_dim;
  const int64_t n = per_head * n_served_q_heads();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(q[i])) {
      return Status::InvalidArgument(ctx + " layer " + std::to_string(layer) + ": query head " +
                                     std::to_string(head_begin_ * group_size() + i / per_head) + " token " +
                                     std::to_string((i % per_head) / info().head_dim) + " has a NaN/Inf value");
    }
  }
  return Status::OK();
}

Status ContextHandleImpl::Resolve(const QueryOptions& options, SelectionParams* p) const {
  const std::string ctx = "context '" + info().name + "'";
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
                                       : static_cast<float>(1.0 / std::sqrt(static_cast<double>(info().head_dim)));
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
    if (info().calibration_queries == 0 || info().thresholds.empty()) {
      return Status::InvalidArgument(ctx +
                                     " is not calibrated (built without window queries): "
                                     "use budget mode or an explicit threshold");
    }
    for (const ThresholdInfo& t : info().thresholds) {
      if (std::fabs(t.quantile - options.threshold_quantile) < 1e-9) {
        p->tau_flat = t.flat;
        p->tau_coarse = t.coarse;
        p->tau_fine = t.fine;
        return Status::OK();
      }
    }
    std::ostringstream os;
    os << ctx << " has no threshold calibrated at quantile " << options.threshold_quantile
       << " (calibrated: " << FormatQuantiles(info().thresholds) << ")";
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

Status ContextHandleImpl::PlanUnguarded(int layer, const float* q, int T, const QueryOptions& options,
                                        SegmentTable* table) const {
  SelectionParams params;
  SQZ_RETURN_IF_ERROR(Resolve(options, &params));
  if (OnDevice(params, T)) {
    SQZ_RETURN_IF_ERROR(CheckQueries(layer, q, T));
    return PlanResident(layer, q, T, params, table, nullptr, nullptr, nullptr);
  }
  size_t ws = 0;
  return Plan(layer, q, T, options, table, &ws);
}

Status ContextHandleImpl::Plan(int layer, const float* q, int T, const QueryOptions& options, SegmentTable* t,
                               size_t* workspace_bytes) const {
  SQZ_RETURN_IF_ERROR(CheckQueries(layer, q, T));
  SelectionParams params;
  SQZ_RETURN_IF_ERROR(Resolve(options, &params));
  const ContextInfo& ci = info();
  const int G = group_size(), n = n_served(), d = ci.head_dim;
  StartTable(ci, layer, T, G, n, t);
  t->row_set.resize(static_cast<size_t>(n) * G * T);
  const Segment always{static_cast<uint32_t>(ci.n_clustered), static_cast<uint32_t>(ci.n_always())};
  int64_t max_rows = 0;
  HeadSelection sel;
  std::vector<uint32_t> pages;
  for (int h = 0; h < n; ++h) {
    SelectHead(View(layer, h), q + static_cast<int64_t>(h) * G * T * d, G, T, params, &sel);
    const HeadData& hd = head(layer, h);
    const int32_t base = static_cast<int32_t>(t->set_kv_head.size());
    for (const std::vector<uint32_t>& set : sel.sets) {
      ClusterSegments(hd, set, &t->segments);
      if (always.n_rows > 0) t->segments.push_back(always);
      t->set_offsets.push_back(static_cast<uint32_t>(t->segments.size()));
      t->set_kv_head.push_back(h);
    }
    for (int64_t r = 0; r < static_cast<int64_t>(G) * T; ++r) {
      t->row_set[static_cast<size_t>(h) * G * T + r] = base + sel.set_of[r];
    }
    const size_t first_read = t->read_segments.size();
    ClusterSegments(hd, sel.read, &t->read_segments);
    if (always.n_rows > 0) t->read_segments.push_back(always);
    t->read_offsets.push_back(static_cast<uint32_t>(t->read_segments.size()));
    pages.clear();
    int64_t rows = 0;
    for (size_t i = first_read; i < t->read_segments.size(); ++i) {
      AppendPages(ci, t->read_segments[i], &pages);
      rows += t->read_segments[i].n_rows;
    }
    t->pages.insert(t->pages.end(), pages.begin(), pages.end());
    t->page_offsets.push_back(static_cast<uint32_t>(t->pages.size()));
    t->clusters_scored.push_back(sel.dot_products / T);
    t->clusters_read.push_back(static_cast<int64_t>(sel.read.size()));
    max_rows = std::max(max_rows, rows);
  }
  // A run converts at most one head's rows to float (K and V) plus scores.
  *workspace_bytes = static_cast<size_t>(max_rows) * (2 * d + static_cast<size_t>(G) * T) * sizeof(float);
  return Status::OK();
}

Status ContextHandleImpl::RunHead(const SegmentTable& t, int h, const float* q, float scale, float* o, float* lse,
                                  HeadStats* hs, double seconds[2]) const {
  const ContextInfo& ci = info();
  const int G = t.group_size, T = t.T, d = ci.head_dim;
  thread_local Scratch scratch_tls;
  Scratch& sc = scratch_tls;
  struct Release {  // do not keep the buffers of an exceptionally large call
    Scratch& sc;
    ~Release() { sc.TrimTo(kScratchKeepBytes); }
  } release{sc};

  auto t0 = Clock::now();
  const uint32_t* pages = t.pages.data() + t.page_offsets[h];
  const size_t n_pages = t.page_offsets[h + 1] - t.page_offsets[h];
  storage::PageSet set;
  Status s = snap_->ReadPages(t.layer, head_begin_ + h, pages, n_pages, &set);
  if (!s.ok()) return s;
  seconds[0] += Since(t0);

  t0 = Clock::now();
  *hs = ReadStats(t, h, ci);
  const int64_t rows_h = static_cast<int64_t>(G) * T;
  const int32_t* row_set = t.row_set.data() + static_cast<size_t>(h) * rows_h;
  for (int32_t si = 0; si < t.n_sets(); ++si) {
    if (t.set_kv_head[si] != h) continue;
    sc.members.clear();
    for (int64_t r = 0; r < rows_h; ++r) {
      if (row_set[r] == si) sc.members.push_back(r);
    }
    if (sc.members.empty()) continue;
    const uint32_t sb = t.set_offsets[si], se = t.set_offsets[si + 1];
    SegmentBlocks(ci, t.segments.data() + sb, se - sb, pages, n_pages, set, &sc.blocks);
    int64_t rows = 0;
    for (const RowBlock& b : sc.blocks) rows += b.n;
    const int64_t m = static_cast<int64_t>(sc.members.size());
    sc.qm.resize(static_cast<size_t>(m) * d);
    sc.om.resize(static_cast<size_t>(m) * d);
    sc.lm.resize(m);
    for (int64_t i = 0; i < m; ++i) std::copy_n(q + sc.members[i] * d, d, sc.qm.data() + i * d);
    // Few rows (decode): straight from the stored pages, one pass over K and
    // V. Otherwise (or if float scores overflowed): a float copy and BLAS.
    bool done = m <= kMaxLoopRows && AttendBlocks(sc.qm.data(), m, sc.blocks.data(), sc.blocks.size(), ci.dtype, d,
                                                  scale, sc.om.data(), sc.lm.data(), &sc.scores);
    if (!done) {
      sc.k.resize(static_cast<size_t>(rows) * d);
      sc.v.resize(static_cast<size_t>(rows) * d);
      int64_t row = 0;
      for (const RowBlock& b : sc.blocks) {
        ConvertToFloat(b.k, ci.dtype, static_cast<size_t>(b.n) * d, sc.k.data() + row * d);
        ConvertToFloat(b.v, ci.dtype, static_cast<size_t>(b.n) * d, sc.v.data() + row * d);
        row += b.n;
      }
      AttendRows(sc.qm.data(), m, sc.k.data(), sc.v.data(), rows, d, scale, sc.om.data(), sc.lm.data(),
                 m <= kMaxLoopRows ? Kernel::kLoops : Kernel::kBlas, &sc.scores);
    }
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(sc.om.data() + i * d, d, o + sc.members[i] * d);
      lse[sc.members[i]] = sc.lm[i];
    }
    hs->keys_attended += m * rows;
  }
  seconds[1] += Since(t0);
  return Status::OK();
}

Status ContextHandleImpl::Run(const SegmentTable& t, const float* q, float scale, float* o, float* lse,
                              AttendStats* stats) const {
  const int n = t.n_kv_heads;
  const int64_t group_rows = static_cast<int64_t>(t.group_size) * t.T;  // query rows per KV head
  const int64_t d = info().head_dim;
  std::vector<Status> status(n);
  std::vector<HeadStats> head_stats(n);
  std::vector<std::array<double, 2>> seconds(n, {0, 0});
  // KV heads are independent: each writes only its group's rows of o / lse
  // and its own stats, so the result does not depend on the schedule.
  // Decode (T == 1) runs the heads in parallel: its kernels are plain loops,
  // memory bound. Prefill runs them one after the other, each with threaded
  // sgemm: OpenBLAS threads inside OpenMP threads oversubscribe the cores.
#pragma omp parallel for schedule(dynamic, 1) if (n > 1 && t.T == 1)
  for (int h = 0; h < n; ++h) {
    // An exception must not leave an OpenMP region (std::terminate).
    try {
      status[h] = RunHead(t, h, q + h * group_rows * d, scale, o + h * group_rows * d, lse + h * group_rows,
                          &head_stats[h], seconds[h].data());
    } catch (const std::bad_alloc&) {
      status[h] = Status::Aborted("out of memory attending KV head " + std::to_string(h));
    } catch (const std::exception& e) {
      status[h] = Status::Aborted(std::string("attending KV head ") + std::to_string(h) + ": " + e.what());
    }
  }
  for (int h = 0; h < n; ++h) {
    if (!status[h].ok()) return status[h];
  }
  if (stats) {
    stats->heads = std::move(head_stats);
    stats->seconds_read = stats->seconds_attend = 0;
    for (const auto& s : seconds) {
      stats->seconds_read += s[0];
      stats->seconds_attend += s[1];
    }
  }
  return Status::OK();
}

Status ContextHandleImpl::AttendUnguarded(int layer, const float* q, int T, const QueryOptions& options, float* o,
                                          float* lse, AttendStats* stats) const {
  if (o == nullptr || lse == nullptr) {
    return Status::InvalidArgument("context '" + info().name + "' layer " + std::to_string(layer) +
                                   ": output buffers are null");
  }
  SelectionParams params;
  SQZ_RETURN_IF_ERROR(Resolve(options, &params));
  auto t0 = Clock::now();
  SegmentTable table;
  if (OnDevice(params, T)) {
    // The whole call on the GPU: selection, table, attention.
    SQZ_RETURN_IF_ERROR(CheckQueries(layer, q, T));
    SQZ_RETURN_IF_ERROR(PlanResident(layer, q, T, params, &table, o, lse, stats));
    if (stats) {
      stats->seconds_score = stats->seconds_read = 0;
      stats->seconds_attend = Since(t0);
    }
    return CheckOutputs(layer, q, T, o, lse);
  }
  size_t ws = 0;
  SQZ_RETURN_IF_ERROR(Plan(layer, q, T, options, &table, &ws));
  const double plan_seconds = Since(t0);
  SQZ_RETURN_IF_ERROR(Run(table, q, params.scale, o, lse, stats));
  if (stats) stats->seconds_score = plan_seconds;
  return CheckOutputs(layer, q, T, o, lse);
}

Status ContextHandleImpl::CheckOutputs(int layer, const float* q, int T, const float* o, const float* lse) const {
  // Finite queries can still overflow fp32 attention scores against the
  // stored keys: never return such an answer as a success. (An empty set's
  // row, LSE = -inf and O = 0, is an answer.)
  const int d = info().head_dim;
  const int64_t rows = static_cast<int64_t>(n_served_q_heads()) * T;
  for (int64_t r = 0; r < rows; ++r) {
    bool bad = std::isnan(lse[r]) || lse[r] == INFINITY;
    for (int e = 0; e < d && !bad; ++e) bad = !std::isfinite(o[r * d + e]);
    if (!bad) continue;
    float max_abs = 0;
    for (int64_t i = 0; i < rows * d; ++i) max_abs = std::max(max_abs, std::fabs(q[i]));
    std::ostringstream os;
    os << "context '" << info().name << "' layer " << layer
       << ": attention scores overflow float32 (query values up to " << max_abs
       << "): scale the queries to the model's range";
    return Status::InvalidArgument(os.str());
  }
  return Status::OK();
}

Status ContextHandleImpl::DeviceCall(const DeviceAttendArgs& a, const QueryOptions& options, SelectionParams* params,
                                     gpu::DeviceCall* c) const {
  const std::string ctx = "context '" + info().name + "'";
  if (!resident_) {
    return Status::NotSupported(ctx +
                                ": this handle runs on the CPU; open it with OpenOptions::device = kCuda for "
                                "the device call");
  }
  SQZ_RETURN_IF_ERROR(Resolve(options, params));
  if (!OnDevice(*params, a.T)) {
    if (a.T < 1 || a.T > resident_->MaxT()) {
      return Status::NotSupported(ctx + ": the device call takes T = 1.." + std::to_string(resident_->MaxT()) +
                                  " queries per call in this release (got " + std::to_string(a.T) + ")");
    }
    return Status::NotSupported(ctx +
                                ": the device call selects jointly per GQA group (GqaPolicy::kUnion, shared "
                                "selection); use Attend for per-head or per-query selection");
  }
  if (a.layout != TensorLayout::kHeadMajor && a.layout != TensorLayout::kTokenMajor) {
    return Status::InvalidArgument(ctx + ": unknown tensor layout");
  }
  c->layer = a.layer;
  c->T = a.T;
  c->q = a.q;
  c->o = a.o;
  c->lse = a.lse;
  c->dtype = a.dtype;
  c->token_major = a.layout == TensorLayout::kTokenMajor;
  c->lse_base2 = a.lse_base2;
  c->workspace = a.workspace;
  c->workspace_bytes = a.workspace_bytes;
  c->stream = a.stream;
  return Status::OK();
}

Status ContextHandleImpl::DeviceWorkspaceBytesUnguarded(int T, const QueryOptions& options, size_t* bytes) const {
  DeviceAttendArgs a;
  a.T = T;
  SelectionParams params;
  gpu::DeviceCall c;
  SQZ_RETURN_IF_ERROR(DeviceCall(a, options, &params, &c));
  return resident_->WorkspaceBytes(T, DeviceConfig(params), bytes);
}

Status ContextHandleImpl::AttendDeviceUnguarded(const DeviceAttendArgs& args, const QueryOptions& options) const {
  SelectionParams params;
  gpu::DeviceCall c;
  SQZ_RETURN_IF_ERROR(DeviceCall(args, options, &params, &c));
  Status s = resident_->Attend(c, DeviceConfig(params));
  if (!s.ok()) return s.WithPrefix("context '" + info().name + "'");
  return Status::OK();
}

Status ContextHandleImpl::ReadRowsUnguarded(int layer, int kv_head, int64_t first_row, int64_t n_rows, float* k,
                                            float* v, uint64_t* bytes) const {
  const ContextInfo& ci = info();
  if (layer < 0 || layer >= ci.n_layers || kv_head < head_begin_ || kv_head >= head_end_) {
    return Status::InvalidArgument(Where(layer, kv_head) + ": not served by this handle");
  }
  if (first_row < 0 || n_rows < 0 || first_row + n_rows > ci.n_tokens) {
    return Status::InvalidArgument(Where(layer, kv_head) + ": rows out of range");
  }
  // Split at the clustered/always boundary: the two runs are paged apart.
  std::vector<Segment> segs;
  const int64_t end = first_row + n_rows;
  if (first_row < ci.n_clustered && end > first_row) {
    segs.push_back(
        {static_cast<uint32_t>(first_row), static_cast<uint32_t>(std::min(end, ci.n_clustered) - first_row)});
  }
  if (end > ci.n_clustered) {
    const int64_t b = std::max(first_row, ci.n_clustered);
    segs.push_back({static_cast<uint32_t>(b), static_cast<uint32_t>(end - b)});
  }
  std::vector<uint32_t> pages;
  for (const Segment& s : segs) AppendPages(ci, s, &pages);
  storage::PageSet set;
  SQZ_RETURN_IF_ERROR(snap_->ReadPages(layer, kv_head, pages.data(), pages.size(), &set));
  std::vector<RowBlock> blocks;
  SegmentBlocks(ci, segs.data(), segs.size(), pages.data(), pages.size(), set, &blocks);
  const int d = ci.head_dim;
  int64_t row = 0;
  for (const RowBlock& b : blocks) {
    ConvertToFloat(b.k, ci.dtype, static_cast<size_t>(b.n) * d, k + row * d);
    ConvertToFloat(b.v, ci.dtype, static_cast<size_t>(b.n) * d, v + row * d);
    row += b.n;
  }
  if (bytes) *bytes = pages.size() * ci.page_bytes();
  return Status::OK();
}

}  // namespace sqz::query
