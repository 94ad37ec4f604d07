// BuildContext: KV source -> clustered, permuted KV pages + per-head index
// records + calibrated thresholds -> one atomically committed context.
//
// Memory: the source is streamed layer by layer, so the peak is about two
// layers of K and V in the source dtype (the one being clustered and, with
// read_ahead, the next one being read), one k-means batch of keys in float32
// and its normalised copy (BuildOptions::kmeans_batch_bytes each), and the
// writer's batch (storage flushes it every 32 MiB). Calibration keeps only
// weighted samples (one per cluster) between layers; its second pass reads
// the head indexes back from the (uncommitted) records instead of holding
// every head's centroids in memory.

#include <sys/resource.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "index/calibrate.h"
#include "index/kmeans.h"
#include "sqz/build.h"
#include "storage/store.h"
#include "util/crc32c.h"
#include "util/half.h"

namespace sqz {

namespace {

using Clock = std::chrono::steady_clock;

// Frees a buffer's memory (`buf = {}` would keep its capacity).
template <typename T>
void Release(T* buf) {
  T().swap(*buf);
}

double SecondsSince(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

uint64_t PeakRssBytes() {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

Status ValidateOptions(const BuildOptions& o) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("build options: " + m); };
  if (o.window < 0) return bad("window must be >= 0, got " + std::to_string(o.window));
  if (o.n_sinks < 0) return bad("n_sinks must be >= 0, got " + std::to_string(o.n_sinks));
  if (!(o.fine_ratio > 0 && o.fine_ratio <= 1))
    return bad("fine_ratio must be in (0, 1], got " + std::to_string(o.fine_ratio));
  if (!(o.coarse_ratio > 0 && o.coarse_ratio <= 1)) {
    return bad("coarse_ratio must be in (0, 1], got " + std::to_string(o.coarse_ratio));
  }
  if (o.kmeans_iters < 1) return bad("kmeans_iters must be >= 1, got " + std::to_string(o.kmeans_iters));
  for (double f : o.quantiles) {
    if (!(f > 0 && f < 1)) return bad("calibration quantiles must be in (0, 1), got " + std::to_string(f));
  }
  if (o.page_rows < storage::kMinPageRows || o.page_rows > storage::kMaxPageRows) {
    return bad("page_rows must be in [" + std::to_string(storage::kMinPageRows) + ", " +
               std::to_string(storage::kMaxPageRows) + "], got " + std::to_string(o.page_rows));
  }
  if (!(o.coarse_share > 0 && o.coarse_share <= 1)) {
    return bad("coarse_share must be in (0, 1], got " + std::to_string(o.coarse_share));
  }
  return Status::OK();
}

// Locates the first non-finite element of a [rows_outer, rows, d] tensor for
// the error message (only called once AllFinite failed).
std::string FirstNonFinite(const uint8_t* data, DType t, int64_t outer, int64_t rows, int d, const char* outer_name) {
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(t);
  for (int64_t h = 0; h < outer; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      if (!AllFinite(data + (h * rows + r) * row_bytes, t, static_cast<size_t>(d))) {
        return std::string(outer_name) + " " + std::to_string(h) + ", token " + std::to_string(r);
      }
    }
  }
  return "unknown position";
}

class Builder {
 public:
  Builder(const ContextInfo& info, KvSource* source, const BuildOptions& options, storage::ContextWriter* writer)
      : info_(info),
        src_(source),
        opt_(options),
        shape_(source->shape()),
        writer_(writer),
        calib_(options.quantiles, options.coarse_share) {}

  Status Run(BuildStats* stats);

 private:
  struct LayerInput {
    std::vector<uint8_t> k, v;  // [n_kv_heads, n_tokens, head_dim], source dtype
    std::vector<float> q;       // window queries (calibration), float32
    double seconds = 0;         // time spent reading and checking
  };
  Status ReadInput(int layer, LayerInput* in);
  Status BuildLayer(int layer);
  Status ClusterHeads(int layer, int first, int count, std::vector<index::HeadClustering>* clusterings);
  Status BuildHead(int layer, int head, index::HeadClustering& c);
  Status WritePages(int layer, int head, const index::HeadClustering& c, std::vector<uint32_t>* crcs);
  Status CalibrateSecondPass();
  Status Commit();
  void Report(int layer, int head);

