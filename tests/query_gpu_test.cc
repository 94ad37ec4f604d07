// The GPU sparse decode kernel against the CPU engine, on the device for
// real (skipped where no GPU is present). The CPU engine plans the selection
// (a SegmentTable) and attends it; the GPU kernel attends the same segments
// from the same stored pages. Fresh random queries every run (the seed is
// printed); outputs are poisoned (NaN) before each GPU run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "gpu/sparse_decode.h"
#include "sqz/build.h"
#include "sqz/query.h"
#include "storage/store.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;
using testing::ScopedTempDir;

class GpuDecodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (gpu::DeviceCount(&why) == 0) GTEST_SKIP() << "no GPU: " << why;
    ASSERT_TRUE(DB::Open(Options(), dir_.Sub("db"), &db_).ok());
  }

  // Builds `name` and checks GPU against CPU for one decode query per query
  // head, under each of `configs`.
  void Check(const std::string& name, KvSpec spec, BuildOptions bo, const std::vector<QueryOptions>& configs) {
    KvData data(spec);
    auto src = data.Source();
    bo.kmeans_iters = 3;
    Status s = BuildContext(db_.get(), name, src.get(), bo);
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::unique_ptr<ContextHandle> h;
    ASSERT_TRUE(ContextHandle::Open(db_.get(), name, &h).ok());
    std::unique_ptr<storage::ContextSnapshot> snap;
    ASSERT_TRUE(db_->store()->OpenSnapshot(name, &snap).ok());
    const ContextInfo& info = h->info();
    const int d = info.head_dim, G = info.group_size(), nq = info.n_q_heads;

    const uint64_t seed = std::random_device()();
    std::printf("[ info ] %s: seed %llu\n", name.c_str(), static_cast<unsigned long long>(seed));
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (int layer = 0; layer < info.n_layers; ++layer) {
      // Queries near the keys' topics: a stored key of the head plus noise.
      std::vector<float> q(static_cast<size_t>(nq) * d);
      for (int qh = 0; qh < nq; ++qh) {
        std::vector<float> k(d), v(d);
        const int64_t row = std::uniform_int_distribution<int64_t>(0, info.n_tokens - 1)(rng);
        ASSERT_TRUE(h->ReadRows(layer, qh / G, row, 1, k.data(), v.data()).ok());
        for (int e = 0; e < d; ++e) q[static_cast<size_t>(qh) * d + e] = 2.f * k[e] + 0.5f * normal(rng);
      }
      for (size_t ci = 0; ci < configs.size(); ++ci) {
        const QueryOptions& qo = configs[ci];
        const std::string what = name + " layer " + std::to_string(layer) + " config " + std::to_string(ci);
        std::vector<float> o_cpu(q.size()), lse_cpu(nq);
        s = h->Attend(layer, q.data(), 1, qo, o_cpu.data(), lse_cpu.data());
        ASSERT_TRUE(s.ok()) << s.ToString();
        SegmentTable t;
        ASSERT_TRUE(h->Plan(layer, q.data(), 1, qo, &t).ok());
        ASSERT_EQ(t.n_sets(), info.n_kv_heads) << "decode + GQA union: one set per KV head";

        gpu::HostDecodeProblem p;
        p.head_dim = d;
        p.group_size = G;
        p.page_rows = info.page_rows;
        p.dtype = info.dtype;
        p.n_clustered = info.n_clustered;
        p.clustered_pages = info.clustered_pages;
        p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
        p.q = q.data();
        std::vector<std::unique_ptr<storage::PageSet>> sets;
        for (int g = 0; g < info.n_kv_heads; ++g) {
          gpu::HostDecodeHead hd;
          hd.page_ids.assign(t.pages.begin() + t.page_offsets[g], t.pages.begin() + t.page_offsets[g + 1]);
          sets.push_back(std::make_unique<storage::PageSet>());
          ASSERT_TRUE(snap->ReadPages(layer, g, hd.page_ids.data(), hd.page_ids.size(), sets.back().get()).ok());
          for (size_t i = 0; i < hd.page_ids.size(); ++i) hd.pages.push_back(sets.back()->data(i));
          for (uint32_t i = t.set_offsets[g]; i < t.set_offsets[g + 1]; ++i) {
            hd.first_row.push_back(t.segments[i].first_row);
            hd.n_rows.push_back(t.segments[i].n_rows);
          }
          p.heads.push_back(std::move(hd));
        }
        std::vector<float> o_gpu(q.size()), lse_gpu(nq);
        gpu::DecodeRun run;
        s = gpu::SparseDecodeOnDevice(p, o_gpu.data(), lse_gpu.data(), &run);
        ASSERT_TRUE(s.ok()) << s.ToString();
        for (int r = 0; r < nq; ++r) {
          if (std::isinf(lse_cpu[r])) {  // nothing attended
            EXPECT_TRUE(std::isinf(lse_gpu[r]) && lse_gpu[r] < 0) << what << " row " << r;
            for (int e = 0; e < d; ++e) EXPECT_EQ(o_gpu[static_cast<size_t>(r) * d + e], 0.f);
            continue;
          }
          ASSERT_TRUE(std::isfinite(lse_gpu[r])) << what << " row " << r;
          EXPECT_NEAR(lse_gpu[r], lse_cpu[r], 1e-4 * std::max(1.f, std::fabs(lse_cpu[r]))) << what << " row " << r;
          double diff = 0, norm = 0;
          for (int e = 0; e < d; ++e) {
            const float a = o_gpu[static_cast<size_t>(r) * d + e], b = o_cpu[static_cast<size_t>(r) * d + e];
            ASSERT_TRUE(std::isfinite(a)) << what << " row " << r;
            diff += (a - b) * static_cast<double>(a - b);
            norm += static_cast<double>(b) * b;
          }
          // Both accumulate in fp32 in different orders.
          EXPECT_LE(std::sqrt(diff), 1e-4 * std::sqrt(norm) + 1e-6) << what << " row " << r;
        }
        std::printf("[ info ] %s: %d splits per head, %.3f ms\n", what.c_str(), run.splits, run.kernel_ms);
      }
    }
  }

  static std::vector<QueryOptions> Configs() {
    std::vector<QueryOptions> c(4);
    c[0].mode = SelectionMode::kDense;
    c[1].budget = 0.125;
    c[2].budget = 0.125;
    c[2].hierarchical = true;
    c[3].budget = 0.01;  // a few small clusters
    return c;
  }

  ScopedTempDir dir_{"sqz-gpu"};
  std::unique_ptr<DB> db_;
};

