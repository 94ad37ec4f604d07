// Sparse decode kernels: attention of a few query rows per KV head (decode,
// T = 1, or small T as in speculative decoding) over the rows of the head's
// segments (runs of its stored rows, as in a SegmentTable), reading K and V
// straight from pages in the stored layout (docs/FORMAT.md, "KV pages").
//
// - The rows of a head are split across thread blocks (grid y) so one request
//   fills the GPU; each block writes a partial (o, m, l) state per query row
//   and a second kernel merges them (and writes O in the caller's dtype and
//   layout, LSE in natural log or base 2).
// - A KV row is read once for all the query rows of a block (up to 8: a GQA
//   group's heads, times T); 16-byte loads (8 elements per thread, D / 8
//   threads per row), several rows in flight per thread; fp32 accumulation.
// - Segment tables live in device memory: written by the select kernels
//   (gpu/select.cuh) or uploaded from a host plan.
//
// Launchers take a stream and caller-owned workspace and never allocate, so a
// step can be captured in a CUDA graph. All pointers are device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "select.cuh"

namespace sqz::gpu {

inline constexpr int kMaxGroup = 8;     // query rows per block (a GQA group's heads, times T)
inline constexpr int kDecodeWarps = 4;  // warps per block

struct DecodeParams {
  const uint8_t* pages = nullptr;  // this layer's pages: [H][pages_per_head] of [2][P][D] elements
  size_t page_bytes = 0;
  int64_t pages_per_head = 0;
  // Segments of head h: seg_first/seg_before[h * seg_stride + s], s < seg_count[h];
  // seg_before: attended rows before segment s (ascending); head_rows[h]: all.
  const uint32_t* seg_first = nullptr;
  const uint32_t* seg_before = nullptr;
  int seg_stride = 0;
  const uint32_t* seg_count = nullptr;  // stride count_stride
  const uint32_t* head_rows = nullptr;  // stride count_stride
  int count_stride = 1;
  // [H][splits]: the segment holding the first row of each block's share
  // (rows [s * share, (s + 1) * share), share = ceil(head_rows / splits)).
  const uint32_t* split_seg = nullptr;
  // A block stages its share's segments in shared memory when there are at
  // most this many (at most kSegCache; 0: always read them from global
  // memory, for tests).
  uint32_t seg_cache = 256;
  int n_heads = 0;
  int rows = 0;  // query rows per head (G * T)
  int page_rows = 0;
  int page_shift = -1;  // log2(page_rows) when a power of two (no division per row)
  int64_t n_clustered = 0;
  int64_t clustered_pages = 0;
  const float* q = nullptr;  // [H][rows][D], already scaled
  int splits = 1;            // blocks per head
  // Workspace: partial states [H][rows][splits] (o: x D).
  float* part_o = nullptr;
  float* part_m = nullptr;
  float* part_l = nullptr;
};

// How the merge kernel writes O and LSE.
struct DecodeOutput {
  void* o = nullptr;  // element type: the launcher's O template argument
  float* lse = nullptr;
  int G = 1, T = 1;          // rows = G * T per head; row r = g * T + t
  bool token_major = false;  // [T][H * G][D] instead of [H * G][T][D]
  bool lse_base2 = false;
};

// Workspace floats for the partial states.
inline size_t DecodeWorkspaceFloats(int n_heads, int rows, int head_dim, int splits) {
  return static_cast<size_t>(n_heads) * rows * splits * (head_dim + 2);
}

template <typename T>
__device__ inline float2 ToFloat2(uint32_t bits);
template <>
__device__ inline float2 ToFloat2<__half>(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}
template <>
__device__ inline float2 ToFloat2<__nv_bfloat16>(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

template <typename T>
__device__ inline void Unpack8(const uint4& u, float* f) {
  const float2 a = ToFloat2<T>(u.x), b = ToFloat2<T>(u.y), c = ToFloat2<T>(u.z), d = ToFloat2<T>(u.w);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y, f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

// Address (in elements) of the K row of stored row `row` of head h; the V row
// is P * D elements further.
template <typename T, int D>
__device__ inline const T* RowPtr(const DecodeParams& p, int h, uint32_t row) {
  uint32_t page, slot;
  const bool clustered = row < p.n_clustered;
  const uint32_t a = clustered ? row : row - static_cast<uint32_t>(p.n_clustered);
  const uint32_t ap = p.page_shift >= 0 ? a >> p.page_shift : a / p.page_rows;
  page = clustered ? ap : static_cast<uint32_t>(p.clustered_pages) + ap;
  slot = a - ap * p.page_rows;
  const size_t s = static_cast<size_t>(h) * p.pages_per_head + page;
  return reinterpret_cast<const T*>(p.pages + s * p.page_bytes) + static_cast<size_t>(slot) * D;
}

// Grid (H, splits, ceil(rows / NR)), kDecodeWarps warps. Block (h, s, c)
// takes attended rows [s * chunk, (s + 1) * chunk) of head h for query rows
// c * NR .. c * NR + NR - 1. A KV row is held by D / 8 threads (16 bytes
// each); a warp holds 32 / (D / 8) rows per load and kUnroll loads in flight.
template <typename T, int D, int NR>
__global__ void __launch_bounds__(kDecodeWarps * 32, NR <= 4 ? 4 : 2) SparseDecodeSplitKernel(DecodeParams p) {
  constexpr int kTpr = D / 8;                                   // threads per KV row
  constexpr int kRowsPerLoad = 32 / kTpr;                       // KV rows per warp per load
  constexpr int kUnroll = 4;                                    // loads in flight per thread
  constexpr int kStep = kDecodeWarps * kRowsPerLoad * kUnroll;  // KV rows per block iteration
  const int h = blockIdx.x, split = blockIdx.y, chunk = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kTpr, col = lane % kTpr;  // which row of the load, which 8 elements
  const int q0 = chunk * NR, nq = min(NR, p.rows - q0);

  WaitForPrevious();
  LetDependentsLaunch();
  const uint32_t total = p.head_rows[h * p.count_stride];
  const uint32_t per = (total + p.splits - 1) / p.splits;
  const uint32_t r0 = min(total, split * per), r1 = min(total, r0 + per);

  float qr[NR][8];
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    if (i < nq) {
      const float4* qp =
          reinterpret_cast<const float4*>(p.q + (static_cast<size_t>(h) * p.rows + q0 + i) * D + col * 8);
      const float4 a = qp[0], b = qp[1];
      qr[i][0] = a.x, qr[i][1] = a.y, qr[i][2] = a.z, qr[i][3] = a.w;
      qr[i][4] = b.x, qr[i][5] = b.y, qr[i][6] = b.z, qr[i][7] = b.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qr[i][e] = 0.f;
    }
  }
  float m[NR], l[NR], acc[NR][8];
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
  }

  // The segments of this block's share, staged in shared memory when they
  // fit (else read from global memory); s indexes them from the share's first.
  constexpr uint32_t kSegCache = 256;
  __shared__ uint32_t c_first[kSegCache], c_before[kSegCache];
  const uint32_t* first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  const uint32_t* before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
  uint32_t n_seg = 0;
  if (r0 < r1) {
    const uint32_t* split_seg = p.split_seg + static_cast<size_t>(h) * p.splits;
    const uint32_t lo = split_seg[split];
    const uint32_t hi = r1 < total ? split_seg[split + 1] : p.seg_count[h * p.count_stride] - 1;
    n_seg = hi - lo + 1;
    first += lo;
    before += lo;
  }
  if (n_seg <= min(kSegCache, p.seg_cache)) {
    for (uint32_t i = threadIdx.x; i < n_seg; i += blockDim.x) {
      c_first[i] = first[i];
      c_before[i] = before[i];
    }
    first = c_first;
    before = c_before;
  }
  __syncthreads();
  uint32_t s = 0;  // the segment of this thread's next row (rows ascend)
  for (uint32_t base = r0; base < r1; base += kStep) {
    uint4 kv[kUnroll], vv[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t r = base + (warp * kUnroll + u) * kRowsPerLoad + sub;
      ok[u] = r < r1;
      if (ok[u]) {
        while (s + 1 < n_seg && before[s + 1] <= r) ++s;
        const T* kp = RowPtr<T, D>(p, h, first[s] + (r - before[s])) + col * 8;
        kv[u] = __ldg(reinterpret_cast<const uint4*>(kp));
        vv[u] = __ldg(reinterpret_cast<const uint4*>(kp + static_cast<size_t>(p.page_rows) * D));
      }
    }
    float sc[kUnroll][NR];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      Unpack8<T>(kv[u], kf);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d += qr[i][e] * kf[e];
#pragma unroll
        for (int off = kTpr / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
        sc[u][i] = ok[u] ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      float mn = m[i];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mn = fmaxf(mn, sc[u][i]);
      if (mn == -INFINITY) continue;  // nothing seen yet
      const float alpha = __expf(m[i] - mn);
      l[i] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] *= alpha;
      m[i] = mn;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      float vf[8];
      Unpack8<T>(vv[u], vf);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const float w = __expf(sc[u][i] - m[i]);
        l[i] += w;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] += w * vf[e];
      }
    }
  }

  // Merge the states of the rows-of-a-load within the warp (same col), then
  // the warps' in shared memory, then write the block's partial.
