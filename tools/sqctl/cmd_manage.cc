// sqctl build-index, list, info, drop, verify.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "cli.h"
#include "format.h"
#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"

namespace sqz::cli {
namespace {

Status OpenDb(const Args& args, OpenMode mode, std::unique_ptr<DB>* db) {
  return OpenDatabase(args.Get("db"), mode, db);
}

// Terminal progress line, redrawn in place; silent when stderr is not a TTY.
class ProgressLine {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled && isatty(STDERR_FILENO)) {}
  ~ProgressLine() { Done(); }
  void Update(const std::string& ctx, const BuildProgress& p) {
    if (!enabled_) return;
    std::fprintf(stderr, "\r\033[K%s: layer %d/%d head %d/%d | %.2f Mkeys/s | ETA %s", ctx.c_str(), p.layer + 1,
                 p.n_layers, p.head + 1, p.n_kv_heads, p.keys_per_second / 1e6, FormatSeconds(p.eta_seconds).c_str());
    std::fflush(stderr);
    dirty_ = true;
  }
  // Shown before the first head finishes (one head of a long context can take minutes).
  void Start(const std::string& ctx, const KvShape& sh) {
    if (!enabled_) return;
    std::fprintf(stderr, "\r\033[K%s: layer 1/%d head 1/%d | clustering %lld keys per head ...", ctx.c_str(),
                 sh.n_layers, sh.n_kv_heads, static_cast<long long>(sh.n_tokens));
    std::fflush(stderr);
    dirty_ = true;
  }
  void Done() {
    if (enabled_ && dirty_) std::fprintf(stderr, "\r\033[K");
    dirty_ = false;
  }

 private:
  bool enabled_;
  bool dirty_ = false;
};

constexpr int kIntMax = std::numeric_limits<int>::max();
constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();

Status ParseBuildOptions(const Args& args, BuildOptions* o) {
  SQZ_RETURN_IF_ERROR(args.GetInt("window", o->window, 0, kIntMax, &o->window));
  SQZ_RETURN_IF_ERROR(args.GetInt("sinks", o->n_sinks, 0, kIntMax, &o->n_sinks));
  SQZ_RETURN_IF_ERROR(args.GetInt("iters", o->kmeans_iters, 1, kIntMax, &o->kmeans_iters));
  SQZ_RETURN_IF_ERROR(args.GetInt("page-rows", o->page_rows, 1, 4096, &o->page_rows));
  SQZ_RETURN_IF_ERROR(args.GetUint64("seed", o->seed, 0, kU64Max, &o->seed));
  SQZ_RETURN_IF_ERROR(args.GetDouble("fine", o->fine_ratio, kFractionOpenClosed, &o->fine_ratio));
  SQZ_RETURN_IF_ERROR(args.GetDouble("coarse", o->coarse_ratio, kFractionOpenClosed, &o->coarse_ratio));
  SQZ_RETURN_IF_ERROR(args.GetDoubleList("quantiles", o->quantiles, kFractionOpen, &o->quantiles));
  o->replace = args.Has("replace");
  return Status::OK();
}

int RunBuildIndex(const Args& args) {
  const std::string cmd = "build-index";
  if (args.Has("kv") == args.Has("corpus")) {
    std::fprintf(stderr, "sqctl build-index: give exactly one of --kv FILE or --corpus DIR\n");
    return 2;
  }
  if (args.Has("name") && args.Has("corpus")) {
    std::fprintf(stderr, "sqctl build-index: --name applies to a single --kv file, not to --corpus\n");
    return 2;
  }
  BuildOptions opts;
  Status s = ParseBuildOptions(args, &opts);
  if (!s.ok()) return Usage(cmd, s.message());

  // Inputs: (name, path) pairs.
  std::vector<std::pair<std::string, std::string>> inputs;
  if (args.Has("kv")) {
    std::filesystem::path p = args.Get("kv");
    inputs.emplace_back(args.Get("name", p.stem().string()), p.string());
  } else {
    std::error_code ec;
    std::filesystem::path dir = args.Get("corpus");
    if (!std::filesystem::is_directory(dir, ec)) {
      return Fail(cmd, Status::InvalidArgument(dir.string() + ": not a directory"));
    }
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.is_regular_file() && e.path().extension() == ".safetensors") {
        inputs.emplace_back(e.path().stem().string(), e.path().string());
      }
    }
    std::sort(inputs.begin(), inputs.end());
    if (inputs.empty()) {
      return Fail(cmd, Status::InvalidArgument(dir.string() + ": no .safetensors files in this directory"));
    }
  }

  // Every input's header is validated before the database is opened, so bad
  // input never creates (or touches) a database.
  int failures = 0;
  {
    std::vector<std::pair<std::string, std::string>> valid;
    for (const auto& [name, path] : inputs) {
      std::unique_ptr<KvSource> src;
      s = OpenSafetensorsKvSource(path, &src);
      if (s.ok()) {
        valid.emplace_back(name, path);
        continue;
      }
      std::fprintf(stderr, "sqctl build-index: context '%s' from %s: %s\n", PrintableName(name).c_str(), path.c_str(),
                   s.ToString().c_str());
      ++failures;
    }
    if (valid.empty()) {
      if (args.Has("json")) std::printf("[]\n");
      return 1;
    }
    inputs = std::move(valid);
  }

  std::unique_ptr<DB> db;
  s = OpenDb(args, OpenMode::kCreate, &db);
  if (!s.ok()) return Fail(cmd, s);
  const bool quiet = args.Has("quiet");
  const bool json = args.Has("json");
  Json json_out = Json::array();
  for (const auto& [name, path] : inputs) {
    std::unique_ptr<KvSource> src;
    s = OpenSafetensorsKvSource(path, &src);
    BuildStats stats;
    if (s.ok()) {
      ProgressLine progress(!quiet);
      progress.Start(name, src->shape());
      BuildOptions o = opts;
      o.on_progress = [&, n = name](const BuildProgress& p) { progress.Update(n, p); };
      s = BuildContext(db.get(), name, src.get(), o, &stats);
    }
    if (!s.ok()) {
      std::fprintf(stderr, "sqctl build-index: context '%s' from %s: %s\n", PrintableName(name).c_str(), path.c_str(),
                   s.ToString().c_str());
      ++failures;
      continue;
    }
    const KvShape& sh = src->shape();
    double keys_rate = stats.keys_clustered / std::max(stats.seconds_total, 1e-9);
    if (json) {
      Json j;
      j["name"] = name;
      j["seconds"] = stats.seconds_total;
      j["seconds_read"] = stats.seconds_read;
      j["seconds_kmeans"] = stats.seconds_kmeans;
      j["seconds_calibrate"] = stats.seconds_calibrate;
      j["seconds_write"] = stats.seconds_write;
      j["keys_clustered"] = stats.keys_clustered;
      j["keys_per_second"] = keys_rate;
      j["kv_bytes"] = stats.kv_bytes;
      j["index_bytes"] = stats.index_bytes;
      j["peak_rss_bytes"] = stats.peak_rss_bytes;
      json_out.push_back(std::move(j));
    } else if (!quiet) {
      std::printf(
          "built '%s': %d layers x %d KV heads x %lld tokens x %d dims (%s) in %s; %.2f Mkeys/s; "
          "KV %s, index %s; peak RSS %s\n",
          PrintableName(name).c_str(), sh.n_layers, sh.n_kv_heads, static_cast<long long>(sh.n_tokens), sh.head_dim,
          DTypeName(sh.dtype), FormatSeconds(stats.seconds_total).c_str(), keys_rate / 1e6,
          FormatBytes(stats.kv_bytes).c_str(), FormatBytes(stats.index_bytes).c_str(),
          FormatBytes(stats.peak_rss_bytes).c_str());
    }
  }
  if (json) std::printf("%s\n", JsonDump(json_out).c_str());
  return failures ? 1 : 0;
}

