// sqctl query: sparse attention of a queries file over a stored context.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "cli.h"
#include "query/eval.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "util/safetensors.h"

namespace sqz::cli {
namespace {

constexpr const char* kName = "query";

int Usage(const std::string& msg) { return cli::Usage(kName, msg); }

// Parses the selection flags into options; returns 0, or 2 after printing a
// usage error.
int ParseSelection(const Args& args, QueryOptions* o, std::string* describe) {
  int modes = args.Has("budget") + args.Has("threshold-quantile") + args.Has("threshold") + args.Has("dense");
  if (modes > 1) return Usage("--budget, --threshold-quantile, --threshold and --dense are exclusive");
  Status s;
  std::ostringstream d;
  if (args.Has("dense")) {
    o->mode = SelectionMode::kDense;
    d << "dense";
  } else if (args.Has("threshold-quantile")) {
    o->mode = SelectionMode::kThreshold;
    s = args.GetDouble("threshold-quantile", -1, kFractionOpen, &o->threshold_quantile);
    d << "threshold at quantile " << o->threshold_quantile;
  } else if (args.Has("threshold")) {
    o->mode = SelectionMode::kThreshold;
    double t = 0, tc = 0;
    s = args.GetDouble("threshold", 0, kAnyFinite, &t);
    if (s.ok()) s = args.GetDouble("threshold-coarse", t, kAnyFinite, &tc);
    o->threshold = static_cast<float>(t);
    o->threshold_coarse = static_cast<float>(tc);
    d << "threshold " << t;
    if (args.Has("hierarchical")) d << " (coarse " << tc << ")";
  } else {
    o->mode = SelectionMode::kBudget;
    s = args.GetDouble("budget", o->budget, kFractionOpenClosed, &o->budget);
    d << "budget " << o->budget;
  }
  if (!s.ok()) return Usage(s.message());
  if (args.Has("threshold-coarse") && !(args.Has("threshold") && args.Has("hierarchical"))) {
    return Usage("--threshold-coarse needs --threshold and --hierarchical");
  }
  o->hierarchical = args.Has("hierarchical");
  const std::string gqa = args.Get("gqa", "union");
  if (gqa == "union") {
    o->gqa = GqaPolicy::kUnion;
  } else if (gqa == "per-head") {
    o->gqa = GqaPolicy::kPerHead;
  } else {
    return Usage("--gqa must be 'union' or 'per-head', got '" + gqa + "'");
  }
  o->per_query_selection = args.Has("per-query");
  if (o->mode != SelectionMode::kDense) {
    d << (o->hierarchical ? ", hierarchical" : ", flat") << ", gqa " << gqa
      << (o->per_query_selection ? ", per-query selection" : "");
  }
  *describe = d.str();
  return 0;
}

int Run(const Args& args) {
  QueryOptions options;
  std::string mode;
  if (int rc = ParseSelection(args, &options, &mode); rc != 0) return rc;
  const std::string db_path = args.Get("db"), name = args.Get("context"), qpath = args.Get("queries"),
                    out_path = args.Get("out");

  {
    // Writing the output over the input would destroy the queries.
    std::error_code ec;
    if (std::filesystem::exists(out_path, ec) && std::filesystem::equivalent(out_path, qpath, ec)) {
      return Usage("--out " + out_path + " is the queries file (--queries " + qpath +
                   "); writing it would destroy the input: give another path");
    }
  }
  std::unique_ptr<DB> db;
  Status s = OpenDatabase(db_path, OpenMode::kReadOnly, &db);
  if (!s.ok()) return Fail(kName, s.WithPrefix("opening database " + db_path));
  OpenOptions open_options;
  if (Status ds = ParseDevice(args, &open_options); !ds.ok()) return Usage(ds.message());
  std::unique_ptr<ContextHandle> handle;
  s = ContextHandle::Open(db.get(), name, open_options, &handle);
  if (!s.ok()) return Fail(kName, s);
  const ContextInfo& info = handle->info();

  std::vector<query::LayerQueries> layers;
  s = query::ReadQueriesFile(qpath, info, &layers);
  if (!s.ok()) return Fail(kName, s);

  SafetensorsWriter writer;
  writer.SetMetadata("context", name);
  writer.SetMetadata("selection", mode);
  const int d = info.head_dim, n_q = info.n_q_heads;
  int64_t keys_selected = 0, keys_clustered = 0, queries = 0;
  uint64_t bytes_read = 0;
  double sec_score = 0, sec_read = 0, sec_attend = 0;
  Json layers_json = Json::array();
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < layers.size(); ++i) {
    const query::LayerQueries& lq = layers[i];
    std::vector<float> o(static_cast<size_t>(n_q) * lq.T * d), lse(static_cast<size_t>(n_q) * lq.T);
    AttendStats stats;
    s = handle->Attend(lq.layer, lq.q.data(), lq.T, options, o.data(), lse.data(), &stats);
    if (!s.ok()) return Fail(kName, s.WithPrefix(qpath + " (nothing was written)"));
    const std::string prefix = "layers." + std::to_string(lq.layer);
    writer.Add(prefix + ".o", DType::kF32, {n_q, lq.T, d}, o.data());
    writer.Add(prefix + ".lse", DType::kF32, {n_q, lq.T}, lse.data());
    const int64_t clustered = info.n_clustered * info.n_kv_heads;
    keys_selected += stats.keys_selected();
    keys_clustered += clustered;
    bytes_read += stats.bytes_read();
    queries += static_cast<int64_t>(n_q) * lq.T;
    sec_score += stats.seconds_score;
    sec_read += stats.seconds_read;
    sec_attend += stats.seconds_attend;
    Json lj;
    lj["layer"] = lq.layer;
    lj["T"] = lq.T;
    lj["keys_selected"] = stats.keys_selected();
    lj["keys_fraction"] = clustered ? static_cast<double>(stats.keys_selected()) / clustered : 0.0;
    lj["bytes_read"] = stats.bytes_read();
    lj["seconds_score"] = stats.seconds_score;
    lj["seconds_read"] = stats.seconds_read;
    lj["seconds_attend"] = stats.seconds_attend;
    layers_json.push_back(std::move(lj));
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  s = writer.WriteFile(out_path);
  if (!s.ok()) return Fail(kName, s);

  const double keys_fraction = keys_clustered ? static_cast<double>(keys_selected) / keys_clustered : 0.0;
  // Dense reads every block of a layer: the stored K+V bytes of one layer.
  const double dense_bytes = static_cast<double>(info.kv_bytes) / info.n_layers * layers.size();
  const double bytes_fraction = dense_bytes > 0 ? bytes_read / dense_bytes : 0.0;
  if (args.Has("json")) {
    Json j;
    j["context"] = name;
    j["queries"] = qpath;
    j["out"] = out_path;
    j["selection"] = mode;
    j["layers"] = std::move(layers_json);
    j["queries_total"] = queries;
    j["keys_selected"] = keys_selected;
    j["keys_fraction"] = keys_fraction;
    j["bytes_read"] = bytes_read;
    j["bytes_fraction"] = bytes_fraction;
    j["seconds_score"] = sec_score;
    j["seconds_read"] = sec_read;
    j["seconds_attend"] = sec_attend;
    j["seconds_wall"] = wall;
    std::printf("%s\n", JsonDump(j).c_str());
  } else {
    std::printf("context '%s': %zu layer(s), %lld query vectors; selection: %s\n", name.c_str(), layers.size(),
                static_cast<long long>(queries), mode.c_str());
    std::printf("keys read:  %.2f%% of the clustered keys (%lld keys, always set not counted)\n", 100 * keys_fraction,
                static_cast<long long>(keys_selected));
    std::printf("bytes read: %.3f MiB (%.2f%% of dense, always set included)\n", bytes_read / 1048576.0,
                100 * bytes_fraction);
    std::printf("time:       score %.3f ms, read %.3f ms, attend %.3f ms (summed over KV heads); wall %.3f ms\n",
                1e3 * sec_score, 1e3 * sec_read, 1e3 * sec_attend, 1e3 * wall);
    std::printf("wrote %s\n", out_path.c_str());
  }
  return 0;
}

const Registrar kRegistrar(Command{
    kName,
    "sparse attention of a queries file over a stored context (writes O and LSE)",
    "sqctl query --db DIR --context NAME --queries FILE --out FILE [--budget F | --threshold-quantile F | "
    "--threshold X | --dense] [--hierarchical] [--gqa union|per-head] [--per-query] [--json]",
    {
        {"db", "DIR", "database directory", true},
        {"context", "NAME", "context to query", true},
        {"queries", "FILE", "safetensors with layers.{i}.q [n_q_heads, T, head_dim] (F32/F16/BF16), any layers", true},
        {"out", "FILE", "output safetensors: layers.{i}.o [n_q_heads, T, head_dim] F32, layers.{i}.lse F32", true},
        {"budget", "F", "keep clusters by estimated mass up to this fraction of the clustered keys (default 0.125)"},
        {"threshold-quantile", "F", "keep clusters above the context's threshold calibrated at quantile F"},
        {"threshold", "X", "keep clusters whose estimated per-key probability exceeds X"},
        {"threshold-coarse", "X", "with --threshold --hierarchical: coarse-level threshold (default: X)"},
        {"dense", "", "attend every fixed key (exact dense attention)"},
        {"hierarchical", "", "score coarse centroids first, then only children of kept coarse clusters"},
        {"gqa", "POLICY",
         "union (default): with a budget the group selects jointly (the budget bounds the keys read per KV "
         "head), with a threshold each head attends its group's union; per-head: each head its own selection"},
        {"per-query", "", "with T > 1: each query selects alone (default: one selection shared by the T queries)"},
        {"device", "DEV", kDeviceFlagHelp},
        {"json", "", "print the summary as JSON"},
    },
    Run});

}  // namespace
}  // namespace sqz::cli