TEST_F(GpuDecodeTest, SmolLMShapesF16) {  // d = 64, G = 3
  KvSpec s;
  s.n_layers = 2;
  s.n_kv_heads = 3;
  s.n_q_heads = 9;
  s.n_tokens = 3000;
  s.head_dim = 64;
  Check("smol", s, BuildOptions(), Configs());
}

TEST_F(GpuDecodeTest, LlamaShapesBF16) {  // d = 128, G = 4
  KvSpec s;
  s.n_layers = 1;
  s.n_kv_heads = 8;
  s.n_q_heads = 32;
  s.n_tokens = 8192;
  s.head_dim = 128;
  s.dtype = DType::kBF16;
  Check("llama", s, BuildOptions(), Configs());
}

TEST_F(GpuDecodeTest, MhaOddPagesAndEmptySelection) {
  KvSpec s;
  s.n_layers = 1;
  s.n_kv_heads = 4;
  s.n_q_heads = 4;  // G = 1
  s.n_tokens = 1000;
  s.head_dim = 128;
  BuildOptions bo;
  bo.page_rows = 7;  // pages and segments never aligned
  bo.window = 0;     // no always set: a selection can be empty
  bo.n_sinks = 0;
  std::vector<QueryOptions> c = Configs();
  QueryOptions none;
  none.mode = SelectionMode::kThreshold;
  none.threshold = 2.f;  // a probability above 1: nothing is kept
  c.push_back(none);
  Check("mha", s, bo, c);
}

