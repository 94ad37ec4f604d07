// The GPU path against the CPU engine, on the device for real (skipped where
// no GPU is present). A handle opened with Device::kCuda holds the context's
// pages in GPU memory and runs decode steps on the sparse decode kernel; it
// must answer what the CPU handle answers. Fresh random queries every run
// (the seed is printed); the GPU outputs are poisoned (NaN) before each run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "gpu/resident.h"
#include "sqz/build.h"
#include "sqz/query.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;
using testing::ScopedTempDir;

// O within relative L2 1e-4 and LSE within 1e-4 (both accumulate in fp32, in
// different orders); rows with nothing attended: LSE = -inf and O = 0.
void ExpectClose(const std::vector<float>& o_cpu, const std::vector<float>& l_cpu, const std::vector<float>& o_gpu,
                 const std::vector<float>& l_gpu, int d, const std::string& what) {
  for (size_t r = 0; r < l_cpu.size(); ++r) {
    if (std::isinf(l_cpu[r])) {
      EXPECT_TRUE(std::isinf(l_gpu[r]) && l_gpu[r] < 0) << what << " row " << r;
      for (int e = 0; e < d; ++e) EXPECT_EQ(o_gpu[r * d + e], 0.f) << what << " row " << r;
      continue;
    }
    ASSERT_TRUE(std::isfinite(l_gpu[r])) << what << " row " << r;
    EXPECT_NEAR(l_gpu[r], l_cpu[r], 1e-4 * std::max(1.f, std::fabs(l_cpu[r]))) << what << " row " << r;
    double diff = 0, norm = 0;
    for (int e = 0; e < d; ++e) {
      const double a = o_gpu[r * d + e], b = o_cpu[r * d + e];
      ASSERT_TRUE(std::isfinite(a)) << what << " row " << r;
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    EXPECT_LE(std::sqrt(diff), 1e-4 * std::sqrt(norm) + 1e-6) << what << " row " << r;
  }
}

class GpuDecodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (gpu::DeviceCount(&why) == 0) GTEST_SKIP() << "no GPU: " << why;
    ASSERT_TRUE(DB::Open(Options(), dir_.Sub("db"), &db_).ok());
  }

  // Builds `name`, opens it on the CPU and on the GPU, and compares one
  // decode query per query head under each of `configs`, every layer.
  void Check(const std::string& name, KvSpec spec, BuildOptions bo, const std::vector<QueryOptions>& configs) {
    KvData data(spec);
    auto src = data.Source();
    bo.kmeans_iters = 3;
    Status s = BuildContext(db_.get(), name, src.get(), bo);
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::unique_ptr<ContextHandle> cpu, gpu_h;
    ASSERT_TRUE(ContextHandle::Open(db_.get(), name, &cpu).ok());
    OpenOptions oo;
    oo.device = Device::kCuda;
    s = ContextHandle::Open(db_.get(), name, oo, &gpu_h);
    ASSERT_TRUE(s.ok()) << s.ToString();
    const ContextInfo& info = cpu->info();
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
        ASSERT_TRUE(cpu->ReadRows(layer, qh / G, row, 1, k.data(), v.data()).ok());
        for (int e = 0; e < d; ++e) q[static_cast<size_t>(qh) * d + e] = 2.f * k[e] + 0.5f * normal(rng);
      }
      for (size_t ci = 0; ci < configs.size(); ++ci) {
        const std::string what = name + " layer " + std::to_string(layer) + " config " + std::to_string(ci);
        std::vector<float> oc(q.size()), lc(nq), og(q.size(), NAN), lg(nq, NAN);
        ASSERT_TRUE(cpu->Attend(layer, q.data(), 1, configs[ci], oc.data(), lc.data()).ok());
        s = gpu_h->Attend(layer, q.data(), 1, configs[ci], og.data(), lg.data());
        ASSERT_TRUE(s.ok()) << s.ToString();
        ExpectClose(oc, lc, og, lg, d, what);
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
        if (on_gpu) {
          ExpectClose(oc, lc, og, lg, d, "T " + std::to_string(T) + " cfg " + std::to_string(cfg));
        } else {
          ASSERT_EQ(og, oc) << "CPU fallback";
          ASSERT_EQ(lg, lc) << "CPU fallback";
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

// gpu::ResidentKv refuses what it cannot do, with a named reason.
TEST_F(GpuDecodeTest, ResidentKvErrors) {
  gpu::ResidentShape shape;
  shape.n_layers = 1;
  shape.n_heads = 2;
  shape.pages_per_head = 4;
  shape.page_rows = 16;
  shape.head_dim = 96;  // unsupported
  shape.n_clustered = 50;
  shape.clustered_pages = 4;
  std::unique_ptr<gpu::ResidentKv> r;
  Status s = gpu::ResidentKv::Create(0, shape, &r);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("Device::kCpu"), std::string::npos) << s.ToString();
  shape.head_dim = 64;
  EXPECT_TRUE(gpu::ResidentKv::Create(gpu::DeviceCount(), shape, &r).IsNotSupported());
  ASSERT_TRUE(gpu::ResidentKv::Create(0, shape, &r).ok());
  std::vector<uint8_t> page(2 * 16 * 64 * 2, 0);
  EXPECT_TRUE(r->Upload(0, 2, 0, page.data(), 1).IsInvalidArgument());  // head out of range
  EXPECT_TRUE(r->Upload(0, 0, 4, page.data(), 1).IsInvalidArgument());  // page out of range
  EXPECT_TRUE(r->Upload(1, 0, 0, page.data(), 1).IsInvalidArgument());  // layer out of range
  ASSERT_TRUE(r->Upload(0, 1, 3, page.data(), 1).ok());
  ASSERT_TRUE(r->Upload(0, 0, 0, page.data(), 1).ok());  // zero keys and values
  gpu::HostSegments seg;
  seg.offsets = {0, 1};  // one head's worth for a two-head context
  seg.first_row = {0};
  seg.n_rows = {4};
  std::vector<float> q(2 * 64), o(q.size()), lse(2);
  EXPECT_TRUE(r->Decode(0, seg, 1, 0.125f, q.data(), o.data(), lse.data()).IsInvalidArgument());
  seg.offsets = {0, 1, 1};
  EXPECT_TRUE(r->Decode(0, seg, 9, 0.125f, q.data(), o.data(), lse.data()).IsNotSupported());  // G > 8
  ASSERT_TRUE(r->Decode(0, seg, 1, 0.125f, q.data(), o.data(), lse.data()).ok());
  EXPECT_NEAR(lse[0], std::log(4.f), 1e-6);  // 4 zero keys: lse = log 4, o = 0
  for (int e = 0; e < 64; ++e) EXPECT_EQ(o[e], 0.f);
  EXPECT_TRUE(std::isinf(lse[1]) && lse[1] < 0);  // nothing attended
}

}  // namespace
}  // namespace sqz
