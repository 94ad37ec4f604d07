#include "util/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <utility>

#include "util/half.h"

namespace sqz {

namespace {

// A JSON value, just enough for safetensors headers.
struct JsonMember;
struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = Kind::kNull;
  bool b = false;
  bool is_integer = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
  std::vector<Json> arr;
  std::vector<JsonMember> obj;  // in file order
};
// One member of an object. Not std::pair<std::string, Json>: a pair needs
// its types complete where it is named, and Json is not yet inside its own
// definition (libstdc++ with clang refuses it).
struct JsonMember {
  std::string key;
  Json value;
};

class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : t_(text) {}

  bool Parse(Json* out, std::string* err) {
    if (!Value(out, 0)) {
      *err = err_ + " at byte " + std::to_string(pos_);
      return false;
    }
    SkipWs();
    if (pos_ != t_.size()) {
      *err = "trailing characters at byte " + std::to_string(pos_);
      return false;
    }
    return true;
  }

 private:
  void SkipWs() {
    while (pos_ < t_.size() && (t_[pos_] == ' ' || t_[pos_] == '\t' || t_[pos_] == '\n' || t_[pos_] == '\r')) ++pos_;
  }
  bool Fail(const char* msg) {
    err_ = msg;
    return false;
  }
  bool Value(Json* v, int depth) {
    if (depth > 64) return Fail("nesting too deep");
    SkipWs();
    if (pos_ >= t_.size()) return Fail("unexpected end of JSON");
    char c = t_[pos_];
    if (c == '{') return Object(v, depth);
    if (c == '[') return Array(v, depth);
    if (c == '"') {
      v->kind = Json::Kind::kString;
      return String(&v->s);
    }
    if (c == 't' && t_.substr(pos_, 4) == "true") {
      pos_ += 4;
      v->kind = Json::Kind::kBool;
      v->b = true;
      return true;
    }
    if (c == 'f' && t_.substr(pos_, 5) == "false") {
      pos_ += 5;
      v->kind = Json::Kind::kBool;
      return true;
    }
    if (c == 'n' && t_.substr(pos_, 4) == "null") {
      pos_ += 4;
      return true;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return Number(v);
    return Fail("unexpected character");
  }
  bool Number(Json* v) {
    size_t start = pos_;
    if (t_[pos_] == '-') ++pos_;
    bool integer = true;
    while (pos_ < t_.size()) {
      char c = t_[pos_];
      if (c >= '0' && c <= '9') {
        ++pos_;
      } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
        integer = false;
        ++pos_;
      } else {
        break;
      }
    }
    std::string num(t_.substr(start, pos_ - start));
    if (num == "-" || num.empty()) return Fail("malformed number");
    v->kind = Json::Kind::kNumber;
    errno = 0;
    char* end = nullptr;
    if (integer) {
      long long x = std::strtoll(num.c_str(), &end, 10);
      if (errno == ERANGE || *end != '\0') return Fail("integer out of range");
      v->is_integer = true;
      v->i = x;
      v->d = static_cast<double>(x);
    } else {
      double x = std::strtod(num.c_str(), &end);
      if (*end != '\0') return Fail("malformed number");
      v->d = x;
    }
    return true;
  }
  bool String(std::string* out) {
    ++pos_;  // opening quote
    out->clear();
    while (pos_ < t_.size()) {
      char c = t_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in string");
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= t_.size()) break;
      char e = t_[pos_++];
      switch (e) {
        case '"':
          out->push_back('"');
          break;
        case '\\':
          out->push_back('\\');
          break;
        case '/':
          out->push_back('/');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          if (pos_ + 4 > t_.size()) return Fail("truncated \\u escape");
          unsigned cp = 0;
          for (int k = 0; k < 4; ++k) {
            char h = t_[pos_++];
            cp <<= 4;
            if (h >= '0' && h <= '9')
              cp |= h - '0';
            else if (h >= 'a' && h <= 'f')
              cp |= h - 'a' + 10;
            else if (h >= 'A' && h <= 'F')
              cp |= h - 'A' + 10;
            else
              return Fail("bad \\u escape");
          }
          // Encode as UTF-8 (surrogate pairs are kept as two 3-byte units).
          if (cp < 0x80) {
            out->push_back(static_cast<char>(cp));
          } else if (cp < 0x800) {
            out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
            out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
          } else {
            out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
            out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
            out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
          }
          break;
        }
        default:
          return Fail("bad escape");
      }
    }
    return Fail("unterminated string");
  }
  bool Array(Json* v, int depth) {
    ++pos_;
    v->kind = Json::Kind::kArray;
    SkipWs();
    if (pos_ < t_.size() && t_[pos_] == ']') {
      ++pos_;
      return true;
    }
    while (true) {
      v->arr.emplace_back();
      if (!Value(&v->arr.back(), depth + 1)) return false;
      SkipWs();
      if (pos_ >= t_.size()) return Fail("unterminated array");
      char c = t_[pos_++];
      if (c == ']') return true;
      if (c != ',') return Fail("expected ',' or ']'");
    }
  }
  bool Object(Json* v, int depth) {
    ++pos_;
    v->kind = Json::Kind::kObject;
    SkipWs();
    if (pos_ < t_.size() && t_[pos_] == '}') {
      ++pos_;
      return true;
    }
    while (true) {
      SkipWs();
      if (pos_ >= t_.size() || t_[pos_] != '"') return Fail("expected a string key");
      std::string key;
      if (!String(&key)) return false;
      SkipWs();
      if (pos_ >= t_.size() || t_[pos_] != ':') return Fail("expected ':'");
      ++pos_;
      v->obj.push_back(JsonMember{std::move(key), Json()});
      if (!Value(&v->obj.back().value, depth + 1)) return false;
      SkipWs();
      if (pos_ >= t_.size()) return Fail("unterminated object");
      char c = t_[pos_++];
      if (c == '}') return true;
      if (c != ',') return Fail("expected ',' or '}'");
    }
  }

  std::string_view t_;
  size_t pos_ = 0;
  std::string err_;
};

