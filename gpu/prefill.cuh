// Prefill kernels: selection and attention for many query rows per KV head
// (G * T > kMaxSelectRows), on tensor cores (mma.sync m16n8k16, fp16 or
// bf16 operands as the context stores them, fp32 accumulation).
//
//   PrepQueriesKernel<E, T>  the caller's queries as the KV element type,
//                            [H][R][D] (row r = g * T + t), unscaled
//   PrefillScoreKernel       per tile of kPfRowsPerWarp * W rows of one query
//                            head g and one KV head, every centroid of the
//                            level, 64 at a time (the next tile's loads in
//                            flight): pass 1 writes each row's
//                            log2-denominator log2 sum_j N_j 2^(x_rj - m)
//                            + m (x = log2-scaled score); pass 2 recomputes
//                            the scores and writes, per cluster, the tile's
//                            sum of p_rj = 2^(x_rj - lse_r) (shifted by
//                            2^kPfMassShift: exact down to p ~ 1e-68). In the
//                            fine stage of a hierarchical lookup a cluster
//                            whose parent g did not keep scores -inf, and a
//                            tile of 64 such clusters is skipped.
//   KeysKernel (select.cuh)  merges a cluster's partials (all tiles: the
//                            budget order's key; the tiles of query head g:
//                            its threshold bit), then SelectKernel as for
//                            decode.
//   RowListKernel            the head's segments expanded into the stored row
//                            of every attended row.
//   PrefillAttendKernel      flash attention of a tile of rows over the row
//                            list, 64 KV rows at a time (cp.async from the
//                            pages, double-buffered), online softmax in
//                            registers; O in the caller's dtype and layout,
//                            LSE natural or base 2.
//
// Precision: queries are rounded to the KV element type (exact when the
// caller's dtype is the context's) and centroids are their rounded copy, so
// prefill masses carry ~2^-9 (bf16) or ~2^-11 (fp16) relative error against
// the CPU's fp32 scores; the attention rounds the softmax weights to the
// element type for the P.V product, as flash attention does. The GPU tests
// state the tolerances (tests/query_gpu_test.cc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "mma.cuh"
#include "select.cuh"
#include "sparse_decode.cuh"

namespace sqz::gpu {

inline constexpr int kMaxPrefillRows = 1 << 20;  // query rows per KV head (G * T) a call takes
inline constexpr int kPfWarps = 4;               // warps per block (8 measured 2.6x slower: one block per SM)
inline constexpr int kPfMTiles = 2;              // m16 tiles of query rows per warp
inline constexpr int kPfRowsPerWarp = 16 * kPfMTiles;
inline constexpr int kPfTile = 64;  // keys or centroids per pipeline stage

// Shared-memory row stride of a [rows][D] tile, in elements: 16 bytes of
// padding make the rows of an 8x8 ldmatrix fall in distinct banks.
template <int D>
inline constexpr int kPfStride = D + 8;

// s[m][n] = rows row0 + 16 m .. + 15 of the [rows][stride] tile `a` (query
// rows) . rows n * 8 .. n * 8 + 7 of the 64-row tile `b` (keys or
// centroids), fp32. Each B fragment (ldmatrix) serves the warp's kPfMTiles
// m-tiles. Lane layout (m16n8): s[m][n][0..1] row lane / 4, columns
// n * 8 + 2 * (lane % 4) + {0, 1}; s[m][n][2..3] row lane / 4 + 8.
template <typename T, int D>
__device__ inline void WarpDot(const void* a, int row0, const void* b, float (&s)[kPfMTiles][kPfTile / 8][4],
                               int lane) {
  constexpr int kS = kPfStride<D>;
  const uint16_t* at = static_cast<const uint16_t*>(a);
  const uint16_t* bt = static_cast<const uint16_t*>(b);
#pragma unroll
  for (int m = 0; m < kPfMTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kPfTile / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[kPfMTiles][4];
#pragma unroll
    for (int m = 0; m < kPfMTiles; ++m) {
      Ldsm4(af[m], at + (row0 + m * 16 + lane % 16) * kS + kk * 16 + (lane / 16) * 8);
    }
#pragma unroll
    for (int np = 0; np < kPfTile / 16; ++np) {
      uint32_t bf[4];
      Ldsm4(bf, bt + (np * 16 + (lane / 16) * 8 + lane % 8) * kS + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int m = 0; m < kPfMTiles; ++m) {
        Mma<T>(s[m][2 * np], af[m], bf[0], bf[1]);
        Mma<T>(s[m][2 * np + 1], af[m], bf[2], bf[3]);
      }
    }
  }
}

// Scales row half hh (lane / 4 + 8 hh) of m-tile i of the warp's scores to
// log2 units, -inf where keep(column) is false, and returns their max with m.
template <typename Keep>
__device__ inline float ScaleMaskMax(float (&s)[kPfMTiles][kPfTile / 8][4], int i, int hh, float scale, float m,
                                     int lane, Keep&& keep) {
#pragma unroll
  for (int n = 0; n < kPfTile / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n * 8 + 2 * (lane % 4) + e;
      float& x = s[i][n][2 * hh + e];
      x = keep(col) ? x * scale : -INFINITY;
      m = fmaxf(m, x);
    }
  }
  return m;
}

