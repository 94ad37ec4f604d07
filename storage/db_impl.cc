#include "db_impl.h"

#include <rocksdb/cache.h>
#include <rocksdb/convenience.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/listener.h>
#include <rocksdb/sst_file_reader.h>
#include <rocksdb/sst_partitioner.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>
#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <thread>

#include "directory.h"
#include "records.h"
#include "util/crc32c.h"
#include "util/guard.h"

namespace sqz::storage {

Status FromRocks(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return Status::OK();
  std::string msg = std::string(what) + ": " + s.ToString();
  if (s.IsNotFound()) return Status::NotFound(msg);
  if (s.IsCorruption()) return Status::Corruption(msg);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(msg);
  if (s.IsNotSupported()) return Status::NotSupported(msg);
  if (s.IsNoSpace()) return Status::IOError(msg + " (the disk is full: free space and retry; nothing was committed)");
  return Status::IOError(msg);
}

namespace {

constexpr size_t kWriterBatchBytes = size_t{32} << 20;  // flush a writer's batch past this size

std::mutex secondary_fs_mu;
std::shared_ptr<rocksdb::FileSystem> secondary_fs;  // SetSecondaryFileSystemForTest

// Read-only instances must write nothing: their info log goes nowhere.
class NullLogger : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char* /*format*/, va_list /*ap*/) override {}
};

// A reader races the writer: a file name it has just read (CURRENT's
// MANIFEST, a table file) may be gone a moment later, when the writer opens
// (it rolls its MANIFEST) or compacts. Retries `op` with backoff while it
// fails the way such a race makes it fail.
rocksdb::Status RetryWhileRacingWriter(const std::function<rocksdb::Status()>& op) {
  rocksdb::Status s = op();
  // (TryAgain: a secondary found the MANIFEST it was reading replaced, "The
  // primary may have switched to a new MANIFEST and deleted the old one".)
  for (int attempt = 0; attempt < 8 && (s.IsIOError() || s.IsPathNotFound() || s.IsCorruption() || s.IsTryAgain());
       ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10 << std::min(attempt, 5)));
    s = op();
  }
  return s;
}

rocksdb::ColumnFamilyOptions CfOptions(const std::shared_ptr<rocksdb::Cache>& cache, size_t block_size,
                                       rocksdb::CompressionType compression) {
  rocksdb::ColumnFamilyOptions o;
  rocksdb::BlockBasedTableOptions t;
  t.block_cache = cache;
  t.block_size = block_size;
  t.cache_index_and_filter_blocks = true;
  t.pin_l0_filter_and_index_blocks_in_cache = true;
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
  o.compression = compression;
  o.bottommost_compression = compression;
  return o;
}

// Compaction outputs are cut at every context id (the 8-byte key prefix): no
// table file below level 0 holds records of two contexts, so a damaged file
// hits one context and a dropped context's files are deleted whole.
rocksdb::ColumnFamilyOptions PerContext(rocksdb::ColumnFamilyOptions o) {
  o.sst_partitioner_factory = rocksdb::NewSstPartitionerFixedPrefixFactory(8);
  return o;
}

}  // namespace

std::vector<rocksdb::ColumnFamilyDescriptor> ColumnFamilies(const std::shared_ptr<rocksdb::Cache>& cache) {
  // KV pages are stored uncompressed: zstd saves little on fp16/bf16 KV and
  // costs a decompression on every cold read (docs/PERFORMANCE.md).
  return {
      {kCfDefault, CfOptions(cache, 4 << 10, rocksdb::kNoCompression)},
      {kCfManifest, CfOptions(cache, 4 << 10, rocksdb::kNoCompression)},
      {kCfIndex, PerContext(CfOptions(cache, 16 << 10, rocksdb::kZSTD))},
      {kCfKv, PerContext(CfOptions(cache, 32 << 10, rocksdb::kNoCompression))},
  };
}

namespace {

// Tells the reclaimer when RocksDB finished a compaction (ours or its own,
// e.g. the rewrite of bottommost files that zeroes sequence numbers): the
// input files another thread was still reading are deleted by the purge
// that follows (DBImpl::SchedulePurge).
class CompactionListener final : public rocksdb::EventListener {
 public:
  explicit CompactionListener(DBImpl* db) : db_(db) {}
  void OnCompactionCompleted(rocksdb::DB* /*db*/, const rocksdb::CompactionJobInfo& /*info*/) override {
    db_->SchedulePurge();
  }

 private:
  DBImpl* db_;
};

}  // namespace

namespace {

// The writer's MANIFEST (named by CURRENT) and its length: they change with
// every change to the set of table files and write-ahead logs (a flush, a
// compaction, a read-write open).
std::string ManifestState(const std::string& path) {
  std::ifstream current(path + "/CURRENT");
  std::string name;
  std::getline(current, name);
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path + "/" + name, ec);
  return name + ":" + (ec ? std::string("?") : std::to_string(size));
}

// The table files in `dir` ("000041.sst"); empty if it cannot be listed.
std::vector<std::string> ListTableFiles(const std::string& dir) {
  std::vector<std::string> names, tables;
  if (!ListDir(dir, &names).ok()) return tables;
  for (auto& n : names) {
    if (n.size() > 4 && n.compare(n.size() - 4, 4, ".sst") == 0) tables.push_back(std::move(n));
  }
  return tables;
}

}  // namespace

// Crash-test hook: with SQZ_KILL_POINT=<name> in the environment the process
// dies (SIGKILL, no cleanup) when it reaches that point. The kill tests
// (tests/query_snapshot_test.cc) use it to crash between a build's records
// and its commit, and between a commit and its compaction; the stress test
// (tools/stress) picks points at random. Without the variable: nothing.
void KillPoint(const char* name) {
  static const char* const want = std::getenv("SQZ_KILL_POINT");
  if (want != nullptr && std::strcmp(want, name) == 0) raise(SIGKILL);
}

// RocksDB's LOCK file is held (by another process, or another open in this
// one). Matched on RocksDB's messages ("While lock file: DIR/LOCK: ...",
// "lock hold by current process"), not on the word "lock" alone, which
// "block checksum mismatch" also holds.
bool IsLockHeld(std::string_view message) {
  return message.find("While lock file") != std::string_view::npos ||
         message.find("lock hold by current process") != std::string_view::npos;
}

// A RocksDB error at open that is not a lock held by another process is
// damage to the database's files: say what to run.
Status Damaged(const Status& s, const std::string& path) {
  if (s.ok() || IsLockHeld(s.message())) return s;
  if (!s.IsCorruption() && !s.IsIOError() && !s.IsNotFound()) return s;
  return Status::Corruption(s.message() + ". The database is damaged; nothing was changed. Salvage its contexts into " +
                            "a new directory with: sqctl repair --db " + path + " --out NEW_DIR");
}

RocksView::~RocksView() {
  if (db) {
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    db->Close();
    db.reset();
  }
  if (!secondary_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(secondary_dir, ec);
  }
}

// --- PageSet ---------------------------------------------------------------------

struct PageSet::Rep {
  std::vector<rocksdb::PinnableSlice> values;
};
PageSet::PageSet() : rep_(new Rep()) {}
PageSet::~PageSet() = default;
size_t PageSet::size() const { return rep_->values.size(); }
const uint8_t* PageSet::data(size_t i) const { return reinterpret_cast<const uint8_t*>(rep_->values[i].data()); }

// --- Snapshot ----------------------------------------------------------------------

class SnapshotImpl final : public ContextSnapshot {
 public:
  SnapshotImpl(DBImpl* owner, std::shared_ptr<RocksView> view, const rocksdb::Snapshot* snap)
      : owner_(owner), view_(std::move(view)), snap_(snap) {}
  ~SnapshotImpl() override {
    if (snap_) owner_->ReleaseSnapshot(snap_);
  }
  const ContextInfo& info() const override { return info_; }
  ContextInfo* mutable_info() { return &info_; }
  rocksdb::ReadOptions Read() const {
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    ro.snapshot = snap_;
    return ro;
  }
  RocksView* view() const { return view_.get(); }

  std::string Where(int layer, int head) const {
    return "context '" + info_.name + "' layer " + std::to_string(layer) + " KV head " + std::to_string(head);
  }

  Status GetHeadIndex(int layer, int head, HeadIndexRecord* out) const override {
    return GetHeadIndexImpl(layer, head, false, out);
  }
  Status GetHeadIndexImpl(int layer, int head, bool full, HeadIndexRecord* out) const {
    const std::string where = Where(layer, head);
    if (layer < 0 || layer >= info_.n_layers || head < 0 || head >= info_.n_kv_heads) {
      return Status::InvalidArgument(where + ": out of range");
    }
    std::string bytes;
    rocksdb::Status s = view_->db->Get(Read(), view_->cf_index, HeadKey(info_.id, layer, head), &bytes);
    if (s.IsNotFound()) return Status::Corruption(where + ": index record is missing");
    SQZ_RETURN_IF_ERROR(FromRocks(s, where + ": reading the index record"));
    return DecodeHeadIndex(bytes, info_, layer, head, full, where, out);
  }

