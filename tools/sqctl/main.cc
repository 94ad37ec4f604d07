// sqctl: the command-line front end of squeeze. A thin layer over the
// library: each subcommand is a cli::Command registered by a cmd_*.cc file;
// this file parses flags against the command's table and generates --help.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "cli.h"

namespace {

using sqz::cli::Command;
using sqz::cli::Registry;

void PrintCommandHelp(const Command& c, FILE* out) {
  std::fprintf(out, "%s\n\nUsage: %s\n", c.summary.c_str(), c.usage.c_str());
  if (c.flags.empty()) return;
  std::fprintf(out, "\nOptions:\n");
  size_t width = 0;
  for (const auto& f : c.flags) width = std::max(width, f.name.size() + (f.value.empty() ? 0 : f.value.size() + 1));
  for (const auto& f : c.flags) {
    std::string left = "--" + f.name + (f.value.empty() ? "" : " " + f.value);
    std::fprintf(out, "  %-*s  %s%s\n", static_cast<int>(width + 2), left.c_str(), f.help.c_str(),
                 f.required ? " (required)" : "");
  }
  std::fprintf(out, "  %-*s  %s\n", static_cast<int>(width + 2), "--help", "show this help");
}

void PrintTopHelp(FILE* out) {
  std::fprintf(out,
               "sqctl: build, inspect and query a squeeze context database\n"
               "(KV caches of fixed LLM contexts plus a hierarchical centroid index for sparse attention).\n\n"
               "Usage: sqctl <command> [options]    (sqctl <command> --help for its options)\n\nCommands:\n");
  std::vector<const Command*> cmds;
  for (const auto& c : Registry()) cmds.push_back(&c);
  std::sort(cmds.begin(), cmds.end(), [](const Command* a, const Command* b) { return a->name < b->name; });
  for (const Command* c : cmds) std::fprintf(out, "  %-12s %s\n", c->name.c_str(), c->summary.c_str());
}

// FAISS's k-means alternates OpenMP regions with multithreaded OpenBLAS
// calls; by default libgomp's idle threads spin between regions and take
// the cores OpenBLAS's threads need. With passive waiting a 32K-token build
// runs its k-means in 3.4 s instead of 5.3-6.0 on a 2-core machine
// (docs/PERFORMANCE.md, "Build"). libgomp reads OMP_WAIT_POLICY when it is
// loaded, before main: so sqctl sets it and starts itself again, once,
// unless the caller chose a policy. If the new start fails, it carries on.
void PreferPassiveOpenMp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
  execv("/proc/self/exe", argv);
}

}  // namespace

int Main(int argc, char** argv);

// No exception leaves sqctl as a crash: an allocation that fails (a huge
// input, ulimit -v) or any other escaped exception is reported as an error
// (exit 1) naming the command.
int main(int argc, char** argv) {
  // Past `ulimit -f` a write must fail with EFBIG (reported as an IOError
  // naming the file) instead of killing the process without a word.
  signal(SIGXFSZ, SIG_IGN);
  PreferPassiveOpenMp(argv);
  const char* cmd = argc >= 2 ? argv[1] : "";
  try {
    return Main(argc, argv);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "sqctl %s: out of memory: an allocation failed and the command stopped\n", cmd);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sqctl %s: internal error: %s\n", cmd, e.what());
  } catch (...) {
    std::fprintf(stderr, "sqctl %s: internal error (unknown exception)\n", cmd);
  }
  return 1;
}

int Main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    PrintTopHelp(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  const Command* cmd = nullptr;
  for (const auto& c : Registry()) {
    if (c.name == name) cmd = &c;
  }
  if (!cmd) {
    std::fprintf(stderr, "sqctl: unknown command '%s'\n\n", name.c_str());
    PrintTopHelp(stderr);
    return 2;
  }
  sqz::cli::Args args;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      PrintCommandHelp(*cmd, stdout);
      return 0;
    }
    if (a.rfind("--", 0) != 0) {
      std::fprintf(stderr, "sqctl %s: unexpected argument '%s' (options start with --; see sqctl %s --help)\n",
                   name.c_str(), a.c_str(), name.c_str());
      return 2;
    }
    std::string flag = a.substr(2), value;
    size_t eq = flag.find('=');
    if (eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    }
    auto it = std::find_if(cmd->flags.begin(), cmd->flags.end(), [&](const auto& f) { return f.name == flag; });
    if (it == cmd->flags.end()) {
      std::fprintf(stderr, "sqctl %s: unknown option '--%s' (see sqctl %s --help)\n", name.c_str(), flag.c_str(),
                   name.c_str());
      return 2;
    }
    if (!it->value.empty() && eq == std::string::npos) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "sqctl %s: option '--%s' needs a value %s\n", name.c_str(), flag.c_str(),
                     it->value.c_str());
        return 2;
      }
      value = argv[++i];
    } else if (it->value.empty() && eq != std::string::npos) {
      std::fprintf(stderr, "sqctl %s: option '--%s' takes no value\n", name.c_str(), flag.c_str());
      return 2;
    }
    args.values_[flag] = value;
  }
  for (const auto& f : cmd->flags) {
    if (f.required && !args.Has(f.name)) {
      std::fprintf(stderr, "sqctl %s: missing required option --%s %s (see sqctl %s --help)\n", name.c_str(),
                   f.name.c_str(), f.value.c_str(), name.c_str());
      return 2;
    }
  }
  return cmd->run(args);
}
