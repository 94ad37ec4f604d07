// CPU query latency per layer: sparse (budget 1/8 and 1/4, flat and
// hierarchical) against dense attention over the same context, decode
// (T = 1) and prefill (T > 1), cold (OS page cache dropped for the database
// files, fresh handle) and warm (block cache populated). The dense baseline
// is the best dense CPU path we have: K and V resident in memory in their
// fp16 form, F16C conversion on the fly for decode, OpenBLAS sgemm over
// float32 copies for prefill; it reads nothing from storage.
//
//   query_bench --db DIR --context NAME --kv FILE --queries FILE [--layer L] [--reps N] [--prefill T]
#include <cblas.h>
#include <fcntl.h>
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/query.h"
#include "util/half.h"
#include "util/safetensors.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

[[noreturn]] void Die(const std::string& what, const sqz::Status& s) {
  std::fprintf(stderr, "query_bench: %s: %s\n", what.c_str(), s.ToString().c_str());
  std::exit(1);
}

// Drops the database files from the OS page cache so the next read is cold.
void DropPageCache(const std::string& dir) {
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
  }
}

struct DenseKv {
  int h_kv = 0, n = 0, d = 0;
  std::vector<uint16_t> k16, v16;  // [h_kv, n, d] fp16
  std::vector<float> k32, v32;     // float copies for the sgemm prefill path
};

// Dense decode, the best CPU form we have: per KV head (KV heads in
// parallel), keys and values stream once in tiles of 64 rows, converted from
// fp16 into an L1-resident tile and shared by the G query heads of the group,
// with an online softmax (running max and sum) so nothing is re-read.
float Dot(const float* a, const float* b, int d) {
  __m256 acc = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 <= d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  float r = _mm_cvtss_f32(lo);
  for (; c < d; ++c) r += a[c] * b[c];
  return r;
}

void DenseDecode(const DenseKv& kv, const float* q, int hq, float* o, float* lse) {
  constexpr int kTile = 64;
  const int g = hq / kv.h_kv;
  const int d = kv.d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel for schedule(static)
  for (int hk = 0; hk < kv.h_kv; ++hk) {
    std::vector<float> kt(kTile * d), vt(kTile * d), p(static_cast<size_t>(g) * kTile),
        acc(static_cast<size_t>(g) * d, 0.0f);
    std::vector<float> m(g, -INFINITY), l(g, 0.0f);
    const uint16_t* K = kv.k16.data() + static_cast<size_t>(hk) * kv.n * d;
    const uint16_t* V = kv.v16.data() + static_cast<size_t>(hk) * kv.n * d;
    const float* qg = q + static_cast<size_t>(hk) * g * d;
    for (int start = 0; start < kv.n; start += kTile) {
      const int nt = std::min(kTile, kv.n - start);
      sqz::ConvertToFloat(K + static_cast<size_t>(start) * d, sqz::DType::kF16, static_cast<size_t>(nt) * d, kt.data());
      sqz::ConvertToFloat(V + static_cast<size_t>(start) * d, sqz::DType::kF16, static_cast<size_t>(nt) * d, vt.data());
      for (int h = 0; h < g; ++h) {
        float* ph = p.data() + static_cast<size_t>(h) * kTile;
        float mt = -INFINITY;
        for (int i = 0; i < nt; ++i) {
          ph[i] = Dot(qg + static_cast<size_t>(h) * d, kt.data() + static_cast<size_t>(i) * d, d) * scale;
          mt = std::max(mt, ph[i]);
        }
        const float nm = std::max(m[h], mt);
        const float corr = std::exp(m[h] - nm);
        float* ah = acc.data() + static_cast<size_t>(h) * d;
        l[h] *= corr;
        for (int c = 0; c < d; ++c) ah[c] *= corr;
        for (int i = 0; i < nt; ++i) {
          ph[i] = std::exp(ph[i] - nm);
          l[h] += ph[i];
          const float* vr = vt.data() + static_cast<size_t>(i) * d;
          const __m256 w = _mm256_set1_ps(ph[i]);
          for (int c = 0; c + 8 <= d; c += 8) {
            _mm256_storeu_ps(ah + c, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + c), _mm256_loadu_ps(ah + c)));
          }
        }
        m[h] = nm;
      }
    }
    for (int h = 0; h < g; ++h) {
      const int qh = hk * g + h;
      for (int c = 0; c < d; ++c) o[static_cast<size_t>(qh) * d + c] = acc[static_cast<size_t>(h) * d + c] / l[h];
      lse[qh] = m[h] + std::log(l[h]);
    }
  }
}