  ContextInfo info_;  // shapes and page geometry; counts and thresholds filled in as the build goes
  KvSource* src_;
  const BuildOptions& opt_;
  const KvShape shape_;
  storage::ContextWriter* writer_;
  index::Calibrator calib_;

  std::string describe_;  // src_->Describe(), taken once (the reader thread owns the source)
  Clock::time_point t0_;
  int64_t n_sinks_ = 0, window_ = 0, n_clustered_ = 0;
  bool calibrate_ = false;
  size_t row_bytes_ = 0;

  // Current layer (the streaming unit).
  std::vector<uint8_t> k_, v_;
  std::vector<float> q_;
  std::vector<float> keys_;  // one k-means batch of heads' clustered keys, float32 [heads, n_clustered, d]
  std::string page_;         // gather buffer of one KV page

  std::vector<int32_t> fine_clusters_, coarse_clusters_;
  std::vector<int64_t> histogram_;
  int64_t heads_done_ = 0;
  BuildStats st_;
};

Status Builder::Run(BuildStats* stats) {
  t0_ = Clock::now();
  n_sinks_ = info_.n_sinks;
  window_ = info_.window;
  n_clustered_ = info_.n_clustered;
  calibrate_ = shape_.q_window_len > 0 && !opt_.quantiles.empty();
  row_bytes_ = static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype);

  describe_ = src_->Describe();
  // The source is read one layer ahead on a second thread, overlapping the
  // next layer's I/O and checks with this layer's k-means and writes (two
  // layers of K and V in memory at most).
  LayerInput cur, next;
  SQZ_RETURN_IF_ERROR(ReadInput(0, &cur));
  for (int layer = 0; layer < shape_.n_layers; ++layer) {
    k_ = std::move(cur.k);
    v_ = std::move(cur.v);
    q_ = std::move(cur.q);
    st_.seconds_read += cur.seconds;
    cur = LayerInput();
    Status next_status;
    std::thread reader;
    if (layer + 1 < shape_.n_layers && opt_.read_ahead) {
      reader = std::thread([&, layer] {
        try {
          next_status = ReadInput(layer + 1, &next);
        } catch (const std::bad_alloc&) {
          next_status = Status::Aborted(describe_ + ": out of memory reading layer " + std::to_string(layer + 1));
        } catch (const std::exception& e) {
          next_status = Status::Aborted(describe_ + ": " + e.what());
        }
      });
    }
    Status s;
    try {
      s = BuildLayer(layer);
    } catch (...) {
      if (reader.joinable()) reader.join();
      throw;
    }
    if (reader.joinable()) reader.join();
    if (!s.ok()) return s;
    if (layer + 1 < shape_.n_layers) {
      if (!opt_.read_ahead) {
        Release(&k_);  // one layer in memory at a time
        Release(&v_);
        next_status = ReadInput(layer + 1, &next);
      }
      if (!next_status.ok()) return next_status;
      cur = std::move(next);
      next = LayerInput();
    }
  }
  // Release the last layer before calibration and commit.
  Release(&k_);
  Release(&v_);
  Release(&keys_);
  Release(&page_);
  if (calibrate_) SQZ_RETURN_IF_ERROR(CalibrateSecondPass());
  SQZ_RETURN_IF_ERROR(Commit());
  st_.seconds_total = SecondsSince(t0_);
  st_.peak_rss_bytes = PeakRssBytes();
  if (stats) *stats = st_;
  return Status::OK();
}