#pragma unroll
  for (int off = kTpr; off < 32; off *= 2) {
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      const float om = __shfl_xor_sync(0xffffffffu, m[i], off), ol = __shfl_xor_sync(0xffffffffu, l[i], off);
      const float mn = fmaxf(m[i], om);
      const float a = m[i] == -INFINITY ? 0.f : __expf(m[i] - mn), b = om == -INFINITY ? 0.f : __expf(om - mn);
      l[i] = l[i] * a + ol * b;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] = acc[i][e] * a + __shfl_xor_sync(0xffffffffu, acc[i][e], off) * b;
      m[i] = mn;
    }
  }
  __shared__ float sm[kDecodeWarps][NR], sl[kDecodeWarps][NR];
  __shared__ float sacc[kDecodeWarps][NR][D];
  if (sub == 0) {
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      if (col == 0) {
        sm[warp][i] = m[i];
        sl[warp][i] = l[i];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) sacc[warp][i][col * 8 + e] = acc[i][e];
    }
  }
  __syncthreads();
  for (int x = threadIdx.x; x < nq * D; x += blockDim.x) {
    const int i = x / D, c = x % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mm = fmaxf(mm, sm[w][i]);
    float ll = 0.f, oo = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float a = sm[w][i] == -INFINITY ? 0.f : __expf(sm[w][i] - mm);
        ll += a * sl[w][i];
        oo += a * sacc[w][i][c];
      }
    }
    const size_t part = (static_cast<size_t>(h) * p.rows + q0 + i) * p.splits + split;
    p.part_o[part * D + c] = oo;
    if (c == 0) {
      p.part_m[part] = mm;
      p.part_l[part] = ll;
    }
  }
}

