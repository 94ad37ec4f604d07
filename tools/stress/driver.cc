// sqz_stress crash: the driver. Starts reader processes, then loops: starts
// a writer process, lets it run a random time and kills it from outside
// (SIGKILL), or lets it die at a random library kill point (SQZ_KILL_POINT)
// or inside a build, or, now and then, stop by itself; then reopens the
// database read-write and checks it against the oracle (VerifyDatabase,
// full). Any violation, a writer or reader that reports one, or a reader
// that dies, fails the run; the seed to reproduce it is printed.
//
// sqz_stress verify: the same check, once, of a stopped run's directory.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <thread>

#include "stress.h"

extern char** environ;

namespace sqz::stress {

namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

std::string SelfExe() {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return "";
  exe[n] = '\0';
  return exe;
}

// Starts this program again with `args` (fork + exec: a clean process),
// stdout and stderr to `log_path`; it dies with the driver. -1 on failure.
pid_t Spawn(const std::vector<std::string>& args, const std::vector<std::string>& env_extra,
            const std::string& log_path) {
  const std::string exe = SelfExe();
  if (exe.empty()) return -1;
  std::vector<std::string> argv_s = {exe};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    if (std::string(*e).rfind("SQZ_KILL_POINT=", 0) != 0) env_s.emplace_back(*e);
  }
  env_s.insert(env_s.end(), env_extra.begin(), env_extra.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid != 0) return pid;
  // Child: only async-signal-safe calls until exec.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);
  const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0 || dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0) _exit(127);
  execve(exe.c_str(), argv.data(), envp.data());
  _exit(127);
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// The last "stats ..." line of a log, without the prefix ("" if none).
std::string LastStats(const std::vector<std::string>& lines) {
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    if (it->rfind("stats ", 0) == 0) return it->substr(6);
  }
  return "";
}

// The log's lines that are not "stats" lines, the last `n` of them.
std::string Tail(const std::vector<std::string>& lines, size_t n) {
  std::vector<std::string> keep;
  for (const auto& l : lines) {
    if (l.rfind("stats ", 0) != 0) keep.push_back(l);
  }
  std::string out;
  for (size_t i = keep.size() > n ? keep.size() - n : 0; i < keep.size(); ++i) out += "    " + keep[i] + "\n";
  return out;
}

