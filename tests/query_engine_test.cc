// The query engine end to end (ContextHandle over a built context): exactness
// against dense attention computed independently from the stored values,
// attention restricted to the selection, statistics, errors, concurrency.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gpu/device.h"
#include "query/engine.h"
#include "query/selection.h"
#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "storage/db_impl.h"
#include "storage/format.h"
#include "tests/index_test_util.h"
#include "tests/test_util.h"
#include "util/half.h"

namespace sqz {
namespace {

using index_test::KvData;
using index_test::KvSpec;

// A built context plus everything needed to recompute attention from the
// stored values (decoded back to float) without the engine.
struct TestContext {
  KvSpec spec;
  std::unique_ptr<KvData> data;
  std::vector<std::vector<float>> k, v;  // per layer [n_kv, N, d], the stored values as float
  std::vector<std::vector<float>> q;     // per layer [n_q, T, d] test queries
  int T = 0;
  std::unique_ptr<ContextHandle> handle;
  // The stored index records of the version the handle reads, [layer * n_kv + head].
  std::vector<storage::HeadIndexRecord> records;
  const storage::HeadIndexRecord& record(int layer, int g) const { return records[layer * spec.n_kv_heads + g]; }
};

class QueryEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(DB::Open(Options(), dir_.Sub("db"), &db_).ok()); }

  // Builds `name` from synthetic data; queries are the generator's window
  // queries (T of them per head), which point at topics like real ones.
  void Build(const std::string& name, KvSpec spec, int T, bool calibrate, BuildOptions bo, TestContext* ctx) {
    spec.q_window = T;
    ctx->spec = spec;
    ctx->data = std::make_unique<KvData>(spec);
    ctx->T = T;
    const size_t n = static_cast<size_t>(spec.n_kv_heads) * spec.n_tokens * spec.head_dim;
    for (int l = 0; l < spec.n_layers; ++l) {
      ctx->k.emplace_back(n);
      ctx->v.emplace_back(n);
      ConvertToFloat(ctx->data->k[l].data(), spec.dtype, n, ctx->k.back().data());
      ConvertToFloat(ctx->data->v[l].data(), spec.dtype, n, ctx->v.back().data());
      ctx->q.push_back(ctx->data->q[l]);
    }
    if (!calibrate) {
      // Same KV, no window queries: the context is not calibrated.
      for (auto& q : ctx->data->q) q.clear();
      ctx->data->spec.q_window = 0;
    }
    bo.kmeans_iters = 4;
    std::unique_ptr<KvSource> src = ctx->data->Source();
    ASSERT_TRUE(src);
    Status s = BuildContext(db_.get(), name, src.get(), bo);
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = ContextHandle::Open(db_.get(), name, &ctx->handle);
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::unique_ptr<storage::ContextSnapshot> snap;
    s = db_->store()->OpenSnapshot(name, &snap);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(snap->info().id, ctx->handle->generation());
    ctx->records.resize(static_cast<size_t>(spec.n_layers) * spec.n_kv_heads);
    for (int l = 0; l < spec.n_layers; ++l) {
      for (int g = 0; g < spec.n_kv_heads; ++g) {
        s = snap->GetHeadIndex(l, g, &ctx->records[l * spec.n_kv_heads + g]);
        ASSERT_TRUE(s.ok()) << s.ToString();
      }
    }
  }

  // Dense attention in double over the original token positions `pos` of
  // KV head g, for query row q.
  static void Reference(const TestContext& c, int layer, int g, const float* q, const std::vector<uint32_t>& pos,
                        std::vector<double>* o, double* lse) {
    const int d = c.spec.head_dim;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const float* kh = c.k[layer].data() + static_cast<size_t>(g) * c.spec.n_tokens * d;
    const float* vh = c.v[layer].data() + static_cast<size_t>(g) * c.spec.n_tokens * d;
    std::vector<double> x(pos.size());
    double m = -INFINITY;
    for (size_t i = 0; i < pos.size(); ++i) {
      double dot = 0;
      for (int e = 0; e < d; ++e) dot += static_cast<double>(q[e]) * kh[static_cast<size_t>(pos[i]) * d + e];
      x[i] = scale * dot;
      m = std::max(m, x[i]);
    }
    o->assign(d, 0.0);
    double z = 0;
    for (double xi : x) z += std::exp(xi - m);
    for (size_t i = 0; i < pos.size(); ++i) {
      const double w = std::exp(x[i] - m) / z;
      for (int e = 0; e < d; ++e) (*o)[e] += w * vh[static_cast<size_t>(pos[i]) * d + e];
    }
    *lse = pos.empty() ? -INFINITY : m + std::log(z);
  }

