// Helpers shared by the test suites.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace sqz::testing {

// A fresh, empty directory under $TEST_TMPDIR (or /tmp), removed by the
// destructor.
class ScopedTempDir {
 public:
  explicit ScopedTempDir(const std::string& tag = "sqz");
  ~ScopedTempDir();
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The allocation-failure shim (tests/alloc_fail_shim.cc): $SQZ_ALLOC_SHIM when
// set (staged binaries, e.g. on the GPU machine), else the one built beside
// the tests; "" when neither exists.
std::string AllocShimPath();

// Runs a shell command, returns its exit status (-1 if it could not run)
// and appends stdout+stderr to *output when given.
int RunCommand(const std::string& cmd, std::string* output = nullptr);

// Runs this test binary again in a child process on the tests matching
// `gtest_filter` (disabled tests included), with `env_extra` ("NAME=value")
// added to the environment. fork() + exec give the child a clean process
// (RocksDB's and OpenMP's threads do not survive a bare fork). Waits at most
// `timeout_s` seconds (then kills the child and returns -1); returns the
// child's raw wait status (WIFSIGNALED etc.), -1 if it could not run.
int RunSelfChild(const std::string& gtest_filter, const std::vector<std::string>& env_extra, int timeout_s);

// Like RunCommand, but keeps stdout (*out) and stderr (*err) apart, e.g. to
// parse a command's --json output.
int RunCommandSplit(const std::string& cmd, std::string* out, std::string* err);

// `s` as one word for /bin/sh (single-quoted; any bytes but NUL).
std::string ShellQuote(const std::string& s);

// Path of the built sqctl binary ($SQZ_SQCTL overrides it).
std::string SqctlPath();

// Every regular file under `dir` (relative path) with its bytes: a
// directory's whole state, to check that a command changed nothing.
std::map<std::string, std::string> DirectorySnapshot(const std::string& dir);

}  // namespace sqz::testing
