// No exception crosses the library's entry points (include/sqz/status.h,
// util/guard.h): a child process runs the public calls with operator new
// failing above a size (tests/alloc_fail_shim.cc, LD_PRELOAD), as on a
// machine without the memory a request asks for; every call must return a
// Status and the child must exit normally (an escaping std::bad_alloc, or
// one thrown inside an OpenMP region, would abort it).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "sqz/query.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

constexpr const char* kEnvDb = "SQZ_OOM_CHILD_DB";
constexpr int kHeads = 4, kKvHeads = 2, kDim = 64, kTokens = 900;

TEST(LibraryAllocationFailure, EntryPointsReturnStatusNeverThrow) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the shim cannot be preloaded before the ASan runtime";
#endif
  const std::string shim = testing::AllocShimPath();
  if (shim.empty()) GTEST_SKIP() << "no allocation-failure shim (" << SQZ_ALLOC_SHIM_PATH << "; set SQZ_ALLOC_SHIM)";
  testing::ScopedTempDir dir;
  const std::string path = dir.Sub("db");
  {
    std::unique_ptr<DB> db;
    ASSERT_TRUE(DB::Open(Options(), path, &db).ok());
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<size_t>(kKvHeads) * kTokens * kDim), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    KvLayerView layer;
    layer.k = {k.data(), DType::kF32, {kKvHeads, kTokens, kDim}};
    layer.v = {v.data(), DType::kF32, {kKvHeads, kTokens, kDim}};
    std::unique_ptr<KvSource> src;
    ASSERT_TRUE(MakeInMemoryKvSource(kHeads, {layer}, "oom test", &src).ok());
    BuildOptions bo;
    bo.kmeans_iters = 2;
    Status s = BuildContext(db.get(), "c", src.get(), bo);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  const int st = testing::RunSelfChild("QueryOomChild.DISABLED_Run",
                                       {std::string(kEnvDb) + "=" + path, "LD_PRELOAD=" + shim,
                                        "SQZ_FAIL_NEW_AT_LEAST=" + std::to_string(size_t{2} << 20)},
                                       120);
  ASSERT_NE(st, -1);
  EXPECT_TRUE(WIFEXITED(st)) << "the child died of signal " << (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  EXPECT_EQ(WEXITSTATUS(st), 0);
}

// The child: every public call that allocates with the request's size, with
// allocations of 2 MiB and more failing. Buffers of its own come from malloc
// (the shim only fails operator new).
TEST(QueryOomChild, DISABLED_Run) {
  const char* path = std::getenv(kEnvDb);
  if (path == nullptr) GTEST_SKIP() << "run by LibraryAllocationFailure";
  Options o;
  o.read_only = true;
  std::unique_ptr<DB> db;
  Status s = DB::Open(o, path, &db);
  ASSERT_TRUE(s.ok()) << s.ToString();  // an open allocates little
  std::unique_ptr<ContextHandle> h;
  s = ContextHandle::Open(db.get(), "c", &h);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const int T = 8192;  // [heads, T, d] floats: 8 MiB, and T x keys scores
  const size_t n = static_cast<size_t>(kHeads) * T * kDim;
  float* q = static_cast<float*>(std::malloc(n * sizeof(float)));
  float* out = static_cast<float*>(std::malloc(n * sizeof(float)));
  float* lse = static_cast<float*>(std::malloc(static_cast<size_t>(kHeads) * T * sizeof(float)));
  ASSERT_TRUE(q && out && lse);
  for (size_t i = 0; i < n; ++i) q[i] = static_cast<float>(i % 17) * 0.01f;
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kBudget}) {
    QueryOptions qo;
    qo.mode = mode;
    for (bool per_query : {false, true}) {
      qo.per_query_selection = per_query;
      s = h->Attend(0, q, T, qo, out, lse);
      EXPECT_FALSE(s.ok());
      EXPECT_FALSE(s.message().empty());
      std::printf("Attend(mode %d, per_query %d): %s\n", static_cast<int>(mode), per_query, s.ToString().c_str());
      SegmentTable table;
      s = h->Plan(0, q, T, qo, &table);
      std::printf("Plan(mode %d, per_query %d): %s\n", static_cast<int>(mode), per_query, s.ToString().c_str());
    }
  }
  // Small calls still work in the same process afterwards.
  QueryOptions qo;
  s = h->Attend(0, q, 1, qo, out, lse);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::free(q);
  std::free(out);
  std::free(lse);
}

}  // namespace
}  // namespace sqz
