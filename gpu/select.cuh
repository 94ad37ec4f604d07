// Device selection: the plan step of the GPU engine, on the GPU, for one
// layer and every served KV head at once (docs/SEMANTICS.md, "Estimated
// probabilities" and "Selection"; the CPU reference is query/selection.cc).
//
//   ScoreKernel         per chunk of kScoreChunk clusters and KV head:
//                       s[h][r][j] = qf[h][r] . c_j for every query row
//                       (row r = g * T + t; the caller's queries converted and
//                       scaled on the way, and written as qf for the attention
//                       kernels), then each row's partial softmax state over
//                       the chunk; in the fine stage of a hierarchical lookup
//                       only children of kept coarse clusters are read (the
//                       others score -inf for the rows that did not keep them)
//   KeysKernel          per chunk: the rows' denominators from the partials,
//                       then each cluster's estimated probabilities as the
//                       budget order's key (and its size added to the head's
//                       histogram of log-masses) or the threshold flags
//   SelectKernel        one block per KV head: the rule (budget: the
//                       histogram's boundary bin, its clusters ranked exactly;
//                       a radix select of the keys when the bin holds too
//                       many), then, in the fine stage, the kept clusters
//                       compacted into the head's segments (adjacent clusters
//                       merged, the always set appended), the segment where
//                       each attention block's share of rows starts, and the
//                       head's statistics.
//   PrepQueriesKernel   dense mode only (no scoring): the query conversion.
// The per-cluster work runs on every SM; only the rule and the compaction
// are one block per head.
//
// Everything is a kernel over caller-owned device memory: no allocation, no
// host synchronisation, so a call can be captured in a CUDA graph.
//
// Ties and rounding: scores are fp32 dot products and probabilities are fp32
// (the CPU computes them in double from fp32 scores), so two clusters whose
// masses differ in the last bits may be ordered differently than on the CPU;
// equal keys are ordered by cluster id, as on the CPU. The GPU tests accept a
// difference only at the budget boundary, between clusters whose CPU masses
// are within a stated relative tolerance.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "launch.cuh"

namespace sqz::gpu {

inline constexpr int kMaxSelectRows = 64;  // query rows per KV head (G * T) the selection takes

// The query heads of a GQA group (bit g: query head g; G <= kMaxSelectRows
// = 64) that kept a coarse cluster.
using HeadMask = uint64_t;
__host__ __device__ inline HeadMask AllHeads(int G) { return G >= 64 ? ~HeadMask{0} : (HeadMask{1} << G) - 1; }
// The select kernels' flags: kept (by some query head of the group).
inline constexpr uint8_t kKept = 1;
inline constexpr int kScoreThreads = 256;
inline constexpr int kSelectThreads = 512;
inline constexpr uint32_t kMaxCandidates = 1024;  // clusters of the budget's boundary bin the select kernel ranks

// Per-head statistics the select kernel writes ([H][kStatCount] uint32).
enum : int {
  kStatScored = 0,    // centroid dot products per query row (coarse + fine)
  kStatKept = 1,      // fine clusters kept
  kStatSegments = 2,  // segments, the always set included
  kStatHeadRows = 3,  // rows attended: kept rows + the always set
  kStatCount = 4,
};

// Where one (layer, KV head)'s index lives in the flattened arrays.
struct HeadMeta {
  uint32_t fine_base;  // first fine cluster
  uint32_t k2;
  uint32_t coarse_base;  // first coarse cluster
  uint32_t k1;
};

template <typename E>
__device__ inline float LoadFloat(const E* p);
template <>
__device__ inline float LoadFloat<float>(const float* p) {
  return *p;
}
template <>
__device__ inline float LoadFloat<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ inline float LoadFloat<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename O>
__device__ inline O FromFloat(float x);
template <>
__device__ inline float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ inline __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ inline __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Where the caller's q holds element d of query head qh, token t: [H * G][T][D]
// (head-major) or [T][H * G][D] (token-major).
__device__ inline int64_t QueryIndex(int64_t qh, int t, int d, int H, int G, int T, int D, bool token_major) {
  return (token_major ? static_cast<int64_t>(t) * H * G + qh : qh * T + t) * D + d;
}

// qf[((h * G + g) * T + t) * D + d] = scale * q(query head h * G + g, token t, d), as O
// (fp32 for the decode kernels; the KV element type, scale 1, for prefill).
template <typename E, typename O = float>
__global__ void PrepQueriesKernel(const E* q, O* qf, int H, int G, int T, int D, bool token_major, float scale) {
  WaitForPrevious();
  LetDependentsLaunch();
  const int64_t n = static_cast<int64_t>(H) * G * T * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / D;  // (qh * T + t)
    qf[i] = FromFloat<O>(scale * LoadFloat(q + QueryIndex(row / T, static_cast<int>(row % T), static_cast<int>(i % D),
                                                          H, G, T, D, token_major)));
  }
}

// fp32 keys that compare like the floats (all finite or -inf here).
__device__ inline uint32_t OrderKey(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Online (max, sum) pair merge: l * e^m (+) l' * e^m'.
__device__ inline void MergeMax(float& m, float& l, float om, float ol) {
  const float mm = fmaxf(m, om);
  l = (m == -INFINITY ? 0.f : l * expf(m - mm)) + (om == -INFINITY ? 0.f : ol * expf(om - mm));
  m = mm;
}

// (m, l) (+) (om, ol) for states l * 2^m.
__device__ inline void MergeMax2(float& m, float& l, float om, float ol) {
  const float mm = fmaxf(m, om);
  l = (m == -INFINITY ? 0.f : l * exp2f(m - mm)) + (om == -INFINITY ? 0.f : ol * exp2f(om - mm));
  m = mm;
}

// The warp's (max, sum) states merged: every lane ends with the whole warp's.
__device__ inline void WarpMergeMax(float& m, float& l) {
  for (int off = 16; off > 0; off /= 2) {
    MergeMax(m, l, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, l, off));
  }
}

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
// Prefill's pass 2 sums 2^(log2 p + kPfMassShift) (gpu/prefill.cuh): p <= 1,
// so a sum over at most 2^20 rows stays below 2^121; a probability below
// 2^-226 (~1e-68) counts zero.
inline constexpr float kPfMassShift = 100.f;

