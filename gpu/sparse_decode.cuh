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
#include <type_traits>

#include "launch.cuh"
#include "mma.cuh"
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
  // The CUDA-core split kernel instead of the tensor-core one (for tests and
  // comparisons; SQZ_GPU_DECODE_SIMT=1).
  bool simt = false;
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

// Rows [r0, r1) of a head's `total` attended rows: share `split` of `splits`.
__device__ inline void ShareRows(uint32_t total, int splits, int split, uint32_t& r0, uint32_t& r1) {
  const uint32_t per = (total + splits - 1) / splits;
  r0 = min(total, split * per);
  r1 = min(total, r0 + per);
}

// Elements 8c .. 8c + 7 of query row `row` of head h (p.q, fp32, scaled),
// or zeros when the row is past the call's rows (valid = false).
template <int D>
__device__ inline void LoadQueryChunk(const DecodeParams& p, int h, int row, int c, bool valid, float (&x)[8]) {
  if (!valid) {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = 0.f;
    return;
  }
  const float4* qp = reinterpret_cast<const float4*>(p.q + (static_cast<size_t>(h) * p.rows + row) * D + c * 8);
  const float4 a = qp[0], b = qp[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

// The segments of a block's share, staged in shared memory when they fit
// (else read from global memory): first / before then index them from the
// share's first segment. Returns their count; the caller synchronises the
// block before reading them.
inline constexpr uint32_t kSegCache = 256;
struct ShareSegments {
  uint32_t first[kSegCache], before[kSegCache];
};
__device__ inline uint32_t StageShareSegments(const DecodeParams& p, int h, int split, uint32_t r0, uint32_t r1,
                                              uint32_t total, ShareSegments& seg, const uint32_t*& first,
                                              const uint32_t*& before) {
  first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
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
      seg.first[i] = first[i];
      seg.before[i] = before[i];
    }
    first = seg.first;
    before = seg.before;
  }
  return n_seg;
}

// Each warp's softmax state (m, l and the unnormalised o) of a block's NR
// query rows, in shared memory.
template <int D, int NR>
struct WarpStates {
  float m[kDecodeWarps][NR], l[kDecodeWarps][NR];
  float acc[kDecodeWarps][NR][D];
};

// Merges the warps' states of the block's query rows q0 .. q0 + nq - 1 and
// writes them as the block's partial state (after a block synchronisation).
template <int D, int NR>
__device__ inline void WriteBlockPartial(const DecodeParams& p, const WarpStates<D, NR>& st, int h, int split, int q0,
                                         int nq) {
  for (int x = threadIdx.x; x < nq * D; x += blockDim.x) {
    const int i = x / D, c = x % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mm = fmaxf(mm, st.m[w][i]);
    float ll = 0.f, oo = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float a = st.m[w][i] == -INFINITY ? 0.f : __expf(st.m[w][i] - mm);
        ll += a * st.l[w][i];
        oo += a * st.acc[w][i][c];
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
  uint32_t r0, r1;
  ShareRows(total, p.splits, split, r0, r1);

  float qr[NR][8];
#pragma unroll
  for (int i = 0; i < NR; ++i) LoadQueryChunk<D>(p, h, q0 + i, col, i < nq, qr[i]);
  float m[NR], l[NR], acc[NR][8];
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
  }

  __shared__ ShareSegments seg;
  const uint32_t* first;
  const uint32_t* before;
  const uint32_t n_seg = StageShareSegments(p, h, split, r0, r1, total, seg, first, before);
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
  __shared__ WarpStates<D, NR> st;
  if (sub == 0) {
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      if (col == 0) {
        st.m[warp][i] = m[i];
        st.l[warp][i] = l[i];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) st.acc[warp][i][col * 8 + e] = acc[i][e];
    }
  }
  __syncthreads();
  WriteBlockPartial(p, st, h, split, q0, nq);
}

