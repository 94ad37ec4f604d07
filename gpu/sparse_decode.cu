#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_util.h"
#include "gpu/sparse_decode.h"

namespace sqz::gpu {

Status CheckDecodeShape(int head_dim, int group_size, DType dtype) {
  if (head_dim != 64 && head_dim != 128) return Status::NotSupported("GPU decode: head_dim must be 64 or 128");
  if (group_size < 1 || group_size > kMaxGroup) return Status::NotSupported("GPU decode: group size must be 1..8");
  if (dtype != DType::kF16 && dtype != DType::kBF16) {
    return Status::NotSupported("GPU decode: dtype must be F16 or BF16");
  }
  return Status::OK();
}

int DecodeSplits(int device, int n_heads, uint32_t max_rows) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
  const int want = std::max(1, 4 * sms / std::max(1, n_heads));
  return std::max(1, std::min<int>(want, static_cast<int>((max_rows + 63) / 64)));
}

cudaError_t LaunchDecode(const DecodeParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  const bool half = dtype == DType::kF16;
  if (head_dim == 64) {
    return half ? LaunchSparseDecode<__half, 64>(p, stream) : LaunchSparseDecode<__nv_bfloat16, 64>(p, stream);
  }
  return half ? LaunchSparseDecode<__half, 128>(p, stream) : LaunchSparseDecode<__nv_bfloat16, 128>(p, stream);
}

uint32_t PrepareSegments(const std::vector<uint32_t>& offsets, const std::vector<uint32_t>& n_rows,
                         std::vector<uint32_t>* before, std::vector<uint32_t>* head_rows) {
  before->assign(n_rows.size(), 0);
  head_rows->clear();
  uint32_t max_rows = 0;
  for (size_t h = 0; h + 1 < offsets.size(); ++h) {
    uint32_t rows = 0;
    for (uint32_t s = offsets[h]; s < offsets[h + 1]; ++s) {
      (*before)[s] = rows;
      rows += n_rows[s];
    }
    head_rows->push_back(rows);
    max_rows = std::max(max_rows, rows);
  }
  return max_rows;
}

