#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>

#include "cuda_util.h"
#include "gpu/resident.h"

namespace sqz::gpu {

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

class ResidentKvImpl final : public ResidentKv {
 public:
  ResidentKvImpl(int device, const ResidentShape& shape) : device_(device), shape_(shape) {}
  ~ResidentKvImpl() override {
    if (stream_) cudaStreamDestroy(stream_);
    if (pages_) cudaFree(pages_);
  }

  Status Init() {
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    page_bytes_ = 2 * static_cast<size_t>(shape_.page_rows) * shape_.head_dim * DTypeSize(shape_.dtype);
    bytes_ = static_cast<uint64_t>(shape_.n_layers) * shape_.n_heads * shape_.pages_per_head * page_bytes_;
    size_t free_b = 0, total_b = 0;
    SQZ_CUDA_TRY(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    if (bytes_ > free_b) {
      return Status::IOError("GPU " + std::to_string(device_) + " has " + std::to_string(free_b >> 20) +
                             " MiB free; the context's pages need " + std::to_string(bytes_ >> 20) +
                             " MiB (open fewer KV heads per handle, or wait for paging)");
    }
    SQZ_CUDA_TRY(cudaMalloc(&pages_, std::max<uint64_t>(bytes_, 1)), "cudaMalloc (KV pages)");
    SQZ_CUDA_TRY(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "SM count");
    SQZ_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    return Status::OK();
  }

  const ResidentShape& shape() const override { return shape_; }
  uint64_t bytes() const override { return bytes_; }

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

  Status Decode(int layer, const HostSegments& seg, int group, float scale, const float* q, float* o, float* lse,
                DecodeRun* run) override {
    SQZ_RETURN_IF_ERROR(CheckDecodeShape(shape_.head_dim, group, shape_.dtype));
    const int H = shape_.n_heads, D = shape_.head_dim;
    if (layer < 0 || layer >= shape_.n_layers || seg.offsets.size() != static_cast<size_t>(H) + 1 ||
        seg.first_row.size() != seg.n_rows.size() || seg.offsets.back() != seg.first_row.size()) {
      return Status::InvalidArgument("ResidentKv::Decode: segment table does not match the resident heads");
    }
    std::vector<uint32_t> before, head_rows, base(H);  // base[h]: slot of the head's page 0 in this layer
    const uint32_t max_rows = PrepareSegments(seg.offsets, seg.n_rows, &before, &head_rows);
    for (int h = 0; h < H; ++h) base[h] = static_cast<uint32_t>(h * shape_.pages_per_head);
    const int splits = DecodeSplits(sm_count_, H, max_rows);
    const size_t n_seg = seg.first_row.size(), rows = static_cast<size_t>(H) * group;

    std::lock_guard<std::mutex> lock(mu_);
    SQZ_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    // One upload buffer: [base H][offsets H+1][first n][rows n][before n][head_rows H] uint32, then q.
    std::vector<uint32_t> meta;
    meta.reserve(3 * H + 1 + 3 * n_seg);
    meta.insert(meta.end(), base.begin(), base.end());
    meta.insert(meta.end(), seg.offsets.begin(), seg.offsets.end());
    meta.insert(meta.end(), seg.first_row.begin(), seg.first_row.end());
    meta.insert(meta.end(), seg.n_rows.begin(), seg.n_rows.end());
    meta.insert(meta.end(), before.begin(), before.end());
    meta.insert(meta.end(), head_rows.begin(), head_rows.end());
    const size_t meta_bytes = (meta.size() * sizeof(uint32_t) + 15) / 16 * 16;
    const size_t q_bytes = rows * D * sizeof(float);
    SQZ_RETURN_IF_ERROR(in_.Reserve(meta_bytes + q_bytes));
    SQZ_RETURN_IF_ERROR(out_.Reserve(q_bytes + rows * sizeof(float)));
    SQZ_RETURN_IF_ERROR(ws_.Reserve(DecodeWorkspaceFloats(H, group, D, splits) * sizeof(float)));
    uint8_t* in = static_cast<uint8_t*>(in_.ptr);
    SQZ_CUDA_TRY(cudaMemcpyAsync(in, meta.data(), meta.size() * sizeof(uint32_t), cudaMemcpyHostToDevice, stream_),
                 "uploading segments");
    SQZ_CUDA_TRY(cudaMemcpyAsync(in + meta_bytes, q, q_bytes, cudaMemcpyHostToDevice, stream_), "uploading queries");

    const uint32_t* m = reinterpret_cast<const uint32_t*>(in);
    DecodeParams p;
    p.pages = Page(layer, 0, 0);
    p.page_bytes = page_bytes_;
    p.head_page_base = m;
    p.seg_offsets = m + H;
    p.seg_first = m + 2 * H + 1;
    p.seg_rows = p.seg_first + n_seg;
    p.seg_before = p.seg_rows + n_seg;
    p.head_rows = p.seg_before + n_seg;
    p.n_heads = H;
    p.group = group;
    p.page_rows = shape_.page_rows;
    p.n_clustered = shape_.n_clustered;
    p.clustered_pages = shape_.clustered_pages;
    p.scale = scale;
    p.q = reinterpret_cast<const float*>(in + meta_bytes);
    p.o = static_cast<float*>(out_.ptr);
    p.lse = p.o + rows * D;
    p.splits = splits;
    p.part_o = static_cast<float*>(ws_.ptr);
    p.part_m = p.part_o + rows * splits * D;
    p.part_l = p.part_m + rows * splits;

    cudaEvent_t start = nullptr, stop = nullptr;
    if (run) {
      SQZ_CUDA_TRY(cudaEventCreate(&start), "cudaEventCreate");
      SQZ_CUDA_TRY(cudaEventCreate(&stop), "cudaEventCreate");
      SQZ_CUDA_TRY(cudaEventRecord(start, stream_), "cudaEventRecord");
    }
    SQZ_CUDA_TRY(LaunchDecode(p, shape_.dtype, D, stream_), "launching the sparse decode kernels");
    if (run) SQZ_CUDA_TRY(cudaEventRecord(stop, stream_), "cudaEventRecord");
    SQZ_CUDA_TRY(cudaMemcpyAsync(o, p.o, q_bytes, cudaMemcpyDeviceToHost, stream_), "downloading O");
    SQZ_CUDA_TRY(cudaMemcpyAsync(lse, p.lse, rows * sizeof(float), cudaMemcpyDeviceToHost, stream_), "downloading LSE");
    SQZ_CUDA_TRY(cudaStreamSynchronize(stream_), "running the sparse decode kernels");
    if (run) {
      float ms = 0;
      SQZ_CUDA_TRY(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
      run->splits = splits;
      run->kernel_ms = ms;
    }
    return Status::OK();
  }

 private:
  int device_;
  int sm_count_ = 1;
  ResidentShape shape_;
  size_t page_bytes_ = 0;
  uint64_t bytes_ = 0;
  void* pages_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::mutex mu_;
  Growable in_, out_, ws_;
};

}  // namespace

Status ResidentKv::Create(int device, const ResidentShape& shape, std::unique_ptr<ResidentKv>* out) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return Status::NotSupported("no CUDA device available");
  if (device < 0 || device >= n) {
    return Status::NotSupported("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                                " present)");
  }
  if (Status s = CheckDecodeShape(shape.head_dim, 1, shape.dtype); !s.ok()) {
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