// ---- the tensor-core split kernel ----
//
// The same blocks, shares and partial states as SparseDecodeSplitKernel, with
// both products on tensor cores (mma.sync m16n8k16) in transposed form, so
// that 16 KV rows fill the M side and the block's NQ (8 or 16) query rows the
// N side: S^T = K Q^T (A = 16 K rows, B = the queries), then O^T += V^T P^T
// (A = 16 columns of V^T, B = P^T, whose fragment is the transpose of the S^T
// accumulator's: movmatrix). A KV row is read once for all the query rows.
// fp32 precision is kept by splitting the operands that are not stored
// 16-bit: each query into kQueryTerms<T> 16-bit terms (bf16: 3, fp16: 2) and
// each softmax weight into 2, every term multiplied and the products summed
// in fp32. Decode is bound by the bytes read, so the extra products are free.
//
// Operands are staged per lane, no ldmatrix: a dot product is the same sum
// for any order of its terms, so the K fragment of lane (g = lane / 4,
// t4 = lane % 4) is taken as 16-byte chunks 4u + t4 of K rows g and 8 + g,
// and the query fragments are laid out to match (element e of the chunk
// stands for k index 16 (2u + e / 4) + 2 t4 + e % 2 + 8 ((e / 2) % 2)). For
// V^T the lane takes 16-byte chunks g + 8c of V rows 2 t4, 2 t4 + 1, 2 t4 + 8,
// 2 t4 + 9 and pairs the rows' elements (prmt); its i-th element (i = 8c + e,
// column 8 (g + 8c) + e) is row g of m-tile i, or row g + 8 of m-tile
// i - D / 16.
//
// Each warp streams its rows through its own ring of kMmaStages stages in
// shared memory (cp.async, 16 rows of K and V per stage): a lane reads back
// only the chunks it copied, so no barrier is needed, and kMmaStages - 1
// stages stay in flight while the warp computes.
inline constexpr int kMmaRowsMax = 16;  // query rows per block
inline constexpr int kMmaBlocksPerSm = 2;
inline constexpr int kMmaStages = 3;
template <typename T>
inline constexpr int kQueryTerms = std::is_same_v<T, __half> ? 2 : 3;

__device__ inline uint32_t Word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The transpose of an 8x8 matrix of 16-bit elements held as a warp's
// accumulator-layout pairs (lane: row lane / 4, columns 2 (lane % 4) + {0, 1}).
__device__ inline uint32_t Transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Dynamic shared memory of the tensor-core kernel: the query fragments, the
// share's segments, then the warps' rings (reused for their final states).
template <typename T, int D, int NQ>
struct MmaDecodeSmem {
  static constexpr int kU = D / 32, kC = D / 64, kSlots = 2 * kU + 4 * kC;  // 16-byte chunks per lane and stage
  static constexpr size_t kQuery = static_cast<size_t>(kQueryTerms<T>) * (NQ / 8) * kU * 32 * 16;
  static constexpr size_t kRing = static_cast<size_t>(kDecodeWarps) * kMmaStages * kSlots * 32 * 16;
  static constexpr size_t kTail = kRing > sizeof(WarpStates<D, NQ>) ? kRing : sizeof(WarpStates<D, NQ>);
  static constexpr size_t kBytes = kQuery + sizeof(ShareSegments) + kTail;
};

