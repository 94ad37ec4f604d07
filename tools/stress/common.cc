// What the roles share: flags, names, reporting.
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <sstream>

#include "stress.h"

namespace sqz::stress {

Status Flags::Parse(int argc, char** argv, int first, const std::vector<std::string>& known) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) return Status::InvalidArgument("unexpected argument '" + a + "'");
    a = a.substr(2);
    bool is_switch = false, found = false;
    for (const auto& k : known) {
      if (k == a || k == a + "!") {
        found = true;
        is_switch = k.back() == '!';
      }
    }
    if (!found) return Status::InvalidArgument("unknown flag --" + a);
    if (is_switch) {
      values_[a].assign(1, '1');  // (not = "1": a false -Wrestrict from GCC 12 in Release)
    } else {
      if (i + 1 >= argc) return Status::InvalidArgument("--" + a + " needs a value");
      values_[a] = argv[++i];
    }
  }
  return Status::OK();
}

std::string Flags::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

Status Flags::GetInt(const std::string& name, int64_t def, int64_t min, int64_t max, int64_t* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) return *out = def, Status::OK();
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  if (errno != 0 || end == it->second.c_str() || *end != '\0' || v < min || v > max) {
    return Status::InvalidArgument("--" + name + " " + it->second + ": expected an integer in [" + std::to_string(min) +
                                   ", " + std::to_string(max) + "]");
  }
  *out = v;
  return Status::OK();
}

Status Flags::GetDouble(const std::string& name, double def, double min, double max, double* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) return *out = def, Status::OK();
  char* end = nullptr;
  const double v = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end != '\0' || !std::isfinite(v) || v < min || v > max) {
    return Status::InvalidArgument("--" + name + " " + it->second + ": expected a number in [" + std::to_string(min) +
                                   ", " + std::to_string(max) + "]");
  }
  *out = v;
  return Status::OK();
}

std::vector<std::string> ContextNames(int n) {
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "ctx-%02d", i);
    names.push_back(buf);
  }
  return names;
}

void AddCounters(const std::string& line, std::map<std::string, int64_t>* into) {
  std::istringstream in(line);
  std::string field;
  while (in >> field) {
    const size_t eq = field.find('=');
    if (eq == std::string::npos) continue;
    char* end = nullptr;
    const long long v = std::strtoll(field.c_str() + eq + 1, &end, 10);
    if (*end == '\0') (*into)[field.substr(0, eq)] += v;
  }
}

void ReportFinding(const std::string& what) {
  std::fprintf(stderr, "FINDING: %s\n", what.c_str());
  std::fflush(stderr);
}

void PrintLine(const std::string& line) {
  const std::string s = line + "\n";
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(STDOUT_FILENO, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

}  // namespace sqz::stress
