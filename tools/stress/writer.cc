// sqz_stress run: the writer process. Several threads build, replace and
// drop contexts of a fixed set of names, and query them through handles
// (fresh ones and ones kept open across other threads' mutations), each
// mutation announced in the oracle log before it starts and confirmed after
// it returns. Every answer is checked against the oracle; the first
// violation ends the process with exit code 1 (kExitFinding).
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "sqz/build.h"
#include "sqz/query.h"
#include "stress.h"

namespace sqz::stress {

namespace {

struct Writer {
  DB* db = nullptr;
  LogWriter* log = nullptr;
  ReferenceCache cache;
  IdRegistry ids;
  Counters counters;
  std::vector<std::string> names;
  std::vector<std::mutex> locks;  // one per name: one mutation of a name at a time
  double kill_in_build = 0;
  int max_kept = 3;
  int64_t max_ops = 0;  // 0: no limit
  std::chrono::steady_clock::time_point deadline;

  explicit Writer(int n_names) : names(ContextNames(n_names)), locks(static_cast<size_t>(n_names)) {}
};

[[noreturn]] void Fail(const std::string& what) {
  ReportFinding(what);
  _exit(kExitFinding);
}

void Check(const Status& s, const std::string& what) {
  if (!s.ok()) Fail(what + ": " + s.ToString());
}

Record Rec(char type, uint64_t gen, const std::string& name) {
  Record r;
  r.type = type;
  r.gen = gen;
  r.name = name;
  return r;
}

// The versions a view taken during `op` may show for `name`.
template <typename Op>
Window During(Writer* w, Op op) {
  OracleState start;
  size_t position = 0;
  w->log->Snapshot(&start, &position);
  op();
  Window window(start);
  for (const Record& r : w->log->Since(position)) window.Add(r);
  return window;
}

struct Kept {
  std::unique_ptr<ContextHandle> handle;
  std::string name;
  uint64_t gen = 0;
};

class Thread {
 public:
  Thread(Writer* w, uint64_t seed) : w_(w), rng_(seed) {}

  void Run() {
    while (std::chrono::steady_clock::now() < w_->deadline) {
      const int64_t op = w_->counters.ops++;
      if (w_->max_ops > 0 && op >= w_->max_ops) break;
      const size_t i = static_cast<size_t>(Pick(static_cast<int>(w_->names.size())));
      const std::string& name = w_->names[i];
      const int dice = Pick(100);
      if (dice < 30) {
        Put(i);
      } else if (dice < 40) {
        Drop(i);
      } else if (dice < 43) {
        PutExisting(i);
      } else if (dice < 73) {
        Query(name);
      } else if (dice < 85) {
        Requery();
      } else if (dice < 92) {
        List();
      } else {
        VerifyOrDescribe(name, dice < 96);
      }
      PrintLine("stats " + w_->counters.ToString());
    }
    kept_.clear();
  }

 private:
  int Pick(int n) { return static_cast<int>(rng_() % static_cast<uint64_t>(n)); }
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }

  // A build (name absent) or a replace (present) as a new generation.
  void Put(size_t i) {
    const std::string& name = w_->names[i];
    std::lock_guard<std::mutex> lock(w_->locks[i]);
    const NameState st = w_->log->Get(name);
    const uint64_t gen = w_->log->NewGeneration();
    std::function<void(const BuildProgress&)> on_progress;
    if (Chance(w_->kill_in_build)) {
      // Die (SIGKILL, no cleanup) after a random number of (layer, head)
      // steps: between two heads, or after the last one (calibration,
      // manifest, commit still to come).
      const int64_t at = 1 + Pick(kLayers * kKvHeads);
      on_progress = [at, name, gen](const BuildProgress& p) {
        if (p.heads_done == at) {
          PrintLine("writer: killing itself in the build of '" + name + "' gen " + std::to_string(gen) +
                    " after head " + std::to_string(at));
          raise(SIGKILL);
        }
      };
    }
    Check(w_->log->Append(Rec('P', gen, name)), "oracle log");
    Status s = BuildVersion(w_->db, SpecOf(name, gen), /*replace=*/st.committed != 0, on_progress);
    if (!s.ok()) {
      (void)w_->log->Append(Rec('F', 0, name));
      Fail(std::string(st.committed ? "replace" : "build") + " of '" + name + "' gen " + std::to_string(gen) +
           " failed: " + s.ToString());
    }
    Check(w_->log->Append(Rec('p', gen, name)), "oracle log");
    ++w_->counters.puts;
  }