  Status ReadPages(int layer, int head, const uint32_t* pages, size_t n, PageSet* out) const override {
    const std::string where = Where(layer, head);
    std::vector<std::string> keys(n);
    std::vector<rocksdb::Slice> slices(n);
    const uint64_t total = static_cast<uint64_t>(info_.pages_per_head());
    for (size_t i = 0; i < n; ++i) {
      if (pages[i] >= total) {
        return Status::InvalidArgument(where + ": page " + std::to_string(pages[i]) + " out of range");
      }
      keys[i] = PageKey(info_.id, layer, head, pages[i]);
      slices[i] = keys[i];
    }
    auto& values = out->rep()->values;
    values.clear();
    values.resize(n);
    std::vector<rocksdb::Status> statuses(n);
    if (n > 0) {
      view_->db->MultiGet(Read(), view_->cf_kv, n, slices.data(), values.data(), statuses.data(),
                          /*sorted_input=*/false);
    }
    const size_t want = info_.page_bytes();
    for (size_t i = 0; i < n; ++i) {
      if (statuses[i].IsNotFound()) {
        return Status::Corruption(where + ": KV page " + std::to_string(pages[i]) + " is missing");
      }
      SQZ_RETURN_IF_ERROR(FromRocks(statuses[i], where + ": reading KV page " + std::to_string(pages[i])));
      if (values[i].size() != want) {
        return Status::Corruption(where + ": KV page " + std::to_string(pages[i]) + " has " +
                                  std::to_string(values[i].size()) + " bytes, expected " + std::to_string(want));
      }
    }
    return Status::OK();
  }

 private:
  DBImpl* owner_;
  std::shared_ptr<RocksView> view_;
  const rocksdb::Snapshot* snap_;
  ContextInfo info_;
};

namespace {

// --- Writer ------------------------------------------------------------------------

class WriterImpl final : public ContextWriter {
 public:
  WriterImpl(DBImpl* db, std::shared_ptr<RocksView> view, uint64_t id, const ContextInfo& shape)
      : db_(db), view_(std::move(view)), id_(id), shape_(shape) {
    shape_.id = id;
  }
  ~WriterImpl() override {
    if (!done_) (void)Abort();
  }
  uint64_t id() const override { return id_; }
  uint64_t bytes_written() const override { return bytes_; }

  Status PutHeadIndex(const HeadIndexRecord& rec) override {
    // The shapes the record needs; counts are checked against the final
    // manifest at read time.
    std::string bytes = EncodeHeadIndex(shape_, rec);
    SQZ_RETURN_IF_ERROR(
        FromRocks(batch_.Put(view_->cf_index, HeadKey(id_, rec.layer, rec.head), bytes), "buffering an index record"));
    bytes_ += bytes.size();
    return MaybeFlush();
  }
  Status PutPage(int layer, int head, int64_t page, std::string_view value) override {
    if (page < 0 || page >= (int64_t{1} << 32)) return Status::InvalidArgument("page id out of range");
    SQZ_RETURN_IF_ERROR(FromRocks(batch_.Put(view_->cf_kv, PageKey(id_, layer, head, static_cast<uint32_t>(page)),
                                             rocksdb::Slice(value.data(), value.size())),
                                  "buffering a KV page"));
    bytes_ += value.size();
    return MaybeFlush();
  }
  Status GetHeadIndex(int layer, int head, HeadIndexRecord* out) override {
    SQZ_RETURN_IF_ERROR(Flush());
    std::string bytes;
    const std::string where = "layer " + std::to_string(layer) + " KV head " + std::to_string(head);
    rocksdb::Status s = view_->db->Get(rocksdb::ReadOptions(), view_->cf_index, HeadKey(id_, layer, head), &bytes);
    SQZ_RETURN_IF_ERROR(FromRocks(s, where + ": re-reading the index record"));
    return DecodeHeadIndex(bytes, shape_, layer, head, false, where, out);
  }
  Status Commit(const ContextInfo& info, bool replace) override {
    if (done_) return Status::InvalidArgument("commit: the writer is finished");
    if (info.id != id_) return Status::InvalidArgument("commit: the manifest names another context id");
    SQZ_RETURN_IF_ERROR(Flush());
    Status s = db_->CommitContext(info, replace);
    if (s.ok()) done_ = true;
    return s;
  }
  Status Abort() override {
    done_ = true;
    batch_.Clear();
    return db_->AbortContext(id_);
  }
  Status Flush() {
    if (batch_.Count() == 0) return Status::OK();
    rocksdb::WriteOptions wo;
    wo.disableWAL = true;  // durability comes from the memtable flush before commit
    Status s = FromRocks(view_->db->Write(wo, &batch_), db_->path() + ": writing context records");
    batch_.Clear();
    return s;
  }

 private:
  Status MaybeFlush() { return batch_.GetDataSize() >= kWriterBatchBytes ? Flush() : Status::OK(); }

  DBImpl* db_;
  std::shared_ptr<RocksView> view_;
  uint64_t id_;
  rocksdb::WriteBatch batch_;
  uint64_t bytes_ = 0;
  bool done_ = false;
  ContextInfo shape_;
};

}  // namespace

}  // namespace sqz::storage

namespace sqz {
Status DB::Open(const Options& options, const std::string& path, std::unique_ptr<DB>* db) {
  return util::Guarded("DB::Open", [&] {
    std::unique_ptr<storage::DBImpl> impl(new storage::DBImpl());
    SQZ_RETURN_IF_ERROR(impl->OpenImpl(options, path));
    *db = std::move(impl);
    return Status::OK();
  });
}
}  // namespace sqz

namespace sqz::storage {

DBImpl::~DBImpl() {
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    stop_ = true;
  }
  reclaim_cv_.notify_all();
  if (reclaimer_.joinable()) reclaimer_.join();
  // Close RocksDB now (no handle outlives the DB): its background threads
  // may still call the listener, which uses the reclaim state below.
  std::lock_guard<std::mutex> lock(view_mu_);
  view_.reset();
}

std::shared_ptr<RocksView> DBImpl::view() const {
  std::lock_guard<std::mutex> lock(view_mu_);
  return view_;
}

