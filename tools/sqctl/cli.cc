#include "cli.h"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace sqz::cli {

std::vector<Command>& Registry() {
  static std::vector<Command>* r = new std::vector<Command>();
  return *r;
}

std::string Args::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

Status Args::GetDouble(const std::string& name, double def, double* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(it->second.c_str(), &end);
  if (it->second.empty() || *end != '\0' || errno == ERANGE) {
    return Status::InvalidArgument("--" + name + " expects a number, got '" + it->second + "'");
  }
  *out = v;
  return Status::OK();
}

Status Args::GetInt(const std::string& name, long long def, long long* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end != '\0' || errno == ERANGE) {
    return Status::InvalidArgument("--" + name + " expects an integer, got '" + it->second + "'");
  }
  *out = v;
  return Status::OK();
}

Status Args::GetDoubleList(const std::string& name, const std::vector<double>& def, std::vector<double>* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  out->clear();
  const std::string& s = it->second;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    std::string item = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || errno == ERANGE) {
      return Status::InvalidArgument("--" + name + " expects comma-separated numbers, got '" + s + "'");
    }
    out->push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return Status::OK();
}

int Fail(const std::string& cmd, const Status& s) {
  std::fprintf(stderr, "sqctl %s: %s\n", cmd.c_str(), s.ToString().c_str());
  return 1;
}

std::string JsonDump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

Json JsonFloat(float f) {
  if (!std::isfinite(f)) return Json(nullptr);  // JSON has no NaN or infinity
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof(buf), f);
  return Json(std::strtod(std::string(buf, r.ptr).c_str(), nullptr));
}

}  // namespace sqz::cli