// The block's query rows: rows t0 .. t0 + rows - 1 of one query head (q16
// points at its row 0), zero past T, into a [rows][stride] tile.
template <int D>
__device__ inline void LoadQueryTile(void* dst, const void* q16, int t0, int rows, int T) {
  constexpr int kChunks = D / 8;
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* q = static_cast<const uint16_t*>(q16);
  for (int c = threadIdx.x; c < rows * kChunks; c += blockDim.x) {
    const int r = c / kChunks, e = (c % kChunks) * 8;
    const bool ok = t0 + r < T;
    CpAsync16(d + r * kPfStride<D> + e, q + static_cast<size_t>(ok ? t0 + r : 0) * D + e, ok);
  }
}

// ---- selection ----

struct PrefillScoreParams {
  int H = 0, G = 0, T = 0;
  const void* q16 = nullptr;  // [H][R][D], the KV element type, unscaled
  float scale_log2 = 0;       // softmax scale * log2(e)
  const HeadMeta* meta = nullptr;
  bool coarse = false;
  const void* centroids = nullptr;  // the level's centroids [*, D], KV element type
  const uint32_t* sizes = nullptr;
  const uint32_t* parent = nullptr;  // fine stage of a hierarchical lookup (else null)
  const HeadMask* coarse_keep = nullptr;
  int k1_stride = 0;
  float* row_lse = nullptr;  // [H][R], log2 units; +inf: the row reaches nothing
  // Pass 2: [H][n_tiles][k_stride], sum over the tile's rows of
  // 2^(log2 p + kPfMassShift).
  float* part = nullptr;
  int k_stride = 0;
  int tiles_per_g = 0;       // ceil(T / rows per block)
  uint32_t* hist = nullptr;  // zeroed by pass 1 (budget rule)
};

// Dynamic shared memory of the scoring kernel: the query tile, two centroid
// tiles, their sizes and flags.
template <int D, int W>
inline size_t PrefillScoreSmem() {
  return (static_cast<size_t>(W) * kPfRowsPerWarp + 2 * kPfTile) * kPfStride<D> * 2 + 2 * kPfTile * 4 + 4 * 4;
}