rocksdb::Status DBImpl::OpenRocks(bool fresh_dir, bool paranoid, OpenMode mode, RocksView* v) {
  rocksdb::DBOptions dbo;
  // Only a directory found new or empty is created in (OpenImpl decides).
  dbo.create_if_missing = fresh_dir && mode == OpenMode::kReadWrite;
  dbo.create_missing_column_families = dbo.create_if_missing;
  dbo.max_background_jobs = std::max(1, options_.max_background_jobs);
  dbo.paranoid_checks = paranoid;
  dbo.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  dbo.keep_log_file_num = 2;
  const std::vector<rocksdb::ColumnFamilyDescriptor> descs = ColumnFamilies(cache_);
  // Read-only instances: what is on disk before RocksDB reads the MANIFEST
  // (FindLostCommits). A table file listed here was written before the
  // version this instance reads, so a writer's flush or compaction that had
  // not reached the MANIFEST by then either reaches it while this instance
  // opens (`moved`) or leaves its inputs (table files, write-ahead logs) in
  // place for this instance to read.
  std::string manifest_before;
  if (mode != OpenMode::kReadWrite) {
    v->tables_listed = ListTableFiles(path_);
    manifest_before = ManifestState(path_);
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s;
  if (mode == OpenMode::kReadWrite) {
    dbo.listeners.push_back(std::make_shared<CompactionListener>(this));
    s = rocksdb::DB::Open(dbo, path_, descs, &v->handles, &raw);
  } else {
    // Read-only instances write nothing, not even a log, and need every
    // table file open from the start so that files the writer deletes later
    // stay readable. A probe reads the version and a few records, and is
    // closed at once: it opens table files only as it reads them (RocksDB's
    // smallest table cache).
    dbo.max_open_files = mode == OpenMode::kProbe ? 20 : -1;
    dbo.info_log = std::make_shared<NullLogger>();
    if (mode == OpenMode::kReadOnly || mode == OpenMode::kProbe) {
      s = RetryWhileRacingWriter([&] {
        v->handles.clear();
        return rocksdb::DB::OpenForReadOnly(dbo, path_, descs, &v->handles, &raw);
      });
    } else {
      // A secondary instance: no lock, and it tails nothing (it is never
      // caught up: Refresh opens a new one).
      {
        std::lock_guard<std::mutex> lock(secondary_fs_mu);
        if (secondary_fs) {
          v->env = rocksdb::NewCompositeEnv(secondary_fs);
          dbo.env = v->env.get();
        }
      }
      char tmpl[] = "/tmp/sqz-reader-XXXXXX";
      if (!mkdtemp(tmpl)) return rocksdb::Status::IOError("cannot create a scratch directory for a read-only open");
      v->secondary_dir = tmpl;
      s = RetryWhileRacingWriter([&] {
        v->handles.clear();
        return rocksdb::DB::OpenAsSecondary(dbo, path_, v->secondary_dir, descs, &v->handles, &raw);
      });
    }
  }
  if (!s.ok()) return s;
  v->SetDb(raw);
  if (mode != OpenMode::kReadWrite) v->moved = ManifestState(path_) != manifest_before;
  return s;
}

void RocksView::SetDb(rocksdb::DB* raw) {
  db.reset(raw);
  cf_default = handles[0];
  cf_manifest = handles[1];
  cf_index = handles[2];
  cf_kv = handles[3];
}

Status DBImpl::OpenView(bool fresh_dir, std::shared_ptr<RocksView>* out) {
  rocksdb::CompressionType zstd = rocksdb::kZSTD;
  std::vector<rocksdb::CompressionType> supported = rocksdb::GetSupportedCompressions();
  if (std::find(supported.begin(), supported.end(), zstd) == supported.end()) {
    return Status::NotSupported("this RocksDB build lacks zstd compression, which the index column family uses");
  }
  if (read_only_) {
    const Status s = OpenConsistentSecondary(out);
    if (s.ok() || !(s.IsCorruption() || s.IsIOError())) return s;
    bool found = false;  // a secondary instance that cannot load a table file fails or leaves it out
    SQZ_RETURN_IF_ERROR(OpenDegraded(out, &found));
    return found ? Status::OK() : s;
  }
  if (!fresh_dir) SQZ_RETURN_IF_ERROR(ProbeBeforeReadWriteOpen());
  auto v = std::make_shared<RocksView>();
  const rocksdb::Status s = OpenRocks(fresh_dir, /*paranoid=*/true, OpenMode::kReadWrite, v.get());
  if (!s.ok() && s.IsIOError() && IsLockHeld(s.ToString())) {
    return Status::IOError(path_ + ": the database is open read-write in another process (" + s.ToString() +
                           "); readers can use a read-only open (sqctl's list/info/query/eval/verify do)");
  }
  if (!s.ok()) {
    // A table file that cannot be loaded fails a paranoid open: if only
    // context data is damaged, the other contexts stay usable.
    const Status failed = Damaged(FromRocks(s, path_ + ": cannot open the database"), path_);
    if (fresh_dir || !(s.IsCorruption() || s.IsIOError())) return failed;
    bool found = false;
    SQZ_RETURN_IF_ERROR(OpenDegraded(out, &found));
    return found ? Status::OK() : failed;
  }
  SQZ_RETURN_IF_ERROR(Damaged(CheckFormatVersion(v.get(), fresh_dir), path_));
  *out = std::move(v);
  return Status::OK();
}

bool RocksView::RecordsDamaged(uint64_t id) const {
  for (const auto& d : damaged) {
    if (!d.copy_only && id >= d.first_id && id <= d.last_id) return true;
  }
  return false;
}

std::string RocksView::DamageOf(uint64_t id) const {
  std::string what;
  for (const auto& d : damaged) {
    if (id < d.first_id || id > d.last_id) continue;
    if (!what.empty()) what += "; ";
    what += "its table file " + d.file + " (" + d.family + " family) " + d.problem;
    if (d.copy_only) what += " (it held only the redundant copy of the context's manifest)";
  }
  return what;
}

Status DBImpl::FindDamagedTables(std::shared_ptr<RocksView>* probe_out) {
  // A plain read-only open with paranoid checks off loads whatever it can
  // and lists every table file the MANIFEST names; it writes nothing.
  auto probe = std::make_shared<RocksView>();
  const rocksdb::Status s = OpenRocks(false, /*paranoid=*/false, OpenMode::kReadOnly, probe.get());
  if (!s.ok()) return Damaged(FromRocks(s, path_ + ": cannot open the database"), path_);
  std::vector<RocksView::DamagedTable>* damaged = &probe->damaged;
  std::vector<rocksdb::LiveFileMetaData> files;
  probe->db->GetLiveFilesMetaData(&files);
  std::vector<std::string> metadata;  // damaged files of the default and manifest families
  for (const auto& f : files) {
    const std::string name = f.name.substr(f.name.find_last_of('/') + 1);
    const std::string path = path_ + "/" + name;
    std::error_code ec;
    const uint64_t size = std::filesystem::file_size(path, ec);
    std::string problem;
    if (ec) {
      problem = std::filesystem::exists(path, ec) ? "cannot be read (" + ec.message() + ")" : "is missing";
    } else if (size != f.size) {
      problem = "has " + std::to_string(size) + " bytes (the MANIFEST says " + std::to_string(f.size) + ")";
    } else {
      rocksdb::Options o;
      rocksdb::SstFileReader reader(o);
      const rocksdb::Status rs = reader.Open(path);
      if (!rs.ok()) problem = "cannot be opened (" + rs.ToString() + ")";
    }
    if (problem.empty()) continue;
    RocksView::DamagedTable d;
    d.file = name;
    d.family = f.column_family_name;
    d.problem = problem;
    const bool data = d.family == kCfIndex || d.family == kCfKv;
    if (!data || !DecodeContextId(f.smallestkey, &d.first_id) || !DecodeContextId(f.largestkey, &d.last_id)) {
      metadata.push_back(name + " (" + d.family + " family) " + problem);
      continue;
    }
    d.copy_only = IsManifestCopyKey(f.smallestkey) && f.smallestkey == f.largestkey;
    damaged->push_back(d);
  }
  if (!metadata.empty()) {
    std::string list;
    for (const auto& m : metadata) list += (list.empty() ? "" : "; ") + m;
    return Damaged(Status::Corruption(path_ + ": table file " + list + ", which every context needs"), path_);
  }
  SQZ_RETURN_IF_ERROR(CheckLostCommits(probe.get()));
  *probe_out = std::move(probe);
  return Status::OK();
}

Status DBImpl::OpenDegraded(std::shared_ptr<RocksView>* out, bool* found) {
  std::shared_ptr<RocksView> v;
  SQZ_RETURN_IF_ERROR(FindDamagedTables(&v));
  *found = !v->damaged.empty();
  if (!*found) return Status::OK();
  if (!read_only_) {
    // The writer's view: the probe (read-only) closes before the read-write
    // open takes the lock.
    std::vector<RocksView::DamagedTable> damaged = std::move(v->damaged);
    v = std::make_shared<RocksView>();
    const rocksdb::Status s = OpenRocks(false, /*paranoid=*/false, OpenMode::kReadWrite, v.get());
    if (!s.ok()) return Damaged(FromRocks(s, path_ + ": cannot open the database"), path_);
    v->damaged = std::move(damaged);
    // No automatic compaction may pick a damaged file (it would fail, again
    // and again); dropping or replacing the damaged context deletes its files
    // whole, and the reclaim compacts only what is left.
    for (auto* cf : {v->cf_index, v->cf_kv}) {
      SQZ_RETURN_IF_ERROR(
          FromRocks(v->db->SetOptions(cf, {{"disable_auto_compactions", "true"}}), path_ + ": degraded open"));
    }
  }
  SQZ_RETURN_IF_ERROR(Damaged(CheckFormatVersion(v.get(), false), path_));
  if (read_only_) {
    Status incomplete;
    SQZ_RETURN_IF_ERROR(CheckComplete(v.get(), &incomplete));
    SQZ_RETURN_IF_ERROR(incomplete);
  }
  *out = std::move(v);
  return Status::OK();
}

namespace {

std::mutex view_retry_hook_mu;
std::function<void()> view_retry_hook;

}  // namespace

void SetSecondaryFileSystemForTest(std::shared_ptr<rocksdb::FileSystem> fs) {
  std::lock_guard<std::mutex> lock(secondary_fs_mu);
  secondary_fs = std::move(fs);
}

void SetViewRetryHookForTest(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(view_retry_hook_mu);
  view_retry_hook = std::move(hook);
}

// A secondary instance (OpenRocks). *moved: the writer changed its MANIFEST
// while the instance opened. RocksDB's secondary reads the MANIFEST, then
// the write-ahead logs it finds; a log the writer flushed and deleted in
// between is skipped silently, and the instance shows the database as it
// was before the writes in that log, even ones made before this open began
// (found by tools/stress: a reader listed a context dropped before it
// opened, after a read-write open had flushed the log of the drop). The
// flush precedes the deletion, so an unchanged MANIFEST proves the view
// whole.
Status DBImpl::OpenSecondary(std::shared_ptr<RocksView>* out, bool* moved) {
  auto v = std::make_shared<RocksView>();
  const rocksdb::Status s = OpenRocks(false, /*paranoid=*/true, OpenMode::kSecondary, v.get());
  if (!s.ok()) return Damaged(FromRocks(s, path_ + ": cannot open the database"), path_);
  *moved = v->moved;
  SQZ_RETURN_IF_ERROR(Damaged(CheckFormatVersion(v.get(), false), path_));
  *out = std::move(v);
  return Status::OK();
}

// A secondary instance reads RocksDB's MANIFEST (the table files) before the
// WAL (the latest writes). A commit flushes a context's records (MANIFEST)
// and then writes its manifest record (WAL); if the flush landed between the
// two reads, the instance sees the manifest record without the records.
// Until every visible context has its records (the first and last index
// record and the last KV page of its last head) and every records' manifest
// copy its manifest, and the writer did not change the MANIFEST during the
// open (OpenSecondary), take a new instance, which reads the MANIFEST
// again, so a reader never sees a partial or an old view.
// A new instance, not the same one caught up (TryCatchUpWithPrimary): an
// instance caught up after the writer flushed keeps in its memtable what it
// had replayed from the WAL, and Get (memtable first) then answers the old
// value while an iterator answers the new one (RocksDB issues 14444 and
// 15051): a reader listed a context that did not open, or opened one it did
// not list (found by tools/stress, docs/RELIABILITY.md "Stress").
// A secondary instance also silently leaves out a table file it cannot load
// (and every later file of its family): a view still incomplete after three
// attempts looks for damage (OpenDegraded) before it keeps trying.
Status DBImpl::OpenConsistentSecondary(std::shared_ptr<RocksView>* out) {
  Status incomplete, probe;
  for (int attempt = 0; attempt < 50; ++attempt) {
    if (attempt > 0) {
      {
        std::lock_guard<std::mutex> lock(view_retry_hook_mu);
        if (view_retry_hook) view_retry_hook();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min(5 * attempt, 100)));
    }
    if (attempt == 3 && incomplete.IsCorruption()) {
      // (A probe that fails may be racing the writer: keep trying, and say
      // what it found if the view never completes.)
      bool found = false;
      probe = OpenDegraded(out, &found);
      if (probe.ok() && found) return Status::OK();
    }
    std::shared_ptr<RocksView> v;
    bool moved = false;
    SQZ_RETURN_IF_ERROR(OpenSecondary(&v, &moved));
    if (moved) {
      incomplete = Status::IOError(path_ +
                                   ": the writer kept changing the database's files during the read-only "
                                   "open (50 attempts); try again");
      continue;
    }
    // (Before CheckComplete: a lost commit can also show as a manifest copy
    // without its manifest, which a new view does not settle.)
    SQZ_RETURN_IF_ERROR(CheckLostCommits(v.get()));
    SQZ_RETURN_IF_ERROR(CheckComplete(v.get(), &incomplete));
    if (incomplete.ok()) {
      *out = std::move(v);
      return Status::OK();
    }
  }
  return probe.ok() ? incomplete : probe;
}