// Grid (H * rows, D / 32), kMergeWarps warps: block (row, c) merges the
// splits' partial states of 32 columns of one query row; warp w sums the
// splits w, w + kMergeWarps, ... (weights computed once per block, in shared
// memory), then the warps' sums are added. Writes O in the caller's dtype and
// layout and (column group 0) the LSE. A row with nothing attended gets O = 0
// and LSE = -inf.
inline constexpr int kMaxSplits = 1024;
inline constexpr int kMergeWarps = 8;
template <typename O, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) SparseDecodeMergeKernel(DecodeParams p, DecodeOutput out) {
  __shared__ float w[kMaxSplits];
  __shared__ float red[kMergeWarps][32];
  __shared__ float s_mm, s_ll;
  const size_t row = blockIdx.x;  // h * rows + r
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  WaitForPrevious();
  const float* pm = p.part_m + row * p.splits;
  const float* pl = p.part_l + row * p.splits;
  if (warp == 0) {
    float mm = -INFINITY;
    for (int s = lane; s < p.splits; s += 32) mm = fmaxf(mm, pm[s]);
    for (int off = 16; off > 0; off /= 2) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, off));
    float ll = 0.f;
    for (int s = lane; s < p.splits; s += 32) {
      const float x = (mm == -INFINITY || pm[s] == -INFINITY) ? 0.f : __expf(pm[s] - mm);
      w[s] = x;
      ll += x * pl[s];
    }
    for (int off = 16; off > 0; off /= 2) ll += __shfl_xor_sync(0xffffffffu, ll, off);
    if (lane == 0) {
      s_mm = mm;
      s_ll = ll;
    }
  }
  __syncthreads();
  const float mm = s_mm, ll = s_ll;
  const int c = blockIdx.y * 32 + lane;
  float acc = 0.f;
  if (ll > 0.f) {
    const float* po = p.part_o + row * p.splits * D + c;
#pragma unroll 4
    for (int s = warp; s < p.splits; s += kMergeWarps) acc += w[s] * po[static_cast<size_t>(s) * D];
  }
  red[warp][lane] = acc;
  __syncthreads();
  if (warp != 0) return;
  float oo = 0.f;