// Dense prefill: S = Q K^T, softmax, O = P V with sgemm per head.
void DensePrefill(const DenseKv& kv, const float* q, int hq, int T, float* o, float* lse) {
  const int g = hq / kv.h_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kv.d));
  std::vector<float> s(static_cast<size_t>(T) * kv.n);
  for (int h = 0; h < hq; ++h) {
    const float* K = kv.k32.data() + static_cast<size_t>(h / g) * kv.n * kv.d;
    const float* V = kv.v32.data() + static_cast<size_t>(h / g) * kv.n * kv.d;
    const float* qh = q + static_cast<size_t>(h) * T * kv.d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, kv.n, kv.d, scale, qh, kv.d, K, kv.d, 0.0f, s.data(), kv.n);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      float* row = s.data() + static_cast<size_t>(t) * kv.n;
      float m = *std::max_element(row, row + kv.n);
      double sum = 0;
      for (int i = 0; i < kv.n; ++i) {
        row[i] = std::exp(row[i] - m);
        sum += row[i];
      }
      float inv = static_cast<float>(1.0 / sum);
      for (int i = 0; i < kv.n; ++i) row[i] *= inv;
      lse[static_cast<size_t>(h) * T + t] = static_cast<float>(m + std::log(sum));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, kv.d, kv.n, 1.0f, s.data(), kv.n, V, kv.d, 0.0f,
                o + static_cast<size_t>(h) * T * kv.d, kv.d);
  }
}

