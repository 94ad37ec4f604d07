// Fixed-size KV pages: which default page size P? Measures, on one context
// (KV file + queries file, e.g. from `sqctl synth`):
//
//  1. the size distribution of the fine clusters (default build options:
//     fine 5%, coarse 1%, 10 iterations, 4 sinks, window 100), computed with
//     index::ClusterHead on the clustered keys of each (layer, KV head);
//  2. the read amplification of pages against the segments of the decode
//     selections (query::SelectHead, budget mode, GQA union, one selection per
//     query token = one decode step): segments are maximal runs of
//     consecutive permuted rows covered by the selected fine clusters; pages
//     touched are the pages intersecting a segment;
//     amplification = pages touched * P / rows in segments;
//  3. zstd (levels 1 and 3, single thread) on every page (K plane then V
//     plane, fp16 as stored and converted to bf16), as stored and byte
//     shuffled (all high bytes, then all low bytes), the shuffled page as one
//     frame and as two frames (high half, low half);
//  4. cold and warm read rates: all pages of one layer (every clustered head)
//     written to a file, dropped from the page cache (fsync +
//     POSIX_FADV_DONTNEED, checked with mincore), then the pages touched by
//     each decode step's selections read with pread in selection order, one
//     pread per page and one pread per run of consecutive pages, each into
//     its own slot of a staging buffer; buffered (kernel readahead on), one
//     thread; O_DIRECT, one thread (queue depth 1); O_DIRECT from --qd
//     threads; warm = the buffered reads again right after (second pass).
//
// Page layout (per layer and KV head): the always set (sinks then window) as
// its own page run, then the n_clustered keys in permuted order cut into
// pages of P rows (the last one zero-padded); a page is the K plane [P, d]
// then the V plane [P, d] in the stored dtype. In the page file the heads
// follow each other (head 0's always run, head 0's clustered pages, head 1 ...).
//
//   page_bench --kv FILE --queries FILE [--out FILE] [--layers N] [--heads N]
//              [--pages 16,32,64,128] [--read-layer L] [--read-queries N]
//              [--scratch DIR] [--qd N] [--zstd-layers N] [--no-read] [--no-zstd]
#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "index/kmeans.h"
#include "query/selection.h"
#include "sqz/query.h"
#include "util/half.h"
#include "util/safetensors.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

constexpr int kSinks = 4;
constexpr int kWindow = 100;

// Everything printed goes to stdout and to the --out file.
FILE* g_out = nullptr;
void Print(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void Print(const char* fmt, ...) {
  va_list a;
  va_start(a, fmt);
  std::vfprintf(stdout, fmt, a);
  va_end(a);
  std::fflush(stdout);
  if (g_out) {
    va_start(a, fmt);
    std::vfprintf(g_out, fmt, a);
    va_end(a);
    std::fflush(g_out);
  }
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "page_bench: %s\n", what.c_str());
  std::exit(1);
}
void Check(const sqz::Status& s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.ToString());
}

template <typename T>
double Quantile(std::vector<T> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(std::floor(q * static_cast<double>(v.size() - 1) + 0.5));
  return static_cast<double>(v[std::min(i, v.size() - 1)]);
}

struct Seg {
  uint32_t begin, end;  // permuted rows [begin, end)
};

struct LayerKv {
  std::vector<uint16_t> k16, v16;  // [H, N, d] fp16 as stored
  std::vector<uint16_t> kbf, vbf;  // the same converted to bf16 (zstd only)
  std::vector<float> q;            // [Hq, T, d]
};

struct Head {
  int layer = 0, head = 0;
  sqz::index::HeadClustering c;
  std::vector<uint32_t> fine_sizes, coarse_sizes;
  double kmeans_s = 0;
};

struct Shape {
  int h_kv = 0, hq = 0, n = 0, d = 0, t = 0;
  int64_t n_clustered() const { return n - kSinks - kWindow; }
};

// Pages of one head, contiguous: always run (ceil(104 / P) pages), then the
// clustered pages. `src_k`/`src_v` point at the head's [N, d] 16-bit rows.
size_t AlwaysPages(int P) { return (kSinks + kWindow + P - 1) / P; }
size_t ClusteredPages(int64_t n_clustered, int P) { return static_cast<size_t>((n_clustered + P - 1) / P); }

void MakeHeadPages(const Shape& sh, const Head& h, const uint16_t* src_k, const uint16_t* src_v, int P,
                   std::vector<uint16_t>* out) {
  const int d = sh.d;
  const size_t na = AlwaysPages(P), nc = ClusteredPages(sh.n_clustered(), P);
  const size_t page_elems = static_cast<size_t>(2) * P * d;
  out->assign((na + nc) * page_elems, 0);
  auto put_row = [&](size_t page, int row, int64_t token) {
    uint16_t* base = out->data() + page * page_elems;
    std::memcpy(base + static_cast<size_t>(row) * d, src_k + token * d, d * 2);
    std::memcpy(base + static_cast<size_t>(P + row) * d, src_v + token * d, d * 2);
  };
  std::vector<int64_t> always;
  for (int64_t p = 0; p < kSinks; ++p) always.push_back(p);
  for (int64_t p = sh.n - kWindow; p < sh.n; ++p) always.push_back(p);
  for (size_t i = 0; i < always.size(); ++i) put_row(i / P, static_cast<int>(i % P), always[i]);
  for (int64_t r = 0; r < sh.n_clustered(); ++r) {
    put_row(na + static_cast<size_t>(r / P), static_cast<int>(r % P), kSinks + h.c.permutation[r]);
  }
}

