#include "directory.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

namespace sqz::storage {

namespace {

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

bool StartsWith(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// Files a creation killed before RocksDB wrote its first MANIFEST can leave.
bool IsCreationLeftover(const std::string& name) {
  return name == kIdentityFile || name == "LOCK" || name == "LOG" || StartsWith(name, "LOG.old") ||
         StartsWith(name, std::string(kIdentityFile).append(".tmp").c_str());
}

}  // namespace

bool IsRocksFileName(const std::string& name) {
  return name == "CURRENT" || name == "IDENTITY" || name == "LOCK" || name == "LOG" || StartsWith(name, "LOG.old") ||
         StartsWith(name, "MANIFEST-") || StartsWith(name, "OPTIONS-") || EndsWith(name, ".sst") ||
         EndsWith(name, ".log") || EndsWith(name, ".blob") || EndsWith(name, ".dbtmp") || EndsWith(name, ".ldb");
}

Status ListDir(const std::string& dir, std::vector<std::string>* names) {
  names->clear();
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    names->push_back(it->path().filename().string());
  }
  if (ec) return Status::IOError(dir + ": cannot list the directory: " + ec.message());
  std::sort(names->begin(), names->end());
  return Status::OK();
}

Status InspectDatabaseDir(const std::string& path, DirState* state) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) {
    if (ec && ec != std::errc::no_such_file_or_directory) {
      return Status::IOError(path + ": cannot inspect: " + ec.message());
    }
    *state = DirState::kAbsent;
    return Status::OK();
  }
  if (!std::filesystem::is_directory(st)) {
    return Status::InvalidArgument(path + ": exists and is not a directory; a squeeze database is a directory");
  }
  std::vector<std::string> names;
  SQZ_RETURN_IF_ERROR(ListDir(path, &names));
  if (std::find(names.begin(), names.end(), "CURRENT") != names.end()) {
    *state = DirState::kDatabase;
    return Status::OK();
  }
  if (std::all_of(names.begin(), names.end(), IsCreationLeftover)) {
    *state = DirState::kEmpty;
    return Status::OK();
  }
  const bool ours = std::find(names.begin(), names.end(), kIdentityFile) != names.end();
  const auto rocks = std::find_if(names.begin(), names.end(), [](const std::string& n) {
    return StartsWith(n, "MANIFEST-") || EndsWith(n, ".sst") || EndsWith(n, ".log");
  });
  if (ours || rocks != names.end()) {
    return Status::Corruption(
        path + ": damaged " + (ours ? "squeeze" : "RocksDB") +
        " database: its CURRENT file is missing (a partial copy or restore?). Nothing was changed. Salvage its "
        "contexts into a new directory with: sqctl repair --db " +
        path + " --out NEW_DIR");
  }
  const auto foreign =
      std::find_if(names.begin(), names.end(), [](const std::string& n) { return !IsCreationLeftover(n); });
  return Status::InvalidArgument(path + ": not a squeeze database: the directory holds other files (e.g. '" + *foreign +
                                 "'). Nothing was changed. A database is created only in a new or empty directory.");
}

bool HasIdentityFile(const std::string& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir + "/" + kIdentityFile, ec);
}

Status WriteIdentityFile(const std::string& dir) {
  static constexpr char kText[] =
      "squeeze context database (RocksDB directory; docs/FORMAT.md). Do not add, remove or edit files here; use "
      "sqctl (backup, restore, repair).\n";
  const std::string final_path = dir + "/" + kIdentityFile, tmp = final_path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return Status::IOError(tmp + ": cannot create: " + std::strerror(errno));
  const size_t n = sizeof(kText) - 1;
  const bool ok = ::write(fd, kText, n) == static_cast<ssize_t>(n) && ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok || std::rename(tmp.c_str(), final_path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return Status::IOError(final_path + ": cannot write: " + std::strerror(ok ? errno : err));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return Status::OK();
}

}  // namespace sqz::storage