// Sets *incomplete to a Corruption naming what is partial in the instance's
// view (OK when nothing is); returns other errors.
Status DBImpl::CheckComplete(RocksView* v, Status* incomplete) {
  *incomplete = Status::OK();
  std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ContextInfo info;
    SQZ_RETURN_IF_ERROR(
        DecodeManifest(it->value().ToStringView(), path_ + ": context '" + it->key().ToString() + "'", &info));
    if (!v->DamageOf(info.id).empty()) continue;  // a degraded open: reading it fails, with the reason
    const uint32_t L = static_cast<uint32_t>(info.n_layers - 1), H = static_cast<uint32_t>(info.n_kv_heads - 1);
    const uint32_t P = static_cast<uint32_t>(info.pages_per_head() - 1);
    const std::pair<rocksdb::ColumnFamilyHandle*, std::string> keys[] = {{v->cf_index, HeadKey(info.id, 0, 0)},
                                                                         {v->cf_index, HeadKey(info.id, L, H)},
                                                                         {v->cf_kv, PageKey(info.id, L, H, P)}};
    for (const auto& [cf, key] : keys) {
      rocksdb::PinnableSlice value;
      rocksdb::Status gs = v->db->Get(rocksdb::ReadOptions(), cf, key, &value);
      if (gs.IsNotFound()) {
        *incomplete = Status::Corruption(
            path_ + ": context '" + info.name +
            "' has a manifest but its records are missing (also in new views of the database): the database is "
            "damaged; drop the context with a read-write open (sqctl drop --db DIR --context NAME) and rebuild it, "
            "or if a read-write open fails too, salvage the database with sqctl repair --db " +
            path_ + " --out NEW_DIR");
        return Status::OK();
      }
      // A damaged block (checksum) or file of this context: it is present,
      // and reading it fails with that error; the other contexts open.
      if (gs.IsCorruption() || gs.IsIOError()) break;
      SQZ_RETURN_IF_ERROR(FromRocks(gs, path_ + ": checking context '" + info.name + "'"));
    }
  }
  SQZ_RETURN_IF_ERROR(FromRocks(it->status(), path_ + ": scanning manifests"));
  // And the reverse: no committed context lacks its manifest record. A drop
  // racing this open can show its manifest deletion before the deletion of
  // the copy: a new view settles it, damage persists.
  std::set<uint64_t> ids;
  Status copies = CheckManifestsAgainstCopies(v, &ids);
  if (copies.IsCorruption()) {
    *incomplete = copies;
    return Status::OK();
  }
  return copies;
}

Status DBImpl::OpenImpl(const Options& options, const std::string& path) {
  options_ = options;
  path_ = path;
  read_only_ = options.read_only;
  std::error_code ec;
  // RocksDB would create a database over anything without a CURRENT file
  // (and then delete the table files it does not know): the directory is
  // classified first, and only a new or empty one is ever created in.
  DirState state;
  SQZ_RETURN_IF_ERROR(InspectDatabaseDir(path, &state));
  const bool exists = state == DirState::kDatabase;
  if (exists && options.error_if_exists) return Status::AlreadyExists(path + ": a database already exists here");
  if (!exists && (read_only_ || !options.create_if_missing)) {
    return Status::NotFound(path + ": no squeeze database here (build one with sqctl build-index)");
  }
  if (exists) {
    std::vector<std::string> cfs;
    auto list = [&] {
      cfs.clear();
      return rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), path, &cfs);
    };
    const rocksdb::Status ls = read_only_ ? RetryWhileRacingWriter(list) : list();
    if (!ls.ok()) return Damaged(FromRocks(ls, path + ": cannot read the database"), path);
    for (const auto& cf : cfs) {
      if (cf != kCfDefault && cf != kCfManifest && cf != kCfIndex && cf != kCfKv) {
        return Status::InvalidArgument(path + ": not a squeeze database (unknown column family '" + cf + "')");
      }
    }
    if (cfs.size() != 4) {
      // A plain RocksDB database (only "default") is not ours to convert; a
      // squeeze database that lost a column family is damaged.
      if (!HasIdentityFile(path)) {
        return Status::InvalidArgument(path +
                                       ": not a squeeze database (a RocksDB database without squeeze's column "
                                       "families); nothing was changed");
      }
      return Status::Corruption(path +
                                ": the database lacks some of its column families; nothing was changed. "
                                "Salvage its contexts with: sqctl repair --db " +
                                path + " --out NEW_DIR");
    }
  } else {
    if (!std::filesystem::create_directories(path, ec) && ec) {
      return Status::IOError(path + ": cannot create directory: " + ec.message());
    }
    // The identity file comes first: a creation killed after it is still
    // recognised as ours (and as empty, while RocksDB has written nothing).
    SQZ_RETURN_IF_ERROR(WriteIdentityFile(path));
  }
  cache_ = rocksdb::NewLRUCache(std::max<size_t>(options.block_cache_bytes, 1 << 20));
  SQZ_RETURN_IF_ERROR(OpenView(!exists, &view_));
  if (read_only_) return Status::OK();
  // Databases created before the identity file existed get it now.
  if (!HasIdentityFile(path)) SQZ_RETURN_IF_ERROR(WriteIdentityFile(path));
  SQZ_RETURN_IF_ERROR(RecoverOnOpen());
  SQZ_RETURN_IF_ERROR(Reclaim());
  reclaimer_ = std::thread([this] { ReclaimLoop(); });
  return Status::OK();
}