  // Checks (o, lse) of every query row against Reference over the positions
  // positions_of(kv head, query head in group, t).
  template <typename PositionsOf>
  static void ExpectMatches(const TestContext& c, int layer, const std::vector<float>& o, const std::vector<float>& lse,
                            PositionsOf positions_of, const std::string& what) {
    ExpectMatchesFor(c, layer, c.q[layer], c.T, o, lse, positions_of, what);
  }
  // Same for queries q [n_q, T, d].
  template <typename PositionsOf>
  static void ExpectMatchesFor(const TestContext& c, int layer, const std::vector<float>& q, int T,
                               const std::vector<float>& o, const std::vector<float>& lse, PositionsOf positions_of,
                               const std::string& what) {
    const int d = c.spec.head_dim, G = c.spec.n_q_heads / c.spec.n_kv_heads;
    for (int qh = 0; qh < c.spec.n_q_heads; ++qh) {
      for (int t = 0; t < T; ++t) {
        const size_t row = static_cast<size_t>(qh) * T + t;
        std::vector<double> want;
        double want_lse;
        Reference(c, layer, qh / G, q.data() + row * d, positions_of(qh / G, qh % G, t), &want, &want_lse);
        double diff = 0, norm = 0;
        for (int e = 0; e < d; ++e) {
          ASSERT_TRUE(std::isfinite(o[row * d + e])) << what;
          diff += (o[row * d + e] - want[e]) * (o[row * d + e] - want[e]);
          norm += want[e] * want[e];
        }
        EXPECT_LT(std::sqrt(diff / norm), 1e-3) << what << " layer " << layer << " head " << qh << " t " << t;
        EXPECT_NEAR(lse[row], want_lse, 1e-3 * std::max(1.0, std::fabs(want_lse)))
            << what << " layer " << layer << " head " << qh << " t " << t;
      }
    }
  }

  // Original token position of stored row `row` of (layer, kv head g):
  // clustered rows through the stored permutation, then the always set
  // (sinks, then the window).
  static uint32_t TokenOfRow(const TestContext& c, int layer, int g, int64_t row) {
    const ContextInfo& info = c.handle->info();
    if (row < info.n_clustered) return c.record(layer, g).permutation[row];
    const int64_t i = row - info.n_clustered;
    return static_cast<uint32_t>(i < info.n_sinks ? i : info.n_tokens - info.window + (i - info.n_sinks));
  }

  // Original token positions of fine clusters `clusters` plus the always set
  // of (layer, kv head), from the stored index record.
  static std::vector<uint32_t> Positions(const TestContext& c, int layer, int g,
                                         const std::vector<uint32_t>& clusters) {
    const ContextInfo& info = c.handle->info();
    const storage::HeadIndexRecord& r = c.record(layer, g);
    std::vector<uint32_t> pos;
    for (int64_t row = info.n_clustered; row < info.n_tokens; ++row) pos.push_back(TokenOfRow(c, layer, g, row));
    for (uint32_t j : clusters) {
      for (uint32_t p = r.fine_offsets[j]; p < r.fine_offsets[j + 1]; ++p) pos.push_back(r.permutation[p]);
    }
    return pos;
  }

  // Brute force: the maximal runs of stored rows covered by fine clusters
  // `clusters` of (layer, g), then the always set, as segments.
  static std::vector<Segment> Runs(const TestContext& c, int layer, int g, const std::vector<uint32_t>& clusters) {
    const ContextInfo& info = c.handle->info();
    const storage::HeadIndexRecord& r = c.record(layer, g);
    std::vector<bool> in(static_cast<size_t>(info.n_clustered), false);
    for (uint32_t j : clusters) {
      for (uint32_t p = r.fine_offsets[j]; p < r.fine_offsets[j + 1]; ++p) in[p] = true;
    }
    std::vector<Segment> out;
    for (int64_t row = 0; row < info.n_clustered;) {
      if (!in[row]) {
        ++row;
        continue;
      }
      int64_t end = row;
      while (end < info.n_clustered && in[end]) ++end;
      out.push_back(Segment{static_cast<uint32_t>(row), static_cast<uint32_t>(end - row)});
      row = end;
    }
    if (info.n_always() > 0) {
      out.push_back(Segment{static_cast<uint32_t>(info.n_clustered), static_cast<uint32_t>(info.n_always())});
    }
    return out;
  }

  // The pages holding `segments` (ascending page ids), from the page geometry:
  // clustered row r in page r / P, always row n_clustered + i in page
  // clustered_pages + i / P.
  static std::vector<uint32_t> PagesOf(const ContextInfo& info, const std::vector<Segment>& segments) {
    std::set<uint32_t> pages;
    for (const Segment& s : segments) {
      for (int64_t row = s.first_row; row < static_cast<int64_t>(s.first_row) + s.n_rows; ++row) {
        pages.insert(static_cast<uint32_t>(row < info.n_clustered
                                               ? row / info.page_rows
                                               : info.clustered_pages + (row - info.n_clustered) / info.page_rows));
      }
    }
    return std::vector<uint32_t>(pages.begin(), pages.end());
  }

