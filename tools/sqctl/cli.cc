#include "cli.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

namespace sqz::cli {

std::vector<Command>& Registry() {
  static std::vector<Command>* r = new std::vector<Command>();
  return *r;
}

std::string Args::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

namespace {

std::string FormatDouble(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

// Strings are built by appending to a std::string: GCC 12 at -O3 reports a
// false -Wrestrict for `"literal" + std::string` (operator+(const char*, string&&)).
template <typename T>
std::string IntRange(T lo, T hi) {
  std::string s = "[";
  s += std::to_string(lo);
  s += ", ";
  s += std::to_string(hi);
  s += ']';
  return s;
}

Status Malformed(const std::string& name, const char* what, const std::string& allowed, const std::string& value) {
  return Status::InvalidArgument("--" + name + " expects " + what + " in " + allowed + ", got '" + value + "'");
}

Status OutOfRange(const std::string& name, const std::string& value, const std::string& allowed) {
  return Status::InvalidArgument("--" + name + " " + value + " is out of range; allowed: " + allowed);
}

enum class IntText { kOk, kMalformed, kTooLarge };

// Decimal integer with an optional sign, as a sign and a 64-bit magnitude.
IntText ParseIntText(const std::string& text, bool* negative, uint64_t* magnitude) {
  const char* p = text.data();
  const char* end = p + text.size();
  *negative = false;
  if (p != end && (*p == '-' || *p == '+')) *negative = *p++ == '-';
  if (p == end || *p < '0' || *p > '9') return IntText::kMalformed;
  auto r = std::from_chars(p, end, *magnitude);
  if (r.ptr != end) return IntText::kMalformed;
  if (r.ec == std::errc::result_out_of_range) return IntText::kTooLarge;
  return r.ec == std::errc() ? IntText::kOk : IntText::kMalformed;
}

// Parses a finite double in `range` (one value of flag `name`).
Status ParseDouble(const std::string& name, const std::string& text, const Range& range, double* out) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || std::isspace(static_cast<unsigned char>(text[0]))) {
    return Malformed(name, "a number", range.ToString(), text);
  }
  if (!std::isfinite(v) || errno == ERANGE || !range.Contains(v)) return OutOfRange(name, text, range.ToString());
  *out = v;
  return Status::OK();
}

}  // namespace

bool Range::Contains(double v) const {
  if (!std::isfinite(v)) return false;
  const bool above = lo_open ? v > lo : v >= lo;
  const bool below = hi_open ? v < hi : v <= hi;
  return above && below;
}

std::string Range::ToString() const {
  if (std::isinf(lo) && std::isinf(hi)) return "any finite number";
  std::string s;
  if (std::isinf(hi)) {
    s = lo_open ? "> " : ">= ";
    s += FormatDouble(lo);
  } else if (std::isinf(lo)) {
    s = hi_open ? "< " : "<= ";
    s += FormatDouble(hi);
  } else {
    s = lo_open ? "(" : "[";
    s += FormatDouble(lo);
    s += ", ";
    s += FormatDouble(hi);
    s += hi_open ? ')' : ']';
  }
  return s;
}

namespace {
// The sign and magnitude of an integer option, or the usage error naming it.
Status ParseIntArg(const std::string& name, const std::string& text, const std::string& allowed, bool* negative,
                   uint64_t* magnitude) {
  switch (ParseIntText(text, negative, magnitude)) {
    case IntText::kMalformed:
      return Malformed(name, "an integer", allowed, text);
    case IntText::kTooLarge:
      return OutOfRange(name, text, allowed);
    case IntText::kOk:
      break;
  }
  return Status::OK();
}
}  // namespace

Status Args::GetInt(const std::string& name, int64_t def, int64_t min, int64_t max, int64_t* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  const std::string& text = it->second;
  const std::string allowed = IntRange(min, max);
  bool negative;
  uint64_t magnitude;
  SQZ_RETURN_IF_ERROR(ParseIntArg(name, text, allowed, &negative, &magnitude));
  constexpr uint64_t kMaxPositive = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  if (magnitude > kMaxPositive + (negative ? 1 : 0)) return OutOfRange(name, text, allowed);
  const int64_t v = !negative                  ? static_cast<int64_t>(magnitude)
                    : magnitude > kMaxPositive ? std::numeric_limits<int64_t>::min()
                                               : -static_cast<int64_t>(magnitude);
  if (v < min || v > max) return OutOfRange(name, text, allowed);
  *out = v;
  return Status::OK();
}

