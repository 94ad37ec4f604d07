// sqz_stress: the roles of the stress program (tools/stress/main.cc lists
// them; docs/RELIABILITY.md, "Stress", describes the test).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/status.h"
#include "stress/content.h"
#include "stress/oracle.h"
#include "stress/verify.h"

namespace sqz::stress {

// Exit codes of the roles.
constexpr int kExitOk = 0;
constexpr int kExitFinding = 1;  // an oracle violation or an unexpected error: a bug
constexpr int kExitUsage = 2;

// Flags of one command line: "--name value" pairs.
class Flags {
 public:
  // Parses argv[first..]; every flag must be in `known` ("name" takes a
  // value, "name!" is a switch).
  Status Parse(int argc, char** argv, int first, const std::vector<std::string>& known);
  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;
  Status GetInt(const std::string& name, int64_t def, int64_t min, int64_t max, int64_t* out) const;
  Status GetDouble(const std::string& name, double def, double min, double max, double* out) const;

 private:
  std::map<std::string, std::string> values_;
};

// The files of a stress run under its work directory.
struct Paths {
  explicit Paths(std::string work) : work(std::move(work)) {}
  std::string Db() const { return work + "/db"; }
  std::string Oracle() const { return work + "/oracle.log"; }
  std::string Stop() const { return work + "/STOP"; }
  std::string WriterLog() const { return work + "/writer.log"; }
  std::string ReaderLog(int i) const { return work + "/reader-" + std::to_string(i) + ".log"; }
  std::string work;
};

// Names of the contexts the writer works on: "ctx-00" ...
std::vector<std::string> ContextNames(int n);

// Parses Counters::ToString() back (unknown keys ignored) and adds it to *into.
void AddCounters(const std::string& line, std::map<std::string, int64_t>* into);

// The roles (main.cc dispatches). Each returns the process exit code.
int RunWriter(const Flags& flags);
int RunReader(const Flags& flags);
int RunCrash(const Flags& flags);
int RunVerify(const Flags& flags);

// Prints "FINDING: <what>" on stderr (and flushes).
void ReportFinding(const std::string& what);
// Writes one line to stdout at once (the writer may be killed any moment).
void PrintLine(const std::string& line);

}  // namespace sqz::stress
