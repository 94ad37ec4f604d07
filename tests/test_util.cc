#include "tests/test_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace sqz::testing {

ScopedTempDir::ScopedTempDir(const std::string& tag) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::filesystem::path root = base ? base : std::filesystem::temp_directory_path();
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::filesystem::path p = root / (tag + "-" + std::to_string(rd()));
    std::error_code ec;
    if (std::filesystem::create_directories(p, ec)) {
      path_ = p.string();
      return;
    }
  }
  throw std::runtime_error("cannot create a temporary directory under " + root.string());
}

ScopedTempDir::~ScopedTempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string AllocShimPath() {
  const char* env = std::getenv("SQZ_ALLOC_SHIM");
  const std::string path = env != nullptr && *env != '\0' ? env : SQZ_ALLOC_SHIM_PATH;
  std::error_code ec;
  return std::filesystem::exists(path, ec) ? path : "";
}

int RunCommand(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) return -1;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) {
    if (output) output->append(buf.data(), n);
  }
  int st = pclose(p);
  if (st == -1) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int RunSelfChild(const std::string& gtest_filter, const std::vector<std::string>& env_extra, int timeout_s) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  for (const auto& e : env_extra) env_strings.push_back(e);
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::string a0 = "/proc/self/exe", a1 = "--gtest_filter=" + gtest_filter, a2 = "--gtest_also_run_disabled_tests";
  std::vector<char*> argv = {a0.data(), a1.data(), a2.data(), nullptr};
  // Resolve the binary before fork so the child only calls execve.
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return -1;
  exe[n] = '\0';
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execve(exe, argv.data(), envp.data());
    _exit(127);
  }
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (true) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r < 0) return -1;
    if (r == pid) return status;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

int RunCommandSplit(const std::string& cmd, std::string* out, std::string* err) {
  out->clear();
  err->clear();
  char err_path[] = "/tmp/sqz-stderr.XXXXXX";
  const int fd = mkstemp(err_path);
  if (fd < 0) return -1;
  close(fd);
  // Braces so the stderr redirection applies to the whole command line.
  const std::string full = "{ " + cmd + "\n} 2>" + err_path;
  int rc = -1;
  if (FILE* p = popen(full.c_str(), "r")) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out->append(buf.data(), n);
    const int st = pclose(p);
    if (st != -1) rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  std::ifstream f(err_path, std::ios::binary);
  err->assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  std::remove(err_path);
  return rc;
}

std::string ShellQuote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') {
      q += "'\\''";
    } else {
      q += c;
    }
  }
  return q + "'";
}

std::string SqctlPath() {
  // Overridable so staged binaries can run on another machine (scripts/stage_device.sh).
  const char* env = std::getenv("SQZ_SQCTL");
  return env && *env ? env : SQCTL_PATH;
}

std::map<std::string, std::string> DirectorySnapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    out[std::filesystem::relative(e.path(), dir).string()] =
        std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

}  // namespace sqz::testing
