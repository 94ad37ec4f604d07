// Device selection: the plan step of the GPU engine, on the GPU, for one
// layer and every served KV head at once (docs/SEMANTICS.md, "Estimated
// probabilities" and "Selection"; the CPU reference is query/selection.cc).
//
//   PrepQueriesKernel   q (fp32/fp16/bf16, head- or token-major) -> qf, fp32,
//                       scaled, [H][R][D] with row r = g * T + t
//   ScoreKernel         s[h][r][j] = qf[h][r] . c_j for every centroid of a
//                       level; in the fine stage of a hierarchical lookup only
//                       children of kept coarse clusters are read (the others
//                       score -inf for the rows that did not keep them)
//   SelectKernel        one block per KV head: per-row max and denominator,
//                       the estimated probabilities, the rule (budget: a
//                       radix select of the mass order with size
//                       accumulation; threshold), then, in the fine stage,
//                       the kept clusters compacted into the head's segments
//                       (adjacent clusters merged, the always set appended)
//                       and its statistics.
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

namespace sqz::gpu {

inline constexpr int kMaxSelectRows = 64;  // query rows per KV head (G * T) the selection takes
inline constexpr int kScoreThreads = 128;
inline constexpr int kSelectThreads = 512;

// Per-head statistics the select kernel writes ([H][kStatCount] uint32).
enum : int {
  kStatScored = 0,    // centroid dot products per query row (coarse + fine)
  kStatKept = 1,      // fine clusters kept
  kStatRows = 2,      // clustered rows kept
  kStatSegments = 3,  // segments, the always set included
  kStatPages = 4,     // distinct KV pages the segments touch
  kStatHeadRows = 5,  // rows attended: kept rows + the always set
  kStatCount = 8,
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

// qf[((h * G + g) * T + t) * D + d] = scale * q(query head h * G + g, token t, d).
template <typename E>
__global__ void PrepQueriesKernel(const E* q, float* qf, int H, int G, int T, int D, bool token_major, float scale) {
  const int64_t n = static_cast<int64_t>(H) * G * T * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % D);
    const int64_t row = i / D;  // (qh * T + t)
    const int t = static_cast<int>(row % T);
    const int64_t qh = row / T;
    const int64_t src = token_major ? (static_cast<int64_t>(t) * H * G + qh) * D + d : i;
    qf[i] = scale * LoadFloat(q + src);
  }
}

struct ScoreParams {
  const float* qf = nullptr;  // [H][R][D]
  int H = 0, G = 0, T = 0;    // R = G * T
  const HeadMeta* meta = nullptr;
  bool coarse = false;               // which level
  const float* centroids = nullptr;  // that level's centroids [*, D]
  // Fine stage of a hierarchical lookup: the parent of each fine cluster and
  // the coarse keep masks (bit g: query head g kept it); null when flat.
  const uint32_t* parent = nullptr;
  const uint8_t* coarse_keep = nullptr;  // [H][k1_stride]
  int k1_stride = 0;
  float* scores = nullptr;  // [H][R][k_stride]
  int k_stride = 0;
};

