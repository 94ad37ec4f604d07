// The sqctl command table: every subcommand is one Command with its flags;
// --help for each is generated from the table (tools/sqctl/main.cc).
//
// A command's run function returns the process exit code: 0 on success,
// 1 on a runtime error (message already printed to stderr, naming the file or
// context and the problem), 2 on a usage error.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "query/eval.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "sqz/status.h"

namespace sqz::cli {

struct Flag {
  std::string name;   // without the leading "--", e.g. "db"
  std::string value;  // placeholder for the value ("DIR"); "" for a boolean switch
  std::string help;   // one line; mention the default
  bool required = false;
};

// Allowed values of a floating-point option: an interval whose ends are open
// or closed. Every floating-point option must also be finite.
struct Range {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = true;
  bool hi_open = true;
  bool Contains(double v) const;
  std::string ToString() const;  // "(0, 1]", or "any finite number"
};
inline constexpr Range kAnyFinite{};
inline constexpr Range kFractionOpenClosed{0, 1, true, false};  // (0, 1]: budgets, cluster ratios
inline constexpr Range kFractionOpen{0, 1, true, true};         // (0, 1): quantiles

// The parsed flags of one command line. Every getter returns the default when
// the flag is absent. A value that does not parse, or lies outside the allowed
// range, is InvalidArgument with a message naming the flag, the value given
// and what is allowed; commands report these as usage errors (Usage, exit 2).
class Args {
 public:
  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  // Value of a flag, or `def` when absent.
  std::string Get(const std::string& name, const std::string& def = "") const;
  // Integers in [min, max] (decimal, optional sign). Give the real range of
  // the field the flag feeds: an int field never accepts more than INT_MAX.
  Status GetInt(const std::string& name, int64_t def, int64_t min, int64_t max, int64_t* out) const;
  Status GetInt(const std::string& name, int def, int min, int max, int* out) const;
  Status GetUint64(const std::string& name, uint64_t def, uint64_t min, uint64_t max, uint64_t* out) const;
  // A finite number in `range` (NaN and infinities are refused).
  Status GetDouble(const std::string& name, double def, const Range& range, double* out) const;
  // Comma-separated list of finite numbers in `range` ("0.05,0.125").
  Status GetDoubleList(const std::string& name, const std::vector<double>& def, const Range& range,
                       std::vector<double>* out) const;
  std::map<std::string, std::string> values_;
};

struct Command {
  std::string name;
  std::string summary;  // one line for the command list
  std::string usage;    // synopsis line, e.g. "sqctl list --db DIR [--json]"
  std::vector<Flag> flags;
  int (*run)(const Args& args) = nullptr;
};

// Registry filled by each cmd_*.cc through a static Registrar.
std::vector<Command>& Registry();
struct Registrar {
  explicit Registrar(Command c) { Registry().push_back(std::move(c)); }
};

// Prints "sqctl <cmd>: <status message>" to stderr and returns 1.
int Fail(const std::string& cmd, const Status& s);
// How a command opens the database of --db.
enum class OpenMode {
  kReadOnly,   // list, info, query, eval, verify: no lock, nothing written
  kReadWrite,  // drop: an existing database
  kCreate,     // build-index, demo: created when missing
};
// Opens the database at `path`. Without kCreate, a path with no database is
// NotFound ("no squeeze database here") and nothing is created.
Status OpenDatabase(const std::string& path, OpenMode mode, std::unique_ptr<DB>* db);

// A usage error: prints "sqctl <cmd>: <message> (see sqctl <cmd> --help)" to
// stderr and returns 2.
int Usage(const std::string& cmd, const std::string& message);

// --json output: every command builds an nlohmann::ordered_json (fields in
// the order they are added) and prints JsonDump(j) followed by a newline.
// Invalid UTF-8 in strings (a context name is any byte string) is replaced by
// U+FFFD rather than failing the command.
// --device cpu | cuda | cuda:N (default cpu) into open options; a bad value
// is InvalidArgument naming the flag (a usage error).
Status ParseDevice(const Args& args, OpenOptions* o);
inline const char* kDeviceFlagHelp =
    "cpu (default), cuda or cuda:N: with cuda the context's pages and index are loaded into GPU memory and "
    "the GPU engine answers (prefill and per-head selections run on the CPU)";

// Before `eval`: one dense pass over the file's queries, so queries whose
// attention scores overflow float32 (1e38) are refused up front (Attend
// returns InvalidArgument naming the layer and the largest query value).
Status CheckQueriesAttendFinite(const ContextHandle& h, const std::vector<query::LayerQueries>& layers);

using Json = nlohmann::ordered_json;
std::string JsonDump(const Json& j);
// A float as the shortest decimal that reads back to the same float (0.1f is
// written 0.1, not 0.10000000149011612).
Json JsonFloat(float f);

}  // namespace sqz::cli
