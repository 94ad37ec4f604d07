// sqz_stress read: a reader process. Opens the database read-only (fresh
// opens and Refresh in turn) beside the writer, across the writer's kills
// and the driver's reopens, and checks every view against the oracle log:
// the view was taken between two reads of the log, so each name must be in
// a version it had somewhere between them; a listed context opens and
// answers as its version, an unlisted one does not open (the view is fixed),
// and a handle kept over many rounds keeps its version. Runs until the STOP
// file appears; the first violation ends it with exit code 1.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <memory>
#include <random>
#include <thread>

#include "sqz/query.h"
#include "stress.h"

namespace sqz::stress {

namespace {

[[noreturn]] void Fail(const std::string& what) {
  ReportFinding("reader: " + what);
  std::exit(kExitFinding);
}

// The one error a read-only open (or Refresh) may give beside a writer:
// the writer changed the database's files during each of its attempts
// (storage/db_impl.cc, OpenConsistentSecondary). Anything else is a finding.
bool IsTransient(const Status& s) {
  return s.IsIOError() && s.message().find("kept changing the database's files") != std::string::npos;
}

struct KeptHandle {
  std::shared_ptr<DB> db;  // the view the handle was opened on (a DB outlives its handles)
  std::unique_ptr<ContextHandle> handle;
  std::string name;
  uint64_t gen = 0;
  int rounds_left = 0;
  void Release() {
    handle.reset();  // before its DB
    db.reset();
  }
};

}  // namespace

int RunReader(const Flags& flags) {
  int64_t seed = 0, pause_ms = 0, duration_ms = 0;
  for (const Status& s :
       {flags.GetInt("seed", 1, 0, INT64_MAX, &seed), flags.GetInt("pause-ms", 20, 0, 10000, &pause_ms),
        flags.GetInt("duration-ms", 3600 * 1000, 1, INT64_MAX / 2, &duration_ms)}) {
    if (!s.ok()) {
      std::fprintf(stderr, "sqz_stress read: %s\n", s.ToString().c_str());
      return kExitUsage;
    }
  }
  if (!flags.Has("dir")) {
    std::fprintf(stderr, "sqz_stress read: --dir is required\n");
    return kExitUsage;
  }
  const Paths paths(flags.Get("dir"));
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  auto pick = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  LogTail tail(paths.Oracle());
  OracleState state;
  ReferenceCache cache;
  IdRegistry ids;
  Counters counters;
  Options ro;
  ro.read_only = true;
  ro.block_cache_bytes = size_t{8} << 20;
  std::shared_ptr<DB> db;
  KeptHandle kept;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(duration_ms);
  int64_t round = 0;
  for (; !std::filesystem::exists(paths.Stop()) && std::chrono::steady_clock::now() < deadline; ++round) {
    if (round > 0) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
    Status ls = tail.Poll(&state, nullptr);
    if (!ls.ok()) Fail("oracle log: " + ls.ToString());
    const OracleState start = state;
    Status s;
    const bool fresh = round % 2 == 0 || db == nullptr;
    if (fresh) {
      std::unique_ptr<DB> opened;
      s = DB::Open(ro, paths.Db(), &opened);
      db = std::move(opened);
      ++counters.opens;
    } else {
      s = db->Refresh();
      ++counters.refreshes;
    }
    std::vector<Record> records;
    ls = tail.Poll(&state, &records);
    if (!ls.ok()) Fail("oracle log: " + ls.ToString());
    if (!s.ok() && IsTransient(s)) {
      ++counters.transient;
      if (fresh) db.reset();
      continue;
    }
    if (!s.ok()) Fail(std::string(fresh ? "read-only open" : "Refresh") + " failed: " + s.ToString());
    Window window(start);
    for (const Record& r : records) window.Add(r);

    // The listing of the view.
    std::vector<std::string> listed;
    s = db->ListContexts(&listed);
    if (!s.ok()) Fail("ListContexts: " + s.ToString());
    ++counters.lists;
    const std::set<std::string> listed_set(listed.begin(), listed.end());
    std::vector<std::string> unlisted;
    for (const auto& n : listed) {
      if (window.Allowed(n) == std::set<uint64_t>{0}) Fail("lists '" + n + "'; the oracle allows only its absence");
    }
    for (const auto& n : window.Names()) {
      const std::set<uint64_t> a = window.Allowed(n);
      if (listed_set.count(n)) continue;
      if (!a.count(0)) Fail("does not list '" + n + "'; the oracle allows " + AllowedToString(a));
      unlisted.push_back(n);
    }

    // Two listed contexts answer as an allowed version; an unlisted one is absent from the view.
    std::unique_ptr<ContextHandle> last;
    std::string last_name;
    uint64_t last_gen = 0;
    for (int i = 0; i < 2 && !listed.empty(); ++i) {
      const std::string& name = listed[pick(listed.size())];
      std::unique_ptr<ContextHandle> h;
      s = ContextHandle::Open(db.get(), name, &h);
      if (!s.ok()) {
        std::string diag = std::string(fresh ? " (fresh open" : " (refresh") + ", round " + std::to_string(round) +
                           ", allowed " + AllowedToString(window.Allowed(name));
        ContextInfo info;
        Status ds = db->DescribeContext(name, &info);
        diag += "; describe: " + (ds.ok() ? info.model + " id " + std::to_string(info.id) : ds.ToString());
        std::vector<std::string> again;
        Status ls2 = db->ListContexts(&again);
        diag += "; listed again: " + std::to_string(std::count(again.begin(), again.end(), name));
        s = ContextHandle::Open(db.get(), name, &h);
        diag += "; second open: " + s.ToString();
        std::unique_ptr<DB> other;
        Status os = DB::Open(ro, paths.Db(), &other);
        if (os.ok()) {
          again.clear();
          (void)other->ListContexts(&again);
          diag += "; a new view lists it: " + std::to_string(std::count(again.begin(), again.end(), name));
        }
        Fail("listed context '" + name + "' does not open: " + s.ToString() + diag + ")");
      }
      CheckCounters c;
      uint64_t gen = 0;
      s = CheckHandle(*h, name, window.Allowed(name), &cache, &ids, rng(), &c, &gen);
      if (!s.ok()) Fail(s.ToString());
      counters.Add(c);
      last = std::move(h);
      last_name = name;
      last_gen = gen;
    }
    if (!unlisted.empty()) {
      const std::string& name = unlisted[pick(unlisted.size())];
      std::unique_ptr<ContextHandle> h;
      s = ContextHandle::Open(db.get(), name, &h);
      if (!s.IsNotFound()) Fail("unlisted context '" + name + "' opens: " + s.ToString());
    }
    if (round % 4 == 1 && !listed.empty()) {
      const std::string& name = listed[pick(listed.size())];
      VerifyReport report;
      s = db->VerifyContext(name, &report);
      if (!s.ok()) Fail("VerifyContext of listed context '" + name + "': " + s.ToString());
      ++counters.verifies;
    }

    // A handle kept over several rounds (and the writer's kills) keeps its version.
    if (kept.handle) {
      CheckCounters c;
      uint64_t gen = 0;
      s = CheckHandle(*kept.handle, kept.name, {kept.gen}, &cache, &ids, rng(), &c, &gen);
      if (!s.ok()) Fail("kept handle: " + s.ToString());
      counters.Add(c);
      if (--kept.rounds_left <= 0) kept.Release();
    } else if (last) {
      kept.db = db;
      kept.handle = std::move(last);
      kept.name = last_name;
      kept.gen = last_gen;
      kept.rounds_left = 5 + static_cast<int>(pick(20));
    }
    if (round % 10 == 0) PrintLine("stats " + counters.ToString());
  }
  kept.Release();
  db.reset();
  PrintLine("stats " + counters.ToString());
  PrintLine("reader: finished after " + std::to_string(round) + " rounds");
  return kExitOk;
}

}  // namespace sqz::stress