// Grid (G * tiles_per_g, H), W warps. Block (g * tiles_per_g + i, h) holds
// rows t = i * kPfRowsPerWarp * W .. of query head g of KV head h.
template <typename T, int D, int W, bool kPass2>
__global__ void __launch_bounds__(W * 32) PrefillScoreKernel(PrefillScoreParams p) {
  static_assert(W >= 2, "warps 0 and 1 load a tile's 64 cluster flags");
  constexpr int kRows = W * kPfRowsPerWarp, kS = kPfStride<D>, kChunks = D / 8, kM = kPfMTiles;
  extern __shared__ __align__(16) uint8_t pf_smem[];
  T* sq = reinterpret_cast<T*>(pf_smem);                            // [kRows][kS]
  T* sc = sq + kRows * kS;                                          // [2][kPfTile][kS]
  float* s_size = reinterpret_cast<float*>(sc + 2 * kPfTile * kS);  // [2][kPfTile]; -1: not reached by g
  // [2][2]: whether the tile's first / second 32 clusters hold one reached
  // (written by warps 0 and 1 as they load the tile; read before the sync
  // that lets the next loads into the buffer start).
  uint32_t* s_any = reinterpret_cast<uint32_t*>(s_size + 2 * kPfTile);
  __shared__ float red[W][kPfTile];
  const int h = blockIdx.y, g = blockIdx.x / p.tiles_per_g, t0 = (blockIdx.x % p.tiles_per_g) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, R = p.G * p.T;
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2, base = p.coarse ? m.coarse_base : m.fine_base;
  const T* cent = static_cast<const T*>(p.centroids) + static_cast<size_t>(base) * D;
  const T* q16 = static_cast<const T*>(p.q16) + (static_cast<size_t>(h) * R + static_cast<size_t>(g) * p.T) * D;

  WaitForPrevious();
  if (!kPass2 && blockIdx.x == 0 && p.hist != nullptr) {
    for (int i = threadIdx.x; i < kKeyBins; i += blockDim.x) p.hist[static_cast<size_t>(h) * kKeyBins + i] = 0;
  }
  LoadQueryTile<D>(sq, q16, t0, kRows, p.T);
  auto load_tile = [&](int tile, int buf) {
    const uint32_t j0 = static_cast<uint32_t>(tile) * kPfTile;
    for (int c = threadIdx.x; c < kPfTile * kChunks; c += blockDim.x) {
      const int r = c / kChunks, e = (c % kChunks) * 8;
      const bool ok = j0 + r < k;
      CpAsync16(sc + (buf * kPfTile + r) * kS + e, cent + static_cast<size_t>(ok ? j0 + r : 0) * D + e, ok);
    }
    if (threadIdx.x < kPfTile) {
      const uint32_t j = j0 + threadIdx.x;
      bool reach = j < k;
      if (reach && p.parent != nullptr) {
        reach = ((p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + p.parent[base + j]] >> g) & 1u) != 0;
      }
      s_size[buf * kPfTile + threadIdx.x] = reach ? static_cast<float>(p.sizes[base + j]) : -1.f;
      const unsigned any = __any_sync(0xffffffffu, reach);  // threads 0..63: warps 0 and 1
      if (lane == 0) s_any[buf * 2 + warp] = any;
    }
  };
  const int n_tiles = static_cast<int>((k + kPfTile - 1) / kPfTile);
  if (n_tiles > 0) load_tile(0, 0);
  CpAsyncCommit();

  // This thread's rows: r(m, half) = warp * kPfRowsPerWarp + m * 16 + lane / 4 + 8 * half.
  float* row_lse = p.row_lse + static_cast<size_t>(h) * R + static_cast<size_t>(g) * p.T + t0;
  float mx[kM][2], sum[kM][2], lse[kM][2];
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = warp * kPfRowsPerWarp + i * 16 + lane / 4 + 8 * hh;
      mx[i][hh] = -INFINITY;
      sum[i][hh] = 0.f;
      lse[i][hh] = kPass2 && t0 + r < p.T ? row_lse[r] : INFINITY;
    }
  }
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < n_tiles) load_tile(tile + 1, buf ^ 1);
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();
    const uint32_t j0 = static_cast<uint32_t>(tile) * kPfTile;
    const float* size = s_size + buf * kPfTile;
    const bool any = (s_any[buf * 2] | s_any[buf * 2 + 1]) != 0;
    if (any) {
      float s[kM][kPfTile / 8][4];
      WarpDot<T, D>(sq, warp * kPfRowsPerWarp, sc + buf * kPfTile * kS, s, lane);
      if (!kPass2) {
        // Each row's online (max, sum_j N_j 2^(x_j - max)), x = log2-scaled score.
#pragma unroll
        for (int i = 0; i < kM; ++i) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float nm =
                ScaleMaskMax(s, i, hh, p.scale_log2, mx[i][hh], lane, [&](int col) { return size[col] >= 0.f; });
            const float u = nm == -INFINITY ? 0.f : nm;
            float l = sum[i][hh] * exp2f(mx[i][hh] - u);
#pragma unroll
            for (int n = 0; n < kPfTile / 8; ++n) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                // (size < 0 only where x = -inf: the term is -0)
                l += size[n * 8 + 2 * (lane % 4) + e] * exp2f(s[i][n][2 * hh + e] - u);
              }
            }
            sum[i][hh] = l;
            mx[i][hh] = nm;
          }
        }
      } else {
        // Per column, the warp's rows' sum of 2^(log2 p + kPfMassShift).
#pragma unroll
        for (int n = 0; n < kPfTile / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float w = 0.f;
            if (size[n * 8 + 2 * (lane % 4) + e] >= 0.f) {
#pragma unroll
              for (int i = 0; i < kM; ++i) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                  w += exp2f(fmaf(s[i][n][2 * hh + e], p.scale_log2, kPfMassShift - lse[i][hh]));
                }
              }
            }