  // Segments as (first_row, n_rows) pairs (comparable, printable).
  using Runs_t = std::vector<std::pair<uint32_t, uint32_t>>;
  static Runs_t Pairs(const Segment* b, const Segment* e) {
    Runs_t out;
    for (; b != e; ++b) out.emplace_back(b->first_row, b->n_rows);
    return out;
  }
  static Runs_t Pairs(const std::vector<Segment>& v) { return Pairs(v.data(), v.data() + v.size()); }

  // The first T of the context's test queries of every head: [n_q, T, d].
  static std::vector<float> FirstQueries(const TestContext& c, int layer, int T) {
    const int d = c.spec.head_dim;
    std::vector<float> q;
    for (int h = 0; h < c.spec.n_q_heads; ++h) {
      q.insert(q.end(), c.q[layer].begin() + static_cast<size_t>(h) * c.T * d,
               c.q[layer].begin() + (static_cast<size_t>(h) * c.T + T) * d);
    }
    return q;
  }

  static std::vector<uint32_t> AllPositions(const TestContext& c) {
    std::vector<uint32_t> all(c.spec.n_tokens);
    for (uint32_t i = 0; i < all.size(); ++i) all[i] = i;
    return all;
  }

  testing::ScopedTempDir dir_{"sqz-query"};
  std::unique_ptr<DB> db_;
};

KvSpec SmallSpec(int n_kv, int n_q, int64_t n_tokens = 2048, int d = 64, DType dtype = DType::kF16) {
  KvSpec s;
  s.n_layers = 2;
  s.n_kv_heads = n_kv;
  s.n_q_heads = n_q;
  s.n_tokens = n_tokens;
  s.head_dim = d;
  s.dtype = dtype;
  s.seed = 11;
  return s;
}

TEST_F(QueryEngineTest, DenseAndFullBudgetEqualDenseAttention) {
  struct Case {
    const char* name;
    int n_kv, n_q;
    DType dtype;
  };
  for (const Case& cs :
       {Case{"mha", 2, 2, DType::kF16}, Case{"gqa", 2, 4, DType::kF16}, Case{"gqa_bf16", 1, 4, DType::kBF16}}) {
    TestContext c;
    BuildOptions bo;
    bo.window = 64;
    Build(cs.name, SmallSpec(cs.n_kv, cs.n_q, 2048, 64, cs.dtype), 6, false, bo, &c);
    const auto all = AllPositions(c);
    for (int T : {1, 6}) {
      for (int layer = 0; layer < 2; ++layer) {
        const std::vector<float> q = FirstQueries(c, layer, T);
        for (int variant = 0; variant < 4; ++variant) {
          QueryOptions qo;
          qo.mode = variant == 0 ? SelectionMode::kDense : SelectionMode::kBudget;
          qo.budget = 1.0;
          qo.hierarchical = variant == 2;
          qo.per_query_selection = variant == 3;
          qo.gqa = variant == 3 ? GqaPolicy::kPerHead : GqaPolicy::kUnion;
          std::vector<float> o(q.size()), lse(o.size() / c.spec.head_dim);
          AttendStats st;
          Status s = c.handle->Attend(layer, q.data(), T, qo, o.data(), lse.data(), &st);
          ASSERT_TRUE(s.ok()) << s.ToString();
          ExpectMatchesFor(
              c, layer, q, T, o, lse, [&](int, int, int) { return all; },
              std::string(cs.name) + " T " + std::to_string(T) + " variant " + std::to_string(variant));
          // Everything was read: every page of the layer (all K+V bytes,
          // padding included).
          const ContextInfo& info = c.handle->info();
          EXPECT_GE(info.pages_per_head() * static_cast<int64_t>(info.page_rows), c.spec.n_tokens);
          EXPECT_EQ(st.bytes_read(), static_cast<uint64_t>(c.spec.n_kv_heads * info.pages_per_head()) * 2 *
                                         info.page_rows * c.spec.head_dim * 2);
          for (const HeadStats& hs : st.heads) EXPECT_EQ(hs.pages_read, info.pages_per_head());
          EXPECT_EQ(st.keys_selected(), c.handle->info().n_clustered * c.spec.n_kv_heads);
        }
      }
    }
  }
}