Status DBImpl::RefreshUnguarded() {
  if (!read_only_) return Status::OK();
  std::shared_ptr<RocksView> v;
  SQZ_RETURN_IF_ERROR(OpenView(false, &v));
  std::lock_guard<std::mutex> lock(view_mu_);
  view_ = std::move(v);
  return Status::OK();
}

Status DBImpl::CheckFormatVersion(RocksView* v, bool fresh) {
  std::string value;
  rocksdb::Status s = v->db->Get(rocksdb::ReadOptions(), v->cf_default, kFormatVersionKey, &value);
  if (s.IsNotFound()) {
    // A database without a version is new unless it already holds contexts.
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
    it->SeekToFirst();
    if (!fresh && it->Valid()) {
      return Status::Corruption(path_ + ": the database holds contexts but no format version record");
    }
    if (read_only_) return Status::OK();  // an empty database another process is creating
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(v->db->Put(wo, v->cf_default, kFormatVersionKey, EncodeBE(kFormatVersion, 4)),
                     path_ + ": writing the format version");
  }
  if (!s.ok()) return FromRocks(s, path_ + ": reading the format version");
  uint64_t version = 0;
  if (value.size() != 4 || !DecodeBE(value, 4, &version)) {
    return Status::Corruption(path_ + ": malformed format version record");
  }
  if (version == 0) return Status::Corruption(path_ + ": invalid format version 0");
  if (version > kFormatVersion) {
    return Status::NotSupported(path_ + ": written by squeeze format version " + std::to_string(version) +
                                "; this build reads version " + std::to_string(kFormatVersion) +
                                ". Upgrade squeeze to open it.");
  }
  if (version < kFormatVersion) {
    return Status::NotSupported(path_ + ": written by squeeze format version " + std::to_string(version) +
                                " (one KV block per cluster); this build reads version " +
                                std::to_string(kFormatVersion) +
                                " (fixed-size KV pages). Rebuild the contexts into a new database "
                                "(sqctl build-index --db NEW --corpus DIR); nothing was changed here.");
  }
  return Status::OK();
}

// A committed context has a manifest and a copy of it inside its own key
// range (the same batch wrote both; a drop or replace removes both). A copy
// whose name has no manifest of that generation or newer means the manifest
// family lost records (a RocksDB secondary even drops a whole family whose
// table cannot be loaded, silently): refuse rather than list too little, or
// (read-write) remove committed contexts as leftovers. Fills *ids with the
// context ids that have records.
Status DBImpl::CheckManifestsAgainstCopies(RocksView* v, std::set<uint64_t>* ids) {
  std::map<std::string, uint64_t> manifests;
  {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ContextInfo info;
      SQZ_RETURN_IF_ERROR(
          Damaged(DecodeManifest(it->value().ToStringView(), path_ + ": context '" + it->key().ToString() + "'", &info),
                  path_));
      manifests[info.name] = info.id;
    }
    SQZ_RETURN_IF_ERROR(Damaged(FromRocks(it->status(), path_ + ": scanning manifests"), path_));
  }
  ids->clear();
  for (auto* cf : {v->cf_index, v->cf_kv}) {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), cf));
    uint64_t from = 0;                                 // the seek target: the first id not yet seen
    std::vector<std::pair<uint64_t, uint64_t>> files;  // context id range of each table file (on an error)
    for (it->SeekToFirst();;) {
      if (!it->Valid() && !it->status().ok()) {
        // The seek ran into a damaged table file (missing in a degraded
        // open, or a block that fails its checksum): go on after the
        // contexts of the first file at or after `from`. Reading them fails
        // with the error. They are left out of *ids, so they escape the
        // leftover removal (nothing damaged is ever removed as a leftover)
        // and the copy check; the id counter does not need them (an id is
        // persisted before any record uses it).
        if (files.empty()) {
          // (Every table file of the version, the damaged ones of a degraded
          // open included.)
          std::vector<rocksdb::LiveFileMetaData> md;
          v->db->GetLiveFilesMetaData(&md);
          for (const auto& f : md) {
            uint64_t a = 0, b = 0;
            if (f.column_family_name == cf->GetName() && DecodeContextId(f.smallestkey, &a) &&
                DecodeContextId(f.largestkey, &b)) {
              files.emplace_back(a, b);
            }
          }
        }
        const std::pair<uint64_t, uint64_t>* hit = nullptr;
        for (const auto& f : files) {
          if (f.second >= from && (!hit || f.first < hit->first)) hit = &f;
        }
        if (!hit) break;
        if (hit->second == UINT64_MAX) break;
        from = hit->second + 1;
        it->Seek(ContextPrefix(from));
        continue;
      }
      if (!it->Valid()) break;
      uint64_t id = 0;
      if (!DecodeContextId(it->key().ToStringView(), &id)) {
        return Damaged(Status::Corruption(path_ + ": malformed key in column family " + cf->GetName()), path_);
      }
      ids->insert(id);
      if (id == UINT64_MAX) break;
      from = id + 1;
      it->Seek(ContextPrefix(from));
    }
    SQZ_RETURN_IF_ERROR(Damaged(FromRocks(it->status(), path_ + ": scanning " + cf->GetName()), path_));
  }
  for (uint64_t id : *ids) {
    std::string bytes;
    if (!v->db->Get(rocksdb::ReadOptions(), v->cf_index, ManifestCopyKey(id), &bytes).ok()) continue;
    ContextInfo copy;
    if (!DecodeManifest(bytes, "copy", &copy).ok()) continue;
    auto m = manifests.find(copy.name);
    if (m == manifests.end() || m->second < copy.id) {
      return Damaged(Status::Corruption(path_ + ": context '" + copy.name + "' (id " + std::to_string(copy.id) +
                                        ") was committed but its manifest record is missing"),
                     path_);
    }
  }
  return Status::OK();
}

