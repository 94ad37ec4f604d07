#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

#include "cuda_util.h"
#include "gpu/resident.h"
#include "gpu/streams.h"
#include "prefill.cuh"
#include "select.cuh"
#include "select_cluster.cuh"
#include "sparse_decode.cuh"
#include "util/half.h"

namespace sqz::gpu {

static_assert(kDecodeMaxRows == kMaxSelectRows, "resident.h states the decode kernels' limit");

namespace {

// A device allocation that grows (never shrinks) to the bytes asked.
struct Growable {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Growable() {
    if (ptr) cudaFree(ptr);
  }
  Status Reserve(size_t want) {
    if (want <= bytes) return Status::OK();
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    SQZ_CUDA_TRY(cudaMalloc(&ptr, want), "cudaMalloc");
    bytes = want;
    return Status::OK();
  }
};

constexpr size_t Align(size_t x) { return (x + 255) / 256 * 256; }

// Where each array of a call lives in the caller's workspace.
struct WsLayout {
  size_t qf = 0, scores = 0, keys = 0, flags = 0, coarse_keep = 0, seg_first = 0, seg_before = 0, stats = 0, part_m = 0,
         part_l = 0, chunk_weight = 0, chunk_scored = 0, hist = 0, split_seg = 0, part = 0, total = 0;
  // Prefill (G * T > kMaxSelectRows): the queries as the KV element type,
  // the rows' log2-denominators, the scoring tiles' partials per cluster and
  // the attended rows' stored rows (qf, scores, part_m / part_l and part
  // are then not laid out).
  size_t q16 = 0, row_lse = 0, pf_part = 0, rowlist = 0;
  bool prefill = false;
  int splits = 1, rows = 0, tiles_per_g = 0;
};

// Restores the caller's current device on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (prev_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

// Calls f(E{}) with E the element type of a query / output dtype (F32,
// F16 or BF16), for the kernels templated on it.
template <typename F>
cudaError_t WithElement(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      return f(float{});
    case DType::kF16:
      return f(__half{});
    default:
      return f(__nv_bfloat16{});
  }
}

// A switch for tests and measurements: the environment variable `name`
// equals `value`.
bool EnvIs(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

cudaError_t LaunchPrep(const DeviceCall& c, float* qf, int H, int G, int D, float scale, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(H) * G * c.T * D;
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
  return WithElement(c.dtype, [&](auto e) {
    using E = decltype(e);
    PrepQueriesKernel<E><<<blocks, 256, 0, s>>>(static_cast<const E*>(c.q), qf, H, G, c.T, D, c.token_major, scale);
    return cudaGetLastError();
  });
}

// Calls f(T{}, D) with T the KV element type and D the head dimension as a
// compile-time value.
template <int N>
using Int = std::integral_constant<int, N>;
template <typename F>
cudaError_t WithKvShape(DType kv, int D, F&& f) {
  auto with_t = [&](auto t) { return D == 64 ? f(t, Int<64>{}) : f(t, Int<128>{}); };
  return kv == DType::kF16 ? with_t(__half{}) : with_t(__nv_bfloat16{});
}

cudaError_t LaunchDecodeAny(const DecodeParams& p, const DecodeOutput& out, DType kv, int D, DType o_type,
                            cudaStream_t s, bool pdl) {
  return WithKvShape(kv, D, [&](auto t, auto d) {
    return WithElement(o_type, [&](auto o) {
      return LaunchSparseDecode<decltype(t), decltype(d)::value, decltype(o)>(p, out, s, pdl);
    });
  });
}

// Lets `kernel` use all the dynamic shared memory a block may opt in to
// (`optin`), less what it declares statically; *avail: that amount.
template <typename Kernel>
cudaError_t OptInSmem(Kernel kernel, int optin, size_t* avail) {
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess) return e;
  *avail = static_cast<size_t>(optin) > attr.sharedSizeBytes ? optin - attr.sharedSizeBytes : 0;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*avail));
}

class ResidentKvImpl final : public ResidentKv {
 public:
  ResidentKvImpl(int device, const ResidentShape& shape) : device_(device), shape_(shape) {}
  ~ResidentKvImpl() override {
    if (stream_) cudaStreamDestroy(stream_);
    if (pages_) cudaFree(pages_);
    if (index_) cudaFree(index_);
  }