// Grid (ceil(k_max * kScoreTpc / kScoreThreads), H): kScoreTpc threads per
// centroid (adjacent threads read adjacent 16 bytes: coalesced), the rows in
// chunks of 8 (decode reads each centroid once), a 3-step shuffle reduction.
inline constexpr int kScoreTpc = 8;
template <int D>
__global__ void __launch_bounds__(kScoreThreads) ScoreKernel(ScoreParams p) {
  constexpr int kE4 = D / 4 / kScoreTpc;                // float4 per thread
  constexpr int kPerBlock = kScoreThreads / kScoreTpc;  // centroids per block and round
  extern __shared__ float4 sq[];                        // [R][D / 4] (dynamic: R * D * 4 bytes)
  const int h = blockIdx.y, R = p.G * p.T;
  const float4* qh = reinterpret_cast<const float4*>(p.qf + static_cast<size_t>(h) * R * D);
  for (int i = threadIdx.x; i < R * D / 4; i += blockDim.x) sq[i] = qh[i];
  __syncthreads();
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  const int part = threadIdx.x % kScoreTpc;
  const float4* cbase =
      reinterpret_cast<const float4*>(p.centroids + static_cast<size_t>(p.coarse ? m.coarse_base : m.fine_base) * D);
  // Rounds over the head's centroids; the loop bound is uniform per block so
  // the whole warp takes part in the shuffles.
  for (uint32_t j0 = blockIdx.x * kPerBlock; j0 < k; j0 += gridDim.x * kPerBlock) {
    const uint32_t j = j0 + threadIdx.x / kScoreTpc;
    const bool valid = j < k;
    float* out = p.scores + static_cast<size_t>(h) * R * p.k_stride + j;
    uint32_t bits = valid ? 0xffu : 0u;
    if (valid && p.parent != nullptr) {
      bits = p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + p.parent[m.fine_base + j]];
    }
    float4 cv[kE4];
    const float4* c = cbase + static_cast<size_t>(valid ? j : 0) * (D / 4);
#pragma unroll
    for (int e = 0; e < kE4; ++e) cv[e] = bits != 0 ? __ldg(c + part + e * kScoreTpc) : make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r0 = 0; r0 < R; r0 += 8) {
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[i] = 0.f;
        if (r0 + i < R) {
#pragma unroll
          for (int e = 0; e < kE4; ++e) {
            const float4 qv = sq[(r0 + i) * (D / 4) + part + e * kScoreTpc];
            acc[i] += qv.x * cv[e].x + qv.y * cv[e].y + qv.z * cv[e].z + qv.w * cv[e].w;
          }
        }
#pragma unroll
        for (int off = kScoreTpc / 2; off > 0; off /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
      }
      if (valid && part == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int r = r0 + i;
          if (r < R) out[static_cast<size_t>(r) * p.k_stride] = ((bits >> (r / p.T)) & 1u) ? acc[i] : -INFINITY;
        }
      }
    }
  }
}

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
  uint32_t* keys = nullptr;         // scratch [H][k_stride]
  uint8_t* flags = nullptr;         // scratch [H][k_stride]
  // Coarse stage output.
  uint8_t* coarse_keep = nullptr;  // [H][k1_stride]
  int k1_stride = 0;
  // Fine stage outputs.
  const uint32_t* first = nullptr;  // first stored row of each fine cluster (flattened)
  uint32_t* seg_first = nullptr;    // [H][seg_stride]
  uint32_t* seg_before = nullptr;   // [H][seg_stride]: attended rows before the segment
  int seg_stride = 0;
  uint32_t* stats = nullptr;  // [H][kStatCount]
  uint32_t n_clustered = 0, n_always = 0, page_rows = 1, clustered_pages = 0;
};