// Element size of any safetensors dtype (0 if unknown).
size_t AnyDTypeSize(const std::string& name) {
  static const std::pair<const char*, size_t> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  for (const auto& [n, s] : kSizes) {
    if (name == n) return s;
  }
  return 0;
}

Status ReadFully(int fd, void* dst, size_t n, uint64_t offset, const std::string& path) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t r = pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(path + ": read failed: " + std::strerror(errno));
    }
    if (r == 0) return Status::Corruption(path + ": unexpected end of file (truncated?)");
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return Status::OK();
}

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

}  // namespace

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) close(fd_);
}

Status SafetensorsFile::Open(const std::string& path, std::unique_ptr<SafetensorsFile>* out) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
  // writer forever; it is refused below like every other non-regular file.
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f->fd_ < 0) return Status::IOError(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (fstat(f->fd_, &st) != 0) return Status::IOError(path + ": cannot stat: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) {
    const char* what = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "a device";
    return Status::InvalidArgument(path + ": not a regular file (it is " + what +
                                   "); give the path of a safetensors file");
  }
  const int fl = fcntl(f->fd_, F_GETFL);
  if (fl < 0 || fcntl(f->fd_, F_SETFL, fl & ~O_NONBLOCK) != 0) {
    return Status::IOError(path + ": fcntl failed: " + std::strerror(errno));
  }
  f->file_size_ = static_cast<uint64_t>(st.st_size);
  const std::string what = path + ": not a valid safetensors file: ";
  if (f->file_size_ < 8) return Status::Corruption(what + "shorter than the 8-byte header length");
  uint8_t len_bytes[8];
  SQZ_RETURN_IF_ERROR(ReadFully(f->fd_, len_bytes, 8, 0, path));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return Status::Corruption(what + "header length " + std::to_string(header_len) + " is implausible (garbage?)");
  }
  if (8 + header_len > f->file_size_) {
    return Status::Corruption(what + "header length " + std::to_string(header_len) + " exceeds the file size " +
                              std::to_string(f->file_size_) + " (truncated?)");
  }
  std::string header(header_len, '\0');
  SQZ_RETURN_IF_ERROR(ReadFully(f->fd_, header.data(), header_len, 8, path));
  Json root;
  std::string err;
  if (!JsonParser(header).Parse(&root, &err)) return Status::Corruption(what + "header JSON: " + err);
  if (root.kind != Json::Kind::kObject) return Status::Corruption(what + "header is not a JSON object");

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = f->file_size_ - data_start;
  std::set<std::string> seen;
  for (const auto& [name, v] : root.obj) {
    if (!seen.insert(name).second) return Status::Corruption(what + "duplicate entry '" + name + "'");
    if (name == "__metadata__") {
      if (v.kind != Json::Kind::kObject) return Status::Corruption(what + "__metadata__ is not an object");
      for (const auto& [k, mv] : v.obj) {
        if (mv.kind != Json::Kind::kString) {
          return Status::Corruption(what + "__metadata__['" + k + "'] is not a string");
        }
        f->metadata_[k] = mv.s;
      }
      continue;
    }
    const std::string tw = what + "tensor '" + name + "': ";
    if (v.kind != Json::Kind::kObject) return Status::Corruption(tw + "entry is not an object");
    const Json* dtype = nullptr;
    const Json* shape = nullptr;
    const Json* offsets = nullptr;
    for (const auto& [k, fv] : v.obj) {
      if (k == "dtype")
        dtype = &fv;
      else if (k == "shape")
        shape = &fv;
      else if (k == "data_offsets")
        offsets = &fv;
    }
    if (!dtype || dtype->kind != Json::Kind::kString) return Status::Corruption(tw + "missing or bad 'dtype'");
    if (!shape || shape->kind != Json::Kind::kArray) return Status::Corruption(tw + "missing or bad 'shape'");
    if (!offsets || offsets->kind != Json::Kind::kArray || offsets->arr.size() != 2) {
      return Status::Corruption(tw + "missing or bad 'data_offsets'");
    }
    SafetensorsEntry e;
    e.name = name;
    e.dtype_name = dtype->s;
    e.dtype_supported = ParseDType(dtype->s, &e.dtype);
    uint64_t numel = 1;
    for (const Json& d : shape->arr) {
      if (d.kind != Json::Kind::kNumber || !d.is_integer || d.i < 0) {
        return Status::Corruption(tw + "shape has a negative or non-integer dimension");
      }
      if (d.i > 0 && numel > (uint64_t{1} << 62) / static_cast<uint64_t>(d.i)) {
        return Status::Corruption(tw + "shape is too large");
      }
      numel *= static_cast<uint64_t>(d.i);
      e.shape.push_back(d.i);
    }
    for (const Json& o : offsets->arr) {
      if (o.kind != Json::Kind::kNumber || !o.is_integer || o.i < 0) {
        return Status::Corruption(tw + "data_offsets are not non-negative integers");
      }
    }
    uint64_t begin = static_cast<uint64_t>(offsets->arr[0].i);
    uint64_t end = static_cast<uint64_t>(offsets->arr[1].i);
    if (begin > end) return Status::Corruption(tw + "data_offsets begin > end");
    if (end > data_size) {
      return Status::Corruption(tw + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") lie beyond the data section of " + std::to_string(data_size) +
                                " bytes (truncated file or bad header)");
    }
    size_t esize = AnyDTypeSize(e.dtype_name);
    if (esize != 0 && (numel > (end - begin) / esize || numel * esize != end - begin)) {
      return Status::Corruption(tw + "shape " + ShapeToString(e.shape) + " of " + e.dtype_name + " needs " +
                                std::to_string(numel * esize) + " bytes but data_offsets span " +
                                std::to_string(end - begin));
    }
    e.offset = data_start + begin;
    e.nbytes = end - begin;
    f->entries_.push_back(std::move(e));
  }
  // The tensors tile the data section exactly, as the format requires: no
  // byte belongs to two tensors (a v that aliases k's bytes) and none to no
  // tensor (a gap, or trailing bytes after the last one).
  std::vector<const SafetensorsEntry*> order;
  for (const auto& e : f->entries_) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  uint64_t at = data_start;
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry* e : order) {
    auto span = [&](const SafetensorsEntry* x) {
      return "tensor '" + x->name + "' (data_offsets [" + std::to_string(x->offset - data_start) + ", " +
             std::to_string(x->offset - data_start + x->nbytes) + "))";
    };
    if (e->offset < at) {
      return Status::Corruption(what + span(e) + " overlaps " + span(prev) + " (tensors must not share bytes)");
    }
    if (e->offset > at) {
      return Status::Corruption(what + span(e) + " leaves a gap of " + std::to_string(e->offset - at) +
                                " byte(s) before it (tensors must cover the data section contiguously)");
    }
    at = e->offset + e->nbytes;
    prev = e;
  }
  if (at != f->file_size_) {
    return Status::Corruption(what + std::to_string(f->file_size_ - at) +
                              " byte(s) after the last tensor belong to no tensor (the data section must be "
                              "covered exactly)");
  }
  *out = std::move(f);
  return Status::OK();
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

