// sqctl demo: the README's main job. Generates a small synthetic corpus
// (labelled synthetic), indexes it into an embedded database, queries one
// context, and prints what a user needs to judge the result: keys read,
// recall against the oracle, output error, and speed against dense attention
// measured in the same run on this machine.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "cli.h"
#include "format.h"
#include "query/eval.h"
#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "sqz/query.h"
#include "synth/synthetic.h"

namespace sqz::cli {
namespace {

using Clock = std::chrono::steady_clock;

double MedianAttend(const ContextHandle& h, int layer, const std::vector<float>& q, int T, const QueryOptions& o,
                    int reps, AttendStats* stats, Status* s) {
  std::vector<float> out(q.size()), lse(q.size() / h.info().head_dim);
  *s = h.Attend(layer, q.data(), T, o, out.data(), lse.data(), stats);  // warm-up (fills the block cache)
  std::vector<double> t;
  for (int r = 0; r < reps && s->ok(); ++r) {
    auto a = Clock::now();
    *s = h.Attend(layer, q.data(), T, o, out.data(), lse.data(), stats);
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  if (t.empty()) return 0;
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int RunDemo(const Args& args) {
  const std::string cmd = "demo";
  const std::filesystem::path dir = args.Get("dir", "demo-data");
  int64_t tokens;
  Status s = args.GetInt("tokens", int64_t{16384}, int64_t{1024}, std::numeric_limits<int64_t>::max(), &tokens);
  if (!s.ok()) return Usage(cmd, s.message());

  synth::Spec spec;
  spec.n_layers = 2;
  spec.n_kv_heads = 4;
  spec.n_q_heads = 16;
  spec.n_tokens = tokens;
  spec.head_dim = 128;
  spec.q_window = 100;
  spec.n_queries = 16;
  const int n_contexts = 2;
  std::printf("== 1. sample corpus (SYNTHETIC: LLM-like structure, not a real model's KV cache)\n");
  std::vector<std::string> paths;
  s = synth::WriteCorpus(spec, n_contexts, (dir / "corpus").string(), &paths);
  if (!s.ok()) return Fail(cmd, s);
  std::printf("   %d contexts x %lld tokens, %d layers, %d query / %d KV heads, head_dim %d, fp16 -> %s\n", n_contexts,
              static_cast<long long>(tokens), spec.n_layers, spec.n_q_heads, spec.n_kv_heads, spec.head_dim,
              (dir / "corpus").c_str());

  std::printf("== 2. build the index into %s\n", (dir / "db").c_str());
  std::unique_ptr<DB> db;
  s = OpenDatabase((dir / "db").string(), OpenMode::kCreate, &db);
  if (!s.ok()) return Fail(cmd, s);
  for (const auto& p : paths) {
    std::unique_ptr<KvSource> src;
    s = OpenSafetensorsKvSource(p, &src);
    BuildStats st;
    BuildOptions o;
    o.replace = true;
    const std::string name = std::filesystem::path(p).stem().string();
    if (s.ok()) s = BuildContext(db.get(), name, src.get(), o, &st);
    if (!s.ok()) return Fail(cmd, s.WithPrefix("building '" + name + "'"));
    std::printf("   %s: %s, %.2f Mkeys/s clustered, KV %s + index %s\n", name.c_str(),
                FormatSeconds(st.seconds_total).c_str(), st.keys_clustered / st.seconds_total / 1e6,
                FormatBytes(st.kv_bytes).c_str(), FormatBytes(st.index_bytes).c_str());
  }

  const std::string ctx = "ctx_000";
  std::unique_ptr<ContextHandle> handle;
  s = ContextHandle::Open(db.get(), ctx, &handle);
  if (!s.ok()) return Fail(cmd, s);
  std::vector<query::LayerQueries> queries;
  s = query::ReadQueriesFile((dir / "corpus" / "queries" / (ctx + ".safetensors")).string(), handle->info(), &queries);
  if (!s.ok()) return Fail(cmd, s);

  std::printf("== 3. accuracy: sparse attention vs dense attention (double precision) on %s's queries\n", ctx.c_str());
  // Budgets 1/8 and 1/4 and two calibrated thresholds keep the table short;
  // `sqctl eval` shows every calibrated quantile.
  std::vector<query::EvalConfig> configs;
  for (auto& c : query::DefaultEvalConfigs(handle->info(), {0.125, 0.25})) {
    const double f = c.options.threshold_quantile;
    if (c.options.mode != SelectionMode::kThreshold || f == 0.7 || f == 0.9) configs.push_back(std::move(c));
  }
  query::EvalReport report;
  s = query::Evaluate(*handle, queries, configs, query::EvalOptions(), &report);
  if (!s.ok()) return Fail(cmd, s);
  std::printf("%s", query::FormatEvalReport(report).c_str());

  std::printf("== 4. speed: one layer, decode (T = 1) and prefill (T = %d), warm block cache, this machine\n",
              queries[0].T);
  const auto& lq = queries[0];
  std::vector<float> q1(static_cast<size_t>(spec.n_q_heads) * spec.head_dim);
  for (int h = 0; h < spec.n_q_heads; ++h) {
    std::copy_n(lq.q.begin() + static_cast<size_t>(h) * lq.T * spec.head_dim, spec.head_dim,
                q1.begin() + static_cast<size_t>(h) * spec.head_dim);
  }
  QueryOptions dense;
  dense.mode = SelectionMode::kDense;
  QueryOptions sparse;  // budget 1/8, flat (the defaults)
  for (int T : {1, lq.T}) {
    const std::vector<float>& q = T == 1 ? q1 : lq.q;
    AttendStats sd, ss;
    double td = MedianAttend(*handle, lq.layer, q, T, dense, 9, &sd, &s);
    if (!s.ok()) return Fail(cmd, s);
    double ts = MedianAttend(*handle, lq.layer, q, T, sparse, 9, &ss, &s);
    if (!s.ok()) return Fail(cmd, s);
    std::printf("   T = %-3d dense %8s (%s read)   budget 1/8 %8s (%s read)   speedup %.1fx\n", T,
                FormatSeconds(td).c_str(), FormatBytes(sd.bytes_read()).c_str(), FormatSeconds(ts).c_str(),
                FormatBytes(ss.bytes_read()).c_str(), td / ts);
  }

  const query::EvalConfigResult* b8 = nullptr;
  for (const auto& r : report.results) {
    if (r.config.options.mode == SelectionMode::kBudget && r.config.options.budget == 0.125 &&
        !r.config.options.hierarchical) {
      b8 = &r;
    }
  }
  if (b8) {
    std::printf(
        "\nSummary for %s at budget 1/8 (flat): each KV head read %.1f%% of its clustered keys "
        "(%s of KV instead of %s).\n",
        ctx.c_str(), 100 * b8->read_fraction, FormatBytes(b8->bytes_read).c_str(),
        FormatBytes(b8->bytes_dense).c_str());
    std::printf(
        "  %lld concentrated heads: captured %.1f%% of the true attention mass (best possible with as many "
        "keys: %.1f%%); output error %.2f%% mean, %.2f%% worst.\n",
        static_cast<long long>(report.heads_concentrated), 100 * b8->concentrated.recall_mean,
        100 * b8->concentrated.oracle_mean, 100 * b8->concentrated.error_mean, 100 * b8->concentrated.error_max);
    std::printf(
        "  %lld spread heads: captured %.1f%% (best possible: %.1f%%). Attention spread thinly over the whole\n"
        "  context cannot be captured by 1/8 of it (their output error, %.0f%% mean, is relative to a dense\n"
        "  output close to zero). Such contexts need a larger budget or a calibrated threshold: see the table.\n",
        static_cast<long long>(report.heads_spread), 100 * b8->spread.recall_mean, 100 * b8->spread.oracle_mean,
        100 * b8->spread.error_mean);
  }
  std::printf(
      "Next: sqctl info --db %s --context %s; sqctl query --db %s --context %s --queries %s --out o.safetensors\n",
      (dir / "db").c_str(), ctx.c_str(), (dir / "db").c_str(), ctx.c_str(),
      (dir / "corpus" / "queries" / (ctx + ".safetensors")).c_str());
  return 0;
}

Registrar demo_cmd({"demo",
                    "generate a synthetic sample corpus, index it, query it, compare with dense attention",
                    "sqctl demo [--dir DIR] [--tokens N]",
                    {{"dir", "DIR", "working directory for the corpus and the database (default demo-data)"},
                     {"tokens", "N", "tokens per context (default 16384)"}},
                    RunDemo});

}  // namespace
}  // namespace sqz::cli