TEST_F(QueryEngineTest, AttentionIsExactOverTheSelection) {
  TestContext c;
  BuildOptions bo;
  bo.window = 48;
  bo.n_sinks = 3;
  Build("sel", SmallSpec(2, 6), 5, true, bo, &c);
  const auto& impl = static_cast<const query::ContextHandleImpl&>(*c.handle);
  const ContextInfo& info = c.handle->info();
  const int G = 3;
  int variants = 0;
  for (int layer = 0; layer < 2; ++layer) {
    for (bool hier : {false, true}) {
      for (GqaPolicy gqa : {GqaPolicy::kUnion, GqaPolicy::kPerHead}) {
        for (bool per_query : {false, true}) {
          for (int mode = 0; mode < 3; ++mode) {
            QueryOptions qo;
            qo.hierarchical = hier;
            qo.gqa = gqa;
            qo.per_query_selection = per_query;
            if (mode == 0) qo.budget = 0.1;
            if (mode == 1) qo.budget = 0;  // the always set alone
            if (mode == 2) {
              qo.mode = SelectionMode::kThreshold;
              qo.threshold_quantile = 0.8;
            }
            // The selection, brute force from the selection functions.
            query::SelectionParams params;
            Status s = impl.Resolve(qo, &params);
            ASSERT_TRUE(s.ok()) << s.ToString();
            const int d = c.spec.head_dim;
            std::vector<query::HeadSelection> sels(2);
            for (int g = 0; g < 2; ++g) {
              query::SelectHead(impl.View(layer, g), c.q[layer].data() + static_cast<size_t>(g) * G * c.T * d, G, c.T,
                                params, &sels[g]);
            }
            // The plan is exactly that selection as runs of stored rows.
            SegmentTable table;
            s = c.handle->Plan(layer, c.q[layer].data(), c.T, qo, &table);
            ASSERT_TRUE(s.ok()) << s.ToString();
            ASSERT_EQ(table.n_kv_heads, 2);
            ASSERT_EQ(table.group_size, G);
            ASSERT_EQ(table.T, c.T);
            ASSERT_EQ(table.page_rows, info.page_rows);
            ASSERT_EQ(table.row_set.size(), static_cast<size_t>(2 * G * c.T));
            for (int g = 0; g < 2; ++g) {
              for (int gl = 0; gl < G; ++gl) {
                for (int t = 0; t < c.T; ++t) {
                  const int32_t set = table.row_set[(static_cast<size_t>(g) * G + gl) * c.T + t];
                  ASSERT_GE(set, 0);
                  ASSERT_LT(set, table.n_sets());
                  EXPECT_EQ(table.set_kv_head[set], g);
                  const auto& sel = sels[g];
                  EXPECT_EQ(Pairs(table.segments.data() + table.set_offsets[set],
                                  table.segments.data() + table.set_offsets[set + 1]),
                            Pairs(Runs(c, layer, g, sel.sets[sel.set_of[static_cast<size_t>(gl) * c.T + t]])))
                      << "head " << g << " query head " << gl << " t " << t;
                }
              }
              const std::vector<Segment> read = Runs(c, layer, g, sels[g].read);
              EXPECT_EQ(Pairs(table.read_segments.data() + table.read_offsets[g],
                              table.read_segments.data() + table.read_offsets[g + 1]),
                        Pairs(read));
              EXPECT_EQ(std::vector<uint32_t>(table.pages.begin() + table.page_offsets[g],
                                              table.pages.begin() + table.page_offsets[g + 1]),
                        PagesOf(info, read));
              EXPECT_EQ(table.clusters_read[g], static_cast<int64_t>(sels[g].read.size()));
            }
            std::vector<float> o(c.q[layer].size()), lse(o.size() / c.spec.head_dim);
            AttendStats st;
            s = c.handle->Attend(layer, c.q[layer].data(), c.T, qo, o.data(), lse.data(), &st);
            ASSERT_TRUE(s.ok()) << s.ToString();
            ExpectMatches(
                c, layer, o, lse,
                [&](int g, int gl, int t) {
                  const auto& sel = sels[g];
                  return Positions(c, layer, g, sel.sets[sel.set_of[static_cast<size_t>(gl) * c.T + t]]);
                },
                "selection variant");
            // Stats describe exactly what was selected and read.
            ASSERT_EQ(st.heads.size(), 2u);
            for (int g = 0; g < 2; ++g) {
              const auto& h = impl.head(layer, g);
              int64_t keys = 0;
              for (uint32_t j : sels[g].read) keys += h.fine_sizes[j];
              const std::vector<Segment> read = Runs(c, layer, g, sels[g].read);
              const int64_t pages = static_cast<int64_t>(PagesOf(info, read).size());
              EXPECT_EQ(st.heads[g].keys_selected, keys);
              EXPECT_EQ(st.heads[g].clusters_selected, static_cast<int64_t>(sels[g].read.size()));
              EXPECT_EQ(st.heads[g].clusters_scored, table.clusters_scored[g]);
              EXPECT_EQ(st.heads[g].segments_read, static_cast<int64_t>(read.size()));
              EXPECT_EQ(st.heads[g].pages_read, pages);
              EXPECT_EQ(st.heads[g].bytes_read, static_cast<uint64_t>(pages) * info.page_bytes());
              EXPECT_EQ(info.page_bytes(), static_cast<size_t>(2 * info.page_rows * c.spec.head_dim * 2));
              // Whole pages: at least the rows read, at most one partial
              // page per end of every run.
              EXPECT_GE(pages * info.page_rows, keys + info.n_always());
              EXPECT_LE(pages * info.page_rows,
                        keys + info.n_always() + 2 * static_cast<int64_t>(read.size()) * (info.page_rows - 1));
              int64_t attended = 0;
              for (int gl = 0; gl < G; ++gl) {
                for (int t = 0; t < c.T; ++t) {
                  attended += info.n_always();
                  for (uint32_t j : sels[g].sets[sels[g].set_of[static_cast<size_t>(gl) * c.T + t]]) {
                    attended += h.fine_sizes[j];
                  }
                }
              }
              EXPECT_EQ(st.heads[g].keys_attended, attended);
              if (mode == 1) {
                EXPECT_EQ(keys, 0);
              }
              if (mode == 0) {
                EXPECT_GE(keys, 0.1 * c.handle->info().n_clustered);
                EXPECT_GT(st.heads[g].clusters_scored, 0);
              }
            }
            ++variants;
          }
        }
      }
    }
  }
  EXPECT_EQ(variants, 48);
}