#pragma unroll
            for (int off = 4; off < 32; off *= 2) w += __shfl_xor_sync(0xffffffffu, w, off);
            if (lane < 4) red[warp][n * 8 + 2 * lane + e] = w;
          }
        }
      }
    }
    __syncthreads();
    if (kPass2 && threadIdx.x < kPfTile && j0 + threadIdx.x < k) {
      float w = 0.f;
      if (any) {
#pragma unroll
        for (int i = 0; i < W; ++i) w += red[i][threadIdx.x];
      }
      p.part[(static_cast<size_t>(h) * p.G * p.tiles_per_g + blockIdx.x) * p.k_stride + j0 + threadIdx.x] = w;
    }
  }
  CpAsyncWait<0>();
  if (!kPass2) {
#pragma unroll
    for (int i = 0; i < kM; ++i) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mm = mx[i][hh], ll = sum[i][hh];
        for (int off = 1; off < 4; off *= 2) {
          MergeMax2(mm, ll, __shfl_xor_sync(0xffffffffu, mm, off), __shfl_xor_sync(0xffffffffu, ll, off));
        }
        const int r = warp * kPfRowsPerWarp + i * 16 + lane / 4 + 8 * hh;
        if (lane % 4 == 0 && t0 + r < p.T) row_lse[r] = mm == -INFINITY ? INFINITY : mm + log2f(ll);
      }
    }
  }
  LetDependentsLaunch();
}

// Grid (H, kRowListBlocks), 256 threads: rowlist[h][a] = the stored row of
// attended row a of head h (a warp per segment).
inline constexpr int kRowListBlocks = 32;
template <int Unused = 0>
__global__ void __launch_bounds__(256)
    RowListKernel(const uint32_t* seg_first, const uint32_t* seg_before, int seg_stride, const uint32_t* stats,
                  uint32_t* rowlist, size_t list_stride) {
  const int h = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  WaitForPrevious();
  LetDependentsLaunch();
  const uint32_t n_seg = stats[h * kStatCount + kStatSegments], rows = stats[h * kStatCount + kStatHeadRows];
  const uint32_t* first = seg_first + static_cast<size_t>(h) * seg_stride;
  const uint32_t* before = seg_before + static_cast<size_t>(h) * seg_stride;
  uint32_t* out = rowlist + h * list_stride;
  for (uint32_t s = blockIdx.y * 8 + warp; s < n_seg; s += gridDim.y * 8) {
    const uint32_t b = before[s], e = s + 1 < n_seg ? before[s + 1] : rows, f = first[s];
    for (uint32_t i = lane; i < e - b; i += 32) out[b + i] = f + i;
  }
}