// The case this catches (docs/RELIABILITY.md, found by the random damage
// test): a flipped byte made a MANIFEST record's length run past the end of
// the file; RocksDB's log reader takes that for a write torn by a crash and
// drops the record and every later version edit without an error, so the
// database opened at an older version, listed too few contexts with exit 0,
// and the next read-write open would have deleted the lost contexts' table
// files as obsolete. Their files are still in the directory, unreferenced,
// and hold each lost context's manifest: its record in the manifest family
// and its copy in the index family (both written by its commit batch, so
// present only for a committed context).
//
// A manifest in an unreferenced file proves a loss only if nothing else can
// explain it. The version explains it when it holds the context's name at
// that id or a newer one (the file is older: an unfinished compaction's
// output, or the file of a replaced version not yet deleted), or a reclaim
// marker for the id (dropped or replaced; its reclaim not done). Otherwise
// either the id was reserved after the version (at or above its id counter,
// which every id passes before any record is written), or the version still
// holds records of the id. A finished drop or replace leaves neither (the
// counter stays above the id; the reclaim removes every record before its
// marker goes), so such a context's manifest in a file not yet deleted
// proves nothing. An unfinished flush writes what the write-ahead log also
// holds (the commit batch), or records without a manifest (a build's).
Status DBImpl::FindLostCommits(RocksView* v, std::vector<LostCommit>* lost) {
  lost->clear();
  // (A writer changed the files while `v` opened: its version may be older
  // than some listed file. A writer that is running passed this check at its
  // own open.)
  if (v->moved || v->tables_listed.empty()) return Status::OK();
  std::set<std::string> referenced;
  {
    std::vector<rocksdb::LiveFileMetaData> md;
    v->db->GetLiveFilesMetaData(&md);
    for (const auto& f : md) referenced.insert(f.name.substr(f.name.find_last_of('/') + 1));
  }
  std::vector<std::string> unreferenced;
  for (const auto& t : v->tables_listed) {
    if (!referenced.count(t)) unreferenced.push_back(t);
  }
  if (unreferenced.empty()) return Status::OK();

  // What the version holds: the committed names, the reclaim markers and the
  // id counter.
  std::map<std::string, uint64_t> committed;
  {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ContextInfo info;
      if (DecodeManifest(it->value().ToStringView(), "manifest", &info).ok()) committed[info.name] = info.id;
    }
    SQZ_RETURN_IF_ERROR(Damaged(FromRocks(it->status(), path_ + ": scanning manifests"), path_));
  }
  std::set<uint64_t> markers;
  {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_default));
    for (it->Seek(kReclaimPrefix); it->Valid() && it->key().starts_with(kReclaimPrefix); it->Next()) {
      uint64_t id = 0;
      if (DecodeReclaimKey(it->key().ToStringView(), &id)) markers.insert(id);
    }
    SQZ_RETURN_IF_ERROR(Damaged(FromRocks(it->status(), path_ + ": scanning reclaim markers"), path_));
  }
  uint64_t next = 1;  // (no counter: no id was ever reserved in this version)
  {
    std::string value;
    const rocksdb::Status s = v->db->Get(rocksdb::ReadOptions(), v->cf_default, kNextIdKey, &value);
    if (s.ok() && !DecodeBE(value, 8, &next)) next = 1;
    if (!s.ok() && !s.IsNotFound()) return Damaged(FromRocks(s, path_ + ": reading the context id counter"), path_);
  }
  auto has_records = [&](uint64_t id) {
    for (auto* cf : {v->cf_index, v->cf_kv}) {
      std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), cf));
      it->Seek(ContextPrefix(id));
      uint64_t found = 0;
      if (it->Valid() && DecodeContextId(it->key().ToStringView(), &found) && found == id) return true;
    }
    // (A degraded view: records in a damaged file are records too.)
    return std::any_of(v->damaged.begin(), v->damaged.end(),
                       [&](const RocksView::DamagedTable& d) { return id >= d.first_id && id <= d.last_id; });
  };
  auto offer = [&](std::string_view bytes, const std::string& file) {
    ContextInfo m;
    if (!DecodeManifest(bytes, "manifest", &m).ok()) return;
    const auto c = committed.find(m.name);
    if (c != committed.end() && c->second >= m.id) return;
    if (markers.count(m.id)) return;
    if (m.id < next && !has_records(m.id)) return;
    for (auto& l : *lost) {
      if (l.name == m.name && l.id == m.id) {
        l.files.push_back(file);
        return;
      }
    }
    lost->push_back(LostCommit{m.name, m.id, {file}});
  };

  for (const auto& name : unreferenced) {
    // A file that cannot be read proves nothing (nor is it in the version).
    rocksdb::Options o;
    rocksdb::SstFileReader reader(o);
    if (!reader.Open(path_ + "/" + name).ok()) continue;
    const auto props = reader.GetTableProperties();
    if (!props || (props->column_family_name != kCfIndex && props->column_family_name != kCfManifest)) continue;
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    ro.fill_cache = false;
    std::unique_ptr<rocksdb::Iterator> it(reader.NewIterator(ro));
    if (props->column_family_name == kCfManifest) {
      // name -> manifest, one record per context.
      for (it->SeekToFirst(); it->Valid(); it->Next()) offer(it->value().ToStringView(), name);
      continue;
    }
    // The index family: one seek to each context's copy key, then one to the
    // next context.
    for (it->SeekToFirst(); it->Valid();) {
      uint64_t id = 0;
      if (!DecodeContextId(it->key().ToStringView(), &id)) break;
      const std::string copy_key = ManifestCopyKey(id);
      it->Seek(copy_key);
      if (it->Valid() && it->key() == copy_key) offer(it->value().ToStringView(), name);
      if (id == UINT64_MAX) break;
      it->Seek(ContextPrefix(id + 1));
    }
  }
  return Status::OK();
}

Status DBImpl::CheckLostCommits(RocksView* v) {
  std::vector<LostCommit> lost;
  SQZ_RETURN_IF_ERROR(FindLostCommits(v, &lost));
  if (lost.empty()) return Status::OK();
  std::string names;
  std::set<std::string> files;
  for (const auto& l : lost) {
    names += std::string(names.empty() ? "" : ", ") + "'" + l.name + "' (id " + std::to_string(l.id) + ")";
    files.insert(l.files.begin(), l.files.end());
  }
  std::string file_list;
  for (const auto& f : files) file_list += (file_list.empty() ? "" : ", ") + f;
  const bool one = lost.size() == 1;
  return Damaged(Status::Corruption(path_ + ": RocksDB's MANIFEST lost the commit of context" + (one ? " " : "s ") +
                                    names + ": " + (one ? "its manifest is" : "their manifests are") +
                                    " in table file" + (files.size() == 1 ? " " : "s ") + file_list +
                                    ", which the version the MANIFEST describes does not reference (RocksDB takes a "
                                    "MANIFEST record cut off by the end of the file, by damage or truncation, for a "
                                    "write torn by a crash, and drops it and every later change without an error)"),
                 path_);
}

Status DBImpl::ProbeBeforeReadWriteOpen() {
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto probe = std::make_shared<RocksView>();
    // A probe that fails to open leaves the verdict to the read-write open
    // (which fails too, or opens degraded after its own probe).
    if (!OpenRocks(false, /*paranoid=*/false, OpenMode::kProbe, probe.get()).ok()) return Status::OK();
    if (!probe->moved) return CheckLostCommits(probe.get());
    // Another process changed the files meanwhile: a writer (the read-write
    // open fails on its lock) or one that just closed (look again).
  }
  return Status::OK();
}

Status DBImpl::FindLostCommitsAt(const std::string& path, std::vector<std::string>* listed,
                                 std::vector<LostCommit>* lost) {
  DBImpl db;
  db.path_ = path;
  db.read_only_ = true;
  db.cache_ = rocksdb::NewLRUCache(8 << 20);
  auto v = std::make_shared<RocksView>();
  SQZ_RETURN_IF_ERROR(Damaged(FromRocks(db.OpenRocks(false, /*paranoid=*/false, OpenMode::kProbe, v.get()),
                                        path + ": cannot open the database"),
                              path));
  listed->clear();
  std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
  for (it->SeekToFirst(); it->Valid(); it->Next()) listed->push_back(it->key().ToString());
  SQZ_RETURN_IF_ERROR(FromRocks(it->status(), path + ": listing contexts"));
  it.reset();
  return db.FindLostCommits(v.get(), lost);
}

// One pass over what is on disk at a read-write open: the committed
// contexts (manifests), the context ids present in the index and kv
// families (one seek per id, not per record), and the id counter. Sets the
// next id above all of them and removes the ids that have no manifest (the
// leftovers of builds that never committed).
Status DBImpl::RecoverOnOpen() {
  RocksView* v = view_.get();
  uint64_t next = 1;
  std::string value;
  rocksdb::Status s = v->db->Get(rocksdb::ReadOptions(), v->cf_default, kNextIdKey, &value);
  if (s.ok()) {
    if (value.size() != 8 || !DecodeBE(value, 8, &next)) {
      return Status::Corruption(path_ + ": malformed context id counter");
    }
  } else if (!s.IsNotFound()) {
    return FromRocks(s, path_ + ": reading the context id counter");
  }
  std::set<uint64_t> live;
  {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ContextInfo info;
      SQZ_RETURN_IF_ERROR(
          Damaged(DecodeManifest(it->value().ToStringView(), path_ + ": context '" + it->key().ToString() + "'", &info),
                  path_));
      live.insert(info.id);
      next = std::max(next, info.id + 1);
    }
    SQZ_RETURN_IF_ERROR(Damaged(FromRocks(it->status(), path_ + ": scanning manifests"), path_));
  }
  // Also refuses (before anything is removed) when a committed context has
  // lost its manifest record.
  std::set<uint64_t> ids, orphans;
  SQZ_RETURN_IF_ERROR(CheckManifestsAgainstCopies(v, &ids));
  for (uint64_t id : ids) {
    if (!live.count(id)) orphans.insert(id);
    if (id != UINT64_MAX) next = std::max(next, id + 1);
  }
  next_ctx_id_ = next;
  if (orphans.empty()) return Status::OK();
  rocksdb::WriteBatch batch;
  for (uint64_t id : orphans) {
    SQZ_RETURN_IF_ERROR(DeleteContextData(id, &batch));
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(v->cf_default, ReclaimKey(id), ""), "reclaim marker"));
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(v->db->Write(wo, &batch), path_ + ": removing leftovers of unfinished builds");
}

Status DBImpl::DeleteContextData(uint64_t ctx, rocksdb::WriteBatch* batch) {
  const std::string begin = ContextPrefix(ctx), end = ContextEnd(ctx);
  SQZ_RETURN_IF_ERROR(FromRocks(batch->DeleteRange(view_->cf_index, begin, end), "range delete"));
  return FromRocks(batch->DeleteRange(view_->cf_kv, begin, end), "range delete");
}

