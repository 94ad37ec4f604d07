// Decode selection in one kernel: the keys kernel's and the select kernel's
// work (gpu/select.cuh) for one level, done by a cluster of kSelectCtas
// thread blocks per KV head that share their results through distributed
// shared memory (sm_90 thread-block clusters) instead of device memory.
//
//   block r of head h's cluster owns clusters [r * span, (r + 1) * span),
//   span = ceil(k / kSelectCtas):
//   1. the rows' log-denominators (every block, from the scoring partials);
//      per owned cluster its verdict (EvalCluster: budget key, or threshold
//      bits), its size, a local histogram of the candidates' log-masses;
//   -- cluster barrier --
//   2. budget: the cluster's totals and merged histogram (each block reads
//      every block's), the boundary bin; owned clusters above it kept, those
//      in it listed;
//   -- cluster barrier --
//      each listed cluster ranked (key, then id) against every block's list;
//   3. fine stage: each block's compaction terms (segments, attended rows,
//      stored rows, kept clusters), its first and last flags;
//   -- cluster barrier --
//      the block's prefix from the blocks before it, then its segments and
//      attention shares written; block 0 writes the always set and the
//      statistics;
//   -- cluster barrier (no block leaves while another reads its memory) --
//
// The same rule as KeysKernel + SelectKernel, cluster for cluster (the tests
// run both: SQZ_GPU_SELECT_CLUSTER=1 selects this kernel for every decode
// call, whatever the heads' cluster counts). The
// boundary bin's clusters are all ranked exactly (no candidate limit, no
// radix fallback): a bin of many clusters costs time, not correctness.
// Decode only (prefill keeps the two kernels), and only while a block's share
// of a head's clusters fits in shared memory (ClusterSelectFits).
#pragma once

#include <cooperative_groups.h>

#include "select.cuh"

namespace sqz::gpu {

inline constexpr int kSelectCtas = 8;  // thread blocks per head (a portable cluster size)
inline constexpr int kClusterSelectThreads = 512;
inline constexpr int kBinsPerCta = kKeyBins / kSelectCtas;  // the histogram range each block merges
// The engine uses this kernel for heads of at least this many clusters (the
// two-kernel path is faster below: docs/results/2026-11-25-cluster-select.txt).
inline constexpr int kClusterSelectMinClusters = 8192;

// Dynamic shared memory per block for arrays laid out for k_stride clusters
// per head: per owned cluster its key, size, candidate entry (key, id, size)
// and flag.
inline size_t ClusterSelectSmem(int k_stride) {
  const size_t span = (static_cast<size_t>(k_stride) + kSelectCtas - 1) / kSelectCtas;
  return span * (5 * sizeof(uint32_t) + 1);
}

// Grid (kSelectCtas, H), kClusterSelectThreads threads, clusters of
// kSelectCtas blocks along x, ClusterSelectSmem(p.k_stride) dynamic shared memory.
template <int NT>
__global__ void __cluster_dims__(kSelectCtas, 1, 1) __launch_bounds__(NT, 1) ClusterSelectKernel(SelectParams p) {
  namespace cg = cooperative_groups;
  using Scan = cub::BlockScan<uint32_t, NT>;
  using Reduce = cub::BlockReduce<uint32_t, NT>;
  using Reduce64 = cub::BlockReduce<unsigned long long, NT>;
  using ScanC = cub::BlockScan<CompactionScan, NT>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Reduce64::TempStorage reduce64;
    typename Scan::TempStorage scan;
    typename ScanC::TempStorage scanc;
  } tmp;
  __shared__ float row_lse[kMaxSelectRows];
  __shared__ uint32_t hist[kKeyBins];       // this block's candidates' sizes per bin
  __shared__ uint32_t merged[kBinsPerCta];  // bins [rank * kBinsPerCta, ...) of the cluster's histogram
  __shared__ unsigned long long s_ts;       // (candidates' total size << 32) + dot products, this block's
  __shared__ unsigned long long s_all_ts;
  __shared__ uint32_t s_ncand, s_remaining, s_range_sum;
  __shared__ int s_bstar;
  __shared__ CompactionScan s_ctot;
  __shared__ uint32_t s_first, s_last;             // whether this block's first / last owned cluster is kept
  __shared__ int s_rb;                             // the block whose histogram range holds the boundary bin
  __shared__ uint32_t s_above_rb;                  // the candidates' sizes in the ranges above it
  __shared__ CompactionScan s_terms[kSelectCtas];  // every block's compaction terms (corrected)
  __shared__ uint32_t s_joins[kSelectCtas], s_lasts[kSelectCtas];
  extern __shared__ uint32_t dyn[];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const HeadMeta m = p.meta[h];
  const uint32_t k = p.coarse ? m.k1 : m.k2;
  const uint32_t base = p.coarse ? m.coarse_base : m.fine_base;
  const uint32_t span = (k + kSelectCtas - 1) / kSelectCtas;
  const uint32_t c0 = min(k, rank * span), n = min(k, c0 + span) - c0;  // owned: [c0, c0 + n)
  const uint32_t cap = (static_cast<uint32_t>(p.k_stride) + kSelectCtas - 1) / kSelectCtas;
  uint32_t* s_key = dyn;
  uint32_t* s_size = dyn + cap;
  uint32_t* cand_key = dyn + 2 * cap;
  uint32_t* cand_id = dyn + 3 * cap;
  uint32_t* cand_size = dyn + 4 * cap;
  uint8_t* s_flag = reinterpret_cast<uint8_t*>(dyn + 5 * cap);
  const bool budget = p.mode == 1;