// ---- attention ----

struct PrefillAttendParams {
  DecodeParams kv;            // pages and their layout (RowPtr), this layer
  const void* q16 = nullptr;  // [H][R][D] KV element type
  const uint32_t* rowlist = nullptr;
  size_t list_stride = 0;
  const uint32_t* stats = nullptr;  // head_rows at [h * kStatCount + kStatHeadRows]
  float scale_log2 = 0;
  int tiles_per_g = 0;
  DecodeOutput out;
};

// Dynamic shared memory of the attention kernel: the query tile, two K and
// two V tiles.
template <int D, int W>
inline size_t PrefillAttendSmem() {
  return (static_cast<size_t>(W) * kPfRowsPerWarp + 4 * kPfTile) * kPfStride<D> * 2;
}

// Grid (G * tiles_per_g, H), W warps: block (g * tiles_per_g + i, h) attends
// rows t = i * kPfRowsPerWarp * W .. of query head g over head h's attended
// rows.
template <typename T, int D, int W, typename O>
__global__ void __launch_bounds__(W * 32, 2) PrefillAttendKernel(PrefillAttendParams p) {
  constexpr int kRows = W * kPfRowsPerWarp, kS = kPfStride<D>, kChunks = D / 8, kM = kPfMTiles;
  extern __shared__ __align__(16) uint8_t pf_smem[];
  T* sq = reinterpret_cast<T*>(pf_smem);
  T* sk = sq + kRows * kS;        // [2][kPfTile][kS]
  T* sv = sk + 2 * kPfTile * kS;  // [2][kPfTile][kS]
  const int h = blockIdx.y, g = blockIdx.x / p.tiles_per_g, t0 = (blockIdx.x % p.tiles_per_g) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.out.G, T_ = p.out.T, R = G * T_;
  const T* q16 = static_cast<const T*>(p.q16) + (static_cast<size_t>(h) * R + static_cast<size_t>(g) * T_) * D;

  WaitForPrevious();
  LetDependentsLaunch();
  const uint32_t n = p.stats[h * kStatCount + kStatHeadRows];
  const uint32_t* list = p.rowlist + h * p.list_stride;
  LoadQueryTile<D>(sq, q16, t0, kRows, T_);
  // A thread loads 16 bytes of kPer rows of each K / V tile: rows
  // threadIdx.x / kChunks + i * kRowStep, columns (threadIdx.x % kChunks) * 8.
  // The rows' stored ids are fetched a tile ahead (their latency would
  // otherwise stall every tile's loads).
  constexpr int kRowStep = W * 32 / kChunks, kPer = kPfTile / kRowStep;
  static_assert(kPfTile % kRowStep == 0, "whole rows per thread");
  const int row0 = threadIdx.x / kChunks, col = (threadIdx.x % kChunks) * 8;
  auto fetch_rows = [&](int tile, uint32_t(&ids)[kPer]) {
    const uint32_t a0 = static_cast<uint32_t>(tile) * kPfTile;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const uint32_t a = a0 + row0 + i * kRowStep;
      ids[i] = a < n ? __ldg(list + a) : 0xffffffffu;
    }
  };
  auto load_tile = [&](int buf, const uint32_t(&ids)[kPer]) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = row0 + i * kRowStep;
      const bool ok = ids[i] != 0xffffffffu;
      const T* kp = RowPtr<T, D>(p.kv, h, ok ? ids[i] : 0u) + col;
      CpAsync16(sk + (buf * kPfTile + r) * kS + col, kp, ok);
      CpAsync16(sv + (buf * kPfTile + r) * kS + col, kp + static_cast<size_t>(p.kv.page_rows) * D, ok);
    }
  };
  const int n_tiles = static_cast<int>((n + kPfTile - 1) / kPfTile);
  uint32_t ids[kPer];
  if (n_tiles > 0) {
    fetch_rows(0, ids);
    load_tile(0, ids);
  }
  CpAsyncCommit();
  if (n_tiles > 1) fetch_rows(1, ids);

  // Per m-tile and half: rows warp * kPfRowsPerWarp + m * 16 + lane / 4 + 8 * half.
  float o[kM][D / 8][4];
  float mx[kM][2], sum[kM][2];
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    mx[i][0] = mx[i][1] = -INFINITY;
    sum[i][0] = sum[i][1] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) o[i][c][0] = o[i][c][1] = o[i][c][2] = o[i][c][3] = 0.f;
  }
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < n_tiles) load_tile(buf ^ 1, ids);
    CpAsyncCommit();
    if (tile + 2 < n_tiles) fetch_rows(tile + 2, ids);
    CpAsyncWait<1>();
    __syncthreads();
    float s[kM][kPfTile / 8][4];
    WarpDot<T, D>(sq, warp * kPfRowsPerWarp, sk + buf * kPfTile * kS, s, lane);
    const uint32_t a0 = static_cast<uint32_t>(tile) * kPfTile;