// Stage 1 (a reader thread, one layer ahead): read and check layer `layer`
// of the source into *in. Touches nothing but *in and the source.
Status Builder::ReadInput(int layer, LayerInput* in) {
  auto t = Clock::now();
  const std::string where = describe_ + ": layer " + std::to_string(layer);
  SQZ_RETURN_IF_ERROR(src_->ReadLayer(layer, &in->k, &in->v).WithPrefix(where));
  const size_t expect = static_cast<size_t>(shape_.n_kv_heads) * shape_.n_tokens * row_bytes_;
  if (in->k.size() != expect || in->v.size() != expect) {
    return Status::Corruption(where + ": source returned " + std::to_string(in->k.size()) + "/" +
                              std::to_string(in->v.size()) + " K/V bytes, expected " + std::to_string(expect));
  }
  const size_t numel = expect / DTypeSize(shape_.dtype);
  for (const auto& [buf, tname] : {std::pair{&in->k, "k"}, std::pair{&in->v, "v"}}) {
    if (!AllFinite(buf->data(), shape_.dtype, numel)) {
      return Status::InvalidArgument(
          describe_ + ": layers." + std::to_string(layer) + "." + tname + " (layer " + std::to_string(layer) +
          ") has a NaN or Inf value at " +
          FirstNonFinite(buf->data(), shape_.dtype, shape_.n_kv_heads, shape_.n_tokens, shape_.head_dim, "KV head"));
    }
  }
  if (calibrate_) {
    SQZ_RETURN_IF_ERROR(src_->ReadQWindow(layer, &in->q).WithPrefix(where));
    const size_t qn = static_cast<size_t>(shape_.n_q_heads) * shape_.q_window_len * shape_.head_dim;
    if (in->q.size() != qn) return Status::Corruption(where + ": window queries have the wrong size");
    if (!AllFinite(in->q.data(), DType::kF32, qn)) {
      return Status::InvalidArgument(describe_ + ": layers." + std::to_string(layer) + ".q_window (layer " +
                                     std::to_string(layer) + ") has a NaN or Inf value at " +
                                     FirstNonFinite(reinterpret_cast<const uint8_t*>(in->q.data()), DType::kF32,
                                                    shape_.n_q_heads, shape_.q_window_len, shape_.head_dim,
                                                    "query head"));
    }
  }
  in->seconds = SecondsSince(t);
  return Status::OK();
}

// Stages 2 and 3 (this thread): cluster the layer's heads, batch by batch
// (BuildOptions::kmeans_batch_bytes), and write their pages and index
// records.
Status Builder::BuildLayer(int layer) {
  const int n_heads = shape_.n_kv_heads;
  const size_t head_bytes = std::max<size_t>(1, static_cast<size_t>(n_clustered_) * shape_.head_dim * sizeof(float));
  const int batch = static_cast<int>(std::clamp<size_t>(opt_.kmeans_batch_bytes / head_bytes, 1, n_heads));
  std::vector<index::HeadClustering> clusterings;
  for (int first = 0; first < n_heads; first += batch) {
    const int count = std::min(batch, n_heads - first);
    SQZ_RETURN_IF_ERROR(ClusterHeads(layer, first, count, &clusterings));
    for (int i = 0; i < count; ++i) {
      SQZ_RETURN_IF_ERROR(BuildHead(layer, first + i, clusterings[i]));
      Report(layer, first + i);
    }
  }
  return Status::OK();
}

// KV heads [first, first + count) of the layer in one ClusterHeads call (one
// backend Run per k-means level).
Status Builder::ClusterHeads(int layer, int first, int count, std::vector<index::HeadClustering>* clusterings) {
  const int d = shape_.head_dim;
  auto t = Clock::now();
  const size_t head_numel = static_cast<size_t>(n_clustered_) * d;
  keys_.resize(head_numel * count);
  std::vector<index::HeadKeys> heads(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    const size_t head_off = static_cast<size_t>(first + i) * shape_.n_tokens * row_bytes_;
    float* dst = keys_.data() + i * head_numel;
    ConvertToFloat(k_.data() + head_off + n_sinks_ * row_bytes_, shape_.dtype, head_numel, dst);
    heads[i] = {dst, n_clustered_, d};
  }
  st_.seconds_read += SecondsSince(t);

  t = Clock::now();
  index::KMeansOptions ko;
  ko.fine_ratio = opt_.fine_ratio;
  ko.coarse_ratio = opt_.coarse_ratio;
  ko.iters = opt_.kmeans_iters;
  ko.seed = opt_.seed;
  clusterings->assign(static_cast<size_t>(count), index::HeadClustering());
  std::string where = "layer " + std::to_string(layer);
  if (count < shape_.n_kv_heads) {
    where += " heads " + std::to_string(first) + ".." + std::to_string(first + count - 1);
  }
  SQZ_RETURN_IF_ERROR(
      index::ClusterHeads(opt_.kmeans, heads.data(), heads.size(), ko, clusterings->data()).WithPrefix(where));
  st_.seconds_kmeans += SecondsSince(t);
  return Status::OK();
}