// Distinct pages touched by ascending segments, ascending.
void TouchedPages(const std::vector<Seg>& segs, int P, std::vector<uint32_t>* pages) {
  pages->clear();
  for (const Seg& s : segs) {
    uint32_t first = s.begin / P, last = (s.end - 1) / P;
    if (!pages->empty() && pages->back() >= first) first = pages->back() + 1;
    for (uint32_t p = first; p <= last; ++p) pages->push_back(p);
  }
}

struct Run {
  uint32_t first, count;
};
void Runs(const std::vector<uint32_t>& pages, std::vector<Run>* runs) {
  runs->clear();
  for (uint32_t p : pages) {
    if (!runs->empty() && runs->back().first + runs->back().count == p) {
      ++runs->back().count;
    } else {
      runs->push_back({p, 1});
    }
  }
}

struct Config {
  const char* name;
  double budget;
  bool hier;
};
const Config kConfigs[] = {
    {"1/8 flat", 0.125, false}, {"1/8 hier", 0.125, true}, {"1/4 flat", 0.25, false}, {"1/4 hier", 0.25, true}};
constexpr int kNumConfigs = 4;

// ---- page cache helpers -------------------------------------------------------

void DropCache(int fd) {
  if (fdatasync(fd) != 0) Die(std::string("fdatasync: ") + std::strerror(errno));
  int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  if (rc != 0) Die(std::string("posix_fadvise(DONTNEED): ") + std::strerror(rc));
}

// Fraction of the file's 4 KiB pages resident in the page cache.
double Resident(int fd, size_t size) {
  void* m = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) Die(std::string("mmap: ") + std::strerror(errno));
  const size_t ps = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((size + ps - 1) / ps);
  if (mincore(m, size, vec.data()) != 0) Die(std::string("mincore: ") + std::strerror(errno));
  munmap(m, size);
  size_t r = 0;
  for (unsigned char c : vec) r += c & 1;
  return static_cast<double>(r) / static_cast<double>(vec.size());
}

// Bytes this process caused to be fetched from the block device
// (/proc/self/io read_bytes; counts readahead and O_DIRECT reads, not page
// cache hits). -1 if unavailable.
int64_t DeviceReadBytes() {
  FILE* f = std::fopen("/proc/self/io", "r");
  if (!f) return -1;
  char line[128];
  int64_t v = -1;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "read_bytes:", 11) == 0) v = std::atoll(line + 11);
  }
  std::fclose(f);
  return v;
}

std::string LoadAvg() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  char buf[128] = "?";
  if (f) {
    if (!std::fgets(buf, sizeof buf, f)) std::strcpy(buf, "?");
    std::fclose(f);
  }
  buf[std::strcspn(buf, "\n")] = 0;
  return buf;
}