Status DBImpl::CompactContext(uint64_t ctx) {
  const std::string b = ContextPrefix(ctx), e = ContextEnd(ctx);
  rocksdb::Slice begin(b), end(e);
  rocksdb::RangePtr range(&begin, &end);
  rocksdb::CompactRangeOptions co;
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForceOptimized;
  for (auto* cf : {view_->cf_index, view_->cf_kv}) {
    // Table files wholly inside the range (every file below level 0 holds
    // one context: the partitioner) are deleted without being read, so a
    // damaged file of a dropped context goes with it; the compaction then
    // handles what is left (level 0, the tombstones).
    SQZ_RETURN_IF_ERROR(FromRocks(rocksdb::DeleteFilesInRanges(view_->db.get(), cf, &range, 1, /*include_end=*/false),
                                  path_ + ": deleting the table files of a removed context"));
    KillPoint("reclaim:files-deleted");
    SQZ_RETURN_IF_ERROR(FromRocks(view_->db->CompactRange(co, cf, &begin, &end), path_ + ": compacting"));
  }
  SchedulePurge();  // the deleted files (no compaction event when nothing was left to compact)
  return Status::OK();
}

// Moves a freshly committed context's level-0 tables down (a trivial move:
// nothing is rewritten when no other file overlaps, which the partitioner
// and the fresh id guarantee), so that every table below level 0 holds one
// context and a later drop can delete them whole. Best effort.
void DBImpl::SettleContext(uint64_t ctx) {
  const std::string b = ContextPrefix(ctx), e = ContextEnd(ctx);
  rocksdb::Slice begin(b), end(e);
  rocksdb::CompactRangeOptions co;
  for (auto* cf : {view_->cf_index, view_->cf_kv}) (void)view_->db->CompactRange(co, cf, &begin, &end);
}

// --- reclamation ---------------------------------------------------------------

const rocksdb::Snapshot* DBImpl::AcquireSnapshot() {
  std::lock_guard<std::mutex> lock(reclaim_mu_);
  const rocksdb::Snapshot* s = view_->db->GetSnapshot();
  live_snapshots_.insert(s->GetSequenceNumber());
  return s;
}

void DBImpl::ReleaseSnapshot(const rocksdb::Snapshot* s) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    auto it = live_snapshots_.find(s->GetSequenceNumber());
    if (it != live_snapshots_.end()) live_snapshots_.erase(it);
    view_->db->ReleaseSnapshot(s);
    wake = !pending_.empty();
    if (wake) reclaim_wanted_ = true;
  }
  if (wake) reclaim_cv_.notify_all();
}

Status DBImpl::Reclaim() {
  if (read_only_) return Status::OK();
  RocksView* v = view_.get();
  // Markers persisted by drops, replaces and the orphan scan (also those of a
  // process that died before reclaiming).
  {
    std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_default));
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    for (it->Seek(kReclaimPrefix); it->Valid() && it->key().starts_with(kReclaimPrefix); it->Next()) {
      uint64_t id = 0;
      if (!DecodeReclaimKey(it->key().ToStringView(), &id)) {
        return Status::Corruption(path_ + ": malformed reclaim marker");
      }
      pending_.emplace(id, 0);  // 0: dropped before this process took any snapshot
    }
    SQZ_RETURN_IF_ERROR(FromRocks(it->status(), path_ + ": scanning reclaim markers"));
  }
  std::vector<uint64_t> ready;
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    const uint64_t oldest = live_snapshots_.empty() ? UINT64_MAX : *live_snapshots_.begin();
    // A snapshot whose sequence number is >= the drop's already sees the
    // drop: only older ones still need the data.
    for (const auto& [id, seq] : pending_) {
      if (seq <= oldest) ready.push_back(id);
    }
  }
  for (uint64_t id : ready) {
    SQZ_RETURN_IF_ERROR(CompactContext(id));
    KillPoint("reclaim:compacted");
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQZ_RETURN_IF_ERROR(FromRocks(v->db->Delete(wo, v->cf_default, ReclaimKey(id)), path_ + ": reclaim marker"));
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    pending_.erase(id);
  }
  return Status::OK();
}

void DBImpl::ReclaimLoop() {
  using Clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lock(reclaim_mu_);
  while (!stop_) {
    if (reclaim_wanted_) {
      reclaim_wanted_ = false;
      lock.unlock();
      (void)Reclaim();  // best effort: a failure leaves the marker for the next open
      lock.lock();
    } else if (purge_passes_ > 0 && Clock::now() >= purge_due_) {
      --purge_passes_;
      purge_due_ = Clock::now() + std::chrono::seconds(1);
      lock.unlock();
      PurgeObsoleteFiles();
      lock.lock();
    } else if (purge_passes_ > 0) {
      reclaim_cv_.wait_until(lock, purge_due_);
    } else {
      reclaim_cv_.wait(lock);
    }
  }
}

void DBImpl::SchedulePurge() {
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    purge_passes_ = 2;
    purge_due_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  }
  reclaim_cv_.notify_all();
}

// RocksDB deletes the table files a compaction (or DeleteFilesInRanges)
// made obsolete at the end of that job, but not a file that a Get or
// MultiGet of another thread (a query on another context) was reading at
// that moment: that one stays on disk until RocksDB's next flush or
// compaction, which a process that only serves queries may never run, so a
// dropped context's space was not reclaimed (found by tools/stress). Such
// reads end within milliseconds; this runs RocksDB's obsolete-file scan
// again afterwards (re-enabling file deletions scans and deletes; the
// counter nests with a backup's own disabling).
void DBImpl::PurgeObsoleteFiles() {
  std::shared_ptr<RocksView> v = view();
  if (!v || !v->db->DisableFileDeletions().ok()) return;
  (void)v->db->EnableFileDeletions(/*force=*/false);
}

// --- contexts ----------------------------------------------------------------

Status DBImpl::GetManifest(RocksView* v, const rocksdb::ReadOptions& ro, const std::string& name, ContextInfo* info) {
  std::string bytes;
  rocksdb::Status s = v->db->Get(ro, v->cf_manifest, name, &bytes);
  if (s.IsNotFound()) {
    return Status::NotFound("no context named '" + name + "' in " + path_ + " (sqctl list shows the contexts)");
  }
  SQZ_RETURN_IF_ERROR(FromRocks(s, "reading the manifest of context '" + name + "'"));
  SQZ_RETURN_IF_ERROR(DecodeManifest(bytes, "context '" + name + "'", info));
  if (info->name != name) return Status::Corruption("context '" + name + "': manifest names another context");
  return Status::OK();
}

Status DBImpl::ListContextsUnguarded(std::vector<std::string>* names) {
  names->clear();
  auto v = view();
  std::unique_ptr<rocksdb::Iterator> it(v->db->NewIterator(rocksdb::ReadOptions(), v->cf_manifest));
  for (it->SeekToFirst(); it->Valid(); it->Next()) names->push_back(it->key().ToString());
  return FromRocks(it->status(), path_ + ": listing contexts");
}

Status DBImpl::DescribeContextUnguarded(const std::string& name, ContextInfo* info) {
  auto v = view();
  SQZ_RETURN_IF_ERROR(GetManifest(v.get(), rocksdb::ReadOptions(), name, info));
  const std::string b = ContextPrefix(info->id), e = ContextEnd(info->id);
  rocksdb::Range r(b, e);
  for (auto* cf : {v->cf_index, v->cf_kv}) {
    uint64_t size = 0;
    rocksdb::SizeApproximationOptions so;
    so.include_memtables = true;
    so.include_files = true;
    SQZ_RETURN_IF_ERROR(FromRocks(v->db->GetApproximateSizes(so, cf, &r, 1, &size), "estimating context size"));
    info->bytes_on_disk += size;
  }
  info->damage = v->DamageOf(info->id);
  return Status::OK();
}

Status DBImpl::OpenSnapshot(const std::string& name, std::unique_ptr<ContextSnapshot>* out) {
  std::unique_ptr<SnapshotImpl> s;
  SQZ_RETURN_IF_ERROR(OpenSnapshotImpl(name, &s));
  *out = std::move(s);
  return Status::OK();
}

Status DBImpl::OpenSnapshotImpl(const std::string& name, std::unique_ptr<SnapshotImpl>* out) {
  auto v = view();
  const rocksdb::Snapshot* snap = read_only_ ? nullptr : AcquireSnapshot();
  auto s = std::make_unique<SnapshotImpl>(this, v, snap);
  // The manifest is read at the snapshot: shapes, id and records all come
  // from one version.
  SQZ_RETURN_IF_ERROR(GetManifest(v.get(), s->Read(), name, s->mutable_info()));
  if (v->RecordsDamaged(s->info().id)) {
    return Status::Corruption(
        "context '" + name + "' in " + path_ + " is damaged: " + v->DamageOf(s->info().id) +
        ". The other contexts are not affected. Drop it (sqctl drop --db " + path_ + " --context " + name +
        ") and rebuild it, or salvage the database with sqctl repair --db " + path_ + " --out NEW_DIR");
  }
  *out = std::move(s);
  return Status::OK();
}