std::string DescribeStatus(int status) {
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("signal ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

bool IsEmptyOrMissing(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return true;
  return std::filesystem::is_directory(dir, ec) && std::filesystem::is_empty(dir, ec);
}

// The read-write reopen after a writer ended, and the full check.
Status ReopenAndVerify(const Paths& paths, ReferenceCache* cache, IdRegistry* ids, uint64_t seed, Counters* counters,
                       double* open_ms, VerifySummary* summary) {
  LogWriter log;
  SQZ_RETURN_IF_ERROR(log.Open(paths.Oracle()).WithPrefix("oracle log"));
  Options options;
  options.block_cache_bytes = size_t{32} << 20;
  std::unique_ptr<DB> db;
  const auto t0 = Clock::now();
  SQZ_RETURN_IF_ERROR(DB::Open(options, paths.Db(), &db).WithPrefix("read-write reopen"));
  *open_ms = MsSince(t0);
  return VerifyDatabase(db.get(), &log, cache, ids, /*full=*/true, seed, counters, summary);
}

// The library's kill points (storage/db_impl.cc, KillPoint).
const char* const kKillPoints[] = {"commit:flushed", "drop:committed", "replace:committed", "reclaim:files-deleted",
                                   "reclaim:compacted"};

}  // namespace

int RunCrash(const Flags& flags) {
  int64_t loops = 0, readers = 0, threads = 0, names = 0, min_ms = 0, max_ms = 0, seed = 0;
  double kill_point_p = 0, build_kill_p = 0, clean_p = 0;
  for (const Status& s :
       {flags.GetInt("loops", 20, 1, 1000000, &loops), flags.GetInt("readers", 2, 0, 64, &readers),
        flags.GetInt("threads", 3, 1, 64, &threads), flags.GetInt("names", 8, 1, 1000, &names),
        flags.GetInt("min-run-ms", 200, 1, 3600000, &min_ms), flags.GetInt("max-run-ms", 1500, 1, 3600000, &max_ms),
        flags.GetInt("seed", static_cast<int64_t>(std::random_device()() & 0x7fffffff), 0, INT64_MAX, &seed),
        flags.GetDouble("kill-point-prob", 0.25, 0, 1, &kill_point_p),
        flags.GetDouble("build-kill-prob", 0.05, 0, 1, &build_kill_p),
        flags.GetDouble("clean-exit-prob", 0.1, 0, 1, &clean_p)}) {
    if (!s.ok()) {
      std::fprintf(stderr, "sqz_stress crash: %s\n", s.ToString().c_str());
      return kExitUsage;
    }
  }
  if (max_ms < min_ms) max_ms = min_ms;
  std::string work = flags.Get("dir");
  const bool temp_dir = work.empty();
  if (temp_dir) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/sqz-stress-XXXXXX";
    if (!mkdtemp(tmpl.data())) {
      std::fprintf(stderr, "sqz_stress crash: cannot create a directory under %s\n", tmpl.c_str());
      return kExitFinding;
    }
    work = tmpl;
  } else if (!IsEmptyOrMissing(work)) {
    std::fprintf(stderr, "sqz_stress crash: --dir %s must be a new or empty directory\n", work.c_str());
    return kExitUsage;
  }
  std::filesystem::create_directories(work);
  const Paths paths(work);
  std::string repro = "sqz_stress crash --seed " + std::to_string(seed);
  for (const char* f : {"loops", "readers", "threads", "names", "min-run-ms", "max-run-ms", "kill-point-prob",
                        "build-kill-prob", "clean-exit-prob"}) {
    if (flags.Has(f)) repro += std::string(" --") + f + " " + flags.Get(f);
  }
  if (!flags.Has("loops")) repro += " --loops " + std::to_string(loops);
  std::printf("sqz_stress crash: seed %lld, %lld loops, %lld writer threads, %lld readers, %lld names; in %s\n",
              static_cast<long long>(seed), static_cast<long long>(loops), static_cast<long long>(threads),
              static_cast<long long>(readers), static_cast<long long>(names), work.c_str());
  std::printf("reproduce with: %s\n", repro.c_str());
  std::fflush(stdout);

  const auto start = Clock::now();
  std::vector<pid_t> reader_pids;
  bool failed = false;
  auto fail = [&](const std::string& what) {
    if (!failed) ReportFinding(what);
    failed = true;
  };
  {
    std::unique_ptr<DB> db;
    Status s = DB::Open(Options(), paths.Db(), &db);  // create it, so that readers find a database
    if (!s.ok()) fail("creating the database: " + s.ToString());
    std::ofstream(paths.Oracle(), std::ios::app);
  }
  for (int64_t r = 0; r < readers && !failed; ++r) {
    const pid_t pid =
        Spawn({"read", "--dir", work, "--seed", std::to_string(Mix(static_cast<uint64_t>(seed) ^ (r + 101)) >> 1)}, {},
              paths.ReaderLog(static_cast<int>(r)));
    if (pid < 0) fail("cannot start a reader");
    reader_pids.push_back(pid);
  }

  ReferenceCache cache;
  IdRegistry ids;
  Counters verify_counters;
  std::map<std::string, int64_t> writer_totals;
  int64_t loop = 0, outside_kills = 0, self_kills = 0, build_kills = 0, clean_exits = 0;
  std::map<std::string, int64_t> kill_point_deaths;
  double open_ms_sum = 0, open_ms_max = 0;
  for (; loop < loops && !failed; ++loop) {
    std::mt19937_64 rng(Mix(static_cast<uint64_t>(seed) + static_cast<uint64_t>(loop)));
    auto chance = [&rng](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
    const int64_t run_ms = min_ms + static_cast<int64_t>(rng() % static_cast<uint64_t>(max_ms - min_ms + 1));
    const bool clean = chance(clean_p);
    const std::string kill_point = !clean && chance(kill_point_p) ? kKillPoints[rng() % std::size(kKillPoints)] : "";
    const uint64_t writer_seed = rng() >> 1;
    std::vector<std::string> args = {"run",
                                     "--dir",
                                     work,
                                     "--seed",
                                     std::to_string(writer_seed),
                                     "--threads",
                                     std::to_string(threads),
                                     "--names",
                                     std::to_string(names),
                                     "--loop",
                                     std::to_string(loop),
                                     "--kill-in-build",
                                     clean ? "0" : std::to_string(build_kill_p),
                                     "--duration-ms",
                                     std::to_string(clean ? run_ms : 3600 * 1000)};
    std::vector<std::string> env;
    if (!kill_point.empty()) env.push_back("SQZ_KILL_POINT=" + kill_point);
    const pid_t pid = Spawn(args, env, paths.WriterLog());
    if (pid < 0) {
      fail("cannot start the writer");
      break;
    }
    // Let it run, then kill it from outside (a clean writer gets time to finish).
    const auto t0 = Clock::now();
    const auto kill_at = t0 + std::chrono::milliseconds(clean ? run_ms + 120000 : run_ms);
    int status = 0;
    bool killed_by_us = false;
    while (true) {
      const pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) break;
      if (Clock::now() >= kill_at && !killed_by_us) {
        kill(pid, SIGKILL);
        killed_by_us = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const double ran_ms = MsSince(t0);
    const std::vector<std::string> wlog = ReadLines(paths.WriterLog());
    AddCounters(LastStats(wlog), &writer_totals);
    std::string outcome;
    if (killed_by_us && clean) {
      fail("the writer did not stop by itself within 120 s of its deadline:\n" + Tail(wlog, 20));
      break;
    }
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
      if (killed_by_us) {
        ++outside_kills;
        outcome = "killed";
      } else if (!wlog.empty() && Tail(wlog, 1).find("killing itself in the build") != std::string::npos) {
        ++build_kills;
        outcome = "killed in a build";
      } else if (!kill_point.empty()) {
        ++self_kills;
        ++kill_point_deaths[kill_point];
        outcome = "died at kill point " + kill_point;
      } else {
        fail("the writer was killed by SIGKILL that nobody sent (the kernel's OOM killer?)");
      }
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && clean) {
      ++clean_exits;
      outcome = "stopped by itself";
    } else {
      fail("the writer ended with " + DescribeStatus(status) + ":\n" + Tail(wlog, 20));
      break;
    }
    // Readers must still be running.
    for (size_t r = 0; r < reader_pids.size(); ++r) {
      int rs = 0;
      if (reader_pids[r] > 0 && waitpid(reader_pids[r], &rs, WNOHANG) == reader_pids[r]) {
        reader_pids[r] = -1;
        fail("reader " + std::to_string(r) + " ended with " + DescribeStatus(rs) + ":\n" +
             Tail(ReadLines(paths.ReaderLog(static_cast<int>(r))), 20));
      }
    }
    if (failed) break;
    const auto v0 = Clock::now();
    double open_ms = 0;
    VerifySummary summary;
    Status s = ReopenAndVerify(paths, &cache, &ids, Mix(writer_seed), &verify_counters, &open_ms, &summary);
    if (!s.ok()) {
      fail("after loop " + std::to_string(loop) + " (writer " + outcome + "): " + s.ToString() +
           "\n  the writer's last lines:\n" + Tail(wlog, 10));
      break;
    }
    open_ms_sum += open_ms;
    open_ms_max = std::max(open_ms_max, open_ms);
    std::printf(
        "loop %lld: writer ran %.0f ms, %s; reopen %.0f ms, check %.0f ms: %d contexts (%d resolved), "
        "tables %.3f MB for %.3f MB live (bound %.3f, after %.0f ms)\n",
        static_cast<long long>(loop), ran_ms, outcome.c_str(), open_ms, MsSince(v0), summary.contexts, summary.resolved,
        summary.sst_bytes / 1e6, summary.live_bytes / 1e6, summary.bound / 1e6, summary.reclaim_wait_ms);
    std::fflush(stdout);
  }

  // Stop the readers and collect what they checked.
  std::ofstream(paths.Stop()) << "stop\n";
  std::map<std::string, int64_t> reader_totals;
  for (size_t r = 0; r < reader_pids.size(); ++r) {
    if (reader_pids[r] < 0) continue;
    int rs = 0;
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    pid_t got = 0;
    while ((got = waitpid(reader_pids[r], &rs, WNOHANG)) == 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::vector<std::string> rlog = ReadLines(paths.ReaderLog(static_cast<int>(r)));
    if (got != reader_pids[r]) {
      kill(reader_pids[r], SIGKILL);
      waitpid(reader_pids[r], &rs, 0);
      fail("reader " + std::to_string(r) + " did not stop within 60 s");
    } else if (!WIFEXITED(rs) || WEXITSTATUS(rs) != 0) {
      fail("reader " + std::to_string(r) + " ended with " + DescribeStatus(rs) + ":\n" + Tail(rlog, 20));
    }
    AddCounters(LastStats(rlog), &reader_totals);
  }

  OracleState state;
  (void)LoadLog(paths.Oracle(), &state);
  const double seconds = MsSince(start) / 1000;
  std::printf("\nsqz_stress crash: %s after %lld of %lld loops in %.1f s (seed %lld)\n", failed ? "FAILED" : "passed",
              static_cast<long long>(loop), static_cast<long long>(loops), seconds, static_cast<long long>(seed));
  std::printf("  writer: %lld killed from outside, %lld at a kill point (", static_cast<long long>(outside_kills),
              static_cast<long long>(self_kills));
  bool first = true;
  for (const auto& [point, n] : kill_point_deaths) {
    std::printf("%s%s %lld", first ? "" : ", ", point.c_str(), static_cast<long long>(n));
    first = false;
  }
  std::printf("), %lld inside a build, %lld stopped by itself\n", static_cast<long long>(build_kills),
              static_cast<long long>(clean_exits));
  std::printf(
      "  oracle: %lld builds/replaces and %lld drops returned OK, %lld in-flight operations resolved, "
      "highest generation %llu\n",
      static_cast<long long>(state.puts_done()), static_cast<long long>(state.drops_done()),
      static_cast<long long>(state.resolved()), static_cast<unsigned long long>(state.max_gen()));
  auto get = [](const std::map<std::string, int64_t>& m, const char* k) {
    auto it = m.find(k);
    return static_cast<long long>(it == m.end() ? 0 : it->second);
  };
  std::printf("  writer checks: %lld operations, %lld handles, %lld Attend calls, %lld listings, %lld verifies\n",
              get(writer_totals, "ops"), get(writer_totals, "handles"), get(writer_totals, "queries"),
              get(writer_totals, "lists"), get(writer_totals, "verifies"));
  std::printf(
      "  reader checks: %lld opens, %lld refreshes, %lld handles, %lld Attend calls, %lld verifies, "
      "%lld transient open errors\n",
      get(reader_totals, "opens"), get(reader_totals, "refreshes"), get(reader_totals, "handles"),
      get(reader_totals, "queries"), get(reader_totals, "verifies"), get(reader_totals, "transient"));
  std::printf(
      "  reopen checks: %lld handles, %lld Attend calls, %lld verifies; read-write reopen %.0f ms mean, "
      "%.0f ms max\n",
      static_cast<long long>(verify_counters.handles), static_cast<long long>(verify_counters.queries),
      static_cast<long long>(verify_counters.verifies), loop > 0 ? open_ms_sum / static_cast<double>(loop) : 0,
      open_ms_max);
  if (failed) {
    std::printf("  findings: see FINDING above; the directory is kept: %s\n  reproduce with: %s\n", work.c_str(),
                repro.c_str());
    return kExitFinding;
  }
  std::printf("  findings: none\n");
  if (temp_dir && !flags.Has("keep")) {
    std::error_code ec;
    std::filesystem::remove_all(work, ec);
  }
  return kExitOk;
}

int RunVerify(const Flags& flags) {
  if (!flags.Has("dir")) {
    std::fprintf(stderr, "sqz_stress verify: --dir is required\n");
    return kExitUsage;
  }
  const Paths paths(flags.Get("dir"));
  ReferenceCache cache;
  IdRegistry ids;
  Counters counters;
  double open_ms = 0;
  VerifySummary summary;
  Status s = ReopenAndVerify(paths, &cache, &ids, 1, &counters, &open_ms, &summary);
  if (!s.ok()) {
    ReportFinding(s.ToString());
    return kExitFinding;
  }
  std::printf(
      "verify: %d contexts match the oracle (%d in-flight operations resolved); reopen %.0f ms; tables %llu "
      "bytes for %llu live\n",
      summary.contexts, summary.resolved, open_ms, static_cast<unsigned long long>(summary.sst_bytes),
      static_cast<unsigned long long>(summary.live_bytes));
  return kExitOk;
}

}  // namespace sqz::stress