// Grid (H, splits, ceil(rows / NQ)), kDecodeWarps warps. Warp w takes the
// share's rows in steps of 32 (w, w + kDecodeWarps, ...); each lane finds
// the stored row of one of them, and the warp attends them 16 at a time.
template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kDecodeWarps * 32, kMmaBlocksPerSm) SparseDecodeMmaKernel(DecodeParams p) {
  static_assert(NQ == 8 || NQ == 16, "one or two n8 tiles of query rows");
  using Smem = MmaDecodeSmem<T, D, NQ>;
  constexpr int kU = Smem::kU, kC = Smem::kC, kSlots = Smem::kSlots;
  constexpr int kNT = NQ / 8, kTerms = kQueryTerms<T>, kMT = D / 16;
  const int h = blockIdx.x, split = blockIdx.y, q0 = blockIdx.z * NQ;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int nq = min(NQ, p.rows - q0);
  extern __shared__ __align__(16) uint8_t dec_smem[];
  auto s_q = reinterpret_cast<uint4(*)[kNT][kU][32]>(dec_smem);  // [kTerms][kNT][kU][lane]
  auto& seg = *reinterpret_cast<ShareSegments*>(dec_smem + Smem::kQuery);
  uint8_t* tail = dec_smem + Smem::kQuery + sizeof(ShareSegments);
  uint4* ring = reinterpret_cast<uint4*>(tail) + static_cast<size_t>(warp) * kMmaStages * kSlots * 32 + lane;
  auto& st = *reinterpret_cast<WarpStates<D, NQ>*>(tail);

  WaitForPrevious();
  LetDependentsLaunch();
  if (warp == 0) {  // query row 8 nt + g, chunks 4u + t4, as kTerms 16-bit terms
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int r = 8 * nt + g;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float x[8];
        LoadQueryChunk<D>(p, h, q0 + r, 4 * u + t4, r < nq, x);
        uint32_t w[4][kTerms];
#pragma unroll
        for (int i = 0; i < 4; ++i) SplitPack2<T, kTerms>(x[2 * i], x[2 * i + 1], w[i]);
#pragma unroll
        for (int k = 0; k < kTerms; ++k) s_q[k][nt][u][lane] = make_uint4(w[0][k], w[1][k], w[2][k], w[3][k]);
      }
    }
  }
  const uint32_t total = p.head_rows[h * p.count_stride];
  uint32_t r0, r1;
  ShareRows(total, p.splits, split, r0, r1);
  const uint32_t* first;
  const uint32_t* before;
  const uint32_t n_seg = StageShareSegments(p, h, split, r0, r1, total, seg, first, before);
  __syncthreads();
  // The query fragments: in registers when they take at most 48 (8 query
  // rows), else read from shared memory at each use.
  constexpr bool kQueryInRegs = kTerms * kNT * kU <= 12;
  uint4 qreg[kQueryInRegs ? kTerms : 1][kQueryInRegs ? kNT : 1][kQueryInRegs ? kU : 1];
  if constexpr (kQueryInRegs) {
#pragma unroll
    for (int k = 0; k < kTerms; ++k) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int u = 0; u < kU; ++u) qreg[k][nt][u] = s_q[k][nt][u][lane];
      }
    }
  }
  auto qfrag = [&](int k, int nt, int u) -> uint4 {
    if constexpr (kQueryInRegs) {
      return qreg[k][nt][u];
    } else {
      return s_q[k][nt][u][lane];
    }
  };

  const uint4* pages = reinterpret_cast<const uint4*>(p.pages);
  const uint32_t v_off = static_cast<uint32_t>(p.page_rows) * D / 8;  // V row after K row, 16-byte units
  // Step j of the warp: rows [step_base(j), + 16) of the share.
  auto step_base = [&](int j) { return r0 + ((j / 2) * kDecodeWarps + warp) * 32 + 16 * (j % 2); };
  // Issuing: the lane's row of the current 32 (the share's last past its
  // end), as a K-row offset in 16-byte units from the layer's first page.
  uint32_t s = 0, off = 0;  // (rows ascend, so the segment only moves on)
  auto issue = [&](int j) {
    const uint32_t b16 = step_base(j);
    if (b16 >= r1) return;
    if (j % 2 == 0) {
      const uint32_t r = min(b16 + lane, r1 - 1);
      while (s + 1 < n_seg && before[s + 1] <= r) ++s;
      off =
          static_cast<uint32_t>(reinterpret_cast<const uint4*>(RowPtr<T, D>(p, h, first[s] + (r - before[s]))) - pages);
    }
    uint4* dst = ring + (j % kMmaStages) * kSlots * 32;
    const int half = j % 2;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const uint4* kp = pages + __shfl_sync(0xffffffffu, off, 16 * half + 8 * n + g);
#pragma unroll
      for (int u = 0; u < kU; ++u) CpAsync16(dst + (n * kU + u) * 32, kp + 4 * u + t4, true);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * t4 + (i & 1) + 8 * (i >> 1);
      const uint4* vp = pages + __shfl_sync(0xffffffffu, off, 16 * half + row) + v_off;
      const bool ok = b16 + row < r1;  // zeros past the end (0 * garbage could be NaN)
#pragma unroll
      for (int c = 0; c < kC; ++c) CpAsync16(dst + (2 * kU + i * kC + c) * 32, vp + g + 8 * c, ok);
    }
  };

  // o[mt][nt]: O^T rows (columns of O) of m-tile mt, query rows 8 nt + 2 t4 + {0, 1}.
  float o[kMT][kNT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.f;
  }
  float m[kNT][2], l[kNT][2];  // query rows 8 nt + 2 t4 + e
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) m[nt][0] = m[nt][1] = -INFINITY, l[nt][0] = l[nt][1] = 0.f;