inline constexpr int kScoreChunk = 64;  // clusters per block of the scoring kernel (its row-statistics chunk)
inline constexpr int kScoreTpc = 8;     // threads per centroid

struct ScoreParams {
  // The caller's queries (element type: the kernel's E), head- or
  // token-major, and the softmax scale; block 0 of each head also writes
  // them converted (qf, [H][R][D] fp32, scaled) for the attention kernels.
  const void* q = nullptr;
  bool q_vec = false;  // q 16-byte aligned: read 16 bytes per thread
  bool token_major = false;
  float scale = 1.f;
  float* qf = nullptr;
  int H = 0, G = 0, T = 0;  // R = G * T
  const HeadMeta* meta = nullptr;
  bool coarse = false;               // which level
  const float* centroids = nullptr;  // that level's centroids [*, D]
  const uint32_t* sizes = nullptr;   // that level's cluster sizes (flattened)
  // Fine stage of a hierarchical lookup: the parent of each fine cluster and
  // the coarse keep masks (bit g: query head g kept it); null when flat.
  const uint32_t* parent = nullptr;
  const HeadMask* coarse_keep = nullptr;  // [H][k1_stride]
  int k1_stride = 0;
  float* scores = nullptr;  // [H][R][k_stride]
  int k_stride = 0;
  // Per chunk of kScoreChunk clusters, each row's partial softmax state over
  // the chunk: (max, sum_j N_j exp(s_j - max)), [H][R][n_chunks].
  float* part_m = nullptr;
  float* part_l = nullptr;
  int n_chunks = 0;
  uint32_t* hist = nullptr;  // [H][kKeyBins]: zeroed here for the keys kernel (null: no budget rule)
};

inline constexpr int kKeyBins = 4096;    // the budget rule's histogram of estimated masses (log scale)
inline constexpr float kKeySpan = 48.f;  // log-mass range the bins cover below log(R); lower masses share bin 0

// Shared memory of the scoring kernel: the head's query rows and the chunk's scores.
inline size_t ScoreSmemBytes(int R, int D) { return static_cast<size_t>(R) * (D + kScoreChunk) * sizeof(float); }

// The scoring kernel's query rows: 16-byte chunk c (kQEl elements) of the
// head's R rows, chunk c = r * (D / kQEl) + d / kQEl.
template <typename E>
inline constexpr int kQEl = 16 / static_cast<int>(sizeof(E));

template <int D, typename E>
__device__ inline uint4 LoadQueryVec(const ScoreParams& p, int h, int c) {
  static_assert(D % kQEl<E> == 0, "a query row is whole 16-byte chunks");
  constexpr int kPerRow = D / kQEl<E>;
  const int r = c / kPerRow;  // g * T + t
  const int64_t src = QueryIndex(static_cast<int64_t>(h) * p.G + r / p.T, r % p.T, (c % kPerRow) * kQEl<E>, p.H, p.G,
                                 p.T, D, p.token_major);
  return *reinterpret_cast<const uint4*>(static_cast<const E*>(p.q) + src);
}

// Chunk c, converted and scaled, into the shared rows (and, from block 0 of
// the head, the attention kernels' qf).
template <int D, typename E>
__device__ inline void StoreQueryVec(const ScoreParams& p, int h, int c, uint4 raw, float* sqf) {
  const E* e = reinterpret_cast<const E*>(&raw);
  float* qf = p.qf + static_cast<size_t>(h) * p.G * p.T * D;
#pragma unroll
  for (int i = 0; i < kQEl<E>; ++i) {
    const float v = p.scale * LoadFloat(e + i);
    sqf[c * kQEl<E> + i] = v;
    if (blockIdx.x == 0) qf[c * kQEl<E> + i] = v;
  }
}