  WaitForPrevious();
  LetDependentsLaunch();
  if (budget) {
    for (int i = threadIdx.x; i < kKeyBins; i += NT) hist[i] = 0;
  }
  if (threadIdx.x == 0) {
    s_ncand = 0;
    s_bstar = kKeyBins;  // (the scan always finds the bin: the histogram sums to the total)
    s_remaining = 0;
    s_rb = 0;
    s_above_rb = 0;
  }
  RowLse(p, h, row_lse);
  __syncthreads();

  // 1. The owned clusters' verdicts.
  uint32_t weight = 0, scored = 0;
  for (uint32_t i = threadIdx.x; i < n; i += NT) {
    const uint32_t j = c0 + i;
    const ClusterEval e = EvalCluster(p, h, m, j, row_lse);
    const uint32_t size = p.sizes[base + j];
    scored += e.scored;
    s_size[i] = size;
    if (budget) {
      s_key[i] = e.key;
      if (e.key != 0) {
        weight += size;
        atomicAdd(&hist[KeyBin(e.x, p.bin_lo)], size);
      }
    } else {
      s_flag[i] = e.bits != 0 ? kKept : 0;
      if (p.coarse) p.coarse_keep[static_cast<size_t>(h) * p.k1_stride + j] = e.bits;
    }
  }
  const unsigned long long ts = Reduce64(tmp.reduce64).Sum((static_cast<unsigned long long>(weight) << 32) + scored);
  if (threadIdx.x == 0) s_ts = ts;
  cluster.sync();

  // (Remote shared memory is read sparingly: one lane per block for the
  // totals, coalesced words for the histogram. Scattered remote loads queue
  // behind each other: a first version that had every thread read eight
  // strided bins of every block took 60 us.)
  if (warp == 0) {
    unsigned long long t = lane < kSelectCtas ? *cluster.map_shared_rank(&s_ts, lane) : 0ull;
    for (int off = 16; off > 0; off /= 2) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (lane == 0) s_all_ts = t;
  }
  if (budget) {
    // This block's range of the cluster's histogram, merged (a word per
    // thread from every block), and its sum.
    static_assert(kBinsPerCta == NT, "a bin per thread");
    uint32_t b = 0;
    for (int r = 0; r < kSelectCtas; ++r) b += cluster.map_shared_rank(hist, r)[rank * kBinsPerCta + threadIdx.x];
    merged[threadIdx.x] = b;
    const uint32_t range_sum = Reduce(tmp.reduce).Sum(b);
    if (threadIdx.x == 0) s_range_sum = range_sum;
    cluster.sync();
  }
  __syncthreads();
  const unsigned long long all_ts = s_all_ts;
  const uint32_t total = static_cast<uint32_t>(all_ts >> 32), all_scored = static_cast<uint32_t>(all_ts);