// ContextHandle::Open with Device::kCuda: every served page resident in GPU
// memory; decode (T = 1, GQA union) runs on the GPU and equals the CPU
// handle; other calls (prefill, per-head sets) run on the CPU and equal it
// exactly; a head-range handle on the GPU equals the full one on its heads.
TEST_F(GpuDecodeTest, ResidentHandleMatchesTheCpuHandle) {
  KvSpec s;
  s.n_layers = 2;
  s.n_kv_heads = 4;
  s.n_q_heads = 16;
  s.n_tokens = 6000;
  s.head_dim = 128;
  s.dtype = DType::kBF16;
  KvData data(s);
  auto src = data.Source();
  BuildOptions bo;
  bo.kmeans_iters = 3;
  ASSERT_TRUE(BuildContext(db_.get(), "res", src.get(), bo).ok());
  std::unique_ptr<ContextHandle> cpu, gpu_h, gpu_part;
  ASSERT_TRUE(ContextHandle::Open(db_.get(), "res", &cpu).ok());
  OpenOptions oo;
  oo.device = Device::kCuda;
  Status st = ContextHandle::Open(db_.get(), "res", oo, &gpu_h);
  ASSERT_TRUE(st.ok()) << st.ToString();
  oo.kv_head_begin = 2;
  ASSERT_TRUE(ContextHandle::Open(db_.get(), "res", oo, &gpu_part).ok());
  const int d = s.head_dim, nq = s.n_q_heads, G = nq / s.n_kv_heads;
  const uint64_t seed = std::random_device()();
  std::printf("[ info ] resident: seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const int T : {1, 4}) {
    std::vector<float> q(static_cast<size_t>(nq) * T * d);
    for (float& x : q) x = normal(rng);
    for (int cfg = 0; cfg < 4; ++cfg) {
      QueryOptions qo;
      if (cfg == 1) qo.mode = SelectionMode::kDense;
      if (cfg == 2) qo.hierarchical = true;
      if (cfg == 3) qo.gqa = GqaPolicy::kPerHead;  // G sets per KV head: runs on the CPU
      for (int layer = 0; layer < s.n_layers; ++layer) {
        std::vector<float> oc(q.size()), lc(static_cast<size_t>(nq) * T), og(q.size()), lg(lc.size());
        ASSERT_TRUE(cpu->Attend(layer, q.data(), T, qo, oc.data(), lc.data()).ok());
        AttendStats stats;
        st = gpu_h->Attend(layer, q.data(), T, qo, og.data(), lg.data(), &stats);
        ASSERT_TRUE(st.ok()) << st.ToString();
        ASSERT_EQ(stats.heads.size(), static_cast<size_t>(s.n_kv_heads));
        const bool on_gpu = T == 1 && cfg != 3;
        for (size_t r = 0; r < lc.size(); ++r) {
          if (!on_gpu) {
            ASSERT_EQ(lg[r], lc[r]) << "CPU fallback, row " << r;
            continue;
          }
          ASSERT_NEAR(lg[r], lc[r], 1e-4 * std::max(1.f, std::fabs(lc[r]))) << "T " << T << " cfg " << cfg;
          double diff = 0, norm = 0;
          for (int e = 0; e < d; ++e) {
            const double a = og[r * d + e], b = oc[r * d + e];
            ASSERT_TRUE(std::isfinite(a));
            diff += (a - b) * (a - b);
            norm += b * b;
          }
          ASSERT_LE(std::sqrt(diff), 1e-4 * std::sqrt(norm) + 1e-6) << "T " << T << " cfg " << cfg << " row " << r;
        }
        if (!on_gpu) {
          ASSERT_EQ(og, oc);
        }
        // The rank serving KV heads 2 and 3 (query heads 2G .. 4G - 1).
        const size_t first = static_cast<size_t>(2) * G * T, rows = static_cast<size_t>(2) * G * T;
        std::vector<float> qp(q.begin() + first * d, q.begin() + (first + rows) * d), op(qp.size()), lp(rows);
        ASSERT_TRUE(gpu_part->Attend(layer, qp.data(), T, qo, op.data(), lp.data()).ok());
        for (size_t i = 0; i < op.size(); ++i)
          ASSERT_NEAR(op[i], og[first * d + i], 1e-5f + 1e-4f * std::fabs(og[first * d + i]));
      }
    }
  }
}

}  // namespace
}  // namespace sqz