  Status Init() {
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    page_bytes_ = 2 * static_cast<size_t>(shape_.page_rows) * shape_.head_dim * DTypeSize(shape_.dtype);
    page_buffer_bytes_ = static_cast<uint64_t>(shape_.n_layers) * shape_.n_heads * shape_.pages_per_head * page_bytes_;
    size_t free_b = 0, total_b = 0;
    SQZ_CUDA_TRY(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    if (page_buffer_bytes_ > free_b) {
      return Status::IOError("GPU " + std::to_string(device_) + " has " + std::to_string(free_b >> 20) +
                             " MiB free; the context's pages need " + std::to_string(page_buffer_bytes_ >> 20) +
                             " MiB (open fewer KV heads per handle, or wait for paging)");
    }
    SQZ_CUDA_TRY(cudaMalloc(&pages_, std::max<uint64_t>(page_buffer_bytes_, 1)), "cudaMalloc (KV pages)");
    SQZ_CUDA_TRY(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "SM count");
    {
      // SelectKernel stages a head's keys and sizes in shared memory when
      // they fit in what one block may opt in to (227 KiB on an H100: up to
      // ~25,000 clusters per head), less what the kernel declares statically.
      int optin = 0;
      SQZ_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_),
                   "shared memory per block");
      size_t avail = 0, cavail = 0;
      SQZ_CUDA_TRY(OptInSmem(SelectKernel<kSelectThreads>, optin, &avail), "SelectKernel shared memory");
      // SQZ_GPU_SELECT_UNSTAGED=1 (tests): the global-memory path, as for
      // heads with more clusters than fit.
      select_stage_max_ = EnvIs("SQZ_GPU_SELECT_UNSTAGED", "1") ? 0 : avail;
      // Decode selects heads of many clusters with ClusterSelectKernel (one
      // launch, a cluster of blocks per head) while a block's share of a
      // head's clusters fits (ClusterSelect). SQZ_GPU_SELECT_CLUSTER=1
      // (tests, comparisons): for every decode call; =0: never.
      SQZ_CUDA_TRY(OptInSmem(ClusterSelectKernel<kClusterSelectThreads>, optin, &cavail),
                   "ClusterSelectKernel shared memory");
      cluster_select_max_ = EnvIs("SQZ_GPU_SELECT_CLUSTER", "0") ? 0 : cavail;
      cluster_select_min_k_ = EnvIs("SQZ_GPU_SELECT_CLUSTER", "1") ? 0 : kClusterSelectMinClusters;
      // SQZ_GPU_SELECT_RADIX=1 (tests): the budget rule by radix select only.
      // SQZ_GPU_SELECT_CANDIDATES=0 (tests): the histogram rule finds its
      // boundary bin too full every time and hands over to the radix select.
      select_radix_ = EnvIs("SQZ_GPU_SELECT_RADIX", "1");
      max_candidates_ = EnvIs("SQZ_GPU_SELECT_CANDIDATES", "0") ? 0 : kMaxCandidates;
      // SQZ_GPU_PDL=0: the kernels of a call without programmatic dependent
      // launch (gpu/launch.cuh), for comparison.
      pdl_ = !EnvIs("SQZ_GPU_PDL", "0");
      // SQZ_GPU_SEGMENTS_UNSTAGED=1 (tests): the attention blocks read their
      // segments from global memory, as for shares of more than 256 segments.
      segments_unstaged_ = EnvIs("SQZ_GPU_SEGMENTS_UNSTAGED", "1");
      // SQZ_GPU_DECODE_SIMT=1: the decode attention on CUDA cores
      // (SparseDecodeSplitKernel), for tests and comparisons.
      decode_simt_ = EnvIs("SQZ_GPU_DECODE_SIMT", "1");
    }
    SQZ_CUDA_TRY(AllowPrefillSmem(), "prefill kernels' shared memory");
    SQZ_CUDA_TRY(WithKvShape(shape_.dtype, shape_.head_dim,
                             [](auto t, auto d) { return AllowDecodeSmem<decltype(t), decltype(d)::value>(); }),
                 "decode kernels' shared memory");
    SQZ_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    SQZ_RETURN_IF_ERROR(EnsureSideStreams(device_));  // for batches (AttendDeviceBatch), before any capture
    staged_.resize(static_cast<size_t>(shape_.n_layers) * shape_.n_heads);
    return Status::OK();
  }

  const ResidentShape& shape() const override { return shape_; }
  uint64_t bytes() const override { return page_buffer_bytes_ + index_bytes_; }
  int device() const override { return device_; }

  uint8_t* Page(int layer, int head, int64_t page) const {
    const uint64_t slot = (static_cast<uint64_t>(layer) * shape_.n_heads + head) * shape_.pages_per_head + page;
    return static_cast<uint8_t*>(pages_) + slot * page_bytes_;
  }

  Status Upload(int layer, int head, int64_t first_page, const void* data, int64_t n_pages) override {
    if (layer < 0 || layer >= shape_.n_layers || head < 0 || head >= shape_.n_heads || first_page < 0 || n_pages < 0 ||
        first_page + n_pages > shape_.pages_per_head) {
      return Status::InvalidArgument("ResidentKv::Upload: pages out of range");
    }
    std::lock_guard<std::mutex> lock(mu_);
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    SQZ_CUDA_TRY(cudaMemcpy(Page(layer, head, first_page), data, n_pages * page_bytes_, cudaMemcpyHostToDevice),
                 "uploading KV pages");
    return Status::OK();
  }

  Status SetIndex(int layer, int head, const HeadIndexHost& x) override {
    if (layer < 0 || layer >= shape_.n_layers || head < 0 || head >= shape_.n_heads || x.k2 < 1 || x.k1 < 0 ||
        x.fine_centroids == nullptr || x.fine_offsets == nullptr ||
        (x.k1 > 0 && (x.coarse_centroids == nullptr || x.coarse_child_offsets == nullptr))) {
      return Status::InvalidArgument("ResidentKv::SetIndex: bad head or index");
    }
    if (x.fine_offsets[0] != 0 || x.fine_offsets[x.k2] != shape_.n_clustered ||
        (x.k1 > 0 && (x.coarse_child_offsets[0] != 0 || x.coarse_child_offsets[x.k1] != static_cast<uint32_t>(x.k2)))) {
      return Status::InvalidArgument("ResidentKv::SetIndex: offsets do not cover the head");
    }
    const int D = shape_.head_dim;
    Staged& s = staged_[static_cast<size_t>(layer) * shape_.n_heads + head];
    s.set = true;
    s.k2 = x.k2;
    s.k1 = x.k1;
    s.fine_cent.assign(x.fine_centroids, x.fine_centroids + static_cast<size_t>(x.k2) * D);
    s.fine_offsets.assign(x.fine_offsets, x.fine_offsets + x.k2 + 1);
    s.coarse_cent.assign(x.coarse_centroids, x.coarse_centroids + static_cast<size_t>(x.k1) * D);
    if (x.k1 > 0) s.coarse_child.assign(x.coarse_child_offsets, x.coarse_child_offsets + x.k1 + 1);
    return Status::OK();
  }

  Status FinishIndex() override {
    const int D = shape_.head_dim;
    size_t n_fine = 0, n_coarse = 0;
    for (const Staged& s : staged_) {
      if (!s.set) return Status::InvalidArgument("ResidentKv::FinishIndex: a head has no index");
      n_fine += s.k2;
      n_coarse += s.k1;
      k2_max_ = std::max(k2_max_, s.k2);
      k1_max_ = std::max(k1_max_, s.k1);
    }
    // One buffer: meta [L*H], fine centroids, coarse centroids, then the
    // uint32 arrays: fine size / parent, coarse size (a fine cluster's first
    // stored row is the sum of the sizes before it).
    std::vector<HeadMeta> meta(staged_.size());
    std::vector<float> fc, cc;
    std::vector<uint32_t> fsize, fparent, csize;
    fc.reserve(n_fine * D);
    cc.reserve(n_coarse * D);
    for (size_t i = 0; i < staged_.size(); ++i) {
      const Staged& s = staged_[i];
      meta[i] = HeadMeta{static_cast<uint32_t>(fsize.size()), static_cast<uint32_t>(s.k2),
                         static_cast<uint32_t>(csize.size()), static_cast<uint32_t>(s.k1)};
      fc.insert(fc.end(), s.fine_cent.begin(), s.fine_cent.end());
      cc.insert(cc.end(), s.coarse_cent.begin(), s.coarse_cent.end());
      for (int j = 0; j < s.k2; ++j) fsize.push_back(s.fine_offsets[j + 1] - s.fine_offsets[j]);
      std::vector<uint32_t> parent(s.k2, 0);
      for (int a = 0; a < s.k1; ++a) {
        for (uint32_t j = s.coarse_child[a]; j < s.coarse_child[a + 1]; ++j) parent[j] = a;
        csize.push_back(s.fine_offsets[s.coarse_child[a + 1]] - s.fine_offsets[s.coarse_child[a]]);
      }
      fparent.insert(fparent.end(), parent.begin(), parent.end());
    }
    // The prefill kernels score with the centroids rounded to the KV element
    // type (tensor-core operands): for indexes built since 2026-11-25 the
    // same values as the fp32 ones (docs/FORMAT.md, "Centroids"). Decode
    // scoring reads the fp32 ones: a 16-bit decode scoring path measured
    // slower at 32K-512K (docs/results/2026-11-25-barrier-merge-512k.txt).
    std::vector<uint16_t> fc16(fc.size()), cc16(cc.size());
    ConvertFromFloat(fc.data(), fc.size(), shape_.dtype, fc16.data());
    ConvertFromFloat(cc.data(), cc.size(), shape_.dtype, cc16.data());
    const size_t o_meta = 0, o_fc = Align(meta.size() * sizeof(HeadMeta)), o_cc = o_fc + Align(fc.size() * 4),
                 o_fsize = o_cc + Align(cc.size() * 4), o_fparent = o_fsize + Align(fsize.size() * 4),
                 o_csize = o_fparent + Align(fparent.size() * 4), o_fc16 = o_csize + Align(csize.size() * 4 + 4),
                 o_cc16 = o_fc16 + Align(fc16.size() * 2), total = o_cc16 + Align(cc16.size() * 2 + 2);
    std::lock_guard<std::mutex> lock(mu_);
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    if (index_) cudaFree(index_);
    index_ = nullptr;
    SQZ_CUDA_TRY(cudaMalloc(&index_, total), "cudaMalloc (index)");
    index_bytes_ = total;
    uint8_t* b = static_cast<uint8_t*>(index_);
    auto put = [&](size_t off, const void* src, size_t bytes) -> Status {
      if (bytes > 0) SQZ_CUDA_TRY(cudaMemcpy(b + off, src, bytes, cudaMemcpyHostToDevice), "uploading the index");
      return Status::OK();
    };
    SQZ_RETURN_IF_ERROR(put(o_meta, meta.data(), meta.size() * sizeof(HeadMeta)));
    SQZ_RETURN_IF_ERROR(put(o_fc, fc.data(), fc.size() * 4));
    SQZ_RETURN_IF_ERROR(put(o_cc, cc.data(), cc.size() * 4));
    SQZ_RETURN_IF_ERROR(put(o_fsize, fsize.data(), fsize.size() * 4));
    SQZ_RETURN_IF_ERROR(put(o_fparent, fparent.data(), fparent.size() * 4));
    SQZ_RETURN_IF_ERROR(put(o_csize, csize.data(), csize.size() * 4));
    SQZ_RETURN_IF_ERROR(put(o_fc16, fc16.data(), fc16.size() * 2));
    SQZ_RETURN_IF_ERROR(put(o_cc16, cc16.data(), cc16.size() * 2));
    d_meta_ = reinterpret_cast<const HeadMeta*>(b + o_meta);
    d_fine_cent_ = reinterpret_cast<const float*>(b + o_fc);
    d_coarse_cent_ = reinterpret_cast<const float*>(b + o_cc);
    d_fine_size_ = reinterpret_cast<const uint32_t*>(b + o_fsize);
    d_fine_parent_ = reinterpret_cast<const uint32_t*>(b + o_fparent);
    d_coarse_size_ = reinterpret_cast<const uint32_t*>(b + o_csize);
    d_fine16_ = b + o_fc16;
    d_coarse16_ = b + o_cc16;
    staged_.clear();
    staged_.shrink_to_fit();
    return Status::OK();
  }

  int MaxT() const override { return kMaxPrefillRows / shape_.group; }
  bool Prefill(int T) const { return shape_.group * T > kMaxSelectRows; }
  static int PrefillRowsPerBlock() { return kPfWarps * kPfRowsPerWarp; }
  size_t ListStride() const { return static_cast<size_t>(shape_.n_clustered + shape_.n_always); }

  int KStride() const { return (std::max(k2_max_, k1_max_) + 3) / 4 * 4; }
  int K1Stride() const { return (std::max(k1_max_, 1) + 15) / 16 * 16; }
  int SegStride() const { return k2_max_ / 2 + 2; }

  Status Layout(int T, const SelectConfig& c, WsLayout* w) const {
    if (d_meta_ == nullptr) return Status::InvalidArgument("ResidentKv: the index was not uploaded (FinishIndex)");
    if (T < 1 || T > MaxT()) {
      return Status::NotSupported(
          "GPU engine: T = " + std::to_string(T) + " queries; this release takes 1.." + std::to_string(MaxT()) +
          " per call on the GPU (G * T <= " + std::to_string(kMaxPrefillRows) + " query rows per KV head)");
    }
    if (c.mode < 0 || c.mode > 2 || !(c.scale > 0) || !std::isfinite(c.scale)) {
      return Status::InvalidArgument("GPU engine: bad selection config");
    }
    const int H = shape_.n_heads, D = shape_.head_dim, R = shape_.group * T;
    w->prefill = Prefill(T);
    w->splits = w->prefill ? 1 : Splits(H, R, ExpectedRows(c));
    w->rows = R;
    const size_t ks = KStride();
    size_t off = 0;
    auto take = [&](size_t* field, size_t bytes) {
      *field = off;
      off += Align(std::max<size_t>(bytes, 1));
    };
    // The selection's arrays (both paths).
    take(&w->keys, static_cast<size_t>(H) * ks * 4);
    take(&w->flags, static_cast<size_t>(H) * ks);
    take(&w->coarse_keep, static_cast<size_t>(H) * K1Stride() * sizeof(HeadMask));
    take(&w->seg_first, static_cast<size_t>(H) * SegStride() * 4);
    take(&w->seg_before, static_cast<size_t>(H) * SegStride() * 4);
    take(&w->stats, static_cast<size_t>(H) * kStatCount * 4);
    const size_t chunks = (ks + kChunkClusters - 1) / kChunkClusters;
    take(&w->chunk_weight, static_cast<size_t>(H) * chunks * 4);
    take(&w->chunk_scored, static_cast<size_t>(H) * chunks * 4);
    take(&w->hist, c.mode == 1 ? static_cast<size_t>(H) * kKeyBins * 4 : 0);
    take(&w->split_seg, static_cast<size_t>(H) * w->splits * 4);
    if (w->prefill) {
      const int rt = PrefillRowsPerBlock();
      w->tiles_per_g = (T + rt - 1) / rt;
      take(&w->q16, static_cast<size_t>(H) * R * D * DTypeSize(shape_.dtype));
      take(&w->row_lse, static_cast<size_t>(H) * R * 4);
      take(&w->pf_part, c.mode == 0 ? 0 : static_cast<size_t>(H) * shape_.group * w->tiles_per_g * ks * 4);
      take(&w->rowlist, static_cast<size_t>(H) * ListStride() * 4);
    } else {
      const size_t parts = (ks + kScoreChunk - 1) / kScoreChunk;
      take(&w->qf, static_cast<size_t>(H) * R * D * 4);
      take(&w->scores, static_cast<size_t>(H) * R * ks * 4);
      take(&w->part_m, static_cast<size_t>(H) * R * parts * 4);
      take(&w->part_l, static_cast<size_t>(H) * R * parts * 4);
      take(&w->part, DecodeWorkspaceFloats(H, R, D, w->splits) * 4);
    }
    w->total = off;
    return Status::OK();
  }

  // Rows a call is expected to attend per head (the decode split count's guide).
  double ExpectedRows(const SelectConfig& c) const {
    const double all = static_cast<double>(shape_.n_clustered + shape_.n_always);
    if (c.mode != 1) return all;
    return std::min(all, std::max(0.0, c.budget) * 1.25 * shape_.n_clustered + shape_.n_always);
  }

  Status WorkspaceBytes(int T, const SelectConfig& config, size_t* bytes) const override {
    WsLayout w;
    SQZ_RETURN_IF_ERROR(Layout(T, config, &w));
    *bytes = w.total;
    return Status::OK();
  }

  DecodeParams LayerDecodeParams(int layer) const {
    DecodeParams p;
    p.pages = Page(layer, 0, 0);
    p.page_bytes = page_bytes_;
    p.pages_per_head = shape_.pages_per_head;
    p.n_heads = shape_.n_heads;
    p.page_rows = shape_.page_rows;
    p.page_shift = (shape_.page_rows & (shape_.page_rows - 1)) == 0 ? __builtin_ctz(shape_.page_rows) : -1;
    p.n_clustered = shape_.n_clustered;
    p.clustered_pages = shape_.clustered_pages;
    p.simt = decode_simt_;
    return p;
  }

  // The selection parameters both paths share (workspace arrays, the rule's
  // inputs, the head's sizes).
  SelectParams BaseSelectParams(const DeviceCall& c, const SelectConfig& cfg, const WsLayout& w) const {
    const int H = shape_.n_heads, R = w.rows;
    uint8_t* ws = static_cast<uint8_t*>(c.workspace);
    SelectParams sp;
    sp.H = H;
    sp.G = shape_.group;
    sp.T = c.T;
    sp.meta = d_meta_ + static_cast<size_t>(c.layer) * H;
    sp.mode = cfg.mode;
    sp.k_stride = KStride();
    sp.keys = reinterpret_cast<uint32_t*>(ws + w.keys);
    sp.flags = ws + w.flags;
    sp.coarse_keep = reinterpret_cast<HeadMask*>(ws + w.coarse_keep);
    sp.k1_stride = K1Stride();
    sp.seg_first = reinterpret_cast<uint32_t*>(ws + w.seg_first);
    sp.seg_before = reinterpret_cast<uint32_t*>(ws + w.seg_before);
    sp.seg_stride = SegStride();
    sp.stats = reinterpret_cast<uint32_t*>(ws + w.stats);
    sp.chunk_weight = reinterpret_cast<uint32_t*>(ws + w.chunk_weight);
    sp.chunk_scored = reinterpret_cast<uint32_t*>(ws + w.chunk_scored);
    sp.hist = cfg.mode == 1 && !select_radix_ ? reinterpret_cast<uint32_t*>(ws + w.hist) : nullptr;
    sp.bin_lo = std::log(static_cast<float>(R)) - kKeySpan;
    sp.max_candidates = max_candidates_;
    sp.split_seg = reinterpret_cast<uint32_t*>(ws + w.split_seg);
    sp.splits = w.splits;
    sp.n_clustered = static_cast<uint32_t>(shape_.n_clustered);
    sp.n_always = static_cast<uint32_t>(shape_.n_always);
    return sp;
  }

  Status Attend(const DeviceCall& c, const SelectConfig& cfg) const override {
    if (c.layer < 0 || c.layer >= shape_.n_layers) {
      return Status::InvalidArgument("GPU engine: layer " + std::to_string(c.layer) + " out of range [0, " +
                                     std::to_string(shape_.n_layers) + ")");
    }
    WsLayout w;
    SQZ_RETURN_IF_ERROR(Layout(c.T, cfg, &w));
    if (c.q == nullptr || c.o == nullptr || c.lse == nullptr) {
      return Status::InvalidArgument("GPU engine: q, o and lse must be device pointers");
    }
    if (c.dtype != DType::kF32 && c.dtype != DType::kF16 && c.dtype != DType::kBF16) {
      return Status::InvalidArgument("GPU engine: q / o dtype must be F32, F16 or BF16");
    }
    if (c.workspace == nullptr || c.workspace_bytes < w.total) {
      return Status::InvalidArgument("GPU engine: workspace of " + std::to_string(c.workspace_bytes) +
                                     " bytes; this call needs " + std::to_string(w.total) + " (WorkspaceBytes)");
    }
    const int H = shape_.n_heads, G = shape_.group, D = shape_.head_dim, T = c.T, R = w.rows;
    DeviceGuard guard(device_);
    uint8_t* ws = static_cast<uint8_t*>(c.workspace);
    SelectParams sp = BaseSelectParams(c, cfg, w);
    if (w.prefill) return AttendPrefill(c, cfg, w, sp);
    auto s = static_cast<cudaStream_t>(c.stream);
    float* qf = reinterpret_cast<float*>(ws + w.qf);  // the queries, fp32, scaled, [H][R][D]

    // 1. Selection and the segment table, on the device (the scoring kernel
    // also converts the queries for the attention kernel).
    const HeadMeta* meta = sp.meta;
    float* scores = reinterpret_cast<float*>(ws + w.scores);
    sp.scores = scores;
    sp.part_m = reinterpret_cast<float*>(ws + w.part_m);
    sp.part_l = reinterpret_cast<float*>(ws + w.part_l);
    sp.scored_div = static_cast<uint32_t>(T);
    ScoreParams sc;
    sc.q = c.q;
    sc.q_vec = reinterpret_cast<uintptr_t>(c.q) % 16 == 0;
    sc.token_major = c.token_major;
    sc.scale = cfg.scale;
    sc.qf = qf;
    sc.H = H;
    sc.G = G;
    sc.T = T;
    sc.meta = meta;
    sc.scores = scores;
    sc.k_stride = sp.k_stride;
    sc.part_m = reinterpret_cast<float*>(ws + w.part_m);
    sc.part_l = reinterpret_cast<float*>(ws + w.part_l);
    if (cfg.mode == 0) {
      SQZ_CUDA_TRY(LaunchPrep(c, qf, H, G, D, cfg.scale, s), "launching the query conversion");
      SQZ_CUDA_TRY(LaunchKernel(pdl_, DenseSelectKernel<0>, dim3(H), dim3(32), 0, s, sp),
                   "launching the dense selection");
    } else {
      SQZ_RETURN_IF_ERROR(SelectLevels(sp, cfg, s, [&](bool coarse) {
        SetLevel(&sc, coarse, cfg, sp, d_coarse_cent_, d_fine_cent_);
        sc.hist = ClusterSelect(sp, coarse ? k1_max_ : k2_max_) ? nullptr : sp.hist;
        // (The coarse scoring is the call's first kernel: no PDL.)
        return LaunchScore(sc, coarse ? k1_max_ : k2_max_, c.dtype, s, !coarse && cfg.hierarchical && pdl_);
      }));
    }

    // 2. Attention over the segments, and the merge into O / LSE.
    DecodeParams dp = LayerDecodeParams(c.layer);
    dp.seg_first = sp.seg_first;
    dp.seg_before = sp.seg_before;
    dp.seg_stride = sp.seg_stride;
    dp.seg_count = sp.stats + kStatSegments;
    dp.head_rows = sp.stats + kStatHeadRows;
    dp.count_stride = kStatCount;
    dp.split_seg = sp.split_seg;
    if (segments_unstaged_) dp.seg_cache = 0;
    dp.rows = R;
    dp.q = qf;
    dp.splits = w.splits;
    dp.part_o = reinterpret_cast<float*>(ws + w.part);
    dp.part_m = dp.part_o + static_cast<size_t>(H) * R * w.splits * D;
    dp.part_l = dp.part_m + static_cast<size_t>(H) * R * w.splits;
    DecodeOutput out;
    out.o = c.o;
    out.lse = c.lse;
    out.G = G;
    out.T = T;
    out.token_major = c.token_major;
    out.lse_base2 = c.lse_base2;
    SQZ_CUDA_TRY(LaunchDecodeAny(dp, out, shape_.dtype, D, c.dtype, s, pdl_), "launching the sparse attention");
    return Status::OK();
  }

  // Prefill (G * T > kMaxSelectRows, gpu/prefill.cuh): the queries as the
  // KV element type; selection scored on tensor cores in two passes per
  // level, the keys kernel merging the passes' partials, the select kernel
  // as for decode; the segments expanded into a row list; flash attention
  // over it. Launch order as for decode: the first kernel follows the
  // caller's work, the others use programmatic dependent launch.
  Status AttendPrefill(const DeviceCall& c, const SelectConfig& cfg, const WsLayout& w, SelectParams sp) const {
    const int H = shape_.n_heads, G = shape_.group, D = shape_.head_dim, T = c.T;
    auto s = static_cast<cudaStream_t>(c.stream);
    uint8_t* ws = static_cast<uint8_t*>(c.workspace);
    void* q16 = ws + w.q16;
    SQZ_CUDA_TRY(LaunchPrep16(c, q16), "launching the query conversion");
    sp.pf_part = reinterpret_cast<const float*>(ws + w.pf_part);
    sp.pf_tiles_per_g = w.tiles_per_g;
    sp.scored_div = 1;
    PrefillScoreParams ps;
    ps.H = H;
    ps.G = G;
    ps.T = T;
    ps.q16 = q16;
    ps.scale_log2 = cfg.scale * kLog2e;
    ps.meta = sp.meta;
    ps.row_lse = reinterpret_cast<float*>(ws + w.row_lse);
    ps.part = reinterpret_cast<float*>(ws + w.pf_part);
    ps.k_stride = sp.k_stride;
    ps.tiles_per_g = w.tiles_per_g;
    ps.hist = sp.hist;
    if (cfg.mode == 0) {
      SQZ_CUDA_TRY(LaunchKernel(pdl_, DenseSelectKernel<0>, dim3(H), dim3(32), 0, s, sp),
                   "launching the dense selection");
    } else {
      SQZ_RETURN_IF_ERROR(SelectLevels(sp, cfg, s, [&](bool coarse) {
        SetLevel(&ps, coarse, cfg, sp, d_coarse16_, d_fine16_);
        const cudaError_t e = LaunchPrefillScore(ps, false, s);
        return e != cudaSuccess ? e : LaunchPrefillScore(ps, true, s);
      }));
    }
    uint32_t* rowlist = reinterpret_cast<uint32_t*>(ws + w.rowlist);
    SQZ_CUDA_TRY(LaunchKernel(pdl_, RowListKernel<0>, dim3(H, kRowListBlocks), dim3(256), 0, s, sp.seg_first,
                              sp.seg_before, sp.seg_stride, sp.stats, rowlist, ListStride()),
                 "launching the row list");
    PrefillAttendParams ap;
    ap.kv = LayerDecodeParams(c.layer);
    ap.q16 = q16;
    ap.rowlist = rowlist;
    ap.list_stride = ListStride();
    ap.stats = sp.stats;
    ap.scale_log2 = ps.scale_log2;
    ap.tiles_per_g = w.tiles_per_g;
    ap.out.o = c.o;
    ap.out.lse = c.lse;
    ap.out.G = G;
    ap.out.T = T;
    ap.out.token_major = c.token_major;
    ap.out.lse_base2 = c.lse_base2;
    const dim3 grid(G * w.tiles_per_g, H);
    SQZ_CUDA_TRY(WithKvShape(shape_.dtype, D,
                             [&](auto t, auto d) {
                               using T = decltype(t);
                               constexpr int kD = decltype(d)::value, kW = kPfWarps;
                               return WithElement(c.dtype, [&](auto o) {
                                 return LaunchKernel(pdl_, PrefillAttendKernel<T, kD, kW, decltype(o)>, grid,
                                                     dim3(kW * 32), PrefillAttendSmem<kD, kW>(), s, ap);
                               });
                             }),
                 "launching the prefill attention");
    return Status::OK();
  }

  // The caller's queries as the KV element type, unscaled, [H][R][D].
  cudaError_t LaunchPrep16(const DeviceCall& c, void* q16) const {
    const int H = shape_.n_heads, G = shape_.group, D = shape_.head_dim;
    const int64_t n = static_cast<int64_t>(H) * G * c.T * D;
    const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
    auto s = static_cast<cudaStream_t>(c.stream);
    return WithElement(c.dtype, [&](auto e) {
      using E = decltype(e);
      const E* q = static_cast<const E*>(c.q);
      if (shape_.dtype == DType::kF16) {
        PrepQueriesKernel<E, __half>
            <<<blocks, 256, 0, s>>>(q, static_cast<__half*>(q16), H, G, c.T, D, c.token_major, 1.f);
      } else {
        PrepQueriesKernel<E, __nv_bfloat16>
            <<<blocks, 256, 0, s>>>(q, static_cast<__nv_bfloat16*>(q16), H, G, c.T, D, c.token_major, 1.f);
      }
      return cudaGetLastError();
    });
  }

  // One pass of the prefill scoring over a level (pass 2: the partials).
  cudaError_t LaunchPrefillScore(const PrefillScoreParams& ps, bool pass2, cudaStream_t s) const {
    return WithKvShape(shape_.dtype, shape_.head_dim, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int kD = decltype(d)::value, kW = kPfWarps;
      void (*kernel)(PrefillScoreParams) =
          pass2 ? PrefillScoreKernel<T, kD, kW, true> : PrefillScoreKernel<T, kD, kW, false>;
      return LaunchKernel(pdl_, kernel, dim3(ps.G * ps.tiles_per_g, ps.H), dim3(kW * 32), PrefillScoreSmem<kD, kW>(), s,
                          ps);
    });
  }

  // The prefill kernels' dynamic shared memory (over the 48 KiB default).
  cudaError_t AllowPrefillSmem() const {
    return WithKvShape(shape_.dtype, shape_.head_dim, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int kD = decltype(d)::value, kW = kPfWarps;
      const int score = static_cast<int>(PrefillScoreSmem<kD, kW>());
      const int attend = static_cast<int>(PrefillAttendSmem<kD, kW>());
      cudaError_t e = cudaFuncSetAttribute(PrefillScoreKernel<T, kD, kW, false>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, score);
      if (e == cudaSuccess) {
        e = cudaFuncSetAttribute(PrefillScoreKernel<T, kD, kW, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 score);
      }
      for (DType o : {DType::kF32, DType::kF16, DType::kBF16}) {
        if (e != cudaSuccess) break;
        e = WithElement(o, [&](auto x) {
          return cudaFuncSetAttribute(PrefillAttendKernel<T, kD, kW, decltype(x)>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, attend);
        });
      }
      return e;
    });
  }

  Status AttendHost(int layer, int T, const float* q, const SelectConfig& cfg, float* o, float* lse,
                    DeviceSelection* sel) override {
    WsLayout w;
    SQZ_RETURN_IF_ERROR(Layout(T, cfg, &w));
    const int H = shape_.n_heads, D = shape_.head_dim;
    const size_t rows = static_cast<size_t>(H) * shape_.group * T;
    std::lock_guard<std::mutex> lock(mu_);
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    SQZ_RETURN_IF_ERROR(io_.Reserve(Align(rows * D * 4) * 2 + Align(rows * 4)));
    SQZ_RETURN_IF_ERROR(ws_.Reserve(w.total));
    uint8_t* io = static_cast<uint8_t*>(io_.ptr);
    float* dq = reinterpret_cast<float*>(io);
    float* d_o = reinterpret_cast<float*>(io + Align(rows * D * 4));
    float* dl = reinterpret_cast<float*>(io + 2 * Align(rows * D * 4));
    SQZ_CUDA_TRY(cudaMemcpyAsync(dq, q, rows * D * 4, cudaMemcpyHostToDevice, stream_), "uploading queries");
    DeviceCall c;
    c.layer = layer;
    c.T = T;
    c.q = dq;
    c.o = d_o;
    c.lse = dl;
    c.dtype = DType::kF32;
    c.token_major = false;
    c.workspace = ws_.ptr;
    c.workspace_bytes = ws_.bytes;
    c.stream = stream_;
    SQZ_RETURN_IF_ERROR(Attend(c, cfg));
    SQZ_CUDA_TRY(cudaMemcpyAsync(o, d_o, rows * D * 4, cudaMemcpyDeviceToHost, stream_), "downloading O");
    SQZ_CUDA_TRY(cudaMemcpyAsync(lse, dl, rows * 4, cudaMemcpyDeviceToHost, stream_), "downloading LSE");
    std::vector<uint32_t> stats, first, before;
    if (sel) {
      const uint8_t* ws = static_cast<const uint8_t*>(ws_.ptr);
      stats.resize(static_cast<size_t>(H) * kStatCount);
      first.resize(static_cast<size_t>(H) * SegStride());
      before.resize(first.size());
      SQZ_CUDA_TRY(cudaMemcpyAsync(stats.data(), ws + w.stats, stats.size() * 4, cudaMemcpyDeviceToHost, stream_),
                   "downloading the selection");
      SQZ_CUDA_TRY(cudaMemcpyAsync(first.data(), ws + w.seg_first, first.size() * 4, cudaMemcpyDeviceToHost, stream_),
                   "downloading the selection");
      SQZ_CUDA_TRY(
          cudaMemcpyAsync(before.data(), ws + w.seg_before, before.size() * 4, cudaMemcpyDeviceToHost, stream_),
          "downloading the selection");
    }
    SQZ_CUDA_TRY(cudaStreamSynchronize(stream_), "running the GPU engine");
    if (sel) {
      *sel = DeviceSelection();
      sel->seg_offsets.push_back(0);
      for (int h = 0; h < H; ++h) {
        const uint32_t* st = stats.data() + h * kStatCount;
        const size_t b = static_cast<size_t>(h) * SegStride();
        for (uint32_t i = 0; i < st[kStatSegments]; ++i) {
          const uint32_t end = i + 1 < st[kStatSegments] ? before[b + i + 1] : st[kStatHeadRows];
          sel->seg_first.push_back(first[b + i]);
          sel->seg_rows.push_back(end - before[b + i]);
        }
        sel->seg_offsets.push_back(static_cast<uint32_t>(sel->seg_first.size()));
        sel->clusters_scored.push_back(st[kStatScored]);
        sel->clusters_kept.push_back(st[kStatKept]);
      }
    }
    return Status::OK();
  }

 private:
  // Blocks per head of the split kernel: one full wave of resident blocks
  // (tensor-core kernel: kMmaBlocksPerSm; CUDA-core kernel: 4 for up to 4 query
  // rows per block, 2 for 8), at least 64 rows each of the expected `rows`.
  int Splits(int H, int R, double rows) const {
    const bool mma = UseMmaDecode(LayerDecodeParams(0));
    const int per_block = DecodeRowsPerBlock(R, mma);
    const int chunks = (R + per_block - 1) / per_block;
    const int per_sm = mma ? kMmaBlocksPerSm : R <= 4 ? 4 : 2;
    const int wave = std::max(1, per_sm * sm_count_ / (H * chunks));
    return std::max(1, std::min({wave, kMaxSplits, static_cast<int>(std::ceil(rows / 64.0))}));
  }

  // The selection's levels: (hierarchical: the coarse scoring and rule, then)
  // the fine scoring and rule; score(coarse) launches a level's scoring.
  template <typename Score>
  Status SelectLevels(SelectParams sp, const SelectConfig& cfg, cudaStream_t s, Score&& score) const {
    if (cfg.hierarchical) {
      SQZ_CUDA_TRY(score(true), "launching the coarse scoring");
      SQZ_CUDA_TRY(LaunchLevelSelect(sp, cfg, true, s), "launching the coarse selection");
      sp.parent = d_fine_parent_;  // the fine stage reads the coarse keep masks through it
    }
    SQZ_CUDA_TRY(score(false), "launching the centroid scoring");
    SQZ_CUDA_TRY(LaunchLevelSelect(sp, cfg, false, s), "launching the selection");
    return Status::OK();
  }

  // A scoring kernel's level (ScoreParams or PrefillScoreParams): its
  // centroids (coarse_c / fine_c, as that kernel reads them) and sizes; in
  // the fine stage of a hierarchical lookup the parents and coarse keep masks.
  template <typename P>
  void SetLevel(P* p, bool coarse, const SelectConfig& cfg, const SelectParams& sp, const void* coarse_c,
                const void* fine_c) const {
    using C = decltype(p->centroids);
    p->coarse = coarse;
    p->centroids = static_cast<C>(coarse ? coarse_c : fine_c);
    p->sizes = coarse ? d_coarse_size_ : d_fine_size_;
    const bool children = !coarse && cfg.hierarchical;
    p->parent = children ? d_fine_parent_ : nullptr;
    p->coarse_keep = children ? sp.coarse_keep : nullptr;
    p->k1_stride = sp.k1_stride;
  }

  // One level's rule (coarse: the coarse clusters, the budget times the
  // coarse factor, tau_coarse; fine: after a coarse stage when
  // hierarchical), then its keys and select kernels.
  cudaError_t LaunchLevelSelect(SelectParams sp, const SelectConfig& cfg, bool coarse, cudaStream_t s) const {
    const double n = static_cast<double>(shape_.n_clustered);
    if (coarse) {
      sp.coarse = true;
      sp.sizes = d_coarse_size_;
      sp.target = std::min(1.0, cfg.coarse_budget_factor * cfg.budget) * n;
      sp.tau = cfg.tau_coarse;
      return LaunchSelect(sp, k1_max_, s);
    }
    sp.sizes = d_fine_size_;
    sp.hierarchical = cfg.hierarchical;
    sp.target = cfg.budget * n;
    sp.tau = cfg.hierarchical ? cfg.tau_fine : cfg.tau_flat;
    return LaunchSelect(sp, k2_max_, s);
  }

  // Selection of one level after its scoring: the keys per chunk of clusters
  // (every SM), then the rule and the compaction (a block per head).
  cudaError_t LaunchSelect(SelectParams sp, int k_max, cudaStream_t s) const {
    sp.n_chunks = std::max(1, (k_max + kChunkClusters - 1) / kChunkClusters);
    sp.n_parts = ScoreParts(k_max);
    if (ClusterSelect(sp, k_max)) {
      return LaunchKernel(pdl_, ClusterSelectKernel<kClusterSelectThreads>, dim3(kSelectCtas, shape_.n_heads),
                          dim3(kClusterSelectThreads), ClusterSelectSmem(sp.k_stride), s, sp);
    }
    cudaError_t e = LaunchKernel(pdl_, KeysKernel<kChunkClusters>, dim3(sp.n_chunks, shape_.n_heads),
                                 dim3(kChunkClusters), 0, s, sp);
    if (e != cudaSuccess) return e;
    const size_t stage = SelectStageBytes(sp.k_stride);
    sp.staged = stage <= select_stage_max_;
    return LaunchKernel(pdl_, SelectKernel<kSelectThreads>, dim3(shape_.n_heads), dim3(kSelectThreads),
                        sp.staged ? stage : 0, s, sp);
  }

  // Whether a level's decode selection runs as ClusterSelectKernel (one
  // launch, kSelectCtas blocks per head) rather than KeysKernel +
  // SelectKernel (a block per head for the rule and compaction): for heads
  // of at least kClusterSelectMinClusters clusters (k_max: the level's
  // largest), where one block per head is the slower; not for prefill, not
  // under the test switches of the two-kernel path, and only when a block's
  // share of the clusters (of the k_stride laid out) fits in its shared
  // memory.
  bool ClusterSelect(const SelectParams& sp, int k_max) const {
    return sp.pf_part == nullptr && !select_radix_ && max_candidates_ == kMaxCandidates &&
           k_max >= cluster_select_min_k_ && ClusterSelectSmem(sp.k_stride) <= cluster_select_max_;
  }

  static int ScoreParts(int k_max) { return std::max(1, (k_max + kScoreChunk - 1) / kScoreChunk); }

  // Scoring and the rows' partial states: a block per chunk of kScoreChunk
  // clusters and head; shared memory for the head's query rows and the
  // chunk's scores.
  template <int D>
  static cudaError_t LaunchScoreAs(const ScoreParams& sc, DType q_type, dim3 grid, size_t smem, cudaStream_t s,
                                   bool pdl) {
    return WithElement(q_type, [&](auto e) {
      return LaunchKernel(pdl, ScoreKernel<D, decltype(e)>, grid, dim3(kScoreThreads), smem, s, sc);
    });
  }

  // `pdl`: launched with programmatic dependent launch (not as the first
  // kernel of a call, which follows the caller's work).
  cudaError_t LaunchScore(ScoreParams sc, int k_max, DType q_type, cudaStream_t s, bool pdl) const {
    sc.n_chunks = ScoreParts(k_max);
    const dim3 grid(sc.n_chunks, shape_.n_heads);
    const size_t smem = ScoreSmemBytes(sc.G * sc.T, shape_.head_dim);
    return shape_.head_dim == 64 ? LaunchScoreAs<64>(sc, q_type, grid, smem, s, pdl)
                                 : LaunchScoreAs<128>(sc, q_type, grid, smem, s, pdl);
  }

  struct Staged {
    bool set = false;
    int k2 = 0, k1 = 0;
    std::vector<float> fine_cent, coarse_cent;
    std::vector<uint32_t> fine_offsets, coarse_child;
  };

  int device_;
  int sm_count_ = 1;
  size_t select_stage_max_ = 0;    // dynamic shared memory SelectKernel may stage in (opted in at Create)
  size_t cluster_select_max_ = 0;  // dynamic shared memory ClusterSelectKernel may use (0: not used)
  int cluster_select_min_k_ = 0;   // clusters per head from which it is used
  bool select_radix_ = false;      // the budget rule without the histogram (tests)
  uint32_t max_candidates_ = kMaxCandidates;
  bool segments_unstaged_ = false;
  bool decode_simt_ = false;
  bool pdl_ = true;  // kernels after a call's first with programmatic dependent launch
  ResidentShape shape_;
  size_t page_bytes_ = 0;
  uint64_t page_buffer_bytes_ = 0;
  uint64_t index_bytes_ = 0;
  void* pages_ = nullptr;
  void* index_ = nullptr;
  std::vector<Staged> staged_;
  int k2_max_ = 0, k1_max_ = 0;
  const HeadMeta* d_meta_ = nullptr;
  const float* d_fine_cent_ = nullptr;
  const float* d_coarse_cent_ = nullptr;
  const void* d_fine16_ = nullptr;  // the centroids as the KV element type (prefill)
  const void* d_coarse16_ = nullptr;
  const uint32_t* d_fine_size_ = nullptr;
  const uint32_t* d_fine_parent_ = nullptr;
  const uint32_t* d_coarse_size_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::mutex mu_;
  Growable io_, ws_;
};

}  // namespace

Status ResidentKv::Create(int device, const ResidentShape& shape, std::unique_ptr<ResidentKv>* out) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return Status::NotSupported("no CUDA device available");
  }
  if (device < 0 || device >= n) {
    return Status::NotSupported("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                                " present)");
  }
  if (Status s = CheckDecodeShape(shape.head_dim, shape.group, shape.dtype); !s.ok()) {
    return Status::NotSupported(s.message() + "; open the context on the CPU (Device::kCpu, sqctl --device cpu)");
  }
  if (shape.n_layers < 1 || shape.n_heads < 1 || shape.pages_per_head < 1 || shape.page_rows < 1) {
    return Status::InvalidArgument("ResidentKv: empty shape");
  }
  auto impl = std::make_unique<ResidentKvImpl>(device, shape);
  SQZ_RETURN_IF_ERROR(impl->Init());
  *out = std::move(impl);
  return Status::OK();
}

}  // namespace sqz::gpu