namespace {

// Device buffers freed on scope exit.
struct DeviceBuffers {
  std::vector<void*> ptrs;
  ~DeviceBuffers() {
    for (void* p : ptrs) cudaFree(p);
  }
  template <typename T>
  Status Upload(const std::vector<T>& host, T** out) {
    return UploadBytes(host.data(), host.size() * sizeof(T), reinterpret_cast<void**>(out));
  }
  Status UploadBytes(const void* host, size_t bytes, void** out) {
    void* d = nullptr;
    SQZ_CUDA_TRY(cudaMalloc(&d, std::max<size_t>(bytes, 1)), "cudaMalloc");
    ptrs.push_back(d);
    if (bytes > 0) SQZ_CUDA_TRY(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
    *out = d;
    return Status::OK();
  }
  Status Alloc(size_t bytes, void** out) {
    void* d = nullptr;
    SQZ_CUDA_TRY(cudaMalloc(&d, std::max<size_t>(bytes, 1)), "cudaMalloc");
    ptrs.push_back(d);
    *out = d;
    return Status::OK();
  }
};

}  // namespace

Status SparseDecodeOnDevice(const HostDecodeProblem& pr, float* o, float* lse, DecodeRun* run) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    return Status::NotSupported("no CUDA device available");
  }
  SQZ_RETURN_IF_ERROR(CheckDecodeShape(pr.head_dim, pr.group_size, pr.dtype));
  const int n_heads = static_cast<int>(pr.heads.size());
  const int D = pr.head_dim, G = pr.group_size;
  const size_t page_bytes = 2 * static_cast<size_t>(pr.page_rows) * D * DTypeSize(pr.dtype);

  // Pages of all heads in one buffer; per head a page table (page id -> slot).
  std::vector<uint8_t> pages;
  std::vector<int32_t> table;
  std::vector<uint32_t> table_base, seg_offsets{0}, seg_first, seg_rows, seg_before, head_rows;
  int32_t slot = 0;
  for (const HostDecodeHead& h : pr.heads) {
    table_base.push_back(static_cast<uint32_t>(table.size()));
    uint32_t max_page = 0;
    for (uint32_t id : h.page_ids) max_page = std::max(max_page, id);
    table.resize(table.size() + max_page + 1, -1);
    for (size_t i = 0; i < h.pages.size(); ++i) {
      const uint8_t* src = static_cast<const uint8_t*>(h.pages[i]);
      pages.insert(pages.end(), src, src + page_bytes);
      table[table_base.back() + h.page_ids[i]] = slot++;
    }
    seg_first.insert(seg_first.end(), h.first_row.begin(), h.first_row.end());
    seg_rows.insert(seg_rows.end(), h.n_rows.begin(), h.n_rows.end());
    seg_offsets.push_back(static_cast<uint32_t>(seg_first.size()));
  }
  const uint32_t max_rows = PrepareSegments(seg_offsets, seg_rows, &seg_before, &head_rows);
  const int splits = DecodeSplits(0, n_heads, max_rows);

  DeviceBuffers buf;
  DecodeParams p;
  uint8_t* d_pages;
  int32_t* d_table;
  uint32_t *d_base, *d_off, *d_first, *d_rows, *d_before, *d_head_rows;
  SQZ_RETURN_IF_ERROR(buf.Upload(pages, &d_pages));
  SQZ_RETURN_IF_ERROR(buf.Upload(table, &d_table));
  SQZ_RETURN_IF_ERROR(buf.Upload(table_base, &d_base));
  SQZ_RETURN_IF_ERROR(buf.Upload(seg_offsets, &d_off));
  SQZ_RETURN_IF_ERROR(buf.Upload(seg_first, &d_first));
  SQZ_RETURN_IF_ERROR(buf.Upload(seg_rows, &d_rows));
  SQZ_RETURN_IF_ERROR(buf.Upload(seg_before, &d_before));
  SQZ_RETURN_IF_ERROR(buf.Upload(head_rows, &d_head_rows));
  void *d_q, *d_o, *d_lse, *d_ws;
  const size_t q_floats = static_cast<size_t>(n_heads) * G * D;
  SQZ_RETURN_IF_ERROR(buf.UploadBytes(pr.q, q_floats * sizeof(float), &d_q));
  SQZ_RETURN_IF_ERROR(buf.Alloc(q_floats * sizeof(float), &d_o));
  SQZ_RETURN_IF_ERROR(buf.Alloc(static_cast<size_t>(n_heads) * G * sizeof(float), &d_lse));
  const size_t ws_floats = DecodeWorkspaceFloats(n_heads, G, D, splits);
  SQZ_RETURN_IF_ERROR(buf.Alloc(ws_floats * sizeof(float), &d_ws));
  // Poison the outputs: a row the kernels forget shows up as NaN.
  SQZ_CUDA_TRY(cudaMemset(d_o, 0xff, q_floats * sizeof(float)), "cudaMemset");
  SQZ_CUDA_TRY(cudaMemset(d_lse, 0xff, static_cast<size_t>(n_heads) * G * sizeof(float)), "cudaMemset");

  p.pages = d_pages;
  p.page_bytes = page_bytes;
  p.page_table = d_table;
  p.table_base = d_base;
  p.seg_offsets = d_off;
  p.seg_first = d_first;
  p.seg_rows = d_rows;
  p.seg_before = d_before;
  p.head_rows = d_head_rows;
  p.n_heads = n_heads;
  p.group = G;
  p.page_rows = pr.page_rows;
  p.n_clustered = pr.n_clustered;
  p.clustered_pages = pr.clustered_pages;
  p.scale = pr.scale;
  p.q = static_cast<const float*>(d_q);
  p.o = static_cast<float*>(d_o);
  p.lse = static_cast<float*>(d_lse);
  p.splits = splits;
  p.part_o = static_cast<float*>(d_ws);
  p.part_m = p.part_o + static_cast<size_t>(n_heads) * G * splits * D;
  p.part_l = p.part_m + static_cast<size_t>(n_heads) * G * splits;

  cudaEvent_t start, stop;
  SQZ_CUDA_TRY(cudaEventCreate(&start), "cudaEventCreate");
  SQZ_CUDA_TRY(cudaEventCreate(&stop), "cudaEventCreate");
  SQZ_CUDA_TRY(cudaEventRecord(start, 0), "cudaEventRecord");
  SQZ_CUDA_TRY(LaunchDecode(p, pr.dtype, D, 0), "launching the sparse decode kernels");
  SQZ_CUDA_TRY(cudaEventRecord(stop, 0), "cudaEventRecord");
  SQZ_CUDA_TRY(cudaEventSynchronize(stop), "running the sparse decode kernels");
  float ms = 0;
  SQZ_CUDA_TRY(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  SQZ_CUDA_TRY(cudaMemcpy(o, d_o, q_floats * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  SQZ_CUDA_TRY(cudaMemcpy(lse, d_lse, static_cast<size_t>(n_heads) * G * sizeof(float), cudaMemcpyDeviceToHost),
               "cudaMemcpy to host");
  if (run) {
    run->splits = splits;
    run->kernel_ms = ms;
  }
  return Status::OK();
}

}  // namespace sqz::gpu