Status Args::GetInt(const std::string& name, int def, int min, int max, int* out) const {
  int64_t v;
  SQZ_RETURN_IF_ERROR(GetInt(name, static_cast<int64_t>(def), min, max, &v));
  *out = static_cast<int>(v);  // in [min, max], so it fits
  return Status::OK();
}

Status Args::GetUint64(const std::string& name, uint64_t def, uint64_t min, uint64_t max, uint64_t* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  const std::string& text = it->second;
  const std::string allowed = IntRange(min, max);
  bool negative;
  uint64_t v;
  SQZ_RETURN_IF_ERROR(ParseIntArg(name, text, allowed, &negative, &v));
  if ((negative && v != 0) || v < min || v > max) return OutOfRange(name, text, allowed);
  *out = v;
  return Status::OK();
}

Status Args::GetDouble(const std::string& name, double def, const Range& range, double* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  return ParseDouble(name, it->second, range, out);
}

Status Args::GetDoubleList(const std::string& name, const std::vector<double>& def, const Range& range,
                           std::vector<double>* out) const {
  auto it = values_.find(name);
  if (it == values_.end()) {
    *out = def;
    return Status::OK();
  }
  std::vector<double> values;
  const std::string& s = it->second;
  size_t start = 0;
  while (true) {
    const size_t comma = s.find(',', start);
    const std::string item = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    double v;
    Status st = ParseDouble(name, item, range, &v);
    if (!st.ok()) {
      return Status::InvalidArgument(st.message() + (s == item ? "" : " (in '" + s + "')"));
    }
    values.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  *out = std::move(values);
  return Status::OK();
}

int Fail(const std::string& cmd, const Status& s) {
  std::fprintf(stderr, "sqctl %s: %s\n", cmd.c_str(), s.ToString().c_str());
  return 1;
}

Status OpenDatabase(const std::string& path, OpenMode mode, std::unique_ptr<DB>* db) {
  Options o;
  o.read_only = mode == OpenMode::kReadOnly;
  o.create_if_missing = mode == OpenMode::kCreate;
  if (mode != OpenMode::kCreate) {
    // Said here rather than left to the storage layer, whose read-only open
    // ignores create_if_missing: a missing or empty directory is no database.
    std::error_code ec;
    if (!std::filesystem::exists(path, ec) ||
        (std::filesystem::is_directory(path, ec) && std::filesystem::is_empty(path, ec))) {
      return Status::NotFound(path + ": no squeeze database here (build one with sqctl build-index)");
    }
  }
  return DB::Open(o, path, db);
}

int Usage(const std::string& cmd, const std::string& message) {
  std::fprintf(stderr, "sqctl %s: %s (see sqctl %s --help)\n", cmd.c_str(), message.c_str(), cmd.c_str());
  return 2;
}

Status ParseDevice(const Args& args, OpenOptions* o) {
  const std::string v = args.Get("device", "cpu");
  if (v == "cpu") {
    o->device = Device::kCpu;
    return Status::OK();
  }
  if (v == "cuda") {
    o->device = Device::kCuda;
    o->device_id = 0;
    return Status::OK();
  }
  if (v.rfind("cuda:", 0) == 0 && v.size() > 5 && v.size() <= 8 &&
      v.find_first_not_of("0123456789", 5) == std::string::npos) {
    o->device = Device::kCuda;
    o->device_id = std::stoi(v.substr(5));
    return Status::OK();
  }
  return Status::InvalidArgument("--device expects cpu, cuda or cuda:N, got '" + v + "'");
}

Status CheckQueriesAttendFinite(const ContextHandle& h, const std::vector<query::LayerQueries>& layers) {
  const ContextInfo& info = h.info();
  QueryOptions dense;
  dense.mode = SelectionMode::kDense;
  for (const auto& lq : layers) {
    std::vector<float> o(static_cast<size_t>(info.n_q_heads) * lq.T * info.head_dim),
        lse(static_cast<size_t>(info.n_q_heads) * lq.T);
    // Attend refuses an answer whose scores overflowed fp32.
    SQZ_RETURN_IF_ERROR(h.Attend(lq.layer, lq.q.data(), lq.T, dense, o.data(), lse.data(), nullptr));
  }
  return Status::OK();
}

std::string JsonDump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

Json JsonFloat(float f) {
  if (!std::isfinite(f)) return Json(nullptr);  // JSON has no NaN or infinity
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof(buf), f);
  return Json(std::strtod(std::string(buf, r.ptr).c_str(), nullptr));
}

}  // namespace sqz::cli