#pragma unroll
  for (int j = 0; j < kMmaStages - 1; ++j) {
    issue(j);
    CpAsyncCommit();
  }
  for (int j = 0;; ++j) {
    const uint32_t b16 = step_base(j);
    if (b16 >= r1) break;
    issue(j + kMmaStages - 1);
    CpAsyncCommit();
    CpAsyncWait<kMmaStages - 1>();
    const uint4* src = ring + (j % kMmaStages) * kSlots * 32;
    uint4 kr[2][kU], vr[4][kC];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int u = 0; u < kU; ++u) kr[n][u] = src[(n * kU + u) * 32];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int c = 0; c < kC; ++c) vr[i][c] = src[(2 * kU + i * kC + c) * 32];
    }
    // S^T = K Q^T, one accumulator per query term (independent mma chains):
    // sk[k][nt][0..1] KV row g, query rows 8 nt + 2 t4 + {0, 1}; [2..3] KV row g + 8.
    float sk[kTerms][kNT][4];
#pragma unroll
    for (int k = 0; k < kTerms; ++k) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) sk[k][nt][0] = sk[k][nt][1] = sk[k][nt][2] = sk[k][nt][3] = 0.f;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const uint32_t a[4] = {Word(kr[0][u], 2 * v), Word(kr[1][u], 2 * v), Word(kr[0][u], 2 * v + 1),
                               Word(kr[1][u], 2 * v + 1)};
#pragma unroll
        for (int k = 0; k < kTerms; ++k) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            const uint4 b = qfrag(k, nt, u);
            Mma<T>(sk[k][nt], a, Word(b, 2 * v), Word(b, 2 * v + 1));
          }
        }
      }
    }
    // Online softmax per query row: its 16 scores are in the 8 lanes of one
    // t4 (KV rows g and g + 8).
    const bool ok_lo = b16 + g < r1, ok_hi = b16 + g + 8 < r1;
    uint32_t pb[kNT][2][2];  // P^T B fragments: [nt][KV rows 0-7 / 8-15][term]
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      float sc[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[e] = sk[kTerms - 1][nt][e];  // smallest terms first
#pragma unroll
        for (int k = kTerms - 2; k >= 0; --k) sc[e] += sk[k][nt][e];
      }
      if (!ok_lo) sc[0] = sc[1] = -INFINITY;
      if (!ok_hi) sc[2] = sc[3] = -INFINITY;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float mx = fmaxf(m[nt][e], fmaxf(sc[e], sc[2 + e]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        // (Row b16 is in the share, so mx is finite.)
        if (mx != m[nt][e]) {
          const float alpha = __expf(m[nt][e] - mx);
          l[nt][e] *= alpha;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) o[mt][nt][e] *= alpha, o[mt][nt][2 + e] *= alpha;
          m[nt][e] = mx;
        }
        sc[e] = __expf(sc[e] - mx);
        sc[2 + e] = __expf(sc[2 + e] - mx);
        l[nt][e] += sc[e] + sc[2 + e];
      }
      uint32_t lo[2], hi[2];
      SplitPack2<T, 2>(sc[0], sc[1], lo);
      SplitPack2<T, 2>(sc[2], sc[3], hi);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        pb[nt][0][k] = Transpose8x8(lo[k]);
        pb[nt][1][k] = Transpose8x8(hi[k]);
      }
    }
    // O^T += V^T P^T, P as two 16-bit terms.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int i0 = mt, i1 = mt + kMT;  // the lane's elements for rows g and g + 8
      const uint32_t s0 = i0 % 2 ? 0x7632u : 0x5410u, s1 = i1 % 2 ? 0x7632u : 0x5410u;
      const int c0 = i0 / 8, w0 = (i0 % 8) / 2, c1 = i1 / 8, w1 = (i1 % 8) / 2;
      const uint32_t a[4] = {__byte_perm(Word(vr[0][c0], w0), Word(vr[1][c0], w0), s0),
                             __byte_perm(Word(vr[0][c1], w1), Word(vr[1][c1], w1), s1),
                             __byte_perm(Word(vr[2][c0], w0), Word(vr[3][c0], w0), s0),
                             __byte_perm(Word(vr[2][c1], w1), Word(vr[3][c1], w1), s1)};
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int k = 0; k < 2; ++k) Mma<T>(o[mt][nt], a, pb[nt][0][k], pb[nt][1][k]);
      }
    }
  }
  CpAsyncWait<0>();  // (none pending: the last issues were past the end)

  // The warp's state into shared memory (the states take the rings' place
  // once every warp is done), then the block's partial.
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float ll = l[nt][e];
      ll += __shfl_xor_sync(0xffffffffu, ll, 4);
      ll += __shfl_xor_sync(0xffffffffu, ll, 8);
      ll += __shfl_xor_sync(0xffffffffu, ll, 16);
      const int r = 8 * nt + 2 * t4 + e;
      if (g == 0) {
        st.m[warp][r] = m[nt][e];
        st.l[warp][r] = ll;
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int i0 = mt, i1 = mt + kMT;
        st.acc[warp][r][8 * (g + 8 * (i0 / 8)) + i0 % 8] = o[mt][nt][e];
        st.acc[warp][r][8 * (g + 8 * (i1 / 8)) + i1 % 8] = o[mt][nt][2 + e];
      }
    }
  }
  __syncthreads();
  WriteBlockPartial(p, st, h, split, q0, nq);
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