TEST_F(QueryEngineTest, HugeQueryNormsGiveFiniteResults) {
  TestContext c;
  BuildOptions bo;
  bo.window = 32;
  Build("huge", SmallSpec(1, 2), 2, false, bo, &c);
  for (float norm : {1e4f, 1e36f}) {
    std::vector<float> q = c.q[0];
    for (float& x : q) x *= norm;
    for (bool hier : {false, true}) {
      QueryOptions qo;
      qo.hierarchical = hier;
      std::vector<float> o(q.size()), lse(q.size() / c.spec.head_dim);
      ASSERT_TRUE(c.handle->Attend(0, q.data(), c.T, qo, o.data(), lse.data()).ok());
      for (float x : o) ASSERT_TRUE(std::isfinite(x)) << norm;
      for (float x : lse) ASSERT_TRUE(std::isfinite(x)) << norm;
    }
  }
}

// Queries at the edge of fp32 (1e38): either a finite answer or a clear
// overflow error, never NaN/Inf with OK (the library's own check, not only
// sqctl's).
TEST_F(QueryEngineTest, OverflowingQueriesAreAnErrorNotNaN) {
  TestContext c;
  Build("edge", SmallSpec(1, 2), 2, false, BuildOptions(), &c);
  int errors = 0;
  for (float norm : {1e37f, 1e38f}) {
    std::vector<float> q = c.q[0];
    float max_abs = 0;
    for (float x : q) max_abs = std::max(max_abs, std::fabs(x));
    for (float& x : q) x = x / max_abs * norm;
    for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kBudget}) {
      QueryOptions qo;
      qo.mode = mode;
      std::vector<float> o(q.size(), NAN), lse(q.size() / c.spec.head_dim, NAN);
      Status s = c.handle->Attend(0, q.data(), c.T, qo, o.data(), lse.data());
      if (s.ok()) {
        for (float x : o) ASSERT_TRUE(std::isfinite(x)) << norm;
        for (float x : lse) ASSERT_FALSE(std::isnan(x) || x == INFINITY) << norm;
      } else {
        ++errors;
        EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
        EXPECT_NE(s.message().find("overflow"), std::string::npos) << s.ToString();
      }
    }
  }
  std::printf("[ info ] %d of 4 edge calls refused as overflowing\n", errors);
}