Status SafetensorsFile::ReadRaw(const SafetensorsEntry& e, void* dst) const {
  return ReadFully(fd_, dst, e.nbytes, e.offset, path_).WithPrefix("tensor '" + e.name + "'");
}

Status SafetensorsFile::ReadFloat(const SafetensorsEntry& e, float* dst) const {
  if (!e.dtype_supported) {
    return Status::InvalidArgument(path_ + ": tensor '" + e.name + "' has dtype " + e.dtype_name +
                                   "; expected F16, BF16 or F32");
  }
  size_t n = e.nbytes / DTypeSize(e.dtype);
  if (e.dtype == DType::kF32) return ReadRaw(e, dst);
  std::vector<uint8_t> raw(e.nbytes);
  SQZ_RETURN_IF_ERROR(ReadRaw(e, raw.data()));
  ConvertToFloat(raw.data(), e.dtype, n, dst);
  return Status::OK();
}

// ---------------------------------------------------------------------------

namespace {
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

Status WriteAll(int fd, const void* data, size_t n, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(path + ": write failed: " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}
}  // namespace

void SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data) {
  Tensor t{name, dtype, std::move(shape), {}};
  int64_t numel = 1;
  for (int64_t s : t.shape) numel *= s;
  size_t nbytes = static_cast<size_t>(numel) * DTypeSize(dtype);
  const uint8_t* p = static_cast<const uint8_t*>(data);
  t.data.assign(p, p + nbytes);
  tensors_.push_back(std::move(t));
}

