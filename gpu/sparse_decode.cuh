// Sparse decode kernels: one decode step (T = 1) of one layer. Every KV head h
// attends the rows of its segments (runs of its stored rows, as in a
// SegmentTable) for its G query heads, reading K and V from pages in the
// stored layout (docs/FORMAT.md, "KV pages"); fp32 accumulation; the rows of
// a head are split across thread blocks whose partial (o, m, l) states a
// second kernel merges, so one request fills the GPU. Launchers take a stream
// and a caller-owned workspace and never allocate, so a step can be captured
// in a CUDA graph. All pointers are device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sqz::gpu {

inline constexpr int kMaxGroup = 8;     // query heads per KV head handled by one block
inline constexpr int kDecodeWarps = 4;  // warps per block

struct DecodeParams {
  const uint8_t* pages = nullptr;  // [slots, 2, P, D] of T: K plane then V plane
  size_t page_bytes = 0;
  // Page p of head h is slot head_page_base[h] + p. (Paging beyond GPU
  // memory will put a page table here.)
  const uint32_t* head_page_base = nullptr;  // [n_heads]
  const uint32_t* seg_offsets = nullptr;     // [n_heads + 1] CSR into the segment arrays
  const uint32_t* seg_first = nullptr;       // first row of each segment
  const uint32_t* seg_rows = nullptr;        // rows of each segment
  const uint32_t* seg_before = nullptr;      // rows of the head's earlier segments
  const uint32_t* head_rows = nullptr;       // [n_heads] attended rows per head
  int n_heads = 0;
  int group = 0;  // G
  int page_rows = 0;
  int64_t n_clustered = 0;
  int64_t clustered_pages = 0;
  float scale = 0;
  const float* q = nullptr;  // [n_heads * G, D]
  float* o = nullptr;        // [n_heads * G, D]
  float* lse = nullptr;      // [n_heads * G], natural log
  int splits = 1;            // blocks per head
  // Workspace: partial states [n_heads * G, splits] (o: x D).
  float* part_o = nullptr;
  float* part_m = nullptr;
  float* part_l = nullptr;
};

// Workspace floats for the partial states.
inline size_t DecodeWorkspaceFloats(int n_heads, int group, int head_dim, int splits) {
  return static_cast<size_t>(n_heads) * group * splits * (head_dim + 2);
}

template <typename T>
__device__ inline float ToFloat(T x);
template <>
__device__ inline float ToFloat<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ inline float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Pointer to the K row (V row: + P * D elements) of stored row `row` of head h.
template <typename T, int D>
__device__ inline const T* RowPtr(const DecodeParams& p, int h, int64_t row) {
  int64_t page, slot;
  if (row < p.n_clustered) {
    page = row / p.page_rows;
    slot = row % p.page_rows;
  } else {
    page = p.clustered_pages + (row - p.n_clustered) / p.page_rows;
    slot = (row - p.n_clustered) % p.page_rows;
  }
  const int64_t s = static_cast<int64_t>(p.head_page_base[h]) + page;
  return reinterpret_cast<const T*>(p.pages + static_cast<size_t>(s) * p.page_bytes) + slot * D;
}