  // A build without replace of a name that exists: AlreadyExists, nothing changes.
  void PutExisting(size_t i) {
    const std::string& name = w_->names[i];
    std::lock_guard<std::mutex> lock(w_->locks[i]);
    const NameState st = w_->log->Get(name);
    if (st.committed == 0) return;
    const uint64_t gen = w_->log->NewGeneration();
    Check(w_->log->Append(Rec('P', gen, name)), "oracle log");
    Status s = BuildVersion(w_->db, SpecOf(name, gen), /*replace=*/false);
    if (s.ok()) {
      Check(w_->log->Append(Rec('p', gen, name)), "oracle log");
      Fail("build without replace of existing context '" + name + "' (gen " + std::to_string(st.committed) +
           ") succeeded as gen " + std::to_string(gen));
    }
    Check(w_->log->Append(Rec('F', 0, name)), "oracle log");
    if (!s.IsAlreadyExists()) Fail("build without replace of existing '" + name + "': " + s.ToString());
  }

  void Drop(size_t i) {
    const std::string& name = w_->names[i];
    std::lock_guard<std::mutex> lock(w_->locks[i]);
    const NameState st = w_->log->Get(name);
    if (st.committed == 0) {
      Status s = w_->db->DropContext(name);
      if (!s.IsNotFound()) Fail("drop of absent context '" + name + "': " + s.ToString() + " (want NotFound)");
      return;
    }
    Check(w_->log->Append(Rec('D', 0, name)), "oracle log");
    Status s = w_->db->DropContext(name);
    if (!s.ok()) {
      (void)w_->log->Append(Rec('F', 0, name));
      Fail("drop of '" + name + "' gen " + std::to_string(st.committed) + " failed: " + s.ToString());
    }
    Check(w_->log->Append(Rec('d', 0, name)), "oracle log");
    ++w_->counters.drops;
  }

  // A fresh handle: the version it reads must be one the name had while it
  // was opened, and answer as that version.
  void Query(const std::string& name) {
    std::unique_ptr<ContextHandle> h;
    Status s;
    const Window window = During(w_, [&] { s = ContextHandle::Open(w_->db, name, &h); });
    const std::set<uint64_t> allowed = window.Allowed(name);
    if (s.IsNotFound()) {
      if (!allowed.count(0)) Fail("open of '" + name + "': NotFound; the oracle allows " + AllowedToString(allowed));
      return;
    }
    Check(s, "open of '" + name + "'");
    uint64_t gen = 0;
    CheckCounters c;
    Check(CheckHandle(*h, name, allowed, &w_->cache, &w_->ids, rng_(), &c, &gen), "fresh handle");
    w_->counters.Add(c);
    if (static_cast<int>(kept_.size()) < w_->max_kept && Chance(0.5)) {
      kept_.push_back(Kept{std::move(h), name, gen});
    }
  }

  // A handle kept open while other threads replace and drop: its version
  // for life.
  void Requery() {
    if (kept_.empty()) return;
    const size_t i = static_cast<size_t>(Pick(static_cast<int>(kept_.size())));
    uint64_t gen = 0;
    CheckCounters c;
    Check(CheckHandle(*kept_[i].handle, kept_[i].name, {kept_[i].gen}, &w_->cache, &w_->ids, rng_(), &c, &gen),
          "kept handle");
    w_->counters.Add(c);
    if (Chance(0.4)) kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(i));  // its space may go now
  }

  // ListContexts: every name listed may exist, every name not listed may be absent.
  void List() {
    std::vector<std::string> listed;
    Status s;
    const Window window = During(w_, [&] { s = w_->db->ListContexts(&listed); });
    Check(s, "ListContexts");
    const std::set<std::string> listed_set(listed.begin(), listed.end());
    for (const auto& n : listed) {
      const std::set<uint64_t> a = window.Allowed(n);
      if (a == std::set<uint64_t>{0}) Fail("ListContexts lists '" + n + "'; the oracle allows only its absence");
    }
    for (const auto& n : window.Names()) {
      const std::set<uint64_t> a = window.Allowed(n);
      if (!listed_set.count(n) && !a.count(0)) {
        Fail("ListContexts misses '" + n + "'; the oracle allows " + AllowedToString(a));
      }
    }
    ++w_->counters.lists;
  }