template <typename F>
double Median(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto a = Clock::now();
    f();
    t.push_back(Seconds(a, Clock::now()));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string db_path, ctx, kv_path, q_path;
  int layer = 0, reps = 5, prefill_t = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--db")
      db_path = argv[i + 1];
    else if (a == "--context")
      ctx = argv[i + 1];
    else if (a == "--kv")
      kv_path = argv[i + 1];
    else if (a == "--queries")
      q_path = argv[i + 1];
    else if (a == "--layer")
      layer = std::atoi(argv[i + 1]);
    else if (a == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (a == "--prefill")
      prefill_t = std::atoi(argv[i + 1]);
  }
  if (db_path.empty() || ctx.empty() || kv_path.empty() || q_path.empty()) {
    std::fprintf(
        stderr,
        "usage: query_bench --db DIR --context NAME --kv FILE --queries FILE [--layer L] [--reps N] [--prefill T]\n");
    return 2;
  }

  // Dense baseline data, straight from the KV file.
  std::unique_ptr<sqz::SafetensorsFile> kvf;
  sqz::Status s = sqz::SafetensorsFile::Open(kv_path, &kvf);
  if (!s.ok()) Die("opening " + kv_path, s);
  const sqz::SafetensorsEntry* ke = kvf->Find("layers." + std::to_string(layer) + ".k");
  const sqz::SafetensorsEntry* ve = kvf->Find("layers." + std::to_string(layer) + ".v");
  if (!ke || !ve || ke->dtype != sqz::DType::kF16) {
    std::fprintf(stderr, "query_bench: %s needs fp16 layers.%d.k/v\n", kv_path.c_str(), layer);
    return 1;
  }
  DenseKv kv;
  kv.h_kv = static_cast<int>(ke->shape[0]);
  kv.n = static_cast<int>(ke->shape[1]);
  kv.d = static_cast<int>(ke->shape[2]);
  kv.k16.resize(ke->nbytes / 2);
  kv.v16.resize(ve->nbytes / 2);
  if (!(s = kvf->ReadRaw(*ke, kv.k16.data())).ok() || !(s = kvf->ReadRaw(*ve, kv.v16.data())).ok())
    Die("reading KV", s);
  kv.k32.resize(kv.k16.size());
  kv.v32.resize(kv.v16.size());
  sqz::ConvertToFloat(kv.k16.data(), sqz::DType::kF16, kv.k16.size(), kv.k32.data());
  sqz::ConvertToFloat(kv.v16.data(), sqz::DType::kF16, kv.v16.size(), kv.v32.data());

  std::unique_ptr<sqz::SafetensorsFile> qf;
  if (!(s = sqz::SafetensorsFile::Open(q_path, &qf)).ok()) Die("opening " + q_path, s);
  const sqz::SafetensorsEntry* qe = qf->Find("layers." + std::to_string(layer) + ".q");
  if (!qe) {
    std::fprintf(stderr, "query_bench: %s has no layers.%d.q\n", q_path.c_str(), layer);
    return 1;
  }
  const int hq = static_cast<int>(qe->shape[0]), tq = static_cast<int>(qe->shape[1]);
  std::vector<float> qall(static_cast<size_t>(hq) * tq * kv.d);
  if (!(s = qf->ReadFloat(*qe, qall.data())).ok()) Die("reading queries", s);
  // Decode query: token 0 of each head. Prefill: T tokens (cycled if the file has fewer).
  std::vector<float> q1(static_cast<size_t>(hq) * kv.d), qp(static_cast<size_t>(hq) * prefill_t * kv.d);
  for (int h = 0; h < hq; ++h) {
    std::memcpy(&q1[static_cast<size_t>(h) * kv.d], &qall[static_cast<size_t>(h) * tq * kv.d], kv.d * 4);
    for (int t = 0; t < prefill_t; ++t) {
      std::memcpy(&qp[(static_cast<size_t>(h) * prefill_t + t) * kv.d],
                  &qall[(static_cast<size_t>(h) * tq + t % tq) * kv.d], kv.d * 4);
    }
  }
  std::vector<float> o(qp.size()), lse(static_cast<size_t>(hq) * prefill_t);

  const double dense_bytes = 2.0 * kv.k16.size() * 2;  // K + V fp16
  double dense_decode = Median(reps, [&] { DenseDecode(kv, q1.data(), hq, o.data(), lse.data()); });
  double dense_prefill =
      Median(std::max(1, reps / 2), [&] { DensePrefill(kv, qp.data(), hq, prefill_t, o.data(), lse.data()); });

  // Sanity check: the baseline computes the same attention as the engine's dense mode.
  {
    std::unique_ptr<sqz::DB> db;
    std::unique_ptr<sqz::ContextHandle> handle;
    sqz::Options dbo;
    dbo.create_if_missing = false;
    if (!(s = sqz::DB::Open(dbo, db_path, &db)).ok()) Die("opening " + db_path, s);
    if (!(s = sqz::ContextHandle::Open(db.get(), ctx, &handle)).ok()) Die("opening context", s);
    std::vector<float> o_ref(q1.size()), lse_ref(hq), o_base(q1.size()), lse_base(hq);
    sqz::QueryOptions dense_opt;
    dense_opt.mode = sqz::SelectionMode::kDense;
    if (!(s = handle->Attend(layer, q1.data(), 1, dense_opt, o_ref.data(), lse_ref.data())).ok()) Die("dense", s);
    DenseDecode(kv, q1.data(), hq, o_base.data(), lse_base.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < o_ref.size(); ++i) {
      num += (o_ref[i] - o_base[i]) * (o_ref[i] - o_base[i]);
      den += o_ref[i] * o_ref[i];
    }
    std::printf("dense baseline vs engine dense mode: relative L2 difference of O = %.2e\n", std::sqrt(num / den));
  }
  std::printf("context %s layer %d: %d query heads, %d KV heads, N = %d, d = %d, %d threads\n", ctx.c_str(), layer, hq,
              kv.h_kv, kv.n, kv.d, omp_get_max_threads());
  std::printf("dense in-memory baseline: decode %.2f ms (%.1f GB/s of fp16 K+V), prefill T=%d %.1f ms\n",
              dense_decode * 1e3, dense_bytes / dense_decode / 1e9, prefill_t, dense_prefill * 1e3);
  std::printf("\n%-22s %-6s %-5s %10s %8s %11s %7s %9s  %s\n", "mode", "T", "cache", "ms/layer", "keys", "bytes read",
              "GB/s", "vs dense", "score/read/attend (thread-ms)");

  struct Config {
    const char* name;
    sqz::QueryOptions opt;
  };
  std::vector<Config> configs;
  auto add = [&](const char* n, sqz::SelectionMode m, double b, bool hier) {
    sqz::QueryOptions q;
    q.mode = m;
    q.budget = b;
    q.hierarchical = hier;
    configs.push_back({n, q});
  };
  add("dense (from storage)", sqz::SelectionMode::kDense, 1, false);
  add("budget 1/8 flat", sqz::SelectionMode::kBudget, 0.125, false);
  add("budget 1/8 hier", sqz::SelectionMode::kBudget, 0.125, true);
  add("budget 1/4 flat", sqz::SelectionMode::kBudget, 0.25, false);
  add("budget 1/4 hier", sqz::SelectionMode::kBudget, 0.25, true);

  for (int T : {1, prefill_t}) {
    const float* q = T == 1 ? q1.data() : qp.data();
    double dense = T == 1 ? dense_decode : dense_prefill;
    for (const auto& c : configs) {
      for (bool cold : {true, false}) {
        std::unique_ptr<sqz::DB> db;
        std::unique_ptr<sqz::ContextHandle> handle;
        if (cold) DropPageCache(db_path);
        sqz::Options dbo;
        dbo.create_if_missing = false;
        dbo.block_cache_bytes = size_t{3} << 30;  // "warm" = everything read stays cached
        if (!(s = sqz::DB::Open(dbo, db_path, &db)).ok()) Die("opening " + db_path, s);
        if (!(s = sqz::ContextHandle::Open(db.get(), ctx, &handle)).ok()) Die("opening context", s);
        sqz::AttendStats st;
        double t;
        if (cold) {
          auto a = Clock::now();
          s = handle->Attend(layer, q, T, c.opt, o.data(), lse.data(), &st);
          t = Seconds(a, Clock::now());
        } else {
          s = handle->Attend(layer, q, T, c.opt, o.data(), lse.data(), &st);  // warm the block cache
          t = Median(T == 1 ? reps : std::max(1, reps / 2),
                     [&] { s = handle->Attend(layer, q, T, c.opt, o.data(), lse.data(), &st); });
        }
        if (!s.ok()) Die(c.name, s);
        const double keys = static_cast<double>(st.keys_selected()) / (static_cast<double>(kv.h_kv) * kv.n);
        std::printf("%-22s %-6d %-5s %10.2f %7.1f%% %8.1f MB %7.2f %8.2fx  %.1f/%.1f/%.1f\n", c.name, T,
                    cold ? "cold" : "warm", t * 1e3, 100 * keys, st.bytes_read() / 1e6, st.bytes_read() / t / 1e9,
                    dense / t, st.seconds_score * 1e3, st.seconds_read * 1e3, st.seconds_attend * 1e3);
      }
    }
  }
  std::printf("\n(keys = clustered keys read / all keys; vs dense = dense in-memory time / this time)\n");
  return 0;
}