std::string ReadAheadKb(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return "?";
  char sys[128];
  std::snprintf(sys, sizeof sys, "/sys/dev/block/%u:%u/queue/read_ahead_kb", major(st.st_dev), minor(st.st_dev));
  FILE* f = std::fopen(sys, "r");
  if (!f) {  // a partition: the queue is the parent's
    std::snprintf(sys, sizeof sys, "/sys/dev/block/%u:%u/../queue/read_ahead_kb", major(st.st_dev), minor(st.st_dev));
    f = std::fopen(sys, "r");
  }
  if (!f) return "?";
  char buf[32] = "?";
  if (!std::fgets(buf, sizeof buf, f)) std::strcpy(buf, "?");
  std::fclose(f);
  buf[std::strcspn(buf, "\n")] = 0;
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string kv_path, q_path, out_path, scratch = "/var/tmp";
  int qd = 8;
  int max_layers = 1 << 30, max_heads = 1 << 30, read_layer = 0, read_queries = 16, zstd_layers = 1 << 30;
  bool do_read = true, do_zstd = true;
  std::vector<int> page_sizes = {16, 32, 64, 128};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--kv") {
      kv_path = next();
    } else if (a == "--queries") {
      q_path = next();
    } else if (a == "--out") {
      out_path = next();
    } else if (a == "--layers") {
      max_layers = std::atoi(next().c_str());
    } else if (a == "--heads") {
      max_heads = std::atoi(next().c_str());
    } else if (a == "--read-layer") {
      read_layer = std::atoi(next().c_str());
    } else if (a == "--read-queries") {
      read_queries = std::atoi(next().c_str());
    } else if (a == "--zstd-layers") {
      zstd_layers = std::atoi(next().c_str());
    } else if (a == "--scratch") {
      scratch = next();
    } else if (a == "--qd") {
      qd = std::max(2, std::atoi(next().c_str()));
    } else if (a == "--no-read") {
      do_read = false;
    } else if (a == "--no-zstd") {
      do_zstd = false;
    } else if (a == "--pages") {
      page_sizes.clear();
      std::string v = next();
      for (size_t p = 0; p < v.size();) {
        size_t c = v.find(',', p);
        page_sizes.push_back(std::atoi(v.substr(p, c - p).c_str()));
        p = c == std::string::npos ? v.size() : c + 1;
      }
    } else {
      Die("unknown flag " + a);
    }
  }
  if (kv_path.empty() || q_path.empty()) {
    std::fprintf(
        stderr,
        "usage: page_bench --kv FILE --queries FILE [--out FILE] [--layers N] [--heads N] [--pages 16,32,64,128]\n"
        "                  [--read-layer L] [--read-queries N] [--scratch DIR] [--qd N] [--zstd-layers N] [--no-read] "
        "[--no-zstd]\n");
    return 2;
  }
  if (!out_path.empty() && !(g_out = std::fopen(out_path.c_str(), "w"))) Die("cannot write " + out_path);

  // ---- Load ------------------------------------------------------------------
  std::unique_ptr<sqz::SafetensorsFile> kvf, qf;
  Check(sqz::SafetensorsFile::Open(kv_path, &kvf), "opening " + kv_path);
  Check(sqz::SafetensorsFile::Open(q_path, &qf), "opening " + q_path);
  int n_layers = 0;
  while (kvf->Find("layers." + std::to_string(n_layers) + ".k")) ++n_layers;
  n_layers = std::min(n_layers, max_layers);
  if (n_layers == 0) Die(kv_path + " has no layers.0.k");
  Shape sh;
  {
    const auto* e = kvf->Find("layers.0.k");
    if (e->dtype != sqz::DType::kF16) Die("page_bench needs fp16 K/V (converts to bf16 itself)");
    sh.h_kv = static_cast<int>(e->shape[0]);
    sh.n = static_cast<int>(e->shape[1]);
    sh.d = static_cast<int>(e->shape[2]);
    const auto* qe = qf->Find("layers.0.q");
    if (!qe) Die(q_path + " has no layers.0.q");
    sh.hq = static_cast<int>(qe->shape[0]);
    sh.t = static_cast<int>(qe->shape[1]);
  }
  const int heads = std::min(sh.h_kv, max_heads);
  const int G = sh.hq / sh.h_kv;
  const int d = sh.d;
  const int64_t nc = sh.n_clustered();
  read_queries = std::min(read_queries, sh.t);
  zstd_layers = std::min(zstd_layers, n_layers);

  Print("page_bench: %s\n  queries %s\n", kv_path.c_str(), q_path.c_str());
  Print("shape: %d layers used, %d of %d KV heads used, %d query heads (G = %d), N = %d tokens, d = %d, fp16\n",
        n_layers, heads, sh.h_kv, sh.hq, G, sh.n, d);
  Print("clustered keys per head: %lld (sinks %d, window %d); decode queries per query head: %d; threads %d\n",
        static_cast<long long>(nc), kSinks, kWindow, sh.t, omp_get_max_threads());
  Print("load average at start (the 2 cores are shared): %s\n", LoadAvg().c_str());
  Print("page sizes P:");
  for (int P : page_sizes) Print(" %d", P);
  Print("\n");

  std::vector<LayerKv> kv(n_layers);
  std::vector<Head> hs;
  sqz::index::KMeansOptions ko;  // defaults: fine 0.05, coarse 0.01, 10 iterations, seed 1234
  auto t_all = Clock::now();
  for (int l = 0; l < n_layers; ++l) {
    const auto* ke = kvf->Find("layers." + std::to_string(l) + ".k");
    const auto* ve = kvf->Find("layers." + std::to_string(l) + ".v");
    const auto* qe = qf->Find("layers." + std::to_string(l) + ".q");
    if (!ke || !ve || !qe) Die("layer " + std::to_string(l) + " missing in the KV or queries file");
    LayerKv& L = kv[l];
    L.k16.resize(ke->nbytes / 2);
    L.v16.resize(ve->nbytes / 2);
    Check(kvf->ReadRaw(*ke, L.k16.data()), "reading K");
    Check(kvf->ReadRaw(*ve, L.v16.data()), "reading V");
    L.q.resize(static_cast<size_t>(sh.hq) * sh.t * d);
    Check(qf->ReadFloat(*qe, L.q.data()), "reading queries");
    std::vector<float> keys(static_cast<size_t>(nc) * d);
    for (int h = 0; h < heads; ++h) {
      Head H;
      H.layer = l;
      H.head = h;
      sqz::ConvertToFloat(L.k16.data() + (static_cast<size_t>(h) * sh.n + kSinks) * d, sqz::DType::kF16, keys.size(),
                          keys.data());
      auto t0 = Clock::now();
      Check(sqz::index::ClusterHead(keys.data(), nc, d, ko, &H.c), "ClusterHead");
      H.kmeans_s = Seconds(t0, Clock::now());
      for (int64_t j = 0; j < H.c.n_fine(); ++j) H.fine_sizes.push_back(H.c.fine_offsets[j + 1] - H.c.fine_offsets[j]);
      for (int64_t a = 0; a < H.c.n_coarse(); ++a) {
        H.coarse_sizes.push_back(H.c.fine_offsets[H.c.coarse_child_offsets[a + 1]] -
                                 H.c.fine_offsets[H.c.coarse_child_offsets[a]]);
      }
      std::fprintf(stderr, "  layer %d head %d: K2 %lld K1 %lld, k-means %.1f s\n", l, h,
                   static_cast<long long>(H.c.n_fine()), static_cast<long long>(H.c.n_coarse()), H.kmeans_s);
      hs.push_back(std::move(H));
    }
  }
  double kmeans_total = 0;
  for (const auto& h : hs) kmeans_total += h.kmeans_s;
  Print("clustering: %zu heads, k-means %.1f s total (%.2f s per head), load + clustering %.1f s\n\n", hs.size(),
        kmeans_total, kmeans_total / hs.size(), Seconds(t_all, Clock::now()));

  // ---- 1. Cluster sizes --------------------------------------------------------
  {
    std::vector<uint32_t> fine, coarse;
    std::vector<int64_t> k2s, k1s;
    for (const auto& h : hs) {
      fine.insert(fine.end(), h.fine_sizes.begin(), h.fine_sizes.end());
      coarse.insert(coarse.end(), h.coarse_sizes.begin(), h.coarse_sizes.end());
      k2s.push_back(h.c.n_fine());
      k1s.push_back(h.c.n_coarse());
    }
    auto mean = [](const std::vector<uint32_t>& v) {
      double s = 0;
      for (auto x : v) s += x;
      return s / static_cast<double>(v.size());
    };
    Print("== 1. Cluster sizes (rows per cluster), all %zu heads ==\n", hs.size());
    Print("fine clusters per head: min %.0f median %.0f max %.0f (asked: ceil(0.05 * %lld) = %lld)\n", Quantile(k2s, 0),
          Quantile(k2s, 0.5), Quantile(k2s, 1), static_cast<long long>(nc),
          static_cast<long long>(sqz::index::ClusterCount(0.05, nc, nc)));
    Print("coarse clusters per head: min %.0f median %.0f max %.0f\n", Quantile(k1s, 0), Quantile(k1s, 0.5),
          Quantile(k1s, 1));
    Print("%-7s %8s %6s %6s %6s %8s %6s %7s\n", "level", "clusters", "min", "p10", "p50", "mean", "p90", "max");
    for (auto [name, v] : {std::pair{"fine", &fine}, std::pair{"coarse", &coarse}}) {
      Print("%-7s %8zu %6.0f %6.0f %6.0f %8.1f %6.0f %7.0f\n", name, v->size(), Quantile(*v, 0), Quantile(*v, 0.1),
            Quantile(*v, 0.5), mean(*v), Quantile(*v, 0.9), Quantile(*v, 1));
    }
    Print("\nfine cluster size histogram (power-of-two bins):\n%-13s %9s %8s %8s\n", "size", "clusters", "% clust",
          "% rows");
    std::vector<int64_t> cnt(33, 0), rows(33, 0);
    int64_t total_rows = 0;
    for (uint32_t s : fine) {
      int b = 31 - __builtin_clz(s);
      ++cnt[b];
      rows[b] += s;
      total_rows += s;
    }
    for (int b = 0; b < 33; ++b) {
      if (!cnt[b]) continue;
      char label[32];
      std::snprintf(label, sizeof label, "[%u, %u)", 1u << b, 2u << b);
      Print("%-13s %9lld %7.1f%% %7.1f%%\n", label, static_cast<long long>(cnt[b]), 100.0 * cnt[b] / fine.size(),
            100.0 * rows[b] / total_rows);
    }
    Print(
        "\nper P: share of fine clusters smaller than P; storage overhead if every fine cluster started a new "
        "page (cluster-aligned layout, for comparison)\n");
    for (int P : page_sizes) {
      int64_t smaller = 0, padded = 0;
      for (uint32_t s : fine) {
        smaller += s < static_cast<uint32_t>(P);
        padded += (s + P - 1) / P * static_cast<int64_t>(P);
      }
      Print("P %4d: %5.1f%% of clusters < P; cluster-aligned storage = %.3f x rows (packed layout: %.4f x)\n", P,
            100.0 * smaller / fine.size(), static_cast<double>(padded) / total_rows,
            static_cast<double>(ClusteredPages(nc, P) * P) / nc);
    }
    Print("\n");
  }

  // ---- 2. Selections -> segments -> pages -----------------------------------------
  // segs[c][head_index * T + t]
  std::vector<std::vector<std::vector<Seg>>> segs(kNumConfigs);
  std::vector<std::vector<std::vector<uint32_t>>> selected(kNumConfigs);  // fine ids, same indexing
  {
    auto t0 = Clock::now();
    for (int c = 0; c < kNumConfigs; ++c) {
      segs[c].resize(hs.size() * sh.t);
      selected[c].resize(hs.size() * sh.t);
      for (size_t hi = 0; hi < hs.size(); ++hi) {
        const Head& H = hs[hi];
        sqz::query::IndexView v;
        v.head_dim = d;
        v.n_clustered = nc;
        v.k2 = static_cast<int32_t>(H.c.n_fine());
        v.k1 = static_cast<int32_t>(H.c.n_coarse());
        v.fine_centroids = H.c.fine_centroids.data();
        v.fine_sizes = H.fine_sizes.data();
        v.coarse_centroids = H.c.coarse_centroids.data();
        v.coarse_sizes = H.coarse_sizes.data();
        v.coarse_child_offsets = H.c.coarse_child_offsets.data();
        sqz::query::SelectionParams p;
        p.mode = sqz::SelectionMode::kBudget;
        p.hierarchical = kConfigs[c].hier;
        p.budget = kConfigs[c].budget;
        p.gqa = sqz::GqaPolicy::kUnion;
        p.per_query = true;
        p.scale = 1.0f / std::sqrt(static_cast<float>(d));
        sqz::query::HeadSelection sel;
        const float* q = kv[H.layer].q.data() + static_cast<size_t>(H.head) * G * sh.t * d;
        sqz::query::SelectHead(v, q, G, sh.t, p, &sel);
        for (int t = 0; t < sh.t; ++t) {
          const auto& set = sel.sets[sel.set_of[t]];  // union: every head g of the group attends set_of[g*T+t]
          auto& sg = segs[c][hi * sh.t + t];
          for (uint32_t j : set) {
            const uint32_t b = H.c.fine_offsets[j], e = H.c.fine_offsets[j + 1];
            if (!sg.empty() && sg.back().end == b) {
              sg.back().end = e;
            } else {
              sg.push_back({b, e});
            }
          }
          selected[c][hi * sh.t + t] = set;
        }
      }
    }
    Print(
        "== 2. Decode selections -> segments -> pages (budget, GQA union, per query; %zu heads x %d queries = %zu "
        "head-steps per config; selection %.1f s) ==\n",
        hs.size(), sh.t, hs.size() * sh.t, Seconds(t0, Clock::now()));
    Print("The always set (%d rows) is its own page run: ceil(%d / P) pages, not counted below.\n\n", kSinks + kWindow,
          kSinks + kWindow);
    Print("%-9s %9s %9s %9s %10s %9s\n", "config", "rows/hs", "%clust", "clust/hs", "segs/hs", "seg len");
    for (int c = 0; c < kNumConfigs; ++c) {
      double rows = 0, nseg = 0, ncl = 0;
      for (size_t i = 0; i < segs[c].size(); ++i) {
        for (const Seg& s : segs[c][i]) rows += s.end - s.begin;
        nseg += segs[c][i].size();
        ncl += selected[c][i].size();
      }
      const double hsn = static_cast<double>(segs[c].size());
      Print("%-9s %9.0f %8.1f%% %9.1f %10.1f %9.1f\n", kConfigs[c].name, rows / hsn, 100.0 * rows / hsn / nc, ncl / hsn,
            nseg / hsn, rows / nseg);
    }
    Print("(hs = head-step: one KV head, one decode query; seg len = mean rows per segment)\n\n");

    Print("%-9s %5s %7s %7s %7s %7s %9s %8s %9s %10s %9s\n", "config", "P", "amp", "amp p50", "amp p90", "amp max",
          "pages/hs", "runs/hs", "pages/run", "MB/step", "alignedamp");
    for (int c = 0; c < kNumConfigs; ++c) {
      for (int P : page_sizes) {
        double rows = 0, pages = 0, runs = 0, aligned = 0;
        std::vector<double> amps;
        std::vector<uint32_t> pg;
        std::vector<Run> rn;
        for (size_t i = 0; i < segs[c].size(); ++i) {
          const Head& H = hs[i / sh.t];
          double r = 0;
          for (const Seg& s : segs[c][i]) r += s.end - s.begin;
          TouchedPages(segs[c][i], P, &pg);
          Runs(pg, &rn);
          rows += r;
          pages += pg.size();
          runs += rn.size();
          amps.push_back(r > 0 ? pg.size() * static_cast<double>(P) / r : 1.0);
          for (uint32_t j : selected[c][i]) aligned += (H.fine_sizes[j] + P - 1) / P * static_cast<double>(P);
        }
        const double hsn = static_cast<double>(segs[c].size());
        const double page_bytes = 2.0 * P * d * 2;
        // MB per decode step of one layer: all KV heads of the model shape (sh.h_kv)
        Print("%-9s %5d %7.3f %7.3f %7.3f %7.3f %9.1f %8.1f %9.2f %10.2f %9.3f\n", kConfigs[c].name, P,
              pages * P / rows, Quantile(amps, 0.5), Quantile(amps, 0.9), Quantile(amps, 1), pages / hsn, runs / hsn,
              pages / runs, pages / hsn * sh.h_kv * page_bytes / 1e6, aligned / rows);
      }
    }
    Print(
        "(amp = pages touched * P / rows in segments, ratio of totals; p50/p90/max over head-steps; runs = maximal "
        "runs of consecutive touched pages;\n MB/step = page bytes read per decode step of one layer (%d KV heads, "
        "fp16, d = %d, clustered pages only);\n alignedamp = the same ratio if every fine cluster started a page "
        "(cluster-aligned layout, for comparison))\n\n",
        sh.h_kv, d);
    Print("bytes per page (K + V planes, fp16): ");
    for (int P : page_sizes) Print(" P %d: d=64 %d B, d=128 %d B;", P, 2 * P * 64 * 2, 2 * P * 128 * 2);
    Print("\n\n");
  }

  // ---- 3. zstd ------------------------------------------------------------------
  if (do_zstd) {
    const auto t_zstd = Clock::now();
    Print(
        "== 3. zstd per page (single thread, ZSTD_compressCCtx / ZSTD_decompressDCtx with reused contexts; %d "
        "layer(s) x %d heads, always run + clustered pages) ==\n",
        zstd_layers, heads);
    for (int l = 0; l < zstd_layers; ++l) {
      LayerKv& L = kv[l];
      std::vector<float> tmp(L.k16.size());
      L.kbf.resize(L.k16.size());
      L.vbf.resize(L.v16.size());
      sqz::ConvertToFloat(L.k16.data(), sqz::DType::kF16, tmp.size(), tmp.data());
      sqz::ConvertFromFloat(tmp.data(), tmp.size(), sqz::DType::kBF16, L.kbf.data());
      sqz::ConvertToFloat(L.v16.data(), sqz::DType::kF16, tmp.size(), tmp.data());
      sqz::ConvertFromFloat(tmp.data(), tmp.size(), sqz::DType::kBF16, L.vbf.data());
    }
    ZSTD_CCtx* cctx = ZSTD_createCCtx();
    ZSTD_DCtx* dctx = ZSTD_createDCtx();
    Print("%-5s %-5s %-3s %-15s %10s %10s %8s %10s %10s\n", "P", "dtype", "lvl", "layout", "raw MB", "zstd MB", "ratio",
          "comp MB/s", "dec MB/s");
    const char* layout_names[] = {"as stored", "shuffled 1 fr", "shuffled 2 fr"};
    for (int P : page_sizes) {
      const size_t page_bytes = static_cast<size_t>(2) * P * d * 2;
      for (int dt = 0; dt < 2; ++dt) {
        // pages of every (layer, head) in the zstd layers, built once per (P, dtype)
        std::vector<uint8_t> all;
        {
          std::vector<uint16_t> hp;
          for (const Head& H : hs) {
            if (H.layer >= zstd_layers) continue;
            const LayerKv& L = kv[H.layer];
            const size_t off = static_cast<size_t>(H.head) * sh.n * d;
            const uint16_t* k = (dt == 0 ? L.k16.data() : L.kbf.data()) + off;
            const uint16_t* v = (dt == 0 ? L.v16.data() : L.vbf.data()) + off;
            MakeHeadPages(sh, H, k, v, P, &hp);
            const uint8_t* b = reinterpret_cast<const uint8_t*>(hp.data());
            all.insert(all.end(), b, b + hp.size() * 2);
          }
        }
        const size_t n_pages = all.size() / page_bytes;
        // shuffled copy: per page, all high bytes then all low bytes (little endian: byte 1 is high)
        std::vector<uint8_t> shuf(all.size());
        for (size_t p = 0; p < n_pages; ++p) {
          const uint8_t* s = all.data() + p * page_bytes;
          uint8_t* o = shuf.data() + p * page_bytes;
          const size_t half = page_bytes / 2;
          for (size_t i = 0; i < half; ++i) {
            o[i] = s[2 * i + 1];
            o[half + i] = s[2 * i];
          }
        }
        std::vector<uint8_t> comp(ZSTD_compressBound(page_bytes) * n_pages * 2), back(all.size());
        for (int level : {1, 3}) {
          for (int lay = 0; lay < 3; ++lay) {
            const std::vector<uint8_t>& src = lay == 0 ? all : shuf;
            const int frames = lay == 2 ? 2 : 1;
            const size_t fbytes = page_bytes / frames;
            const size_t n_frames = n_pages * frames;
            std::vector<size_t> coff(n_frames + 1, 0);
            auto t0 = Clock::now();
            for (size_t f = 0; f < n_frames; ++f) {
              size_t r = ZSTD_compressCCtx(cctx, comp.data() + coff[f], comp.size() - coff[f], src.data() + f * fbytes,
                                           fbytes, level);
              if (ZSTD_isError(r)) Die(std::string("zstd: ") + ZSTD_getErrorName(r));
              coff[f + 1] = coff[f] + r;
            }
            auto t1 = Clock::now();
            for (size_t f = 0; f < n_frames; ++f) {
              size_t r = ZSTD_decompressDCtx(dctx, back.data() + f * fbytes, fbytes, comp.data() + coff[f],
                                             coff[f + 1] - coff[f]);
              if (ZSTD_isError(r) || r != fbytes) Die("zstd decompression failed");
            }
            auto t2 = Clock::now();
            if (std::memcmp(back.data(), src.data(), src.size()) != 0) Die("zstd round trip differs");
            const double raw = static_cast<double>(src.size());
            Print("%-5d %-5s %-3d %-15s %10.1f %10.1f %7.1f%% %10.0f %10.0f\n", P, dt == 0 ? "fp16" : "bf16", level,
                  layout_names[lay], raw / 1e6, coff[n_frames] / 1e6, 100.0 * coff[n_frames] / raw,
                  raw / Seconds(t0, t1) / 1e6, raw / Seconds(t1, t2) / 1e6);
          }
        }
      }
    }
    ZSTD_freeCCtx(cctx);
    ZSTD_freeDCtx(dctx);
    Print("(ratio = compressed / raw; MB/s of raw bytes; '2 fr' = high-byte half and low-byte half as two frames)\n");
    Print("(section 3 took %.1f s)\n\n", Seconds(t_zstd, Clock::now()));
  }

  // ---- 4. Cold / warm reads -----------------------------------------------------
  if (do_read) {
    const auto t_read = Clock::now();
    std::vector<size_t> read_heads;  // indexes into hs of the read layer's heads
    for (size_t i = 0; i < hs.size(); ++i) {
      if (hs[i].layer == read_layer) read_heads.push_back(i);
    }
    if (read_heads.empty()) Die("--read-layer " + std::to_string(read_layer) + " was not clustered");
    Print("== 4. Reads of the pages touched by decode selections: layer %d, %zu KV heads, first %d decode steps ==\n",
          read_layer, read_heads.size(), read_queries);
    Print(
        "Per step: the file is dropped from the page cache (fdatasync + POSIX_FADV_DONTNEED, residency checked "
        "with mincore), then the step's reads\n(every head of the layer, pages in selection order = ascending) are "
        "timed cold, then timed again warm (second pass, same reads).\n");
    Print(
        "modes: buffered = plain pread, one thread (kernel readahead on); direct1 = O_DIRECT, one thread (queue "
        "depth 1); direct%d = O_DIRECT,\n%d threads taking the step's reads round-robin (queue depth up to %d). Pages "
        "are multiples of 4 KiB, so every O_DIRECT read is aligned.\nEvery read lands at its own offset of a "
        "step-sized staging buffer. Warm (second pass, from the page cache) is reported for buffered.\n",
        qd, qd, qd);
    Print("block device read_ahead_kb of %s: %s\n\n", scratch.c_str(), ReadAheadKb(scratch).c_str());
    Print("%-5s %-9s %-9s %-8s %9s %9s %9s %8s %9s %9s %9s %9s %9s %9s\n", "P", "config", "mode", "pread", "MB/step",
          "dev MB/st", "reads/st", "resid", "cold ms", "cold GB/s", "cold rd/s", "warm ms", "warm GB/s", "warm rd/s");
    for (int P : page_sizes) {
      const size_t page_bytes = static_cast<size_t>(2) * P * d * 2;
      const size_t pages_per_head = AlwaysPages(P) + ClusteredPages(nc, P);
      const std::string path = scratch + "/page_bench_P" + std::to_string(P) + ".bin";
      // write the file
      const size_t file_size = pages_per_head * page_bytes * read_heads.size();
      {
        int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) Die("cannot create " + path + ": " + std::strerror(errno));
        std::vector<uint16_t> hp;
        auto t0 = Clock::now();
        for (size_t k = 0; k < read_heads.size(); ++k) {
          const Head& H = hs[read_heads[k]];
          const size_t off = static_cast<size_t>(H.head) * sh.n * d;
          MakeHeadPages(sh, H, kv[read_layer].k16.data() + off, kv[read_layer].v16.data() + off, P, &hp);
          const char* b = reinterpret_cast<const char*>(hp.data());
          size_t len = hp.size() * 2, done = 0;
          while (done < len) {
            ssize_t w = ::pwrite(fd, b + done, len - done, static_cast<off_t>(k * pages_per_head * page_bytes + done));
            if (w <= 0) Die("write " + path + ": " + std::strerror(errno));
            done += static_cast<size_t>(w);
          }
        }
        if (fsync(fd) != 0) Die("fsync");
        const double ws = Seconds(t0, Clock::now());
        const double before = Resident(fd, file_size);
        DropCache(fd);
        const double after = Resident(fd, file_size);
        Print(
            "P %d: wrote %s, %.1f MB (%zu pages of %zu B per head), write + fsync %.2f s (%.2f GB/s); resident "
            "before drop %.1f%%, after drop %.1f%%%s\n",
            P, path.c_str(), file_size / 1e6, pages_per_head, page_bytes, ws, file_size / ws / 1e9, 100 * before,
            100 * after, after > 0.001 ? "  ** DROP DID NOT WORK **" : "");
        ::close(fd);
      }
      int fd_buf = ::open(path.c_str(), O_RDONLY);
      int fd_dir = ::open(path.c_str(), O_RDONLY | O_DIRECT);
      if (fd_buf < 0) Die("open " + path);
      if (fd_dir < 0) Print("  O_DIRECT open failed (%s): direct modes skipped\n", std::strerror(errno));
      struct Read {
        off_t off;
        size_t len, dst;  // dst: offset in the step's staging buffer
      };
      size_t max_step = page_bytes;
      for (int c = 0; c < kNumConfigs; ++c) {
        // the reads of each step, selection order: head after head, pages ascending
        std::vector<std::vector<Read>> per_page(read_queries), per_run(read_queries);
        for (int t = 0; t < read_queries; ++t) {
          size_t dst_p = 0, dst_r = 0;
          for (size_t k = 0; k < read_heads.size(); ++k) {
            std::vector<uint32_t> pg;
            std::vector<Run> rn;
            TouchedPages(segs[c][read_heads[k] * sh.t + t], P, &pg);
            Runs(pg, &rn);
            const size_t base = k * pages_per_head + AlwaysPages(P);
            for (uint32_t p : pg) {
              per_page[t].push_back({static_cast<off_t>((base + p) * page_bytes), page_bytes, dst_p});
              dst_p += page_bytes;
            }
            for (const Run& r : rn) {
              per_run[t].push_back({static_cast<off_t>((base + r.first) * page_bytes), r.count * page_bytes, dst_r});
              dst_r += r.count * page_bytes;
            }
          }
          max_step = std::max(max_step, dst_p);
        }
        // staging buffer: every read of a step lands at its own offset (as a gather into pinned memory would)
        uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(4096, (max_step + 4095) / 4096 * 4096));
        if (!buf) Die("out of memory");
        std::memset(buf, 0, max_step);  // fault it in once
        auto do_reads = [&](int fd, const std::vector<Read>& reads, int threads) {
          auto work = [&](int id) {
            for (size_t i = static_cast<size_t>(id); i < reads.size(); i += static_cast<size_t>(threads)) {
              ssize_t r = ::pread(fd, buf + reads[i].dst, reads[i].len, reads[i].off);
              if (r != static_cast<ssize_t>(reads[i].len)) Die("pread " + path + ": " + std::strerror(errno));
            }
          };
          if (threads == 1) {
            work(0);
            return;
          }
          std::vector<std::thread> pool;
          for (int i = 0; i < threads; ++i) pool.emplace_back(work, i);
          for (auto& th : pool) th.join();
        };
        for (int per = 0; per < 2; ++per) {
          const auto& reads = per == 0 ? per_page : per_run;
          for (int mode = 0; mode < 3; ++mode) {
            const int fd = mode == 0 ? fd_buf : fd_dir;
            const int threads = mode == 2 ? qd : 1;
            if (fd < 0) continue;
            double cold = 0, warm = 0, bytes = 0, n_reads = 0, max_resid = 0, dev = 0;
            for (int t = 0; t < read_queries; ++t) {
              DropCache(fd_buf);
              max_resid = std::max(max_resid, Resident(fd_buf, file_size));
              for (int pass = 0; pass < (mode == 0 ? 2 : 1); ++pass) {
                const int64_t dev0 = pass == 0 ? DeviceReadBytes() : 0;
                auto t0 = Clock::now();
                do_reads(fd, reads[t], threads);
                (pass == 0 ? cold : warm) += Seconds(t0, Clock::now());
                if (pass == 0) dev += static_cast<double>(DeviceReadBytes() - dev0);
              }
              for (const auto& rd : reads[t]) bytes += static_cast<double>(rd.len);
              n_reads += static_cast<double>(reads[t].size());
            }
            const std::string mname = mode == 0 ? "buffered" : "direct" + std::to_string(threads);
            const double steps = read_queries;
            Print("%-5d %-9s %-9s %-8s %9.2f %9.2f %9.0f %7.2f%% %9.2f %9.2f %9.0f", P, kConfigs[c].name, mname.c_str(),
                  per == 0 ? "per page" : "per run", bytes / steps / 1e6, dev / steps / 1e6, n_reads / steps,
                  100 * max_resid, cold / steps * 1e3, bytes / cold / 1e9, n_reads / cold);
            if (mode == 0) {
              Print(" %9.3f %9.2f %9.0f\n", warm / steps * 1e3, bytes / warm / 1e9, n_reads / warm);
            } else {
              Print(" %9s %9s %9s\n", "-", "-", "-");
            }
          }
        }
        std::free(buf);
      }
      ::close(fd_buf);
      if (fd_dir >= 0) ::close(fd_dir);
      ::unlink(path.c_str());
    }
    Print(
        "(MB/step, reads/st: per decode step of the layer, all its KV heads; dev MB/st = bytes fetched from the "
        "block device during the cold pass (/proc/self/io read_bytes: readahead included); resid = largest share of "
        "the file "
        "still in the page cache right after a drop, over the steps;\n cold/warm ms = mean time of one step's reads; "
        "GB/s and rd/s = bytes and preads over the summed read time)\n");
    Print("(section 4 took %.1f s)\n", Seconds(t_read, Clock::now()));
  }
  Print("\nload average at end: %s\ntotal run time %.1f s\n", LoadAvg().c_str(), Seconds(t_all, Clock::now()));
  if (g_out) std::fclose(g_out);
  return 0;
}