// Grid (n_heads, splits), kDecodeWarps warps. Block (h, s) takes rows
// [s * chunk, (s + 1) * chunk) of head h's attended rows; each warp takes
// every kDecodeWarps-th row of them; lane l holds elements [l * E, l * E + E)
// of a row (E = D / 32). Per query head g: online softmax (m, l, acc).
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeWarps * 32) SparseDecodeSplitKernel(DecodeParams p) {
  constexpr int E = D / 32;
  const int h = blockIdx.x, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.group;
  const uint32_t total = p.head_rows[h];
  const uint32_t chunk = (total + p.splits - 1) / p.splits;
  const uint32_t r0 = min(total, split * chunk), r1 = min(total, r0 + chunk);

  // Loops over g run to kMaxGroup, unrolled, with a guard: the per-head
  // arrays stay in registers.
  float qr[kMaxGroup][E];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= G) continue;
    const float* qg = p.q + (static_cast<size_t>(h) * G + g) * D + lane * E;
    for (int e = 0; e < E; ++e) qr[g][e] = qg[e] * p.scale;
  }
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][E];
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }

  const uint32_t sb = p.seg_offsets[h], se = p.seg_offsets[h + 1];
  uint32_t r = r0 + warp;
  if (r < r1) {
    // The segment holding row r (binary search), then walk forward.
    uint32_t lo = sb, hi = se;
    while (hi - lo > 1) {
      const uint32_t mid = (lo + hi) / 2;
      if (p.seg_before[mid] <= r)
        lo = mid;
      else
        hi = mid;
    }
    uint32_t s = lo;
    for (; r < r1; r += kDecodeWarps) {
      while (r >= p.seg_before[s] + p.seg_rows[s]) ++s;
      const int64_t row = static_cast<int64_t>(p.seg_first[s]) + (r - p.seg_before[s]);
      const T* kp = RowPtr<T, D>(p, h, row);
      const T* vp = kp + static_cast<size_t>(p.page_rows) * D;
      float kx[E], vx[E];
      for (int e = 0; e < E; ++e) {
        kx[e] = ToFloat(kp[lane * E + e]);
        vx[e] = ToFloat(vp[lane * E + e]);
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) continue;
        float dot = 0.f;
        for (int e = 0; e < E; ++e) dot += qr[g][e] * kx[e];
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float mn = fmaxf(m[g], dot);
        const float alpha = __expf(m[g] - mn), w = __expf(dot - mn);
        l[g] = l[g] * alpha + w;
        for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * alpha + w * vx[e];
        m[g] = mn;
      }
    }
  }

  // Merge the warps' states in shared memory, then write the block's partial.
  __shared__ float sm[kDecodeWarps][kMaxGroup], sl[kDecodeWarps][kMaxGroup];
  __shared__ float sacc[kDecodeWarps][kMaxGroup][D];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= G) continue;
    if (lane == 0) {
      sm[warp][g] = m[g];
      sl[warp][g] = l[g];
    }
    for (int e = 0; e < E; ++e) sacc[warp][g][lane * E + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, c = i % D;
    float mm = -INFINITY;
    for (int w = 0; w < kDecodeWarps; ++w) mm = fmaxf(mm, sm[w][g]);
    float ll = 0.f, oo = 0.f;
    if (mm != -INFINITY) {
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float a = sm[w][g] == -INFINITY ? 0.f : __expf(sm[w][g] - mm);
        ll += a * sl[w][g];
        oo += a * sacc[w][g][c];
      }
    }
    const size_t part = (static_cast<size_t>(h) * G + g) * p.splits + split;
    p.part_o[part * D + c] = oo;
    if (c == 0) {
      p.part_m[part] = mm;
      p.part_l[part] = ll;
    }
  }
}

// One block per query row (h * G + g): merges the splits' partial states into
// o and lse. An empty row (no attended key) gets o = 0, lse = -inf.
template <int D>
__global__ void SparseDecodeMergeKernel(DecodeParams p) {
  const size_t row = blockIdx.x;
  const float* pm = p.part_m + row * p.splits;
  const float* pl = p.part_l + row * p.splits;
  float mm = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mm = fmaxf(mm, pm[s]);
  float ll = 0.f;
  if (mm != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) ll += pm[s] == -INFINITY ? 0.f : __expf(pm[s] - mm) * pl[s];
  }
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float oo = 0.f;
    if (ll > 0.f) {
      for (int s = 0; s < p.splits; ++s) {
        if (pm[s] != -INFINITY) oo += __expf(pm[s] - mm) * p.part_o[(row * p.splits + s) * D + c];
      }
      oo /= ll;
    }
    p.o[row * D + c] = oo;
  }
  if (threadIdx.x == 0) p.lse[row] = ll > 0.f ? mm + logf(ll) : -INFINITY;
}

// Launches both kernels on `stream`. p.part_* must hold
// DecodeWorkspaceFloats(...) floats together. Returns the launch error.
template <typename T, int D>
cudaError_t LaunchSparseDecode(const DecodeParams& p, cudaStream_t stream) {
  if (p.group < 1 || p.group > kMaxGroup || p.splits < 1) return cudaErrorInvalidValue;
  SparseDecodeSplitKernel<T, D><<<dim3(p.n_heads, p.splits), kDecodeWarps * 32, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  SparseDecodeMergeKernel<D><<<p.n_heads * p.group, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sqz::gpu