#pragma unroll
    for (int i = 0; i < kM; ++i) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float nm = ScaleMaskMax(s, i, hh, p.scale_log2, mx[i][hh], lane, [&](int col) { return a0 + col < n; });
        nm = fmaxf(nm, __shfl_xor_sync(0xffffffffu, nm, 1));
        nm = fmaxf(nm, __shfl_xor_sync(0xffffffffu, nm, 2));
        const float u = nm == -INFINITY ? 0.f : nm;
        const float alpha = exp2f(mx[i][hh] - u);
        mx[i][hh] = nm;
        float l = sum[i][hh] * alpha;
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
          o[i][c][2 * hh] *= alpha;
          o[i][c][2 * hh + 1] *= alpha;
        }
#pragma unroll
        for (int c = 0; c < kPfTile / 8; ++c) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[i][c][2 * hh + e];
            x = exp2f(x - u);
            l += x;
          }
        }
        sum[i][hh] = l;
      }
    }
    const uint16_t* vt = reinterpret_cast<const uint16_t*>(sv + buf * kPfTile * kS);
#pragma unroll
    for (int kk = 0; kk < kPfTile / 16; ++kk) {
      uint32_t pa[kM][4];
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        pa[i][0] = Pack2<T>(s[i][2 * kk][0], s[i][2 * kk][1]);
        pa[i][1] = Pack2<T>(s[i][2 * kk][2], s[i][2 * kk][3]);
        pa[i][2] = Pack2<T>(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
        pa[i][3] = Pack2<T>(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        Ldsm4T(b, vt + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kS + dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int i = 0; i < kM; ++i) {
          Mma<T>(o[i][2 * dp], pa[i], b[0], b[1]);
          Mma<T>(o[i][2 * dp + 1], pa[i], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this buffer is loaded again two tiles on
  }
  CpAsyncWait<0>();

  // O and LSE in the caller's layout.
  const int64_t n_qh = static_cast<int64_t>(p.kv.n_heads) * G, qh = static_cast<int64_t>(h) * G + g;
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = sum[i][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int t = t0 + warp * kPfRowsPerWarp + i * 16 + lane / 4 + 8 * hh;
      if (t >= T_) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int64_t dst = p.out.token_major ? t * n_qh + qh : qh * T_ + t;
      O* orow = static_cast<O*>(p.out.o) + dst * D;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const int col = c * 8 + 2 * (lane % 4);
        orow[col] = FromFloat<O>(o[i][c][2 * hh] * inv);
        orow[col + 1] = FromFloat<O>(o[i][c][2 * hh + 1] * inv);
      }
      if (lane % 4 == 0) {
        const float lse2 = l > 0.f ? mx[i][hh] + log2f(l) : -INFINITY;
        p.out.lse[dst] = p.out.lse_base2 ? lse2 : lse2 * kLn2;
      }
    }
  }
}

}  // namespace sqz::gpu
