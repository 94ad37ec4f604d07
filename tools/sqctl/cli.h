// The sqctl command table: every subcommand is one Command with its flags;
// --help for each is generated from the table (tools/sqctl/main.cc).
//
// A command's run function returns the process exit code: 0 on success,
// 1 on a runtime error (message already printed to stderr, naming the file or
// context and the problem), 2 on a usage error.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sqz/status.h"

namespace sqz::cli {

struct Flag {
  std::string name;   // without the leading "--", e.g. "db"
  std::string value;  // placeholder for the value ("DIR"); "" for a boolean switch
  std::string help;   // one line; mention the default
  bool required = false;
};

class Args {
 public:
  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  // Value of a flag, or `def` when absent.
  std::string Get(const std::string& name, const std::string& def = "") const;
  // Parsed numbers; a malformed value is InvalidArgument naming the flag.
  Status GetDouble(const std::string& name, double def, double* out) const;
  Status GetInt(const std::string& name, long long def, long long* out) const;
  // Comma-separated list of doubles ("0.05,0.125").
  Status GetDoubleList(const std::string& name, const std::vector<double>& def, std::vector<double>* out) const;
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

// --json output: every command builds an nlohmann::ordered_json (fields in
// the order they are added) and prints JsonDump(j) followed by a newline.
// Invalid UTF-8 in strings (a context name is any byte string) is replaced by
// U+FFFD rather than failing the command.
using Json = nlohmann::ordered_json;
std::string JsonDump(const Json& j);
// A float as the shortest decimal that reads back to the same float (0.1f is
// written 0.1, not 0.10000000149011612).
Json JsonFloat(float f);

}  // namespace sqz::cli