// Rounds centroids to the keys' 16-bit type (kept as floats): every value is
// then exact in that type, so the GPU engine's prefill scoring (16-bit
// tensor-core operands) uses the same numbers as the CPU engine
// (docs/FORMAT.md, "Centroids"). The rounding moves a centroid by at most
// 2^-9 (bf16) of each element.
void RoundToKeyType(std::vector<float>& c, DType t) {
  if (t != DType::kF16 && t != DType::kBF16) return;
  std::vector<uint16_t> r(c.size());
  ConvertFromFloat(c.data(), c.size(), t, r.data());
  ConvertToFloat(r.data(), t, r.size(), c.data());
}

Status Builder::BuildHead(int layer, int head, index::HeadClustering& c) {
  const int d = shape_.head_dim;
  auto t = Clock::now();
  st_.keys_clustered += n_clustered_;
  fine_clusters_.push_back(static_cast<int32_t>(c.n_fine()));
  coarse_clusters_.push_back(static_cast<int32_t>(c.n_coarse()));
  RoundToKeyType(c.fine_centroids, shape_.dtype);
  RoundToKeyType(c.coarse_centroids, shape_.dtype);

  if (calibrate_) {
    t = Clock::now();
    const int g = shape_.n_q_heads / shape_.n_kv_heads;
    const float* q = q_.data() + static_cast<size_t>(head) * g * shape_.q_window_len * d;
    calib_.AddFirstPass(index::ViewOf(c), q, g, shape_.q_window_len);
    st_.seconds_calibrate += SecondsSince(t);
  }

  t = Clock::now();
  storage::HeadIndexRecord rec;
  rec.layer = layer;
  rec.head = head;
  SQZ_RETURN_IF_ERROR(WritePages(layer, head, c, &rec.page_crc));
  rec.permutation.resize(c.permutation.size());
  for (size_t i = 0; i < c.permutation.size(); ++i) {
    rec.permutation[i] = c.permutation[i] + static_cast<uint32_t>(n_sinks_);
  }
  for (int64_t j = 0; j < c.n_fine(); ++j) {
    const uint32_t size = c.fine_offsets[j + 1] - c.fine_offsets[j];
    const size_t bucket = static_cast<size_t>(std::bit_width(size) - 1);
    if (histogram_.size() <= bucket) histogram_.resize(bucket + 1, 0);
    ++histogram_[bucket];
  }
  rec.fine_centroids = std::move(c.fine_centroids);
  rec.fine_offsets = std::move(c.fine_offsets);
  rec.coarse_centroids = std::move(c.coarse_centroids);
  rec.coarse_child_offsets = std::move(c.coarse_child_offsets);
  const size_t rec_bytes = 4 * (rec.fine_centroids.size() + rec.fine_offsets.size() + rec.coarse_centroids.size() +
                                rec.coarse_child_offsets.size() + rec.permutation.size() + rec.page_crc.size());
  SQZ_RETURN_IF_ERROR(writer_->PutHeadIndex(rec));
  st_.index_bytes += rec_bytes;
  st_.seconds_write += SecondsSince(t);
  return Status::OK();
}