// Grid (ceil(k_max / kScoreChunk), H), kScoreThreads threads: the scores of
// a chunk of a level's clusters for every query row of the head (kScoreTpc
// threads per centroid, adjacent threads reading adjacent 16 bytes, both
// halves of the chunk's centroids loaded before any arithmetic), written to
// `scores`, then each row's partial softmax state over the chunk. In the
// fine stage of a hierarchical lookup, only children of kept coarse clusters
// are read (the others score -inf for the rows that did not keep them).
// (Registers sized for 4 resident blocks per SM: 2 us faster at 128K than 3
// on the H100, docs/results/2026-11-24-h100-gpu-engine.txt section 13.)
template <int D, typename E>
__global__ void __launch_bounds__(kScoreThreads, 4) ScoreKernel(ScoreParams p) {
  constexpr int kE4 = D / 4 / kScoreTpc;               // float4 per thread and centroid
  constexpr int kPerPass = kScoreThreads / kScoreTpc;  // centroids per pass
  constexpr int kPasses = kScoreChunk / kPerPass;
  extern __shared__ float4 smem[];
  const int h = blockIdx.y, R = p.G * p.T, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float4* sq = smem;                                       // [R][D / 4]
  float* ss = reinterpret_cast<float*>(smem + R * D / 4);  // [R][kScoreChunk]
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  const uint32_t base = p.coarse ? m.coarse_base : m.fine_base;
  const uint32_t j0 = blockIdx.x * kScoreChunk;
  const int part = threadIdx.x % kScoreTpc, slot = threadIdx.x / kScoreTpc;

  // The queries' first 16-byte chunks first, then the centroids: neither
  // depends on the previous kernel (the caller's q was written before the
  // call's first kernel) nor (flat) on anything else, so their latencies
  // overlap. (The rows were read element by element after the centroids: a
  // third of the kernel's stall samples at 128K waited on them, results file
  // 2026-11-25-cluster-select.txt.)
  const int q_chunks = R * D / kQEl<E>;
  uint4 q_first = make_uint4(0, 0, 0, 0);
  if (p.q_vec && threadIdx.x < q_chunks) q_first = LoadQueryVec<D, E>(p, h, threadIdx.x);
  if (p.parent != nullptr) WaitForPrevious();  // the coarse stage's keep masks
  float4 cv[kPasses][kE4];
  HeadMask bits[kPasses];
#pragma unroll
  for (int ps = 0; ps < kPasses; ++ps) {
    const uint32_t j = j0 + ps * kPerPass + slot;
    bits[ps] = j < k ? ~HeadMask{0} : HeadMask{0};
    if (j < k && p.parent != nullptr) {
      bits[ps] = p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + p.parent[base + j]];
    }
    const float4* c = reinterpret_cast<const float4*>(p.centroids + static_cast<size_t>(base + (j < k ? j : 0)) * D);
#pragma unroll
    for (int e = 0; e < kE4; ++e) {
      cv[ps][e] = bits[ps] != 0 ? __ldg(c + part + e * kScoreTpc) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  float n_lane[kScoreChunk / 32];
#pragma unroll
  for (int i = 0; i < kScoreChunk / 32; ++i) {
    const uint32_t j = j0 + i * 32 + lane;
    n_lane[i] = j < k ? static_cast<float>(p.sizes[base + j]) : 0.f;
  }

  WaitForPrevious();
  // The head's query rows, converted and scaled (row r = g * T + t).
  float* sqf = reinterpret_cast<float*>(sq);
  if (p.q_vec) {
    if (threadIdx.x < q_chunks) StoreQueryVec<D, E>(p, h, threadIdx.x, q_first, sqf);
    for (int c = threadIdx.x + kScoreThreads; c < q_chunks; c += kScoreThreads) {
      StoreQueryVec<D, E>(p, h, c, LoadQueryVec<D, E>(p, h, c), sqf);
    }
  } else {
    float* qf = p.qf + static_cast<size_t>(h) * R * D;
    for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
      const int r = i / D;  // g * T + t
      const int64_t src =
          QueryIndex(static_cast<int64_t>(h) * p.G + r / p.T, r % p.T, i % D, p.H, p.G, p.T, D, p.token_major);
      const float v = p.scale * LoadFloat(static_cast<const E*>(p.q) + src);
      sqf[i] = v;
      if (blockIdx.x == 0) qf[i] = v;
    }
  }
  if (blockIdx.x == 0 && p.hist != nullptr) {
    uint4* hz = reinterpret_cast<uint4*>(p.hist + static_cast<size_t>(h) * kKeyBins);
    for (int i = threadIdx.x; i < kKeyBins / 4; i += blockDim.x) hz[i] = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

#pragma unroll
  for (int ps = 0; ps < kPasses; ++ps) {
    const uint32_t j = j0 + ps * kPerPass + slot;
    float* out = p.scores + static_cast<size_t>(h) * R * p.k_stride + j;
    for (int r0 = 0; r0 < R; r0 += 4) {
      float acc[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[i] = 0.f;
        const int r = min(r0 + i, R - 1);
#pragma unroll
        for (int e = 0; e < kE4; ++e) {
          const float4 qv = sq[r * (D / 4) + part + e * kScoreTpc];
          acc[i] += qv.x * cv[ps][e].x + qv.y * cv[ps][e].y + qv.z * cv[ps][e].z + qv.w * cv[ps][e].w;
        }
#pragma unroll
        for (int off = kScoreTpc / 2; off > 0; off /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
      }
      if (part == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + i;
          if (r < R) {
            const float s = j < k && ((bits[ps] >> (r / p.T)) & 1u) ? acc[i] : -INFINITY;
            ss[r * kScoreChunk + ps * kPerPass + slot] = s;
            if (j < k) out[static_cast<size_t>(r) * p.k_stride] = s;
          }
        }
      }
    }
  }
  __syncthreads();
  LetDependentsLaunch();

  // Each row's partial state over the chunk: a warp per row. Scores of -inf
  // (not reached, or past the head's clusters) count for nothing.
  for (int r = warp; r < R; r += kScoreThreads / 32) {
    float s[kScoreChunk / 32];
    float mm = -INFINITY;
#pragma unroll
    for (int i = 0; i < kScoreChunk / 32; ++i) {
      s[i] = ss[r * kScoreChunk + i * 32 + lane];
      mm = fmaxf(mm, s[i]);
    }
    float ll = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int i = 0; i < kScoreChunk / 32; ++i) ll += s[i] == -INFINITY ? 0.f : n_lane[i] * expf(s[i] - mm);
    }
    WarpMergeMax(mm, ll);
    if (lane == 0) {
      p.part_m[(static_cast<size_t>(h) * R + r) * p.n_chunks + blockIdx.x] = mm;
      p.part_l[(static_cast<size_t>(h) * R + r) * p.n_chunks + blockIdx.x] = ll;
    }
  }
}

inline constexpr int kChunkClusters = 256;  // clusters per block of the keys kernel