#pragma unroll
  for (int i = 0; i < kMergeWarps; ++i) oo += red[i][lane];
  if (ll > 0.f) oo /= ll;
  const int h = static_cast<int>(row / p.rows), r = static_cast<int>(row % p.rows);
  const int g = r / out.T, t = r % out.T;
  const int64_t qh = static_cast<int64_t>(h) * out.G + g;
  const int64_t n_qh = static_cast<int64_t>(p.n_heads) * out.G;
  const int64_t dst = out.token_major ? t * n_qh + qh : qh * out.T + t;
  static_cast<O*>(out.o)[dst * D + c] = FromFloat<O>(oo);
  if (c == 0) {
    const float lse = ll > 0.f ? mm + logf(ll) : -INFINITY;
    out.lse[dst] = out.lse_base2 ? lse * 1.4426950408889634f : lse;
  }
}

// Launches both kernels on `stream`, with programmatic dependent launch
// (launch.cuh) when `pdl`. Returns the launch error.
template <typename T, int D, typename O>
cudaError_t LaunchSparseDecode(const DecodeParams& p, const DecodeOutput& out, cudaStream_t stream, bool pdl) {
  if (p.rows < 1 || p.splits < 1 || p.splits > kMaxSplits || p.n_heads < 1) return cudaErrorInvalidValue;
  // Query rows per block: the fewest of 1, 2, 4, 8 that hold a head's rows;
  // more than 8 in blocks of 8 (grid z).
  void (*split)(DecodeParams) = p.rows == 1   ? SparseDecodeSplitKernel<T, D, 1>
                                : p.rows == 2 ? SparseDecodeSplitKernel<T, D, 2>
                                : p.rows <= 4 ? SparseDecodeSplitKernel<T, D, 4>
                                              : SparseDecodeSplitKernel<T, D, 8>;
  const cudaError_t e = LaunchKernel(pdl, split, dim3(p.n_heads, p.splits, (p.rows + kMaxGroup - 1) / kMaxGroup),
                                     dim3(kDecodeWarps * 32), 0, stream, p);
  if (e != cudaSuccess) return e;
  return LaunchKernel(pdl, SparseDecodeMergeKernel<O, D>, dim3(p.n_heads * p.rows, D / 32), dim3(kMergeWarps * 32), 0,
                      stream, p, out);
}

}  // namespace sqz::gpu
