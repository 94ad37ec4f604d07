#include "stress/oracle.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

namespace sqz::stress {

namespace {

Status Errno(const std::string& what) { return Status::IOError(what + ": " + std::strerror(errno)); }

bool ParseU64(const std::string& s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

bool HasGen(char type) { return type == 'P' || type == 'p' || type == 'R'; }

// Parses the complete lines of `text`; returns the bytes consumed (up to and
// including the last newline).
Status ParseLines(const std::string& text, const std::string& path, std::vector<Record>* out, size_t* consumed) {
  size_t pos = 0;
  while (true) {
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) break;
    Record r;
    SQZ_RETURN_IF_ERROR(Record::Parse(text.substr(pos, nl - pos), &r).WithPrefix(path));
    out->push_back(std::move(r));
    pos = nl + 1;
  }
  *consumed = pos;
  return Status::OK();
}

Status ReadFrom(const std::string& path, uint64_t offset, std::string* text) {
  text->clear();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::OK();  // no log yet
    return Errno("opening " + path);
  }
  char buf[1 << 16];
  off_t at = static_cast<off_t>(offset);
  while (true) {
    const ssize_t n = ::pread(fd, buf, sizeof(buf), at);
    if (n < 0) {
      if (errno == EINTR) continue;
      const Status s = Errno("reading " + path);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    text->append(buf, static_cast<size_t>(n));
    at += n;
  }
  ::close(fd);
  return Status::OK();
}

}  // namespace

std::string Record::ToLine() const {
  // (Appends, not "x" + std::string: a false -Wrestrict from GCC 12 in Release.)
  std::string line(1, type);
  if (HasGen(type)) line.append(" ").append(std::to_string(gen));
  return line.append(" ").append(name).append("\n");
}

Status Record::Parse(const std::string& line, Record* out) {
  Record r;
  r.text = line;
  auto bad = [&](const char* why) { return Status::Corruption("oracle log line '" + line + "': " + why); };
  if (line.size() < 3 || line[1] != ' ') return bad("malformed");
  r.type = line[0];
  std::string rest = line.substr(2);
  switch (r.type) {
    case 'W':
      r.name = rest;
      break;
    case 'P':
    case 'p':
    case 'R': {
      const size_t sp = rest.find(' ');
      if (sp == std::string::npos || !ParseU64(rest.substr(0, sp), &r.gen)) return bad("no generation");
      if (r.type != 'R' && r.gen == 0) return bad("generation 0");
      r.name = rest.substr(sp + 1);
      break;
    }
    case 'D':
    case 'd':
    case 'F':
      r.name = rest;
      break;
    default:
      return bad("unknown record type");
  }
  if (r.name.empty()) return bad("no name");
  *out = std::move(r);
  return Status::OK();
}

Status OracleState::Apply(const Record& r) {
  ++records_;
  if (r.type == 'W') return Status::OK();
  if (HasGen(r.type) && r.gen > max_gen_) max_gen_ = r.gen;
  NameState& n = names_[r.name];
  auto bad = [&](const char* why) { return Status::Corruption("oracle: '" + r.text + "': " + why); };
  switch (r.type) {
    case 'P':
    case 'D':
      if (n.in_flight) return bad("an operation on this name is already in flight");
      n.in_flight = true;
      n.target = r.type == 'P' ? r.gen : 0;
      return Status::OK();
    case 'p':
    case 'd':
      if (!n.in_flight || n.target != (r.type == 'p' ? r.gen : 0)) return bad("ends an operation not in flight");
      n.committed = n.target;
      n.in_flight = false;
      ++(r.type == 'p' ? puts_done_ : drops_done_);
      return Status::OK();
    case 'F':
      if (!n.in_flight) return bad("fails an operation not in flight");
      n.in_flight = false;
      return Status::OK();
    case 'R':
      if (!n.in_flight && r.gen != n.committed) return bad("resolves a settled name to another version");
      if (n.in_flight && r.gen != n.committed && r.gen != n.target) return bad("resolves to a version not allowed");
      n.committed = r.gen;
      n.in_flight = false;
      ++resolved_;
      return Status::OK();
    default:
      return bad("unknown record type");
  }
}

std::set<uint64_t> OracleState::Allowed(const std::string& name) const {
  auto it = names_.find(name);
  if (it == names_.end()) return {0};
  std::set<uint64_t> s = {it->second.committed};
  if (it->second.in_flight) s.insert(it->second.target);
  return s;
}

void Window::Add(const Record& r) {
  if (r.type == 'P' || r.type == 'R') extra_[r.name].insert(r.gen);
  if (r.type == 'D') extra_[r.name].insert(0);
}

std::set<uint64_t> Window::Allowed(const std::string& name) const {
  std::set<uint64_t> s = start_.Allowed(name);
  auto it = extra_.find(name);
  if (it != extra_.end()) s.insert(it->second.begin(), it->second.end());
  return s;
}

std::set<std::string> Window::Names() const {
  std::set<std::string> n;
  for (const auto& [name, st] : start_.names()) n.insert(name);
  for (const auto& [name, gens] : extra_) n.insert(name);
  return n;
}

std::string AllowedToString(const std::set<uint64_t>& s) {
  std::string out = "{";
  for (uint64_t g : s) {
    if (out.size() > 1) out += ", ";
    out += g == 0 ? std::string("absent") : "gen " + std::to_string(g);
  }
  return out + "}";
}

Status LogTail::Poll(OracleState* state, std::vector<Record>* records) {
  std::string text;
  SQZ_RETURN_IF_ERROR(ReadFrom(path_, offset_, &text));
  std::vector<Record> fresh;
  size_t consumed = 0;
  SQZ_RETURN_IF_ERROR(ParseLines(text, path_, &fresh, &consumed));
  offset_ += consumed;
  for (auto& r : fresh) {
    SQZ_RETURN_IF_ERROR(state->Apply(r));
    if (records) records->push_back(std::move(r));
  }
  return Status::OK();
}

Status LoadLog(const std::string& path, OracleState* state, std::vector<Record>* records) {
  LogTail tail(path);
  return tail.Poll(state, records);
}

LogWriter::~LogWriter() {
  if (fd_ >= 0) ::close(fd_);
}

Status LogWriter::Open(const std::string& path) {
  std::string text;
  SQZ_RETURN_IF_ERROR(ReadFrom(path, 0, &text));
  std::vector<Record> recs;
  size_t consumed = 0;
  SQZ_RETURN_IF_ERROR(ParseLines(text, path, &recs, &consumed));
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) return Errno("opening " + path);
  // A writer killed inside write() can leave a partial line: cut it, so the
  // next record starts on a line of its own.
  if (consumed != text.size() && ::ftruncate(fd_, static_cast<off_t>(consumed)) != 0) {
    return Errno("truncating " + path);
  }
  for (auto& r : recs) {
    SQZ_RETURN_IF_ERROR(state_.Apply(r));
    records_.push_back(std::move(r));
  }
  next_gen_ = state_.max_gen() + 1;
  return Status::OK();
}

Status LogWriter::Append(const Record& r) {
  Record copy = r;
  const std::string line = r.ToLine();
  copy.text = line.substr(0, line.size() - 1);
  std::lock_guard<std::mutex> lock(mu_);
  SQZ_RETURN_IF_ERROR(state_.Apply(copy));
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("appending to the oracle log");
    }
    done += static_cast<size_t>(n);
  }
  if (::fdatasync(fd_) != 0) return Errno("syncing the oracle log");
  records_.push_back(std::move(copy));
  return Status::OK();
}

uint64_t LogWriter::NewGeneration() {
  std::lock_guard<std::mutex> lock(mu_);
  return next_gen_++;
}

void LogWriter::Snapshot(OracleState* state, size_t* position) const {
  std::lock_guard<std::mutex> lock(mu_);
  *state = state_;
  *position = records_.size();
}

std::vector<Record> LogWriter::Since(size_t position) const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<Record>(records_.begin() + static_cast<std::ptrdiff_t>(position), records_.end());
}

NameState LogWriter::Get(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = state_.names().find(name);
  return it == state_.names().end() ? NameState() : it->second;
}

}  // namespace sqz::stress