struct SelectParams {
  int H = 0, G = 0, T = 0;
  const HeadMeta* meta = nullptr;
  bool coarse = false;            // stage: coarse (writes coarse_keep) or fine (writes segments)
  bool hierarchical = false;      // fine stage after a coarse one (adds to its statistics)
  int mode = 1;                   // 1 budget (joint over the group), 2 threshold (per query head, union)
  double target = 0;              // budget: rows to reach
  float tau = 0;                  // threshold
  const float* scores = nullptr;  // [H][R][k_stride]
  int k_stride = 0;
  const uint32_t* sizes = nullptr;  // the level's cluster sizes (flattened)
  // The scoring kernel's row partial states, [H][R][n_parts] (max, sum N
  // exp(s - max) per chunk of kScoreChunk clusters); per chunk of
  // kChunkClusters clusters of the keys kernel (n_chunks per head), the
  // candidates' size and the dot products with reached clusters [H][n_chunks].
  const float* part_m = nullptr;
  const float* part_l = nullptr;
  int n_parts = 0;
  uint32_t* chunk_weight = nullptr;
  uint32_t* chunk_scored = nullptr;
  int n_chunks = 0;
  uint32_t* keys = nullptr;  // [H][k_stride]: budget order keys (0 = not a candidate)
  uint8_t* flags = nullptr;  // [H][k_stride]: kept (by some query head of the group: nonzero)
  // Budget rule: the candidates' sizes per bin of estimated log-mass
  // ([H][kKeyBins], zeroed by the scoring kernel; null: radix select only),
  // bins of width kKeySpan / kKeyBins from bin_lo = log(R) - kKeySpan.
  uint32_t* hist = nullptr;
  float bin_lo = 0;
  // Coarse stage output (budget: the select kernel's, every head; threshold:
  // the keys kernel's, per query head), the fine stage's input.
  HeadMask* coarse_keep = nullptr;  // [H][k1_stride]
  int k1_stride = 0;
  // Fine stage outputs.
  uint32_t* seg_first = nullptr;   // [H][seg_stride]
  uint32_t* seg_before = nullptr;  // [H][seg_stride]: attended rows before the segment
  int seg_stride = 0;
  uint32_t* stats = nullptr;  // [H][kStatCount]
  uint32_t n_clustered = 0, n_always = 0;
  // For the attention kernel's blocks: the segment holding the first row of
  // each of its `splits` equal shares of a head's attended rows,
  // [H][splits] (a share starting past the head's rows gets nothing).
  uint32_t* split_seg = nullptr;
  int splits = 1;
  // SelectKernel stages a head's sizes, keys and flags in shared memory
  // (SelectStageBytes(k_stride) of dynamic shared memory; when they fit).
  bool staged = false;
  // The boundary bin's clusters the histogram rule ranks at most (more: the
  // radix select); below kMaxCandidates only in tests.
  uint32_t max_candidates = kMaxCandidates;
  // Prefill (gpu/prefill.cuh): instead of scores, each cluster's sum of
  // 2^(log2 p + kPfMassShift) per tile of rows,
  // [H][G * pf_tiles_per_g][k_stride] (tiles g * pf_tiles_per_g .. of query
  // head g); the fine stage of a hierarchical lookup reads the coarse keep
  // masks (coarse_keep) through `parent`.
  const float* pf_part = nullptr;
  int pf_tiles_per_g = 0;
  const uint32_t* parent = nullptr;
  // The statistics count dot products per query: the keys kernel's counts
  // are divided by this (T when it counts per query row, 1 for prefill).
  uint32_t scored_div = 1;
};

inline size_t SelectStageBytes(int k_stride) { return static_cast<size_t>(k_stride) * (2 * sizeof(uint32_t) + 1); }

// The histogram bin of an estimated log-mass x: monotone, so a cluster in a
// higher bin has a strictly larger mass (the keys and select kernels compute
// it with the same rounded operations: no contraction into an FMA).
__device__ inline int KeyBin(float x, float lo) {
  const float f = __fmul_rn(__fsub_rn(x, lo), static_cast<float>(kKeyBins) / kKeySpan);
  return f <= 0.f ? 0 : (f >= static_cast<float>(kKeyBins - 1) ? kKeyBins - 1 : static_cast<int>(f));
}

// The float an OrderKey came from.
__device__ inline float KeyValue(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Each row's log-denominator (max + log of the sum over the level's
// clusters; +inf: the row reaches nothing) from the scoring kernel's
// partials, a warp per row, into row_lse[R] (the caller synchronises).
__device__ inline void RowLse(const SelectParams& p, int h, float* row_lse) {
  const int R = p.G * p.T, warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int r = warp; r < R; r += warps) {
    const float* pm = p.part_m + (static_cast<size_t>(h) * R + r) * p.n_parts;
    const float* pl = p.part_l + (static_cast<size_t>(h) * R + r) * p.n_parts;
    float mm = -INFINITY, ll = 0.f;
    for (int c = lane; c < p.n_parts; c += 32) MergeMax(mm, ll, pm[c], pl[c]);
    WarpMergeMax(mm, ll);
    if (lane == 0) row_lse[r] = mm == -INFINITY ? INFINITY : mm + logf(ll);
  }
}

// One cluster's verdict from the rows' scores (decode) or the prefill
// partials: budget, its order key (0: not a candidate, no row reaches it);
// threshold, the query heads whose mean probability passes tau; and the dot
// products with it, per query row (decode) or token (prefill).
struct ClusterEval {
  uint32_t key = 0;
  float x = -INFINITY;  // budget: the estimated log-mass the key orders
  HeadMask bits = 0;
  uint32_t scored = 0;
};

