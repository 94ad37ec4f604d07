// sqctl eval: accuracy of sparse attention against dense attention.
#include <cstdio>
#include <string>
#include <vector>

#include "cli.h"
#include "format.h"
#include "query/eval.h"
#include "sqz/db.h"
#include "sqz/query.h"

namespace sqz::cli {
namespace {

constexpr const char* kName = "eval";

int Run(const Args& args) {
  std::vector<double> budgets;
  Status s = args.GetDoubleList("budgets", {0.05, 0.125, 0.25}, kFractionOpenClosed, &budgets);
  if (!s.ok()) return Usage(kName, s.message());
  const std::string db_path = args.Get("db"), name = args.Get("context"), qpath = args.Get("queries");

  std::unique_ptr<DB> db;
  s = OpenDatabase(db_path, OpenMode::kReadOnly, &db);
  if (!s.ok()) return Fail(kName, s.WithPrefix("opening database " + db_path));
  OpenOptions open_options;
  if (Status ds = ParseDevice(args, &open_options); !ds.ok()) return Usage(kName, ds.message());
  std::unique_ptr<ContextHandle> handle;
  s = ContextHandle::Open(db.get(), name, open_options, &handle);
  if (!s.ok()) return Fail(kName, s);

  std::vector<query::LayerQueries> layers;
  s = query::ReadQueriesFile(qpath, handle->info(), &layers);
  if (!s.ok()) return Fail(kName, s);

  s = CheckQueriesAttendFinite(*handle, layers);
  if (!s.ok()) return Fail(kName, s.WithPrefix(qpath));

  const auto configs = query::DefaultEvalConfigs(handle->info(), budgets, !args.Has("shared-selection"));
  query::EvalReport report;
  s = query::Evaluate(*handle, layers, configs, query::EvalOptions(), &report);
  if (!s.ok()) return Fail(kName, s.WithPrefix(qpath));
  if (args.Has("json")) {
    std::printf("%s\n", EvalReportJson(report).c_str());
  } else {
    std::printf("%s", query::FormatEvalReport(report).c_str());
  }
  return 0;
}

const Registrar kRegistrar(Command{
    kName,
    "recall and output error of sparse attention vs dense attention, per configuration and head kind",
    "sqctl eval --db DIR --context NAME --queries FILE [--budgets 0.05,0.125,0.25] [--shared-selection] [--json]",
    {
        {"db", "DIR", "database directory", true},
        {"context", "NAME", "context to evaluate", true},
        {"queries", "FILE", "safetensors with layers.{i}.q [n_q_heads, T, head_dim], any layers", true},
        {"budgets", "LIST",
         "comma-separated KV budgets, flat and hierarchical each (default 0.05,0.125,0.25); "
         "every calibrated threshold quantile is evaluated too"},
        {"shared-selection", "", "one selection shared by a layer's T queries (prefill) instead of one per query"},
        {"device", "DEV", kDeviceFlagHelp},
        {"json", "", "print the report as JSON"},
    },
    Run});

}  // namespace
}  // namespace sqz::cli
