// The stress test's oracle (tools/stress, docs/RELIABILITY.md "Stress"): an
// append-only log of the intents and results of every mutation the writer
// makes, from which any process can tell, for each context name, which
// versions a database view may show.
//
// A version of a name is a generation number g (1, 2, ...: unique over the
// whole run, never reused; 0 means "absent"). The content of generation g of
// a name is a pure function of (name, g) (stress/content.h), so the expected
// answers of any version can be recomputed from the number alone.
//
// The log is a text file, one record per line, appended and fsync'd before
// the operation it announces starts, so that after a SIGKILL the log names
// every operation that may have reached the database:
//   W <loop> <pid> <seed>   a writer process started (information only)
//   P <gen> <name>          a build or replace of `name` as generation gen starts
//   p <gen> <name>          ... it returned OK
//   D <name>                a drop of `name` starts
//   d <name>                ... it returned OK
//   F <name>                the operation in flight on `name` returned an error (state unchanged)
//   R <gen> <name>          after a crash, the verifier found `name` at gen (0: absent)
// The writer runs at most one operation per name at a time, so each name
// has at most one operation in flight: its state is the committed version
// plus, while an operation is in flight (begun, not ended, not resolved),
// that operation's target. A killed operation stays in flight until the
// verifier resolves it (R) from what the reopened database holds.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "sqz/status.h"

namespace sqz::stress {

struct Record {
  char type = 0;  // 'W', 'P', 'p', 'D', 'd', 'F', 'R'
  uint64_t gen = 0;
  std::string name;  // 'W': "<loop> <pid> <seed>"
  std::string text;  // the whole line (without the newline), for messages

  std::string ToLine() const;  // the line written to the log (with the newline)
  static Status Parse(const std::string& line, Record* out);
};

struct NameState {
  uint64_t committed = 0;  // 0: absent
  bool in_flight = false;
  uint64_t target = 0;  // the in-flight operation's result (0: a drop)
};

// The state of every name after a prefix of the log.
class OracleState {
 public:
  // Applies one record. FailedPrecondition-like errors (a record that breaks
  // the protocol, e.g. a second operation on a name in flight) are
  // Corruption: the log or the writer is wrong.
  Status Apply(const Record& r);
  // Versions a view taken now may show for `name` (committed, and the
  // in-flight target if any). {0} for a name never seen.
  std::set<uint64_t> Allowed(const std::string& name) const;
  const std::map<std::string, NameState>& names() const { return names_; }
  uint64_t max_gen() const { return max_gen_; }
  int64_t records() const { return records_; }
  // Counts of completed operations (p, d) and resolutions (R).
  int64_t puts_done() const { return puts_done_; }
  int64_t drops_done() const { return drops_done_; }
  int64_t resolved() const { return resolved_; }

 private:
  std::map<std::string, NameState> names_;
  uint64_t max_gen_ = 0;
  int64_t records_ = 0;
  int64_t puts_done_ = 0, drops_done_ = 0, resolved_ = 0;
};

// The versions a view may show when it was taken somewhere between two
// moments of the log: from the state at the first moment, plus every
// operation begun or resolved between the two.
class Window {
 public:
  explicit Window(const OracleState& start) : start_(start) {}
  void Add(const Record& r);
  std::set<uint64_t> Allowed(const std::string& name) const;
  // Every name the window knows of (a name absent from it allows only 0).
  std::set<std::string> Names() const;

 private:
  OracleState start_;
  std::map<std::string, std::set<uint64_t>> extra_;
};

// "{0, 7}" for messages (0 printed as "absent").
std::string AllowedToString(const std::set<uint64_t>& s);

// Follows a log file written by another process: Poll() parses the complete
// lines appended since the last call (an incomplete last line is left for
// later).
class LogTail {
 public:
  explicit LogTail(std::string path) : path_(std::move(path)) {}
  // Applies new records to *state and appends them to *records (optional).
  Status Poll(OracleState* state, std::vector<Record>* records);

 private:
  std::string path_;
  uint64_t offset_ = 0;
};

// The writer's side: appends records (write + fdatasync, under a mutex, so
// the file order is the order of the in-memory state) and keeps the state
// and the list of records in memory, so threads of the writer can take
// windows without reading the file.
class LogWriter {
 public:
  ~LogWriter();
  // Opens `path` for appending, first cutting an incomplete last line left
  // by a killed writer, and loads the state from it.
  Status Open(const std::string& path);
  Status Append(const Record& r);
  // The next generation number (max in the log + 1), reserved.
  uint64_t NewGeneration();
  // The state now and the number of records so far (a window's start).
  void Snapshot(OracleState* state, size_t* position) const;
  // Records appended since `position`.
  std::vector<Record> Since(size_t position) const;
  NameState Get(const std::string& name) const;

 private:
  mutable std::mutex mu_;
  int fd_ = -1;
  OracleState state_;
  std::vector<Record> records_;
  uint64_t next_gen_ = 1;
};

// Reads a whole log (complete lines only) into *state.
Status LoadLog(const std::string& path, OracleState* state, std::vector<Record>* records = nullptr);

}  // namespace sqz::stress