__device__ inline ClusterEval EvalCluster(const SelectParams& p, int h, const HeadMeta& m, uint32_t j,
                                          const float* row_lse) {
  const int R = p.G * p.T;
  const float* scores = p.scores + static_cast<size_t>(h) * R * p.k_stride;
  ClusterEval e;
  bool candidate = false;
  if (p.pf_part != nullptr) {
    // Prefill: the rows' sums per tile. Budget: over every tile;
    // threshold: per query head g, its tiles' sum over T.
    const HeadMask all = AllHeads(p.G);
    const HeadMask reach = p.parent == nullptr
                               ? all
                               : p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + p.parent[m.fine_base + j]] & all;
    e.scored = __popcll(reach);  // per query token: the query heads that score j
    const float* part = p.pf_part + static_cast<size_t>(h) * p.G * p.pf_tiles_per_g * p.k_stride + j;
    if (p.mode == 1) {
      float ll = 0.f;
      for (int i = 0; i < p.G * p.pf_tiles_per_g; ++i) ll += part[static_cast<size_t>(i) * p.k_stride];
      candidate = reach != 0;  // (a mass below the shifted sum's range: -inf, still a candidate)
      if (ll > 0.f) e.x = (log2f(ll) - kPfMassShift) * kLn2;
    } else {
      for (int g = 0; g < p.G; ++g) {
        float pm = 0.f;
        for (int i = g * p.pf_tiles_per_g; i < (g + 1) * p.pf_tiles_per_g; ++i) {
          pm += part[static_cast<size_t>(i) * p.k_stride];
        }
        if (pm * exp2f(-kPfMassShift) / p.T > p.tau) e.bits |= HeadMask{1} << g;
      }
    }
  } else if (p.mode == 1) {
    // log of sum_r p_rj (the mean's order), over the rows that reach j.
    float mx = -INFINITY;
    for (int r = 0; r < R; ++r) {
      const float s = scores[static_cast<size_t>(r) * p.k_stride + j];
      e.scored += s != -INFINITY ? 1u : 0u;
      mx = fmaxf(mx, s - row_lse[r]);
    }
    candidate = mx != -INFINITY;
    if (candidate) {
      float sum = 0.f;
      for (int r = 0; r < R; ++r) {
        const float a = scores[static_cast<size_t>(r) * p.k_stride + j] - row_lse[r];
        if (a != -INFINITY) sum += expf(a - mx);
      }
      e.x = mx + logf(sum);
    }
  } else {
    for (int g = 0; g < p.G; ++g) {
      float pm = 0.f;
      for (int t = 0; t < p.T; ++t) {
        const int r = g * p.T + t;
        const float s = scores[static_cast<size_t>(r) * p.k_stride + j];
        e.scored += s != -INFINITY ? 1u : 0u;
        const float a = s - row_lse[r];
        if (a != -INFINITY) pm += expf(a);
      }
      if (pm / p.T > p.tau) e.bits |= HeadMask{1} << g;
    }
  }
  if (candidate) e.key = OrderKey(e.x);
  return e;
}

// Grid (n_chunks, H), kChunkClusters threads: the rows' log-denominators
// from the partials, then per cluster of the chunk the key of the joint
// (budget) order, or the threshold flags; per chunk the candidates' size and
// the dot products with reached clusters.
template <int NT = kChunkClusters>
__global__ void __launch_bounds__(NT) KeysKernel(SelectParams p) {
  __shared__ float row_lse[kMaxSelectRows];  // per row: max + log(denominator); +inf: reaches nothing
  __shared__ uint32_t sw[kChunkClusters / 32], ss[kChunkClusters / 32];
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  WaitForPrevious();
  LetDependentsLaunch();
  if (p.pf_part == nullptr) RowLse(p, h, row_lse);
  __syncthreads();
  const uint32_t j = blockIdx.x * kChunkClusters + threadIdx.x;
  uint32_t weight = 0, scored = 0;
  if (j < k) {
    const ClusterEval e = EvalCluster(p, h, m, j, row_lse);
    scored = e.scored;
    if (p.mode == 1) {
      if (e.key != 0) {
        const uint32_t size = p.sizes[(p.coarse ? m.coarse_base : m.fine_base) + j];
        weight = size;
        if (p.hist != nullptr) atomicAdd(p.hist + static_cast<size_t>(h) * kKeyBins + KeyBin(e.x, p.bin_lo), size);
      }
      p.keys[static_cast<size_t>(h) * p.k_stride + j] = e.key;
    } else {
      p.flags[static_cast<size_t>(h) * p.k_stride + j] = e.bits != 0 ? 1 : 0;
      if (p.coarse) p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + j] = e.bits;
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    weight += __shfl_xor_sync(0xffffffffu, weight, off);
    scored += __shfl_xor_sync(0xffffffffu, scored, off);
  }
  if (lane == 0) {
    sw[warp] = weight;
    ss[warp] = scored;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t a = 0, b = 0;
    for (int w = 0; w < kChunkClusters / 32; ++w) {
      a += sw[w];
      b += ss[w];
    }
    p.chunk_weight[static_cast<size_t>(h) * p.n_chunks + blockIdx.x] = a;
    p.chunk_scored[static_cast<size_t>(h) * p.n_chunks + blockIdx.x] = b;
  }
}

// The compaction's scan: segments started, attended rows, stored rows and
// kept clusters before a thread's clusters.
struct CompactionScan {
  uint32_t segs, rows, stored, kept;
};
struct CompactionSum {
  __device__ CompactionScan operator()(const CompactionScan& a, const CompactionScan& b) const {
    return {a.segs + b.segs, a.rows + b.rows, a.stored + b.stored, a.kept + b.kept};
  }
};

// The scan's terms of the clusters [jb, je) (indexes into flags / sizes),
// `prev`: whether the cluster before jb is kept.
__device__ inline CompactionScan CountSegments(const uint8_t* flags, const uint32_t* sizes, uint32_t jb, uint32_t je,
                                               bool prev) {
  CompactionScan local{0, 0, 0, 0};
  for (uint32_t j = jb; j < je; ++j) {
    const bool f = flags[j] != 0;
    const uint32_t size = sizes[j];
    local.stored += size;
    if (f) {
      ++local.kept;
      local.rows += size;
      if (!prev) ++local.segs;
    }
    prev = f;
  }
  return local;
}

