// sqz_stress: a crash-and-concurrency stress test of squeeze in the manner of
// RocksDB's db_stress (docs/RELIABILITY.md, "Stress"). Roles:
//
//   sqz_stress crash [--dir DIR] [--loops N] [--seed S] ...   the driver: readers + a writer killed N times
//   sqz_stress run --dir DIR --seed S ...                      one writer process (the driver starts it)
//   sqz_stress read --dir DIR --seed S ...                     one reader process (the driver starts it)
//   sqz_stress verify --dir DIR                                 reopen a stopped run's database and check it
//
// Exit status: 0 passed, 1 a finding (an oracle violation or an unexpected
// error; printed as "FINDING: ..."), 2 a usage error.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "stress.h"

namespace {

using sqz::stress::Flags;

struct Role {
  const char* name;
  const char* summary;
  std::vector<std::string> flags;
  int (*run)(const Flags&);
};

const std::vector<Role>& Roles() {
  static const std::vector<Role> roles = {
      {"crash",
       "the driver: R reader processes, then N loops of {start a writer process, kill it (SIGKILL from outside, a "
       "library kill point or inside a build) or let it stop, reopen read-write and check the database against the "
       "oracle}.\n  --dir DIR (default: a new directory under $TMPDIR, removed when the run passes unless --keep) "
       "--loops N (20) --seed S (random; printed) --readers R (2) --threads K (3) --names M (8) --min-run-ms (200) "
       "--max-run-ms (1500) --kill-point-prob (0.25) --build-kill-prob (0.05, per build) --clean-exit-prob (0.1) "
       "--keep",
       {"dir", "loops", "seed", "readers", "threads", "names", "min-run-ms", "max-run-ms", "kill-point-prob",
        "build-kill-prob", "clean-exit-prob", "keep!"},
       sqz::stress::RunCrash},
      {"run",
       "one writer process: K threads build, replace, drop and query the contexts of M names against the oracle.\n"
       "  --dir DIR --seed S --threads K (3) --names M (8) --ops N (0: no limit) --duration-ms (10000) "
       "--kill-in-build P (0) --max-kept (3) --loop L",
       {"dir", "seed", "threads", "names", "ops", "duration-ms", "kill-in-build", "max-kept", "loop"},
       sqz::stress::RunWriter},
      {"read",
       "one reader process: read-only opens and refreshes checked against the oracle until DIR/STOP appears.\n"
       "  --dir DIR --seed S --pause-ms (20) --duration-ms (3600000)",
       {"dir", "seed", "pause-ms", "duration-ms"},
       sqz::stress::RunReader},
      {"verify",
       "reopen the database of a stopped run read-write and check it against the oracle (resolving operations "
       "left in flight).\n  --dir DIR",
       {"dir"},
       sqz::stress::RunVerify},
  };
  return roles;
}

void Usage(FILE* out) {
  std::fprintf(out,
               "sqz_stress: crash and concurrency stress test of squeeze against an oracle\n\n"
               "Usage: sqz_stress <role> [options]\n\n");
  for (const Role& r : Roles()) std::fprintf(out, "%s: %s\n\n", r.name, r.summary);
}

int Main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    Usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? sqz::stress::kExitUsage : sqz::stress::kExitOk;
  }
  for (const Role& r : Roles()) {
    if (r.name != std::string(argv[1])) continue;
    Flags flags;
    sqz::Status s = flags.Parse(argc, argv, 2, r.flags);
    if (!s.ok()) {
      std::fprintf(stderr, "sqz_stress %s: %s\n", r.name, s.ToString().c_str());
      return sqz::stress::kExitUsage;
    }
    return r.run(flags);
  }
  std::fprintf(stderr, "sqz_stress: unknown role '%s'\n\n", argv[1]);
  Usage(stderr);
  return sqz::stress::kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FINDING: sqz_stress: exception: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "FINDING: sqz_stress: unknown exception\n");
  }
  return sqz::stress::kExitFinding;
}