int RunList(const Args& args) {
  std::unique_ptr<DB> db;
  Status s = OpenDb(args, OpenMode::kReadOnly, &db);
  if (!s.ok()) return Fail("list", s);
  std::vector<std::string> names;
  s = db->ListContexts(&names);
  if (!s.ok()) return Fail("list", s);
  if (args.Has("json")) {
    Json out = Json::array();
    for (const auto& n : names) {
      ContextInfo info;
      s = db->DescribeContext(n, &info);
      if (!s.ok()) return Fail("list", s);
      Json j;
      j["name"] = n;
      j["n_layers"] = info.n_layers;
      j["n_tokens"] = info.n_tokens;
      j["bytes_on_disk"] = info.bytes_on_disk;
      if (!info.damage.empty()) j["damage"] = info.damage;
      out.push_back(std::move(j));
    }
    std::printf("%s\n", JsonDump(out).c_str());
    return 0;
  }
  int damaged = 0;
  for (const auto& n : names) {
    ContextInfo info;
    s = db->DescribeContext(n, &info);
    if (!s.ok()) return Fail("list", s);
    std::printf("%-32s %3d layers %3d/%-3d heads %8lld tokens  %s on disk%s\n", PrintableName(n).c_str(), info.n_layers,
                info.n_q_heads, info.n_kv_heads, static_cast<long long>(info.n_tokens),
                FormatBytes(info.bytes_on_disk).c_str(), info.damage.empty() ? "" : "  DAMAGED");
    if (!info.damage.empty()) {
      ++damaged;
      std::fprintf(stderr, "sqctl list: context %s is damaged: %s\n", PrintableName(n).c_str(), info.damage.c_str());
    }
  }
  if (damaged > 0) {
    std::fprintf(stderr,
                 "sqctl list: %d damaged context(s); the others work. Drop each (sqctl drop --db %s --context NAME) "
                 "and rebuild it, or salvage the database with sqctl repair --db %s --out NEW_DIR\n",
                 damaged, db->path().c_str(), db->path().c_str());
  }
  return 0;
}