// The segments the kept clusters of [jb, j) start (`before`: the scan's
// prefix at jb), and the attention shares whose first row they hold (share s
// of split_seg starts at row s * share of the head's attended rows).
__device__ inline void WriteSegments(const SelectParams& p, const uint8_t* flags, const uint32_t* sizes, uint32_t jb,
                                     uint32_t je, bool prev, CompactionScan before, uint32_t share, uint32_t* seg_first,
                                     uint32_t* seg_before, uint32_t* split_seg) {
  uint32_t seg = before.segs, row = before.rows, stored = before.stored;
  for (uint32_t j = jb; j < je; ++j) {
    const bool f = flags[j] != 0;
    const uint32_t size = sizes[j];
    if (f) {
      if (!prev) {
        seg_first[seg] = stored;
        seg_before[seg] = row;
        ++seg;
      }
      const uint32_t end = row + size;
      for (uint32_t sh = (row + share - 1) / share; sh < static_cast<uint32_t>(p.splits) && sh * share < end; ++sh) {
        split_seg[sh] = seg - 1;
      }
      row = end;
    }
    stored += size;
    prev = f;
  }
}

// One thread: the head's always set as its last segment (after n_seg
// segments of `rows` attended rows), its shares, and the head's statistics.
__device__ inline void WriteHeadTail(const SelectParams& p, int h, uint32_t n_seg, uint32_t rows, uint32_t kept,
                                     uint32_t scored, uint32_t share, uint32_t* seg_first, uint32_t* seg_before,
                                     uint32_t* split_seg) {
  const uint32_t head_rows = rows + p.n_always;
  if (p.n_always > 0) {
    seg_first[n_seg] = p.n_clustered;
    seg_before[n_seg] = rows;
    for (uint32_t sh = (rows + share - 1) / share; sh < static_cast<uint32_t>(p.splits) && sh * share < head_rows;
         ++sh) {
      split_seg[sh] = n_seg;
    }
  }
  uint32_t* st = p.stats + h * kStatCount;
  // Scored, as the CPU counts it: dot products of the G * T rows with the
  // clusters they reach, per query (/ T); plus the coarse stage's.
  st[kStatScored] = (p.hierarchical ? st[kStatScored] : 0u) + scored / p.scored_div;
  st[kStatKept] = kept;
  st[kStatSegments] = n_seg + (p.n_always > 0 ? 1u : 0u);
  st[kStatHeadRows] = head_rows;
}

// The budget rule's rows to reach: 0 (no budget), every candidate's (the
// budget covers them all), else ceil(target) (integer sizes: sum >= target
// <=> sum >= ceil(target)).
__device__ inline uint32_t BudgetNeed(double target, uint32_t total) {
  if (!(target > 0)) return 0;
  if (static_cast<double>(total) <= target) return total;
  return static_cast<uint32_t>(ceil(target));
}

// Against the boundary bin b*: clusters [0, n) (ids id0 + i) in higher bins
// kept, in lower ones not, those in b* listed (while fewer than cap) for the
// exact ranking, counted in *ncand. Strided over the block's threads.
__device__ inline void MarkAgainstBin(const uint32_t* keys, const uint32_t* sizes, uint32_t n, uint32_t id0, int bstar,
                                      float bin_lo, uint32_t cap, uint8_t* flags, uint32_t* ncand, uint32_t* cand_key,
                                      uint32_t* cand_id, uint32_t* cand_size) {
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
    const uint32_t key = keys[i];
    uint8_t f = 0;
    if (key != 0) {
      const int b = KeyBin(KeyValue(key), bin_lo);
      if (b > bstar) {
        f = kKept;
      } else if (b == bstar) {
        const uint32_t c = atomicAdd(ncand, 1u);
        if (c < cap) {
          cand_key[c] = key;
          cand_id[c] = id0 + i;
          cand_size[c] = sizes[i];
        }
      }
    }
    flags[i] = f;
  }
}

