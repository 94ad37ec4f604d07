// BuildContext: KV source -> clustered, permuted KV blocks + per-head index
// records + calibrated thresholds -> one atomically committed context.
//
// Memory: the source is streamed layer by layer, so the peak is about one
// layer of K and V (source dtype) plus one head's keys in float32 and the
// writer's batch (storage flushes it every 32 MiB). Calibration keeps only
// weighted samples (one per cluster) between layers; its second pass reads
// the head indexes back from the (uncommitted) records instead of holding
// every head's centroids in memory.

#include <flatbuffers/flatbuffers.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <exception>
#include <string>
#include <vector>

#include "index/calibrate.h"
#include "index/kmeans.h"
#include "sqz/build.h"
#include "db_impl.h"
#include "format.h"
#include "format_generated.h"
#include "util/crc32c.h"
#include "util/half.h"

namespace sqz {

namespace {

using Clock = std::chrono::steady_clock;

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
  if (!(o.fine_ratio > 0 && o.fine_ratio <= 1)) return bad("fine_ratio must be in (0, 1], got " + std::to_string(o.fine_ratio));
  if (!(o.coarse_ratio > 0 && o.coarse_ratio <= 1)) {
    return bad("coarse_ratio must be in (0, 1], got " + std::to_string(o.coarse_ratio));
  }
  if (o.kmeans_iters < 1) return bad("kmeans_iters must be >= 1, got " + std::to_string(o.kmeans_iters));
  for (double f : o.quantiles) {
    if (!(f > 0 && f < 1)) return bad("calibration quantiles must be in (0, 1), got " + std::to_string(f));
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
  Builder(storage::DBImpl* db, const std::string& name, KvSource* source, const BuildOptions& options,
          storage::ContextWriter* writer)
      : db_(db), name_(name), src_(source), opt_(options), shape_(source->shape()), writer_(writer),
        calib_(options.quantiles, options.coarse_share) {}

  Status Run(BuildStats* stats);

 private:
  Status BuildLayer(int layer);
  Status BuildHead(int layer, int head);
  Status WriteBlocks(int layer, int head, const index::HeadClustering& c, std::vector<uint32_t>* crcs);
  Status CalibrateSecondPass();
  Status Commit();
  void Report(int layer, int head);

  storage::DBImpl* db_;
  const std::string& name_;
  KvSource* src_;
  const BuildOptions& opt_;
  const KvShape shape_;
  storage::ContextWriter* writer_;
  index::Calibrator calib_;

  Clock::time_point t0_;
  int64_t n_sinks_ = 0, window_ = 0, n_clustered_ = 0;
  bool calibrate_ = false;
  size_t row_bytes_ = 0;

  // Current layer (the streaming unit).
  std::vector<uint8_t> k_, v_;
  std::vector<float> q_;
  std::vector<float> keys_;  // one head's clustered keys, float32
  std::string block_;        // gather buffer of one KV block

  std::vector<int32_t> fine_clusters_, coarse_clusters_;
  int64_t heads_done_ = 0;
  BuildStats st_;
};

Status Builder::Run(BuildStats* stats) {
  t0_ = Clock::now();
  n_sinks_ = std::min<int64_t>(opt_.n_sinks, shape_.n_tokens);
  window_ = std::min<int64_t>(opt_.window, shape_.n_tokens - n_sinks_);
  n_clustered_ = shape_.n_tokens - window_ - n_sinks_;
  calibrate_ = shape_.q_window_len > 0 && !opt_.quantiles.empty();
  row_bytes_ = static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype);