// Rows of the head in the permuted order (clustered rows, then the always
// set: sinks then window) cut into pages of P rows: K plane then V plane,
// the last page of each run zero-padded (docs/FORMAT.md, "KV pages").
Status Builder::WritePages(int layer, int head, const index::HeadClustering& c, std::vector<uint32_t>* crcs) {
  const size_t head_off = static_cast<size_t>(head) * shape_.n_tokens * row_bytes_;
  const uint8_t* kh = k_.data() + head_off;
  const uint8_t* vh = v_.data() + head_off;
  const int64_t P = info_.page_rows;
  const size_t plane = static_cast<size_t>(P) * row_bytes_;
  std::vector<int64_t> rows;  // token positions of one run
  rows.reserve(static_cast<size_t>(n_clustered_));
  for (uint32_t r : c.permutation) rows.push_back(n_sinks_ + r);
  std::vector<int64_t> always;
  for (int64_t p = 0; p < n_sinks_; ++p) always.push_back(p);
  for (int64_t p = shape_.n_tokens - window_; p < shape_.n_tokens; ++p) always.push_back(p);

  crcs->clear();
  crcs->reserve(static_cast<size_t>(info_.pages_per_head()));
  int64_t page_id = 0;
  for (const std::vector<int64_t>* run : {&rows, &always}) {
    for (size_t first = 0; first < run->size(); first += static_cast<size_t>(P)) {
      const size_t n = std::min(run->size() - first, static_cast<size_t>(P));
      page_.assign(2 * plane, '\0');
      char* kd = page_.data();
      char* vd = page_.data() + plane;
      for (size_t i = 0; i < n; ++i) {
        const int64_t pos = (*run)[first + i];
        std::memcpy(kd + i * row_bytes_, kh + pos * row_bytes_, row_bytes_);
        std::memcpy(vd + i * row_bytes_, vh + pos * row_bytes_, row_bytes_);
      }
      crcs->push_back(Crc32c(page_.data(), page_.size()));
      st_.kv_bytes += page_.size();
      SQZ_RETURN_IF_ERROR(writer_->PutPage(layer, head, page_id++, page_));
    }
  }
  if (page_id != info_.pages_per_head()) {
    return Status::Aborted("internal: wrote " + std::to_string(page_id) + " pages, expected " +
                           std::to_string(info_.pages_per_head()));
  }
  return Status::OK();
}

Status Builder::CalibrateSecondPass() {
  auto t = Clock::now();
  calib_.FinishFirstPass();
  // The records are re-read from the database (visible once written, though
  // not yet committed) so no head's centroids had to stay in memory.
  const int d = shape_.head_dim;
  const int g = shape_.n_q_heads / shape_.n_kv_heads;
  storage::HeadIndexRecord rec;
  for (int layer = 0; layer < shape_.n_layers; ++layer) {
    SQZ_RETURN_IF_ERROR(
        src_->ReadQWindow(layer, &q_).WithPrefix(src_->Describe() + ": layer " + std::to_string(layer)));
    for (int head = 0; head < shape_.n_kv_heads; ++head) {
      SQZ_RETURN_IF_ERROR(writer_->GetHeadIndex(layer, head, &rec));
      index::HeadView v;
      v.dim = d;
      v.k2 = rec.n_fine();
      v.k1 = rec.n_coarse();
      v.fine_centroids = rec.fine_centroids.data();
      v.fine_offsets = rec.fine_offsets.data();
      v.coarse_centroids = rec.coarse_centroids.data();
      v.coarse_child_offsets = rec.coarse_child_offsets.data();
      const float* q = q_.data() + static_cast<size_t>(head) * g * shape_.q_window_len * d;
      calib_.AddSecondPass(v, q, g, shape_.q_window_len);
    }
  }
  Release(&q_);
  st_.seconds_calibrate += SecondsSince(t);
  return Status::OK();
}

Status Builder::Commit() {
  auto t = Clock::now();
  std::vector<index::Thresholds> th;
  if (calibrate_) th = calib_.Finish();

  ContextInfo info = info_;
  for (const auto& x : th) info.thresholds.push_back({x.quantile, x.flat, x.coarse, x.fine});
  info.fine_clusters = fine_clusters_;
  info.coarse_clusters = coarse_clusters_;
  info.cluster_size_histogram = histogram_;
  info.calibration_queries = calibrate_ ? shape_.q_window_len : 0;
  info.kv_bytes = st_.kv_bytes;
  info.index_bytes = st_.index_bytes;
  info.build_seconds = SecondsSince(t0_);
  info.created_unix = static_cast<int64_t>(std::time(nullptr));
  Status s = writer_->Commit(info, opt_.replace);
  st_.seconds_write += SecondsSince(t);
  return s;
}