// Budget rule by radix select over the keys (0 = not a candidate): the
// largest key K* with W(key > K*) < need <= W(key >= K*), W = sum of sizes;
// ties at K* by id. Returns K* and, in *remaining, need - W(key > K*). The
// passes start at the first byte where the candidates' keys differ (keys of
// similar masses share their high bits: a pass over those would put every
// key in one bin).
template <int NT>
__device__ uint32_t RadixSelect(const uint32_t* keys, const uint32_t* sizes, uint32_t k, uint32_t need,
                                uint32_t* remaining_out) {
  using Reduce = cub::BlockReduce<uint32_t, NT>;
  __shared__ typename Reduce::TempStorage red;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t found_bin, found_above, s_lo, s_hi;
  uint32_t lo = 0xffffffffu, hi = 0;
  for (uint32_t j = threadIdx.x; j < k; j += NT) {
    const uint32_t key = keys[j];
    if (key != 0) {
      lo = min(lo, key);
      hi = max(hi, key);
    }
  }
  lo = Reduce(red).Reduce(lo, [](uint32_t a, uint32_t b) { return a < b ? a : b; });
  __syncthreads();
  hi = Reduce(red).Reduce(hi, [](uint32_t a, uint32_t b) { return a > b ? a : b; });
  if (threadIdx.x == 0) {
    s_lo = lo;
    s_hi = hi;
    found_bin = found_above = 0;
  }
  __syncthreads();
  const uint32_t diff = s_lo ^ s_hi;
  int top = 24;  // the first byte (from the top) where some keys differ
  while (top > 0 && (diff >> top) == 0) top -= 8;
  uint32_t prefix = top == 24 ? 0u : (s_hi & (0xffffffffu << (top + 8))), remaining = need;
  for (int shift = top; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0;
    __syncthreads();
    const uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (uint32_t j = threadIdx.x; j < k; j += NT) {
      const uint32_t key = keys[j];
      if (key != 0 && (key & high_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], sizes[j]);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds bins 255 - 8l .. 248 - 8l (descending).
      const int lane = threadIdx.x;
      uint32_t sum = 0;
      for (int i = 0; i < 8; ++i) sum += hist[255 - lane * 8 - i];
      uint32_t incl = sum;
      for (int off = 1; off < 32; off *= 2) {
        const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      const uint32_t excl = incl - sum;
      if (excl < remaining && remaining <= incl) {
        uint32_t acc = excl;
        for (int i = 0; i < 8; ++i) {
          const uint32_t b = 255 - lane * 8 - i, w = hist[b];
          if (acc + w >= remaining) {
            found_bin = b;
            found_above = acc;
            break;
          }
          acc += w;
        }
      }
    }
    __syncthreads();
    prefix |= found_bin << shift;
    remaining -= found_above;
    __syncthreads();
  }
  *remaining_out = remaining;
  return prefix;
}

// Grid H, NT (kSelectThreads) threads: the rule (budget: radix select and
// ties; threshold: the flags are the keys kernel's), then, in the fine stage,
// the kept clusters compacted into the head's segments (runs of adjacent kept
// clusters merged, the always set appended) and its statistics.
template <int NT>
__global__ void __launch_bounds__(NT) SelectKernel(SelectParams p) {
  using Scan = cub::BlockScan<uint32_t, NT>;
  using Reduce64 = cub::BlockReduce<unsigned long long, NT>;
  using ScanC = cub::BlockScan<CompactionScan, NT>;
  __shared__ union {
    typename Reduce64::TempStorage reduce64;
    typename Scan::TempStorage scan;
    typename ScanC::TempStorage scanc;
  } tmp;
  __shared__ uint32_t shared_kstar, shared_remaining;
  // The histogram rule's candidates: the clusters of the boundary bin.
  __shared__ uint32_t cand_key[kMaxCandidates], cand_id[kMaxCandidates], cand_size[kMaxCandidates];
  __shared__ uint32_t s_ncand;
  __shared__ int s_bstar;

  const int h = blockIdx.x;
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  const uint32_t base = p.coarse ? m.coarse_base : m.fine_base;
  const uint32_t* sizes = p.sizes + base;
  uint32_t* keys = p.keys + static_cast<size_t>(h) * p.k_stride;
  uint8_t* flags = p.flags + static_cast<size_t>(h) * p.k_stride;
  WaitForPrevious();
  LetDependentsLaunch();
  if (p.staged) {
    // The head's keys (budget) or flags (threshold) and sizes in shared
    // memory, loaded coalesced: the rule's passes and the blocked loops
    // below (a thread's clusters are adjacent: strided global loads) then
    // read shared memory.
    extern __shared__ uint32_t stage[];  // sizes [k_stride], keys [k_stride], flags [k_stride] bytes
    uint32_t* s_sizes = stage;
    uint32_t* s_keys = stage + p.k_stride;
    uint8_t* s_flags = reinterpret_cast<uint8_t*>(stage + 2 * static_cast<size_t>(p.k_stride));
    constexpr int kU = 4;  // loads in flight per thread
    for (uint32_t j0 = threadIdx.x; j0 < k; j0 += kU * NT) {
      uint32_t a[kU], b[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const uint32_t j = j0 + u * NT;
        a[u] = j < k ? sizes[j] : 0u;
        b[u] = j < k ? (p.mode == 1 ? keys[j] : flags[j]) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const uint32_t j = j0 + u * NT;
        if (j < k) {
          s_sizes[j] = a[u];
          if (p.mode == 1) {
            s_keys[j] = b[u];
          } else {
            s_flags[j] = static_cast<uint8_t>(b[u]);
          }
        }
      }
    }
    __syncthreads();
    sizes = s_sizes;
    keys = s_keys;
    flags = s_flags;
  }

  // The candidates' total size and the dot products, (total << 32) + scored
  // (scored <= k * kMaxSelectRows < 2^32).
  unsigned long long ts = 0;
  for (int c = threadIdx.x; c < p.n_chunks; c += NT) {
    ts += (static_cast<unsigned long long>(p.chunk_weight[static_cast<size_t>(h) * p.n_chunks + c]) << 32) +
          p.chunk_scored[static_cast<size_t>(h) * p.n_chunks + c];
  }
  ts = Reduce64(tmp.reduce64).Sum(ts);
  __shared__ unsigned long long s_ts;
  if (threadIdx.x == 0) s_ts = ts;
  __syncthreads();
  const uint32_t total = static_cast<uint32_t>(s_ts >> 32), scored = static_cast<uint32_t>(s_ts);

  if (p.mode == 1) {
    const uint32_t need = BudgetNeed(p.target, total);
    const bool all = need > 0 && need == total;
    // The rule: 0 none or every candidate kept; 1 through the histogram of
    // masses; 2 radix select over the keys (no histogram, or more candidates
    // in the boundary bin than the histogram path ranks).
    int rule = need > 0 && !all ? (p.hist != nullptr ? 1 : 2) : 0;
    if (rule == 1) {
      // The bin b* holding the boundary: W(bins > b*) < need <= W(bins >= b*).
      // Thread t sums bins kKeyBins - kPer (t + 1) .. kKeyBins - 1 - kPer t
      // (thread 0 the highest), one exclusive scan.
      constexpr int kPer = kKeyBins / NT;
      static_assert(kPer % 4 == 0, "whole uint4 loads of the histogram");
      const int b0 = kKeyBins - kPer * (threadIdx.x + 1);
      uint32_t w[kPer];
      const uint4* hp = reinterpret_cast<const uint4*>(p.hist + static_cast<size_t>(h) * kKeyBins + b0);
#pragma unroll
      for (int i = 0; i < kPer / 4; ++i) {
        const uint4 u = hp[i];
        w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
      }
      uint32_t local = 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) local += w[i];
      if (threadIdx.x == 0) {
        s_ncand = 0;
        s_bstar = kKeyBins;  // (the scan always finds the bin: the histogram sums to the total)
      }
      uint32_t above;
      Scan(tmp.scan).ExclusiveSum(local, above);
      if (above < need && need <= above + local) {
        uint32_t acc = above;
        for (int i = kPer - 1; i >= 0; --i) {
          if (acc + w[i] >= need) {
            s_bstar = b0 + i;
            shared_remaining = need - acc;
            break;
          }
          acc += w[i];
        }
      }
      __syncthreads();
      const int bstar = s_bstar;
      // Clusters in higher bins are kept, in lower ones not; those in b* are
      // ranked exactly (key, then id) among themselves.
      MarkAgainstBin(keys, sizes, k, 0, bstar, p.bin_lo, p.max_candidates, flags, &s_ncand, cand_key, cand_id,
                     cand_size);
      __syncthreads();
      const uint32_t n = s_ncand, remaining = shared_remaining;
      if (n <= p.max_candidates) {
        for (uint32_t i = threadIdx.x; i < n; i += NT) {
          const uint32_t ki = cand_key[i], ii = cand_id[i];
          uint32_t before = 0;  // sizes of the candidates ordered before i
          for (uint32_t c = 0; c < n; ++c) {
            const uint32_t kc = cand_key[c];
            if (kc > ki || (kc == ki && cand_id[c] < ii)) before += cand_size[c];
          }
          if (before < remaining) flags[ii] = kKept;
        }
      } else {
        rule = 2;
      }
    }
    if (rule == 2) {
      uint32_t remaining = 0;
      const uint32_t kstar = RadixSelect<NT>(keys, sizes, k, need, &remaining);
      if (threadIdx.x == 0) {
        shared_kstar = kstar;
        shared_remaining = remaining;
      }
      __syncthreads();
      // Keys above K* are kept; keys equal to K* in id order while the sizes
      // of the tied ones before them are < remaining. Blocked: thread t owns
      // clusters [t * per, (t + 1) * per), one scan.
      const uint32_t ks = shared_kstar, rem = shared_remaining;
      const uint32_t per = (k + NT - 1) / NT, jb = min(k, threadIdx.x * per), je = min(k, jb + per);
      uint32_t local = 0;
      for (uint32_t j = jb; j < je; ++j) local += keys[j] != 0 && keys[j] == ks ? sizes[j] : 0u;
      uint32_t before;
      Scan(tmp.scan).ExclusiveSum(local, before);
      for (uint32_t j = jb; j < je; ++j) {
        const uint32_t key = keys[j];
        bool keep = false;
        if (key > ks) {
          keep = true;
        } else if (key != 0 && key == ks) {
          keep = before < rem;
          before += sizes[j];
        }
        flags[j] = keep ? kKept : 0;
      }
    } else if (rule == 0) {
      for (uint32_t j = threadIdx.x; j < k; j += NT) flags[j] = all && keys[j] != 0 ? kKept : 0;
    }
  }
  __syncthreads();

  if (p.coarse) {
    // (Threshold: the keys kernel wrote each query head's bits.)
    HeadMask* out = p.coarse_keep + static_cast<size_t>(h) * p.k1_stride;
    const HeadMask all = AllHeads(p.G);
    if (p.mode == 1) {
      for (uint32_t j = threadIdx.x; j < k; j += NT) out[j] = flags[j] != 0 ? all : 0;
    }
    if (threadIdx.x == 0) p.stats[h * kStatCount + kStatScored] = k * p.G;
    return;
  }

  // Compaction. Blocked: thread t owns clusters [t * per, (t + 1) * per); one
  // scan gives each its first segment, attended row, stored row (the
  // clusters' rows are stored in cluster order: the first stored row of a
  // cluster is the sum of the sizes before it) and kept clusters.
  uint32_t* seg_first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* seg_before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* split_seg = p.split_seg + static_cast<size_t>(h) * p.splits;
  const uint32_t per = (k + NT - 1) / NT, jb = min(k, threadIdx.x * per), je = min(k, jb + per);
  const bool prev = jb > 0 && flags[jb - 1] != 0;
  const CompactionScan local = CountSegments(flags, sizes, jb, je, prev);
  CompactionScan before, sum;
  __syncthreads();
  ScanC(tmp.scanc).ExclusiveScan(local, before, CompactionScan{0, 0, 0, 0}, CompactionSum(), sum);
  // The attention kernel's shares of the head's rows: share s starts at row
  // s * share; the cluster holding that row names its segment.
  const uint32_t share = (sum.rows + p.n_always + p.splits - 1) / p.splits;
  WriteSegments(p, flags, sizes, jb, je, prev, before, share, seg_first, seg_before, split_seg);
  if (threadIdx.x == 0)
    WriteHeadTail(p, h, sum.segs, sum.rows, sum.kept, scored, share, seg_first, seg_before, split_seg);
}