  // 2. Budget: the rule over the cluster's candidates.
  if (budget) {
    const uint32_t need = BudgetNeed(p.target, total);
    const bool all = need > 0 && need == total;
    if (need > 0 && !all) {  // (the same branch in every block of the cluster: cluster totals)
      // The boundary bin b*: W(bins > b*) < need <= W(bins >= b*). First
      // the block whose range holds it (ranges from the highest down), then
      // the bin, scanning that block's merged range (thread t: its bin
      // kBinsPerCta - 1 - t, so the scan runs from the highest bin down).
      if (warp == 0) {
        const int r = kSelectCtas - 1 - lane;  // lane 0: the highest range
        const uint32_t w = lane < kSelectCtas ? *cluster.map_shared_rank(&s_range_sum, r) : 0u;
        uint32_t incl = w;
        for (int off = 1; off < 32; off *= 2) {
          const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += o;
        }
        if (lane < kSelectCtas && incl - w < need && need <= incl) {
          s_rb = r;
          s_above_rb = incl - w;
        }
      }
      __syncthreads();
      const int rb = s_rb;
      const uint32_t w = cluster.map_shared_rank(merged, rb)[kBinsPerCta - 1 - threadIdx.x];
      uint32_t above;
      Scan(tmp.scan).ExclusiveSum(w, above);
      above += s_above_rb;
      if (above < need && need <= above + w) {
        s_bstar = rb * kBinsPerCta + kBinsPerCta - 1 - threadIdx.x;
        s_remaining = need - above;
      }
      __syncthreads();
      const int bstar = s_bstar;
      MarkAgainstBin(s_key, s_size, n, c0, bstar, p.bin_lo, n, s_flag, &s_ncand, cand_key, cand_id, cand_size);
      cluster.sync();
      // A warp per listed cluster: the sizes of the boundary bin's clusters
      // ordered before it (every block's list), kept while < remaining.
      const uint32_t mine = s_ncand, remaining = s_remaining;
      for (uint32_t ci = warp; ci < mine; ci += NT / 32) {
        const uint32_t ki = cand_key[ci], ii = cand_id[ci];
        uint32_t before = 0;
        for (int r = 0; r < kSelectCtas; ++r) {
          const uint32_t nr = *cluster.map_shared_rank(&s_ncand, r);
          const uint32_t* rk = cluster.map_shared_rank(cand_key, r);
          const uint32_t* ri = cluster.map_shared_rank(cand_id, r);
          const uint32_t* rs = cluster.map_shared_rank(cand_size, r);
          for (uint32_t c = lane; c < nr; c += 32) {
            const uint32_t kc = rk[c];
            if (kc > ki || (kc == ki && ri[c] < ii)) before += rs[c];
          }
        }
        for (int off = 16; off > 0; off /= 2) before += __shfl_xor_sync(0xffffffffu, before, off);
        if (lane == 0 && before < remaining) s_flag[ii - c0] = kKept;
      }
    } else {
      for (uint32_t i = threadIdx.x; i < n; i += NT) s_flag[i] = all && s_key[i] != 0 ? kKept : 0;
    }
  }
  __syncthreads();