// fp32 keys that compare like the floats (all finite or -inf here).
__device__ inline uint32_t OrderKey(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ inline uint32_t PageOf(uint32_t row, const SelectParams& p) {
  return row < p.n_clustered ? row / p.page_rows : p.clustered_pages + (row - p.n_clustered) / p.page_rows;
}

// Budget rule by radix select over the keys (0 = not a candidate): the
// largest key K* with W(key > K*) < need <= W(key >= K*), W = sum of sizes;
// ties at K* by id. Returns K* and, in *remaining, need - W(key > K*).
template <int NT>
__device__ uint32_t RadixSelect(const uint32_t* keys, const uint32_t* sizes, uint32_t k, uint32_t need,
                                uint32_t* remaining_out) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t found_bin, found_above;
  uint32_t prefix = 0, remaining = need;
  if (threadIdx.x == 0) found_bin = found_above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
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

// Grid H, NT (kSelectThreads) threads.
template <int NT>
__global__ void __launch_bounds__(NT) SelectKernel(SelectParams p) {
  using Reduce = cub::BlockReduce<uint32_t, NT>;
  using Scan = cub::BlockScan<uint32_t, NT>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ float row_lse[kMaxSelectRows];  // per row: max + log(denominator)
  __shared__ float warp_m[NT / 32][8], warp_l[NT / 32][8];
  __shared__ uint32_t shared_total, shared_kstar, shared_remaining;

  const int h = blockIdx.x, R = p.G * p.T, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  const uint32_t base = p.coarse ? m.coarse_base : m.fine_base;
  const uint32_t* sizes = p.sizes + base;
  const float* scores = p.scores + static_cast<size_t>(h) * R * p.k_stride;
  uint32_t* keys = p.keys + static_cast<size_t>(h) * p.k_stride;
  uint8_t* flags = p.flags + static_cast<size_t>(h) * p.k_stride;

  // 1. Per row: max and denominator sum_j N_j exp(s_j - max), online, 8 rows
  // at a time. Scores of -inf (not reached) count for nothing.
  for (int r0 = 0; r0 < R; r0 += 8) {
    float lm[8], ll[8];
    for (int i = 0; i < 8; ++i) {
      lm[i] = -INFINITY;
      ll[i] = 0.f;
    }
    for (uint32_t j = threadIdx.x; j < k; j += NT) {
      const float n = static_cast<float>(sizes[j]);
      for (int i = 0; i < 8 && r0 + i < R; ++i) {
        const float s = scores[static_cast<size_t>(r0 + i) * p.k_stride + j];
        if (s == -INFINITY) continue;
        if (s > lm[i]) {
          ll[i] = ll[i] * expf(lm[i] - s) + n;
          lm[i] = s;
        } else {
          ll[i] += n * expf(s - lm[i]);
        }
      }
    }
    for (int i = 0; i < 8; ++i) {
      for (int off = 16; off > 0; off /= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, lm[i], off), ol = __shfl_xor_sync(0xffffffffu, ll[i], off);
        const float mm = fmaxf(lm[i], om);
        ll[i] = (lm[i] == -INFINITY ? 0.f : ll[i] * expf(lm[i] - mm)) + (om == -INFINITY ? 0.f : ol * expf(om - mm));
        lm[i] = mm;
      }
      if (lane == 0) {
        warp_m[warp][i] = lm[i];
        warp_l[warp][i] = ll[i];
      }
    }
    __syncthreads();
    if (threadIdx.x < 8 && r0 + threadIdx.x < R) {
      const int i = threadIdx.x;
      float mm = -INFINITY, l = 0.f;
      for (int w = 0; w < NT / 32; ++w) mm = fmaxf(mm, warp_m[w][i]);
      if (mm != -INFINITY) {
        for (int w = 0; w < NT / 32; ++w) {
          if (warp_m[w][i] != -INFINITY) l += warp_l[w][i] * expf(warp_m[w][i] - mm);
        }
      }
      row_lse[r0 + i] = mm == -INFINITY ? INFINITY : mm + logf(l);  // +inf: the row reaches nothing
    }
    __syncthreads();
  }

  // 2. Per cluster: the key of the joint (budget) order, or the threshold
  // flags. log p_rj = s_rj - row_lse[r].
  const uint8_t all_bits = static_cast<uint8_t>((1u << p.G) - 1u);
  uint32_t cand_weight = 0;
  for (uint32_t j = threadIdx.x; j < k; j += NT) {
    if (p.mode == 1) {
      // log of sum_r p_rj (the mean's order), over rows that reach j.
      float mx = -INFINITY;
      for (int r = 0; r < R; ++r) mx = fmaxf(mx, scores[static_cast<size_t>(r) * p.k_stride + j] - row_lse[r]);
      uint32_t key = 0;
      if (mx != -INFINITY) {
        float sum = 0.f;
        for (int r = 0; r < R; ++r) {
          const float a = scores[static_cast<size_t>(r) * p.k_stride + j] - row_lse[r];
          if (a != -INFINITY) sum += expf(a - mx);
        }
        key = OrderKey(mx + logf(sum));
        cand_weight += sizes[j];
      }
      keys[j] = key;
    } else {
      uint8_t bits = 0;
      for (int g = 0; g < p.G; ++g) {
        float pm = 0.f;
        for (int t = 0; t < p.T; ++t) {
          const int r = g * p.T + t;
          const float a = scores[static_cast<size_t>(r) * p.k_stride + j] - row_lse[r];
          if (a != -INFINITY) pm += expf(a);
        }
        if (pm / p.T > p.tau) bits |= static_cast<uint8_t>(1u << g);
      }
      flags[j] = bits;
    }
  }

  if (p.mode == 1) {
    const uint32_t total = Reduce(tmp.reduce).Sum(cand_weight);
    if (threadIdx.x == 0) shared_total = total;
    __syncthreads();
    const double target = p.target;
    uint32_t need;
    if (!(target > 0)) {
      need = 0;
    } else if (static_cast<double>(shared_total) <= target) {
      need = shared_total;  // every candidate
    } else {
      need = static_cast<uint32_t>(ceil(target));  // integer sizes: sum >= target <=> sum >= ceil(target)
    }
    uint32_t kstar = 0xffffffffu, remaining = 0;
    if (need > 0 && need < shared_total) {
      kstar = RadixSelect<NT>(keys, sizes, k, need, &remaining);
    }
    if (threadIdx.x == 0) {
      shared_kstar = kstar;
      shared_remaining = remaining;
    }
    __syncthreads();
    kstar = shared_kstar;
    remaining = shared_remaining;
    // Keys above K* are kept; keys equal to K* in id order while the sizes of
    // the tied ones before them are < remaining.
    uint32_t carry = 0;
    for (uint32_t j0 = 0; j0 < k; j0 += NT) {
      const uint32_t j = j0 + threadIdx.x;
      const uint32_t key = j < k ? keys[j] : 0;
      const bool all = need > 0 && need == shared_total;
      const uint32_t tied = (!all && key != 0 && key == kstar) ? sizes[j] : 0;
      uint32_t before, tile_sum;
      Scan(tmp.scan).ExclusiveSum(tied, before, tile_sum);
      __syncthreads();
      if (j < k) {
        bool keep = false;
        if (key != 0 && need > 0) keep = all || key > kstar || (tied > 0 && carry + before < remaining);
        flags[j] = keep ? all_bits : 0;
      }
      carry += tile_sum;
    }
  }
  __syncthreads();

  if (p.coarse) {
    uint8_t* out = p.coarse_keep + static_cast<size_t>(h) * p.k1_stride;
    for (uint32_t j = threadIdx.x; j < k; j += NT) out[j] = flags[j];
    if (threadIdx.x == 0) p.stats[h * kStatCount + kStatScored] = k * p.G;
    return;
  }

  // 3. Fine stage: compact the kept clusters into segments (runs of adjacent
  // kept clusters merged), in id order, then the always set.
  const uint32_t* first = p.first + base;
  uint32_t* seg_first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* seg_before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
  uint32_t n_seg = 0, rows = 0, kept = 0, scored = 0;
  for (uint32_t j0 = 0; j0 < k; j0 += NT) {
    const uint32_t j = j0 + threadIdx.x;
    const bool f = j < k && flags[j] != 0;
    const bool start = f && (j == 0 || flags[j - 1] == 0);
    uint32_t seg_idx, n_starts, row_before, n_rows;
    Scan(tmp.scan).ExclusiveSum(start ? 1u : 0u, seg_idx, n_starts);
    __syncthreads();
    Scan(tmp.scan).ExclusiveSum(f ? sizes[j] : 0u, row_before, n_rows);
    __syncthreads();
    if (start) {
      seg_first[n_seg + seg_idx] = first[j];
      seg_before[n_seg + seg_idx] = rows + row_before;
    }
    n_seg += n_starts;
    rows += n_rows;
    if (f) ++kept;
  }
  // Scored, as the CPU counts it: dot products of the G * T rows with the
  // clusters they reach, per query (/ T).
  for (uint32_t j = threadIdx.x; j < k; j += NT) {
    for (int r = 0; r < R; ++r) scored += scores[static_cast<size_t>(r) * p.k_stride + j] != -INFINITY ? 1u : 0u;
  }
  scored = Reduce(tmp.reduce).Sum(scored);
  __syncthreads();
  kept = Reduce(tmp.reduce).Sum(kept);
  __syncthreads();
  if (threadIdx.x == 0 && p.n_always > 0) {
    seg_first[n_seg] = p.n_clustered;
    seg_before[n_seg] = rows;
  }
  const uint32_t total_segs = n_seg + (p.n_always > 0 ? 1u : 0u);
  const uint32_t head_rows = rows + p.n_always;
  __syncthreads();
  // Pages: each segment's span, less the page it shares with the previous one.
  uint32_t pages = 0;
  for (uint32_t i = threadIdx.x; i < total_segs; i += NT) {
    const uint32_t end = i + 1 < total_segs ? seg_before[i + 1] : head_rows;
    const uint32_t f0 = seg_first[i], nr = end - seg_before[i];
    const uint32_t pf = PageOf(f0, p), pl = PageOf(f0 + nr - 1, p);
    pages += pl - pf + 1;
    if (i > 0) {
      const uint32_t prev_last = seg_first[i - 1] + (seg_before[i] - seg_before[i - 1]) - 1;
      if (PageOf(prev_last, p) == pf) --pages;
    }
  }
  pages = Reduce(tmp.reduce).Sum(pages);
  if (threadIdx.x == 0) {
    uint32_t* st = p.stats + h * kStatCount;
    st[kStatScored] = (p.hierarchical ? st[kStatScored] : 0u) + scored / p.T;  // + the coarse stage's
    st[kStatKept] = kept;
    st[kStatRows] = rows;
    st[kStatSegments] = total_segs;
    st[kStatPages] = pages;
    st[kStatHeadRows] = head_rows;
  }
}

// Every fine cluster kept (dense mode): one segment of the clustered rows and
// the always set. Grid H, one thread. (A template only so that it may be
// defined in this header.)
template <int Unused = 0>
__global__ void DenseSelectKernel(SelectParams p) {
  const int h = blockIdx.x;
  const HeadMeta m = p.meta[h];
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
  st[kStatRows] = p.n_clustered;
  st[kStatSegments] = n;
  st[kStatPages] = (p.n_clustered + p.page_rows - 1) / p.page_rows + (p.n_always + p.page_rows - 1) / p.page_rows;
  st[kStatHeadRows] = p.n_clustered + p.n_always;
}

}  // namespace sqz::gpu