// Every fine cluster kept (dense mode): one segment of the clustered rows and
// the always set, and the attention kernel's shares. Grid H, 32 threads. (A
// template only so that it may be defined in this header.)
template <int Unused = 0>
__global__ void DenseSelectKernel(SelectParams p) {
  const int h = blockIdx.x;
  const HeadMeta m = p.meta[h];
  const uint32_t head_rows = p.n_clustered + p.n_always;
  const uint32_t share = (head_rows + p.splits - 1) / p.splits;
  WaitForPrevious();
  LetDependentsLaunch();
  for (int sh = threadIdx.x; sh < p.splits; sh += blockDim.x) {
    p.split_seg[static_cast<size_t>(h) * p.splits + sh] =
        p.n_clustered > 0 && static_cast<uint32_t>(sh) * share < p.n_clustered ? 0u : (p.n_clustered > 0 ? 1u : 0u);
  }
  if (threadIdx.x != 0) return;
  uint32_t* seg_first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* seg_before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
  uint32_t n = 0;
  if (p.n_clustered > 0) {
    seg_first[n] = 0;
    seg_before[n] = 0;
    ++n;
  }
  if (p.n_always > 0) {
    seg_first[n] = p.n_clustered;
    seg_before[n] = p.n_clustered;
    ++n;
  }
  uint32_t* st = p.stats + h * kStatCount;
  st[kStatScored] = 0;
  st[kStatKept] = m.k2;
  st[kStatSegments] = n;
  st[kStatHeadRows] = head_rows;
}

}  // namespace sqz::gpu