  for (int layer = 0; layer < shape_.n_layers; ++layer) SQZ_RETURN_IF_ERROR(BuildLayer(layer));
  // Release the last layer before calibration and commit.
  k_ = {};
  v_ = {};
  keys_ = {};
  block_ = {};
  if (calibrate_) SQZ_RETURN_IF_ERROR(CalibrateSecondPass());
  SQZ_RETURN_IF_ERROR(Commit());
  st_.seconds_total = SecondsSince(t0_);
  st_.peak_rss_bytes = PeakRssBytes();
  if (stats) *stats = st_;
  return Status::OK();
}

Status Builder::BuildLayer(int layer) {
  auto t = Clock::now();
  const std::string where = src_->Describe() + ": layer " + std::to_string(layer);
  SQZ_RETURN_IF_ERROR(src_->ReadLayer(layer, &k_, &v_).WithPrefix(where));
  const size_t expect = static_cast<size_t>(shape_.n_kv_heads) * shape_.n_tokens * row_bytes_;
  if (k_.size() != expect || v_.size() != expect) {
    return Status::Corruption(where + ": source returned " + std::to_string(k_.size()) + "/" +
                              std::to_string(v_.size()) + " K/V bytes, expected " + std::to_string(expect));
  }
  const size_t numel = expect / DTypeSize(shape_.dtype);
  for (const auto& [buf, tname] : {std::pair{&k_, "k"}, std::pair{&v_, "v"}}) {
    if (!AllFinite(buf->data(), shape_.dtype, numel)) {
      return Status::InvalidArgument(src_->Describe() + ": layers." + std::to_string(layer) + "." + tname +
                                     " (layer " + std::to_string(layer) + ") has a NaN or Inf value at " +
                                     FirstNonFinite(buf->data(), shape_.dtype, shape_.n_kv_heads, shape_.n_tokens,
                                                    shape_.head_dim, "KV head"));
    }
  }
  if (calibrate_) {
    SQZ_RETURN_IF_ERROR(src_->ReadQWindow(layer, &q_).WithPrefix(where));
    const size_t qn = static_cast<size_t>(shape_.n_q_heads) * shape_.q_window_len * shape_.head_dim;
    if (q_.size() != qn) return Status::Corruption(where + ": window queries have the wrong size");
    if (!AllFinite(q_.data(), DType::kF32, qn)) {
      return Status::InvalidArgument(
          src_->Describe() + ": layers." + std::to_string(layer) + ".q_window (layer " + std::to_string(layer) +
          ") has a NaN or Inf value at " +
          FirstNonFinite(reinterpret_cast<const uint8_t*>(q_.data()), DType::kF32, shape_.n_q_heads,
                         shape_.q_window_len, shape_.head_dim, "query head"));
    }
  }
  st_.seconds_read += SecondsSince(t);
  for (int head = 0; head < shape_.n_kv_heads; ++head) {
    SQZ_RETURN_IF_ERROR(BuildHead(layer, head));
    Report(layer, head);
  }
  return Status::OK();
}

Status Builder::BuildHead(int layer, int head) {
  const int d = shape_.head_dim;
  const size_t head_off = static_cast<size_t>(head) * shape_.n_tokens * row_bytes_;

  auto t = Clock::now();
  keys_.resize(static_cast<size_t>(n_clustered_) * d);
  ConvertToFloat(k_.data() + head_off + n_sinks_ * row_bytes_, shape_.dtype, keys_.size(), keys_.data());
  st_.seconds_read += SecondsSince(t);

  t = Clock::now();
  index::KMeansOptions ko;
  ko.fine_ratio = opt_.fine_ratio;
  ko.coarse_ratio = opt_.coarse_ratio;
  ko.iters = opt_.kmeans_iters;
  ko.seed = opt_.seed;
  index::HeadClustering c;
  SQZ_RETURN_IF_ERROR(index::ClusterHead(keys_.data(), n_clustered_, d, ko, &c)
                          .WithPrefix("layer " + std::to_string(layer) + " head " + std::to_string(head)));
  st_.seconds_kmeans += SecondsSince(t);
  st_.keys_clustered += n_clustered_;
  fine_clusters_.push_back(static_cast<int32_t>(c.n_fine()));
  coarse_clusters_.push_back(static_cast<int32_t>(c.n_coarse()));

  if (calibrate_) {
    t = Clock::now();
    const int g = shape_.n_q_heads / shape_.n_kv_heads;
    const float* q = q_.data() + static_cast<size_t>(head) * g * shape_.q_window_len * d;
    calib_.AddFirstPass(index::ViewOf(c), q, g, shape_.q_window_len);
    st_.seconds_calibrate += SecondsSince(t);
  }

  t = Clock::now();
  std::vector<uint32_t> crcs;
  SQZ_RETURN_IF_ERROR(WriteBlocks(layer, head, c, &crcs));

  std::vector<uint32_t> perm(c.permutation.size());
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = c.permutation[i] + static_cast<uint32_t>(n_sinks_);
  std::vector<uint32_t> always;
  always.reserve(static_cast<size_t>(n_sinks_ + window_));
  for (int64_t p = 0; p < n_sinks_; ++p) always.push_back(static_cast<uint32_t>(p));
  for (int64_t p = shape_.n_tokens - window_; p < shape_.n_tokens; ++p) always.push_back(static_cast<uint32_t>(p));

  flatbuffers::FlatBufferBuilder fbb(1024 + c.fine_centroids.size() * 4 + perm.size() * 4);
  auto off = fb::CreateHeadIndex(fbb, layer, head, d, n_clustered_, fbb.CreateVector(c.fine_centroids),
                                 fbb.CreateVector(c.fine_offsets), fbb.CreateVector(c.coarse_centroids),
                                 fbb.CreateVector(c.coarse_child_offsets), fbb.CreateVector(perm),
                                 fbb.CreateVector(always), fbb.CreateVector(crcs));
  fbb.Finish(off);
  std::string_view rec(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
  SQZ_RETURN_IF_ERROR(writer_->PutHeadIndex(static_cast<uint32_t>(layer), static_cast<uint32_t>(head), rec));
  st_.index_bytes += rec.size();
  st_.seconds_write += SecondsSince(t);
  return Status::OK();
}

Status Builder::WriteBlocks(int layer, int head, const index::HeadClustering& c, std::vector<uint32_t>* crcs) {
  const size_t head_off = static_cast<size_t>(head) * shape_.n_tokens * row_bytes_;
  const uint8_t* kh = k_.data() + head_off;
  const uint8_t* vh = v_.data() + head_off;
  const uint32_t L = static_cast<uint32_t>(layer), H = static_cast<uint32_t>(head);
  // Gathers rows `pos` (token positions) of K then V into block_ and stores it.
  auto put = [&](uint32_t block, auto&& positions, size_t n) -> Status {
    block_.resize(2 * n * row_bytes_);
    char* dst = block_.data();
    for (int64_t p : positions) {
      std::memcpy(dst, kh + p * row_bytes_, row_bytes_);
      dst += row_bytes_;
    }
    for (int64_t p : positions) {
      std::memcpy(dst, vh + p * row_bytes_, row_bytes_);
      dst += row_bytes_;
    }
    crcs->push_back(Crc32c(block_.data(), block_.size()));
    st_.kv_bytes += block_.size();
    return writer_->PutBlock(L, H, block, block_);
  };

  struct Range {  // token positions n_sinks + permutation[b .. e)
    const uint32_t* perm;
    int64_t base;
    uint32_t b, e;
    struct It {
      const uint32_t* p;
      int64_t base;
      int64_t operator*() const { return base + *p; }
      It& operator++() { ++p; return *this; }
      bool operator!=(const It& o) const { return p != o.p; }
    };
    It begin() const { return {perm + b, base}; }
    It end() const { return {perm + e, base}; }
  };
  const int64_t k2 = c.n_fine();
  crcs->reserve(static_cast<size_t>(k2) + 1);
  for (int64_t j = 0; j < k2; ++j) {
    const uint32_t b = c.fine_offsets[j], e = c.fine_offsets[j + 1];
    SQZ_RETURN_IF_ERROR(put(static_cast<uint32_t>(j), Range{c.permutation.data(), n_sinks_, b, e}, e - b));
  }
  std::vector<int64_t> always;
  always.reserve(static_cast<size_t>(n_sinks_ + window_));
  for (int64_t p = 0; p < n_sinks_; ++p) always.push_back(p);
  for (int64_t p = shape_.n_tokens - window_; p < shape_.n_tokens; ++p) always.push_back(p);
  return put(storage::kAlwaysBlock, always, always.size());
}

Status Builder::CalibrateSecondPass() {
  auto t = Clock::now();
  calib_.FinishFirstPass();
  // The records are re-read from the database (visible once written, though
  // not yet committed) so no head's centroids had to stay in memory.
  SQZ_RETURN_IF_ERROR(writer_->Flush());
  const int d = shape_.head_dim;
  const int g = shape_.n_q_heads / shape_.n_kv_heads;
  std::string bytes;
  for (int layer = 0; layer < shape_.n_layers; ++layer) {
    SQZ_RETURN_IF_ERROR(src_->ReadQWindow(layer, &q_).WithPrefix(src_->Describe() + ": layer " + std::to_string(layer)));
    for (int head = 0; head < shape_.n_kv_heads; ++head) {
      SQZ_RETURN_IF_ERROR(db_->GetHeadIndex(writer_->id(), static_cast<uint32_t>(layer), static_cast<uint32_t>(head), &bytes));
      const fb::HeadIndex* hi = flatbuffers::GetRoot<fb::HeadIndex>(bytes.data());
      index::HeadView v;
      v.dim = d;
      v.k2 = hi->fine_offsets() ? static_cast<int64_t>(hi->fine_offsets()->size()) - 1 : 0;
      v.k1 = hi->coarse_child_offsets() ? static_cast<int64_t>(hi->coarse_child_offsets()->size()) - 1 : 0;
      if (v.k2 < 0 || v.k1 < 0 || !hi->fine_centroids() || !hi->coarse_centroids() ||
          hi->fine_centroids()->size() != static_cast<size_t>(v.k2) * d ||
          hi->coarse_centroids()->size() != static_cast<size_t>(v.k1) * d) {
        return Status::Corruption("re-reading layer " + std::to_string(layer) + " head " + std::to_string(head) +
                                  ": index record has inconsistent sizes");
      }
      v.fine_centroids = hi->fine_centroids()->data();
      v.fine_offsets = hi->fine_offsets()->data();
      v.coarse_centroids = hi->coarse_centroids()->data();
      v.coarse_child_offsets = hi->coarse_child_offsets()->data();
      const float* q = q_.data() + static_cast<size_t>(head) * g * shape_.q_window_len * d;
      calib_.AddSecondPass(v, q, g, shape_.q_window_len);
    }
  }
  q_ = {};
  st_.seconds_calibrate += SecondsSince(t);
  return Status::OK();
}

Status Builder::Commit() {
  auto t = Clock::now();
  std::vector<index::Thresholds> th;
  if (calibrate_) th = calib_.Finish();

  flatbuffers::FlatBufferBuilder fbb(4096);
  std::vector<flatbuffers::Offset<fb::Threshold>> toff;
  for (const auto& x : th) toff.push_back(fb::CreateThreshold(fbb, x.quantile, x.flat, x.coarse, x.fine));
  auto name_off = fbb.CreateString(name_);
  auto model_off = fbb.CreateString(shape_.model);
  auto fine_off = fbb.CreateVector(fine_clusters_);
  auto coarse_off = fbb.CreateVector(coarse_clusters_);
  auto th_off = fbb.CreateVector(toff);
  fb::ManifestBuilder mb(fbb);
  mb.add_format_version(storage::kFormatVersion);
  mb.add_context_id(writer_->id());
  mb.add_name(name_off);
  mb.add_model(model_off);
  mb.add_n_layers(shape_.n_layers);
  mb.add_n_kv_heads(shape_.n_kv_heads);
  mb.add_n_q_heads(shape_.n_q_heads);
  mb.add_head_dim(shape_.head_dim);
  mb.add_n_tokens(shape_.n_tokens);
  mb.add_dtype(static_cast<uint8_t>(shape_.dtype));
  mb.add_window(static_cast<int32_t>(window_));
  mb.add_n_sinks(static_cast<int32_t>(n_sinks_));
  mb.add_n_clustered(n_clustered_);
  mb.add_fine_ratio(opt_.fine_ratio);
  mb.add_coarse_ratio(opt_.coarse_ratio);
  mb.add_kmeans_iters(opt_.kmeans_iters);
  mb.add_seed(opt_.seed);
  mb.add_fine_clusters(fine_off);
  mb.add_coarse_clusters(coarse_off);
  mb.add_calibration_queries(calibrate_ ? shape_.q_window_len : 0);
  mb.add_thresholds(th_off);
  mb.add_kv_bytes(st_.kv_bytes);
  mb.add_index_bytes(st_.index_bytes);
  mb.add_build_seconds(SecondsSince(t0_));
  mb.add_created_unix(static_cast<int64_t>(std::time(nullptr)));
  fbb.Finish(mb.Finish());
  std::string_view bytes(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
  Status s = db_->CommitContext(writer_, name_, bytes, opt_.replace);
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

Status BuildContext(DB* db, const std::string& name, KvSource* source, const BuildOptions& options,
                    BuildStats* stats) {
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
  storage::DBImpl* impl = storage::Impl(db);
  // Fail fast rather than after hours of k-means (CommitContext re-checks
  // atomically, for concurrent builds).
  {
    std::string bytes;
    Status s = impl->GetManifest(name, &bytes);
    if (s.ok() && !options.replace) {
      return storage::ContextExistsError(name, db->path());
    }
    if (!s.ok() && !s.IsNotFound()) return s;
  }

  std::unique_ptr<storage::ContextWriter> writer;
  SQZ_RETURN_IF_ERROR(impl->BeginContext(&writer));
  Status s;
  try {
    Builder b(impl, name, source, options, writer.get());
    s = b.Run(stats);
  } catch (const std::bad_alloc&) {
    s = Status::Aborted("building context '" + name + "': out of memory");
  } catch (const std::exception& e) {
    s = Status::Aborted("building context '" + name + "': " + e.what());
  }
  if (!s.ok()) {
    // Leave the database as it was; report the build error, not the cleanup's.
    Status a = impl->AbortContext(writer.get());
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