Status DBImpl::DropContextUnguarded(const std::string& name) {
  if (read_only_) return Status::NotSupported(path_ + ": opened read-only; drop needs a read-write open");
  {
    std::lock_guard<std::mutex> lock(commit_mu_);
    ContextInfo info;
    SQZ_RETURN_IF_ERROR(GetManifest(view_.get(), rocksdb::ReadOptions(), name, &info));
    rocksdb::WriteBatch batch;
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Delete(view_->cf_manifest, name), "drop"));
    SQZ_RETURN_IF_ERROR(DeleteContextData(info.id, &batch));
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(view_->cf_default, ReclaimKey(info.id), ""), "drop"));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    // The marker and its sequence number appear together for Reclaim (which
    // scans markers under reclaim_mu_).
    std::lock_guard<std::mutex> rl(reclaim_mu_);
    SQZ_RETURN_IF_ERROR(FromRocks(view_->db->Write(wo, &batch), "dropping context '" + name + "'"));
    pending_[info.id] = view_->db->GetLatestSequenceNumber();
  }
  KillPoint("drop:committed");
  // The drop is committed; a reclaim that fails (a damaged table file that
  // must be compacted) leaves its marker for the next open.
  (void)Reclaim();
  return Status::OK();
}

// --- writing -----------------------------------------------------------------

Status DBImpl::BeginContext(const std::string& name, bool replace, const ContextInfo& shape,
                            std::unique_ptr<ContextWriter>* out) {
  if (read_only_) return Status::NotSupported(path_ + ": opened read-only; building needs a read-write open");
  if (name.empty()) return Status::InvalidArgument("the context name is empty");
  // Fail fast rather than after hours of k-means (the commit re-checks
  // atomically, for concurrent builds).
  if (!replace) {
    ContextInfo info;
    Status s = GetManifest(view_.get(), rocksdb::ReadOptions(), name, &info);
    if (s.ok()) return ContextExistsError(name, path_);
    if (!s.IsNotFound()) return s;
  }
  uint64_t id = 0;
  {
    // The id is persisted before any record uses it, so it is never handed
    // out again, whatever happens to this build (killed, dropped).
    std::lock_guard<std::mutex> lock(commit_mu_);
    id = next_ctx_id_;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQZ_RETURN_IF_ERROR(FromRocks(view_->db->Put(wo, view_->cf_default, kNextIdKey, EncodeBE(id + 1, 8)),
                                  path_ + ": reserving a context id"));
    next_ctx_id_ = id + 1;
  }
  out->reset(new WriterImpl(this, view_, id, shape));
  return Status::OK();
}

Status DBImpl::CommitContext(const ContextInfo& info_in, bool replace) {
  ContextInfo info = info_in;
  info.format_version = kFormatVersion;
  info.bytes_on_disk = 0;
  SQZ_RETURN_IF_ERROR(ValidateManifest(info).WithPrefix("commit"));
  const std::string manifest = EncodeManifest(info);
  // Records were written without WAL: make them durable before the manifest
  // can point at them.
  rocksdb::FlushOptions fo;
  fo.wait = true;
  SQZ_RETURN_IF_ERROR(
      FromRocks(view_->db->Flush(fo, {view_->cf_index, view_->cf_kv}), path_ + ": flushing context records"));
  KillPoint("commit:flushed");  // records on disk, no manifest: the next open removes them
  bool had_old = false;
  {
    std::lock_guard<std::mutex> lock(commit_mu_);
    ContextInfo old;
    Status gs = GetManifest(view_.get(), rocksdb::ReadOptions(), info.name, &old);
    if (gs.ok() && !replace) return ContextExistsError(info.name, path_);
    if (!gs.ok() && !gs.IsNotFound() && !gs.IsCorruption()) return gs;
    had_old = gs.ok();
    rocksdb::WriteBatch batch;
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(view_->cf_manifest, info.name, manifest), "commit"));
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(view_->cf_index, ManifestCopyKey(info.id), manifest), "commit"));
    if (had_old) {
      SQZ_RETURN_IF_ERROR(DeleteContextData(old.id, &batch));
      SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(view_->cf_default, ReclaimKey(old.id), ""), "commit"));
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;
    std::lock_guard<std::mutex> rl(reclaim_mu_);  // see DropContext
    SQZ_RETURN_IF_ERROR(FromRocks(view_->db->Write(wo, &batch), "committing context '" + info.name + "'"));
    if (had_old) pending_[old.id] = view_->db->GetLatestSequenceNumber();
  }
  if (had_old) KillPoint("replace:committed");
  SettleContext(info.id);
  // The commit is done: a reclaim that fails now leaves its marker for the
  // background thread or the next open.
  if (had_old) (void)Reclaim();
  return Status::OK();
}

Status DBImpl::AbortContext(uint64_t id) {
  rocksdb::WriteBatch batch;
  SQZ_RETURN_IF_ERROR(DeleteContextData(id, &batch));
  SQZ_RETURN_IF_ERROR(FromRocks(view_->db->Write(rocksdb::WriteOptions(), &batch), "removing an unfinished context"));
  return CompactContext(id);
}

// --- verify --------------------------------------------------------------------

Status DBImpl::VerifyContextUnguarded(const std::string& name, VerifyReport* report) {
  VerifyReport local;
  if (!report) report = &local;
  *report = VerifyReport();
  std::unique_ptr<SnapshotImpl> base;
  SQZ_RETURN_IF_ERROR(OpenSnapshotImpl(name, &base));
  const SnapshotImpl& snap = *base;
  const ContextInfo& m = snap.info();
  // (Damage to its records fails OpenSnapshotImpl; this is the loss of its
  // manifest copy only, which reads do not need but repair might.)
  const std::string damage = snap.view()->DamageOf(m.id);
  if (!damage.empty()) {
    return Status::Corruption("context '" + name + "' in " + path_ + " is damaged: " + damage +
                              ". Its records are intact and queries work; to restore the copy, rebuild it (sqctl "
                              "build-index --db " +
                              path_ + " --name " + name +
                              " --replace --kv FILE), or salvage the database with sqctl repair --db " + path_ +
                              " --out NEW_DIR");
  }
  report->records_checked++;
  const uint64_t page_bytes = m.page_bytes();
  rocksdb::ReadOptions ro = snap.Read();
  ro.fill_cache = false;
  for (int layer = 0; layer < m.n_layers; ++layer) {
    for (int head = 0; head < m.n_kv_heads; ++head) {
      const std::string where = snap.Where(layer, head);
      HeadIndexRecord h;
      SQZ_RETURN_IF_ERROR(snap.GetHeadIndexImpl(layer, head, /*full=*/true, &h));
      report->records_checked++;
      // Walk the head's key range: exactly pages 0 .. pages_per_head - 1.
      const std::string begin = HeadKey(m.id, layer, head);
      const std::string end = head + 1 < m.n_kv_heads ? HeadKey(m.id, layer, head + 1) : HeadKey(m.id, layer + 1, 0);
      rocksdb::Slice upper(end);
      rocksdb::ReadOptions iro = ro;
      iro.iterate_upper_bound = &upper;
      std::unique_ptr<rocksdb::Iterator> it(snap.view()->db->NewIterator(iro, snap.view()->cf_kv));
      uint64_t expect = 0;
      const uint64_t total = static_cast<uint64_t>(m.pages_per_head());
      for (it->Seek(begin); it->Valid(); it->Next()) {
        uint64_t c;
        uint32_t l, hh, page;
        if (!DecodePageKey(it->key().ToStringView(), &c, &l, &hh, &page)) {
          return Status::Corruption(where + ": malformed KV page key");
        }
        if (expect >= total || page != expect) {
          return Status::Corruption(where + ": unexpected KV page " + std::to_string(page) + " (expected " +
                                    (expect < total ? std::to_string(expect) : std::string("none")) + ")");
        }
        rocksdb::Slice v = it->value();
        if (v.size() != page_bytes) {
          return Status::Corruption(where + ": KV page " + std::to_string(page) + " has " + std::to_string(v.size()) +
                                    " bytes, expected " + std::to_string(page_bytes));
        }
        if (Crc32c(v.data(), v.size()) != h.page_crc[page]) {
          return Status::Corruption(where + ": KV page " + std::to_string(page) + " fails its CRC32C check");
        }
        report->kv_pages_checked++;
        report->bytes_checked += v.size();
        ++expect;
      }
      SQZ_RETURN_IF_ERROR(FromRocks(it->status(), where + ": reading KV pages"));
      if (expect != total) {
        return Status::Corruption(where + ": " + std::to_string(total - expect) + " KV page(s) missing");
      }
    }
  }
  return Status::OK();
}

}  // namespace sqz::storage