  if (p.coarse) {
    // (Threshold: the owned clusters' bits are written above.)
    if (budget) {
      HeadMask* out = p.coarse_keep + static_cast<size_t>(h) * p.k1_stride + c0;
      const HeadMask every = AllHeads(p.G);
      for (uint32_t i = threadIdx.x; i < n; i += NT) out[i] = s_flag[i] != 0 ? every : 0;
    }
    if (rank == 0 && threadIdx.x == 0) p.stats[h * kStatCount + kStatScored] = k * p.G;
    cluster.sync();  // no block leaves while another reads its shared memory
    return;
  }

  // 3. Compaction. Blocked within the block: thread t owns its clusters
  // [t * per, (t + 1) * per). The block's first cluster is counted as a
  // segment start here; it is not one when the previous block's last
  // cluster is kept too (corrected once every block's flags are known).
  const uint32_t per = (n + NT - 1) / NT, jb = min(n, threadIdx.x * per), je = min(n, jb + per);
  const CompactionScan local = CountSegments(s_flag, s_size, jb, je, jb > 0 && s_flag[jb - 1] != 0);
  CompactionScan before, block_sum;
  ScanC(tmp.scanc).ExclusiveScan(local, before, CompactionScan{0, 0, 0, 0}, CompactionSum(), block_sum);
  if (threadIdx.x == 0) {
    s_ctot = block_sum;
    s_first = n > 0 && s_flag[0] != 0;
    s_last = n > 0 && s_flag[n - 1] != 0;
  }
  cluster.sync();

  // The blocks' terms (read by one lane each), corrected: a block whose
  // first cluster continues the previous block's last segment starts one
  // segment fewer. (Blocks with no clusters come last: the block before a
  // non-empty one is non-empty.) Then the prefix of the blocks before this
  // one, and the head's sums.
  if (warp == 0) {
    CompactionScan t{0, 0, 0, 0};
    uint32_t first = 0, last = 0;
    if (lane < kSelectCtas) {
      t = *cluster.map_shared_rank(&s_ctot, lane);
      first = *cluster.map_shared_rank(&s_first, lane);
      last = *cluster.map_shared_rank(&s_last, lane);
    }
    const uint32_t prev_last = __shfl_up_sync(0xffffffffu, last, 1);
    const bool joins = lane > 0 && first != 0 && prev_last != 0;
    if (joins) --t.segs;
    if (lane < kSelectCtas) {
      s_terms[lane] = t;
      s_joins[lane] = joins ? 1u : 0u;
      s_lasts[lane] = last;
    }
  }
  __syncthreads();
  CompactionScan prefix{0, 0, 0, 0}, sum{0, 0, 0, 0};
  for (int r = 0; r < kSelectCtas; ++r) {
    if (r < rank) prefix = CompactionSum()(prefix, s_terms[r]);
    sum = CompactionSum()(sum, s_terms[r]);
  }
  const bool join = s_joins[rank] != 0, prev0 = rank > 0 && s_lasts[rank - 1] != 0;
  before = CompactionSum()(prefix, before);
  if (threadIdx.x > 0 && join) --before.segs;  // (thread 0's first cluster continues the previous segment)
  uint32_t* seg_first = p.seg_first + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* seg_before = p.seg_before + static_cast<size_t>(h) * p.seg_stride;
  uint32_t* split_seg = p.split_seg + static_cast<size_t>(h) * p.splits;
  const uint32_t share = (sum.rows + p.n_always + p.splits - 1) / p.splits;
  const bool prev = threadIdx.x == 0 ? prev0 : jb > 0 && s_flag[jb - 1] != 0;
  if (jb < je) WriteSegments(p, s_flag, s_size, jb, je, prev, before, share, seg_first, seg_before, split_seg);
  if (rank == 0 && threadIdx.x == 0) {
    WriteHeadTail(p, h, sum.segs, sum.rows, sum.kept, all_scored, share, seg_first, seg_before, split_seg);
  }
  cluster.sync();  // no block leaves while another reads its shared memory
}

}  // namespace sqz::gpu