// Whether the tensor-core split kernel takes these parameters: not turned
// off (p.simt) and the layer's pages addressable in 16-byte units by 32 bits.
inline bool UseMmaDecode(const DecodeParams& p) {
  constexpr double kAddressable = 16.0 * 4294967296.0;  // 2^32 offsets of 16 bytes
  return !p.simt && static_cast<double>(p.n_heads) * p.pages_per_head * p.page_bytes < kAddressable;
}

// Lets the tensor-core split kernels use their dynamic shared memory (once
// per device, before their first launch).
template <typename T, int D>
cudaError_t AllowDecodeSmem() {
  cudaError_t e = cudaFuncSetAttribute(SparseDecodeMmaKernel<T, D, 8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(MmaDecodeSmem<T, D, 8>::kBytes));
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(SparseDecodeMmaKernel<T, D, 16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(MmaDecodeSmem<T, D, 16>::kBytes));
}

// Query rows per split block (grid z holds the rest).
inline int DecodeRowsPerBlock(int rows, bool mma) { return mma ? (rows <= 8 ? 8 : kMmaRowsMax) : kMaxGroup; }

// Launches both kernels on `stream`, with programmatic dependent launch
// (launch.cuh) when `pdl`. Returns the launch error.
template <typename T, int D, typename O>
cudaError_t LaunchSparseDecode(const DecodeParams& p, const DecodeOutput& out, cudaStream_t stream, bool pdl) {
  if (p.rows < 1 || p.splits < 1 || p.splits > kMaxSplits || p.n_heads < 1) return cudaErrorInvalidValue;
  // Query rows per block: the tensor-core kernel 8 or 16; the other the
  // fewest of 1, 2, 4, 8 that hold a head's rows. More in blocks of those
  // (grid z).
  const bool mma = UseMmaDecode(p);
  const int per_block = DecodeRowsPerBlock(p.rows, mma);
  void (*split)(DecodeParams) =
      mma           ? (per_block == 8 ? SparseDecodeMmaKernel<T, D, 8> : SparseDecodeMmaKernel<T, D, 16>)
      : p.rows == 1 ? SparseDecodeSplitKernel<T, D, 1>
      : p.rows == 2 ? SparseDecodeSplitKernel<T, D, 2>
      : p.rows <= 4 ? SparseDecodeSplitKernel<T, D, 4>
                    : SparseDecodeSplitKernel<T, D, 8>;
  const size_t smem = !mma ? 0 : per_block == 8 ? MmaDecodeSmem<T, D, 8>::kBytes : MmaDecodeSmem<T, D, 16>::kBytes;
  const cudaError_t e = LaunchKernel(pdl, split, dim3(p.n_heads, p.splits, (p.rows + per_block - 1) / per_block),
                                     dim3(kDecodeWarps * 32), smem, stream, p);
  if (e != cudaSuccess) return e;
  return LaunchKernel(pdl, SparseDecodeMergeKernel<O, D>, dim3(p.n_heads * p.rows, D / 32), dim3(kMergeWarps * 32), 0,
                      stream, p, out);
}

}  // namespace sqz::gpu