int RunInfo(const Args& args) {
  std::unique_ptr<DB> db;
  Status s = OpenDb(args, OpenMode::kReadOnly, &db);
  if (!s.ok()) return Fail("info", s);
  ContextInfo info;
  s = db->DescribeContext(args.Get("context"), &info);
  if (!s.ok()) return Fail("info", s);
  std::printf("%s", (args.Has("json") ? ContextInfoJson(info) : ContextInfoText(info)).c_str());
  return 0;
}

int RunDrop(const Args& args) {
  std::unique_ptr<DB> db;
  Status s = OpenDb(args, OpenMode::kReadWrite, &db);
  if (!s.ok()) return Fail("drop", s);
  s = db->DropContext(args.Get("context"));
  if (!s.ok()) return Fail("drop", s);
  std::printf("dropped '%s'\n", PrintableName(args.Get("context")).c_str());
  return 0;
}

int RunVerify(const Args& args) {
  std::unique_ptr<DB> db;
  Status s = OpenDb(args, OpenMode::kReadOnly, &db);
  if (!s.ok()) return Fail("verify", s);
  std::vector<std::string> names;
  if (args.Has("context")) {
    names.push_back(args.Get("context"));
  } else {
    s = db->ListContexts(&names);
    if (!s.ok()) return Fail("verify", s);
  }
  int bad = 0;
  for (const auto& n : names) {
    VerifyReport r;
    s = db->VerifyContext(n, &r);
    if (s.ok()) {
      std::printf("%-32s OK  (%lld records, %lld KV pages, %s checked)\n", PrintableName(n).c_str(),
                  static_cast<long long>(r.records_checked), static_cast<long long>(r.kv_pages_checked),
                  FormatBytes(r.bytes_checked).c_str());
    } else {
      std::printf("%-32s FAILED: %s\n", PrintableName(n).c_str(), s.ToString().c_str());
      ++bad;
    }
  }
  if (bad) std::fprintf(stderr, "sqctl verify: %d of %zu context(s) failed verification\n", bad, names.size());
  return bad ? 1 : 0;
}

const Flag kDb{"db", "DIR", "database directory", true};

Registrar build_index({"build-index",
                       "index fixed-context KV caches (safetensors) into the database",
                       "sqctl build-index --db DIR (--kv FILE | --corpus DIR) [--name NAME] [options]",
                       {kDb,
                        {"kv", "FILE", "one KV file (safetensors, see docs/FORMAT.md)"},
                        {"corpus", "DIR", "every *.safetensors file of DIR; context name = file stem"},
                        {"name", "NAME", "context name for --kv (default: the file stem)"},
                        {"replace", "", "rebuild a context that already exists (atomic swap)"},
                        {"window", "N", "observation window: last N tokens always attended (default 100)"},
                        {"sinks", "N", "first N tokens always attended: attention sinks (default 4)"},
                        {"fine", "R", "fine clusters per clustered key (default 0.05)"},
                        {"coarse", "R", "coarse clusters per clustered key (default 0.01)"},
                        {"iters", "N", "k-means iterations per level (default 10)"},
                        {"page-rows", "N", "rows per stored KV page, 1..4096 (default 16; docs/FORMAT.md)"},
                        {"seed", "N", "k-means seed; builds are deterministic per seed (default 1234)"},
                        {"quantiles", "LIST", "calibration quantiles (default 0.5,0.7,0.8,0.9,0.95)"},
                        {"quiet", "", "no progress display"},
                        {"json", "", "print build statistics as JSON"}},
                       RunBuildIndex});
Registrar list({"list",
                "list the contexts of a database",
                "sqctl list --db DIR [--json]",
                {kDb, {"json", "", "JSON output"}},
                RunList});
Registrar info({"info",
                "describe one context (shapes, levels, thresholds, bytes, build time)",
                "sqctl info --db DIR --context NAME [--json]",
                {kDb, {"context", "NAME", "context name", true}, {"json", "", "JSON output"}},
                RunInfo});
Registrar drop({"drop",
                "delete a context and reclaim its space",
                "sqctl drop --db DIR --context NAME",
                {kDb, {"context", "NAME", "context name", true}},
                RunDrop});
Registrar verify({"verify",
                  "check every record of one or all contexts",
                  "sqctl verify --db DIR [--context NAME]",
                  {kDb, {"context", "NAME", "only this context (default: all)"}},
                  RunVerify});

}  // namespace
}  // namespace sqz::cli