void Builder::Report(int layer, int head) {
  ++heads_done_;
  if (!opt_.on_progress) return;
  BuildProgress p;
  p.layer = layer;
  p.head = head;
  p.n_layers = shape_.n_layers;
  p.n_kv_heads = shape_.n_kv_heads;
  p.heads_done = heads_done_;
  p.heads_total = static_cast<int64_t>(shape_.n_layers) * shape_.n_kv_heads;
  const double el = SecondsSince(t0_);
  p.keys_per_second = el > 0 ? static_cast<double>(st_.keys_clustered) / el : 0;
  p.eta_seconds = el / static_cast<double>(heads_done_) * static_cast<double>(p.heads_total - heads_done_);
  opt_.on_progress(p);
}

}  // namespace

Status BuildContext(DB* db, const std::string& name, KvSource* source, const BuildOptions& options, BuildStats* stats) {
  if (db == nullptr || source == nullptr) return Status::InvalidArgument("BuildContext: null db or source");
  if (name.empty()) return Status::InvalidArgument("BuildContext: the context name is empty");
  SQZ_RETURN_IF_ERROR(ValidateOptions(options));
  const KvShape& shape = source->shape();
  if (shape.n_tokens >= (int64_t{1} << 32)) {
    return Status::InvalidArgument(source->Describe() + ": " + std::to_string(shape.n_tokens) +
                                   " tokens; at most 2^32 - 1 are supported");
  }
  if (shape.n_layers <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 || shape.n_tokens <= 0 ||
      shape.n_q_heads <= 0 || shape.n_q_heads % shape.n_kv_heads != 0) {
    return Status::InvalidArgument(source->Describe() + ": invalid KV shape");
  }
  // The context's shapes and page geometry, known before any k-means.
  ContextInfo info;
  info.name = name;
  info.model = shape.model;
  info.n_layers = shape.n_layers;
  info.n_kv_heads = shape.n_kv_heads;
  info.n_q_heads = shape.n_q_heads;
  info.head_dim = shape.head_dim;
  info.n_tokens = shape.n_tokens;
  info.dtype = shape.dtype;
  info.n_sinks = static_cast<int>(std::min<int64_t>(options.n_sinks, shape.n_tokens));
  info.window = static_cast<int>(std::min<int64_t>(options.window, shape.n_tokens - info.n_sinks));
  info.n_clustered = shape.n_tokens - info.window - info.n_sinks;
  info.fine_ratio = options.fine_ratio;
  info.coarse_ratio = options.coarse_ratio;
  info.kmeans_iters = options.kmeans_iters;
  info.seed = options.seed;
  info.page_rows = options.page_rows;
  info.clustered_pages = storage::PagesFor(info.n_clustered, info.page_rows);
  info.always_pages = storage::PagesFor(info.n_always(), info.page_rows);

  std::unique_ptr<storage::ContextWriter> writer;
  SQZ_RETURN_IF_ERROR(db->store()->BeginContext(name, options.replace, info, &writer));
  info.id = writer->id();
  Status s;
  try {
    Builder b(info, source, options, writer.get());
    s = b.Run(stats);
  } catch (const std::bad_alloc&) {
    s = Status::Aborted("building context '" + name + "': out of memory");
  } catch (const std::exception& e) {
    s = Status::Aborted("building context '" + name + "': " + e.what());
  }
  if (!s.ok()) {
    // Leave the database as it was; report the build error, not the cleanup's.
    Status a = writer->Abort();
    if (!a.ok()) {
      // The leftovers are removed on the next open; say so after the cause.
      s = Status(s).WithPrefix("building context '" + name + "'");
      s = Status::IOError(s.message() + " [its partial records could not be removed now (" + a.message() +
                          "); the next open of the database removes them]");
    }
    return s;
  }
  return Status::OK();
}

}  // namespace sqz