TEST_F(QueryEngineTest, ClearErrors) {
  TestContext plain, calibrated;
  BuildOptions bo;
  bo.window = 32;
  Build("plain", SmallSpec(1, 2), 2, false, bo, &plain);
  Build("calibrated", SmallSpec(1, 2), 4, true, bo, &calibrated);

  std::unique_ptr<ContextHandle> h;
  Status s = ContextHandle::Open(db_.get(), "nope", &h);
  EXPECT_TRUE(s.IsNotFound()) << s.ToString();
  EXPECT_NE(s.message().find("nope"), std::string::npos) << s.ToString();

  const ContextHandle& p = *plain.handle;
  std::vector<float> q = plain.q[0], o(q.size()), lse(q.size() / 64);
  QueryOptions qo;
  auto expect_invalid = [&](const Status& st, const std::string& needle) {
    EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
    EXPECT_NE(st.message().find(needle), std::string::npos) << st.ToString() << " lacks '" << needle << "'";
  };
  expect_invalid(p.Attend(2, q.data(), 2, qo, o.data(), lse.data()), "layer 2 out of range");
  expect_invalid(p.Attend(-1, q.data(), 2, qo, o.data(), lse.data()), "out of range");
  expect_invalid(p.Attend(0, q.data(), 0, qo, o.data(), lse.data()), "T must be >= 1");
  expect_invalid(p.Attend(0, nullptr, 2, qo, o.data(), lse.data()), "null");
  expect_invalid(p.Attend(0, q.data(), 2, qo, nullptr, lse.data()), "null");
  std::vector<float> bad = q;
  bad[64 * 3 + 5] = NAN;  // query head 1, token 1
  expect_invalid(p.Attend(0, bad.data(), 2, qo, o.data(), lse.data()), "query head 1 token 1");
  bad[64 * 3 + 5] = INFINITY;
  expect_invalid(p.Attend(0, bad.data(), 2, qo, o.data(), lse.data()), "NaN/Inf");

  qo.mode = SelectionMode::kThreshold;
  qo.threshold_quantile = 0.9;
  expect_invalid(p.Attend(0, q.data(), 2, qo, o.data(), lse.data()), "not calibrated");
  // The explicit threshold needs no calibration.
  qo.threshold_quantile = -1;
  qo.threshold = 1e-4f;
  EXPECT_TRUE(p.Attend(0, q.data(), 2, qo, o.data(), lse.data()).ok());

  const ContextHandle& cal = *calibrated.handle;
  std::vector<float> q4 = calibrated.q[0], o4(q4.size()), l4(q4.size() / 64);
  qo.threshold_quantile = 0.33;
  expect_invalid(cal.Attend(0, q4.data(), 4, qo, o4.data(), l4.data()), "no threshold calibrated at quantile 0.33");
  for (double f : cal.info().thresholds.empty() ? std::vector<double>{} : std::vector<double>{0.5, 0.9}) {
    qo.threshold_quantile = f;
    for (bool hier : {false, true}) {
      qo.hierarchical = hier;
      Status st = cal.Attend(0, q4.data(), 4, qo, o4.data(), l4.data());
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
  }
  EXPECT_FALSE(cal.info().thresholds.empty());
}

TEST_F(QueryEngineTest, ConcurrentAttendEqualsSerial) {
  TestContext c;
  BuildOptions bo;
  bo.window = 32;
  Build("conc", SmallSpec(2, 4), 3, true, bo, &c);
  struct Job {
    int layer;
    int T;
    QueryOptions options;
    std::vector<float> q;
    std::vector<float> o, lse;
  };
  std::vector<Job> jobs;
  for (int i = 0; i < 24; ++i) {
    Job j;
    j.layer = i % 2;
    j.T = (i % 3 == 0) ? 1 : 3;
    j.options.budget = 0.05 + 0.02 * (i % 5);
    j.options.hierarchical = i % 4 == 1;
    j.options.gqa = i % 2 ? GqaPolicy::kPerHead : GqaPolicy::kUnion;
    j.options.per_query_selection = i % 6 == 2;
    if (i % 7 == 3) {
      j.options.mode = SelectionMode::kThreshold;
      j.options.threshold_quantile = 0.8;
    }
    j.q = FirstQueries(c, j.layer, j.T);
    jobs.push_back(std::move(j));
  }
  auto run = [&](Job& j, std::vector<float>* o, std::vector<float>* lse) {
    o->assign(j.q.size(), 0.0f);
    lse->assign(j.q.size() / c.spec.head_dim, 0.0f);
    return c.handle->Attend(j.layer, j.q.data(), j.T, j.options, o->data(), lse->data());
  };
  for (Job& j : jobs) ASSERT_TRUE(run(j, &j.o, &j.lse).ok());
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<float> o, lse;
      for (int rep = 0; rep < 3; ++rep) {
        for (size_t i = t; i < jobs.size(); i += 2) {  // overlapping subsets
          if (!run(jobs[i], &o, &lse).ok() || o != jobs[i].o || lse != jobs[i].lse) ++mismatches[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

TEST_F(QueryEngineTest, WrongPageSizeIsCorruption) {
  TestContext c;
  BuildOptions bo;
  bo.window = 32;
  Build("corrupt", SmallSpec(1, 2), 2, false, bo, &c);
  // Replace KV page 0 of layer 1 with one that lost a row's worth of bytes.
  auto v = index_test::RawView(db_.get());
  const std::string key = storage::PageKey(c.handle->info().id, 1, 0, 0);
  std::string value;
  ASSERT_TRUE(v->db->Get(rocksdb::ReadOptions(), v->cf_kv, key, &value).ok());
  ASSERT_EQ(value.size(), c.handle->info().page_bytes());
  value.resize(value.size() - 2 * c.spec.head_dim);
  ASSERT_TRUE(v->db->Put(rocksdb::WriteOptions(), v->cf_kv, key, value).ok());
  std::vector<float> o(c.q[1].size()), lse(o.size() / c.spec.head_dim);
  QueryOptions qo;
  qo.mode = SelectionMode::kDense;
  // The handle opened before the damage reads its own version, intact.
  Status s = c.handle->Attend(1, c.q[1].data(), 2, qo, o.data(), lse.data());
  EXPECT_TRUE(s.ok()) << s.ToString();
  // A handle opened now reads the damaged page.
  std::unique_ptr<ContextHandle> h;
  ASSERT_TRUE(ContextHandle::Open(db_.get(), "corrupt", &h).ok());
  s = h->Attend(1, c.q[1].data(), 2, qo, o.data(), lse.data());
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("layer 1 KV head 0: KV page 0 has"), std::string::npos) << s.ToString();
  std::vector<float> k(static_cast<size_t>(c.spec.head_dim)), vv(k.size());
  s = h->ReadRows(1, 0, 0, 1, k.data(), vv.data());
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  // Layer 0 is intact.
  EXPECT_TRUE(h->Attend(0, c.q[0].data(), 2, qo, o.data(), lse.data()).ok());
}

TEST_F(QueryEngineTest, ReadRowsReturnsTheStoredRowsInPermutedOrder) {
  TestContext c;
  BuildOptions bo;
  bo.window = 40;
  bo.n_sinks = 3;
  bo.page_rows = 24;  // pages straddle cluster boundaries; both runs end in a partial page
  Build("rows", SmallSpec(2, 4, 1000, 32, DType::kBF16), 2, false, bo, &c);
  const ContextInfo& info = c.handle->info();
  ASSERT_EQ(info.page_rows, 24);
  const int d = c.spec.head_dim;
  const int64_t n = info.n_tokens;
  for (int layer = 0; layer < 2; ++layer) {
    for (int g = 0; g < 2; ++g) {
      SCOPED_TRACE("layer " + std::to_string(layer) + " head " + std::to_string(g));
      // Every row, bit for bit the stored (source) value of its token.
      std::vector<float> k(static_cast<size_t>(n) * d), v(k.size());
      uint64_t bytes = 0;
      Status s = c.handle->ReadRows(layer, g, 0, n, k.data(), v.data(), &bytes);
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(bytes, static_cast<uint64_t>(info.pages_per_head()) * info.page_bytes());
      const float* kh = c.k[layer].data() + static_cast<size_t>(g) * n * d;
      const float* vh = c.v[layer].data() + static_cast<size_t>(g) * n * d;
      for (int64_t row = 0; row < n; ++row) {
        const uint32_t tok = TokenOfRow(c, layer, g, row);
        for (int e = 0; e < d; ++e) {
          ASSERT_EQ(k[row * d + e], kh[static_cast<size_t>(tok) * d + e]) << "K row " << row;
          ASSERT_EQ(v[row * d + e], vh[static_cast<size_t>(tok) * d + e]) << "V row " << row;
        }
      }
      // A range across the clustered/always boundary reads the same rows and
      // only the pages holding them.
      const int64_t first = info.n_clustered - 30, count = 45;
      std::vector<float> k2(static_cast<size_t>(count) * d), v2(k2.size());
      s = c.handle->ReadRows(layer, g, first, count, k2.data(), v2.data(), &bytes);
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_TRUE(std::equal(k2.begin(), k2.end(), k.begin() + first * d));
      EXPECT_TRUE(std::equal(v2.begin(), v2.end(), v.begin() + first * d));
      const std::vector<Segment> segs = {
          Segment{static_cast<uint32_t>(first), static_cast<uint32_t>(info.n_clustered - first)},
          Segment{static_cast<uint32_t>(info.n_clustered), static_cast<uint32_t>(first + count - info.n_clustered)}};
      EXPECT_EQ(bytes, PagesOf(info, segs).size() * info.page_bytes());
    }
  }
  std::vector<float> k(static_cast<size_t>(d)), v(k.size());
  EXPECT_TRUE(c.handle->ReadRows(0, 0, n, 1, k.data(), v.data()).IsInvalidArgument());
  EXPECT_TRUE(c.handle->ReadRows(0, 0, -1, 1, k.data(), v.data()).IsInvalidArgument());
  EXPECT_TRUE(c.handle->ReadRows(2, 0, 0, 1, k.data(), v.data()).IsInvalidArgument());
  EXPECT_TRUE(c.handle->ReadRows(0, 2, 0, 1, k.data(), v.data()).IsInvalidArgument());
  // A handle serving KV head 1 only reads only that head.
  OpenOptions oo;
  oo.kv_head_begin = 1;
  std::unique_ptr<ContextHandle> h1;
  ASSERT_TRUE(ContextHandle::Open(db_.get(), "rows", oo, &h1).ok());
  EXPECT_TRUE(h1->ReadRows(0, 0, 0, 1, k.data(), v.data()).IsInvalidArgument());
  std::vector<float> k1(k.size()), v1(k.size());
  ASSERT_TRUE(h1->ReadRows(0, 1, 5, 1, k1.data(), v1.data()).ok());
  ASSERT_TRUE(c.handle->ReadRows(0, 1, 5, 1, k.data(), v.data()).ok());
  EXPECT_EQ(k1, k);
  EXPECT_EQ(v1, v);
}

// A tensor-parallel rank opens only its KV heads: its q / o / lse cover
// only their query heads, its outputs and segment tables equal the full
// handle's for those heads, and bad ranges and devices are refused.
TEST_F(QueryEngineTest, HeadRangeHandleServesItsHeadsOnly) {
  TestContext c;
  KvSpec spec = SmallSpec(3, 6, 1500, 64);  // 3 KV heads, G = 2
  Build("tp", spec, 4, false, BuildOptions(), &c);
  const ContextInfo& info = c.handle->info();
  const int d = info.head_dim, G = info.group_size(), T = c.T;
  for (const bool prefill_shared : {false, true}) {
    QueryOptions qo;
    qo.per_query_selection = !prefill_shared;
    std::vector<float> o(c.q[1].size()), lse(o.size() / d);
    ASSERT_TRUE(c.handle->Attend(1, c.q[1].data(), T, qo, o.data(), lse.data()).ok());
    SegmentTable full;
    ASSERT_TRUE(c.handle->Plan(1, c.q[1].data(), T, qo, &full).ok());
    for (const auto& [b, e] : {std::pair{0, 1}, std::pair{1, 3}, std::pair{2, 3}}) {
      OpenOptions oo;
      oo.kv_head_begin = b;
      oo.kv_head_end = e;
      std::unique_ptr<ContextHandle> h;
      ASSERT_TRUE(ContextHandle::Open(db_.get(), "tp", oo, &h).ok());
      EXPECT_EQ(h->kv_head_begin(), b);
      EXPECT_EQ(h->kv_head_end(), e);
      EXPECT_EQ(h->n_served_q_heads(), (e - b) * G);
      EXPECT_EQ(h->generation(), c.handle->generation());
      const size_t first = static_cast<size_t>(b) * G * T, rows = static_cast<size_t>(e - b) * G * T;
      std::vector<float> q(c.q[1].begin() + first * d, c.q[1].begin() + (first + rows) * d);
      std::vector<float> ho(q.size()), hl(rows);
      AttendStats st;
      Status s = h->Attend(1, q.data(), T, qo, ho.data(), hl.data(), &st);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_EQ(st.heads.size(), static_cast<size_t>(e - b));
      for (size_t i = 0; i < q.size(); ++i) ASSERT_EQ(ho[i], o[first * d + i]) << "range " << b << ".." << e;
      for (size_t i = 0; i < rows; ++i) ASSERT_EQ(hl[i], lse[first + i]);
      SegmentTable part;
      ASSERT_TRUE(h->Plan(1, q.data(), T, qo, &part).ok());
      ASSERT_EQ(part.n_kv_heads, e - b);
      for (int hh = 0; hh < e - b; ++hh) {
        const int g = b + hh;
        EXPECT_TRUE(
            std::equal(part.pages.begin() + part.page_offsets[hh], part.pages.begin() + part.page_offsets[hh + 1],
                       full.pages.begin() + full.page_offsets[g], full.pages.begin() + full.page_offsets[g + 1]))
            << "pages of KV head " << g;
      }
    }
  }
  OpenOptions bad;
  std::unique_ptr<ContextHandle> h;
  bad.kv_head_begin = 2;
  bad.kv_head_end = 2;
  EXPECT_TRUE(ContextHandle::Open(db_.get(), "tp", bad, &h).IsInvalidArgument());
  bad.kv_head_begin = 0;
  bad.kv_head_end = 4;
  EXPECT_TRUE(ContextHandle::Open(db_.get(), "tp", bad, &h).IsInvalidArgument());
  bad.kv_head_begin = -1;
  bad.kv_head_end = -1;
  EXPECT_TRUE(ContextHandle::Open(db_.get(), "tp", bad, &h).IsInvalidArgument());
  OpenOptions cuda;
  cuda.device = Device::kCuda;
  if (gpu::DeviceCount() == 0) {
    const Status cs = ContextHandle::Open(db_.get(), "tp", cuda, &h);
    EXPECT_TRUE(cs.IsNotSupported()) << cs.ToString();
    EXPECT_NE(cs.message().find("cuda"), std::string::npos) << cs.ToString();
  }
  OpenOptions cpu_resident;
  cpu_resident.residency = Residency::kDevice;  // the CPU engine reads from storage
  EXPECT_TRUE(ContextHandle::Open(db_.get(), "tp", cpu_resident, &h).IsNotSupported());
  // The device call is declared; a CPU handle says so.
  size_t ws = 0;
  EXPECT_TRUE(c.handle->DeviceWorkspaceBytes(1, QueryOptions(), &ws).IsNotSupported());
  EXPECT_TRUE(c.handle->AttendDevice(DeviceAttendArgs(), QueryOptions()).IsNotSupported());
}

TEST_F(QueryEngineTest, OnlyTheAlwaysSetWhenNothingIsClustered) {
  TestContext c;
  BuildOptions bo;
  bo.window = 100;  // more than n_tokens: clamped, nothing left to cluster
  bo.n_sinks = 2;
  KvSpec spec = SmallSpec(1, 2, 64, 32);
  Build("tiny", spec, 2, false, bo, &c);
  EXPECT_EQ(c.handle->info().n_clustered, 0);
  const auto all = AllPositions(c);
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kBudget}) {
    for (bool hier : {false, true}) {
      QueryOptions qo;
      qo.mode = mode;
      qo.hierarchical = hier;
      std::vector<float> o(c.q[0].size()), lse(o.size() / 32);
      AttendStats st;
      Status s = c.handle->Attend(0, c.q[0].data(), 2, qo, o.data(), lse.data(), &st);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ExpectMatches(
          c, 0, o, lse, [&](int, int, int) { return all; }, "no clusters");
      EXPECT_EQ(st.keys_selected(), 0);
    }
  }
}

}  // namespace
}  // namespace sqz