  void VerifyOrDescribe(const std::string& name, bool verify) {
    Status s;
    ContextInfo info;
    const Window window = During(w_, [&] {
      VerifyReport report;
      s = verify ? w_->db->VerifyContext(name, &report) : w_->db->DescribeContext(name, &info);
    });
    const std::set<uint64_t> allowed = window.Allowed(name);
    if (s.IsNotFound()) {
      if (!allowed.count(0))
        Fail((verify ? "VerifyContext" : "DescribeContext") + std::string(" of '") + name +
             "': NotFound; the oracle allows " + AllowedToString(allowed));
      return;
    }
    Check(s, (verify ? "VerifyContext '" : "DescribeContext '") + name + "'");
    if (verify) {
      ++w_->counters.verifies;
      return;
    }
    std::string claimed;
    uint64_t gen = 0;
    if (!ParseModel(info.model, &claimed, &gen) || claimed != name || !allowed.count(gen)) {
      Fail("DescribeContext '" + name + "': model '" + info.model + "'; the oracle allows " + AllowedToString(allowed));
    }
    Check(w_->ids.See(info.id, name, gen), "DescribeContext '" + name + "'");
  }

  Writer* w_;
  std::mt19937_64 rng_;
  std::vector<Kept> kept_;
};

}  // namespace

int RunWriter(const Flags& flags) {
  int64_t seed = 0, threads = 0, n_names = 0, ops = 0, duration_ms = 0, loop = 0, max_kept = 0;
  double kill_in_build = 0;
  for (const Status& s : {flags.GetInt("seed", 1, 0, INT64_MAX, &seed), flags.GetInt("threads", 3, 1, 64, &threads),
                          flags.GetInt("names", 8, 1, 1000, &n_names), flags.GetInt("ops", 0, 0, INT64_MAX, &ops),
                          flags.GetInt("duration-ms", 10000, 1, INT64_MAX / 2, &duration_ms),
                          flags.GetInt("loop", 0, 0, INT64_MAX, &loop), flags.GetInt("max-kept", 3, 0, 100, &max_kept),
                          flags.GetDouble("kill-in-build", 0, 0, 1, &kill_in_build)}) {
    if (!s.ok()) {
      std::fprintf(stderr, "sqz_stress run: %s\n", s.ToString().c_str());
      return kExitUsage;
    }
  }
  if (!flags.Has("dir")) {
    std::fprintf(stderr, "sqz_stress run: --dir is required\n");
    return kExitUsage;
  }
  const Paths paths(flags.Get("dir"));
  LogWriter log;
  Status s = log.Open(paths.Oracle());
  if (!s.ok()) {
    ReportFinding("writer: oracle log: " + s.ToString());
    return kExitFinding;
  }
  Options options;
  options.block_cache_bytes = size_t{32} << 20;
  std::unique_ptr<DB> db;
  const auto t0 = std::chrono::steady_clock::now();
  s = DB::Open(options, paths.Db(), &db);
  if (!s.ok()) {
    ReportFinding("writer: read-write open after the previous writer ended: " + s.ToString());
    return kExitFinding;
  }
  const double open_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  Record w;
  w.type = 'W';
  w.name = std::to_string(loop) + " " + std::to_string(getpid()) + " " + std::to_string(seed);
  Check(log.Append(w), "oracle log");

  Writer writer(static_cast<int>(n_names));
  writer.db = db.get();
  writer.log = &log;
  writer.kill_in_build = kill_in_build;
  writer.max_kept = static_cast<int>(max_kept);
  writer.max_ops = ops;
  // Operations left in flight by a writer killed before this one (when the
  // driver has not resolved them already).
  VerifySummary summary;
  Check(VerifyDatabase(db.get(), &log, &writer.cache, &writer.ids, /*full=*/false, static_cast<uint64_t>(seed),
                       &writer.counters, &summary),
        "writer: the database at start");
  PrintLine("writer: pid " + std::to_string(getpid()) + " loop " + std::to_string(loop) + " seed " +
            std::to_string(seed) + ": opened in " + std::to_string(static_cast<int>(open_ms)) + " ms, " +
            std::to_string(summary.contexts) + " contexts, " + std::to_string(summary.resolved) + " resolved");
  writer.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(duration_ms);
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&writer, seed, t] {
      Thread th(&writer, Mix(static_cast<uint64_t>(seed) ^ Mix(static_cast<uint64_t>(t) + 1)));
      th.Run();
    });
  }
  for (auto& t : pool) t.join();
  db.reset();  // a clean close
  PrintLine("stats " + writer.counters.ToString());
  PrintLine("writer: finished");
  return kExitOk;
}

}  // namespace sqz::stress
