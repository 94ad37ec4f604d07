// sqctl eval: accuracy of sparse attention against dense attention.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
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

extern "C" char** environ;

// The Python interpreter that draws --plot: $SQZ_PYTHON, else ./.venv's (what
// scripts/setup.sh makes), else python3 on PATH.
std::string PlotPython() {
  if (const char* env = std::getenv("SQZ_PYTHON"); env != nullptr && *env != '\0') return env;
  if (access(".venv/bin/python", X_OK) == 0) return ".venv/bin/python";
  return "python3";
}

// Writes the report's JSON to a temporary file and runs `python -m
// squeeze.plot` on it (matplotlib draws; the package's docs/PYTHON.md).
Status WritePlot(const std::string& json, const std::string& png) {
  char tmpl[] = "/tmp/sqctl-eval-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) return Status::IOError(std::string("creating a temporary file: ") + std::strerror(errno));
  close(fd);
  const std::string tmp = tmpl;
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << json;
    if (!f) {
      unlink(tmp.c_str());
      return Status::IOError("writing " + tmp);
    }
  }
  const std::string py = PlotPython();
  std::vector<std::string> argv_s = {py, "-m", "squeeze.plot", tmp, "--out", png};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, py.c_str(), nullptr, nullptr, argv.data(), environ);
  int status = 0;
  if (rc == 0) {
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
  }
  unlink(tmp.c_str());
  const char* hint =
      " (--plot needs the squeeze Python package and matplotlib: scripts/setup.sh installs both into .venv; "
      "set SQZ_PYTHON to another interpreter that has them)";
  if (rc != 0) return Status::NotSupported("--plot: cannot run " + py + ": " + std::strerror(rc) + hint);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Status::Aborted("--plot: " + py + " -m squeeze.plot failed" + hint);
  }
  return Status::OK();
}

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
  const bool json = args.Has("json"), plot = args.Has("plot");
  const std::string report_json = json || plot ? EvalReportJson(report) : std::string();
  if (json) {
    std::printf("%s\n", report_json.c_str());
  } else {
    std::printf("%s", query::FormatEvalReport(report).c_str());
  }
  if (plot) {
    std::fflush(stdout);
    s = WritePlot(report_json, args.Get("plot"));
    if (!s.ok()) return Fail(kName, s);
  }
  return 0;
}

const Registrar kRegistrar(Command{
    kName,
    "recall and output error of sparse attention vs dense attention, per configuration and head kind",
    "sqctl eval --db DIR --context NAME --queries FILE [--budgets 0.05,0.125,0.25] [--shared-selection] [--json] "
    "[--plot FILE.png]",
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
        {"plot", "FILE",
         "also draw recall and oracle against the KV read, per head kind, into FILE (PNG) with the squeeze Python "
         "package ($SQZ_PYTHON, ./.venv/bin/python or python3)"},
    },
    Run});

}  // namespace
}  // namespace sqz::cli