Status SafetensorsWriter::WriteFile(const std::string& path) const {
  std::string header = "{";
  bool first = true;
  if (!metadata_.empty()) {
    header += "\"__metadata__\":{";
    bool mfirst = true;
    for (const auto& [k, v] : metadata_) {
      if (!mfirst) header += ",";
      mfirst = false;
      header += JsonString(k) + ":" + JsonString(v);
    }
    header += "}";
    first = false;
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    if (!first) header += ",";
    first = false;
    header += JsonString(t.name) + ":{\"dtype\":\"" + DTypeName(t.dtype) + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ",";
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  header += "}";
  while ((8 + header.size()) % 8 != 0) header += ' ';  // align the data section to 8 bytes

  // Replace only a regular file: renaming over a symlink would replace the
  // link (not what it points to), and over a device or a directory it would
  // clobber something that is not ours to replace.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    const char* what = S_ISLNK(st.st_mode)   ? "a symbolic link"
                       : S_ISDIR(st.st_mode) ? "a directory"
                                             : "not a regular file (a device, a FIFO or a socket)";
    return Status::InvalidArgument(path + ": exists and is " + what +
                                   "; refusing to replace it (give the path of a regular file)");
  }
  // A fresh temporary beside the target (O_EXCL, never follows a link), then
  // an atomic rename: readers see the old file or the whole new one.
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkostemp(tmp.data(), O_CLOEXEC);
  if (fd < 0) return Status::IOError(path + ": cannot create a temporary file beside it: " + std::strerror(errno));
  if (::fchmod(fd, 0644) != 0) {
    const int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status::IOError(tmp + ": chmod failed: " + std::strerror(e));
  }
  uint8_t len[8];
  uint64_t hl = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(hl >> (8 * i));
  Status s = WriteAll(fd, len, 8, tmp);
  if (s.ok()) s = WriteAll(fd, header.data(), header.size(), tmp);
  for (const Tensor& t : tensors_) {
    if (!s.ok()) break;
    s = WriteAll(fd, t.data.data(), t.data.size(), tmp);
  }
  if (s.ok() && fsync(fd) != 0) s = Status::IOError(tmp + ": fsync failed: " + std::strerror(errno));
  if (close(fd) != 0 && s.ok()) s = Status::IOError(tmp + ": close failed: " + std::strerror(errno));
  if (s.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    s = Status::IOError(path + ": rename failed: " + std::strerror(errno));
  }
  if (!s.ok()) ::unlink(tmp.c_str());
  return s;
}

}  // namespace sqz
