// Backup, restore and repair (sqctl backup / restore / repair): RocksDB's
// BackupEngine and RepairDB around squeeze's own checks. Nothing here ever
// writes into the directory it reads from, or into a directory that holds
// files: copies go to new or empty directories only.
#include <rocksdb/cache.h>
#include <rocksdb/utilities/backup_engine.h>
#include <rocksdb/write_batch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "db_impl.h"
#include "directory.h"
#include "records.h"
#include "util/guard.h"

namespace sqz::storage {

namespace {

// `dir` is new or empty, so a copy may be written there.
Status CheckFreshTarget(const std::string& dir, const std::string& what) {
  DirState st;
  Status s = InspectDatabaseDir(dir, &st);
  if (s.ok() && st != DirState::kDatabase) return Status::OK();
  return Status::InvalidArgument(dir + ": " + what +
                                 " writes only into a new or empty directory, and this one holds files" +
                                 (s.ok() ? " (a database)" : " (" + s.message() + ")") + "; nothing was changed");
}

bool IsBackupDir(const std::string& dir) {
  std::error_code ec;
  return std::filesystem::is_directory(dir + "/meta", ec);
}

// Opens the database at `path` read-write and verifies every context;
// fills info->contexts.
Status VerifyAll(const std::string& path, std::vector<std::string>* names) {
  std::unique_ptr<DB> db;
  Options o;
  o.create_if_missing = false;
  SQZ_RETURN_IF_ERROR(DB::Open(o, path, &db));
  SQZ_RETURN_IF_ERROR(db->ListContexts(names));
  for (const auto& n : *names) SQZ_RETURN_IF_ERROR(db->VerifyContext(n, nullptr));
  return Status::OK();
}

uint64_t BackupBytes(rocksdb::BackupEngineReadOnlyBase* be, uint32_t id) {
  std::vector<rocksdb::BackupInfo> infos;
  be->GetBackupInfo(&infos);
  for (const auto& i : infos) {
    if (i.backup_id == id) return i.size;
  }
  return 0;
}

}  // namespace

Status DBImpl::BackupUnguarded(const std::string& backup_dir, BackupInfo* info) {
  if (read_only_) return Status::NotSupported(path_ + ": opened read-only; a backup needs the writer's instance");
  BackupInfo local;
  if (!info) info = &local;
  *info = BackupInfo();
  std::error_code ec;
  if (std::filesystem::exists(backup_dir, ec) && !IsBackupDir(backup_dir)) {
    SQZ_RETURN_IF_ERROR(CheckFreshTarget(backup_dir, "a backup"));
  }
  if (std::filesystem::exists(backup_dir, ec) && std::filesystem::equivalent(backup_dir, path_, ec)) {
    return Status::InvalidArgument(backup_dir + ": is the database itself");
  }
  rocksdb::BackupEngineOptions bo(backup_dir);
  bo.sync = true;
  bo.share_table_files = true;
  bo.share_files_with_checksum = true;
  bo.max_background_operations = std::max(1, options_.max_background_jobs);
  rocksdb::BackupEngine* raw = nullptr;
  SQZ_RETURN_IF_ERROR(FromRocks(rocksdb::BackupEngine::Open(rocksdb::Env::Default(), bo, &raw),
                                backup_dir + ": cannot open the backup directory"));
  std::unique_ptr<rocksdb::BackupEngine> be(raw);
  rocksdb::BackupID id = 0;
  {
    // No commit or drop interleaves: the backup holds exactly the contexts
    // listed (builds keep writing their records; they commit after).
    std::lock_guard<std::mutex> lock(commit_mu_);
    SQZ_RETURN_IF_ERROR(ListContexts(&info->contexts));
    rocksdb::CreateBackupOptions co;
    co.flush_before_backup = true;
    const std::string meta = "squeeze format " + std::to_string(kFormatVersion) + ", " +
                             std::to_string(info->contexts.size()) + " context(s)";
    SQZ_RETURN_IF_ERROR(FromRocks(be->CreateNewBackupWithMetadata(co, view_->db.get(), meta, &id),
                                  path_ + ": backing up into " + backup_dir));
  }
  // Read back every file of the backup against its checksum.
  SQZ_RETURN_IF_ERROR(FromRocks(be->VerifyBackup(id, /*verify_with_checksum=*/true),
                                backup_dir + ": verifying backup " + std::to_string(id)));
  info->backup_id = id;
  info->bytes = BackupBytes(be.get(), id);
  return Status::OK();
}

}  // namespace sqz::storage

namespace sqz {

using storage::FromRocks;

namespace {
Status RestoreUnguarded(const std::string& backup_dir, uint32_t backup_id, const std::string& db_path,
                        BackupInfo* info);
Status RepairUnguarded(const std::string& damaged, const std::string& out, RepairReport* report);
}  // namespace

Status DB::Restore(const std::string& backup_dir, uint32_t backup_id, const std::string& db_path, BackupInfo* info) {
  return util::Guarded("DB::Restore", [&] { return RestoreUnguarded(backup_dir, backup_id, db_path, info); });
}

Status DB::Repair(const std::string& damaged, const std::string& out, RepairReport* report) {
  return util::Guarded("DB::Repair", [&] { return RepairUnguarded(damaged, out, report); });
}

namespace {
Status RestoreUnguarded(const std::string& backup_dir, uint32_t backup_id, const std::string& db_path,
                        BackupInfo* info) {
  BackupInfo local;
  if (!info) info = &local;
  *info = BackupInfo();
  if (!storage::IsBackupDir(backup_dir)) {
    return Status::NotFound(backup_dir + ": not a backup directory (sqctl backup --db DIR --to BACKUP_DIR makes one)");
  }
  SQZ_RETURN_IF_ERROR(storage::CheckFreshTarget(db_path, "restore"));
  rocksdb::BackupEngineOptions bo(backup_dir);
  bo.sync = true;
  rocksdb::BackupEngineReadOnly* raw = nullptr;
  SQZ_RETURN_IF_ERROR(FromRocks(rocksdb::BackupEngineReadOnly::Open(rocksdb::Env::Default(), bo, &raw),
                                backup_dir + ": cannot open the backup directory"));
  std::unique_ptr<rocksdb::BackupEngineReadOnly> be(raw);
  std::vector<rocksdb::BackupInfo> infos;
  be->GetBackupInfo(&infos);
  if (infos.empty()) return Status::NotFound(backup_dir + ": holds no backup");
  uint32_t id = backup_id;
  if (id == 0) {
    for (const auto& i : infos) id = std::max(id, i.backup_id);
  }
  if (std::none_of(infos.begin(), infos.end(), [&](const rocksdb::BackupInfo& i) { return i.backup_id == id; })) {
    return Status::NotFound(backup_dir + ": no backup " + std::to_string(id));
  }
  SQZ_RETURN_IF_ERROR(FromRocks(be->VerifyBackup(id, /*verify_with_checksum=*/true),
                                backup_dir + ": backup " + std::to_string(id) + " is damaged"));
  std::error_code ec;
  std::filesystem::create_directories(db_path, ec);
  if (ec) return Status::IOError(db_path + ": cannot create directory: " + ec.message());
  SQZ_RETURN_IF_ERROR(FromRocks(be->RestoreDBFromBackup(rocksdb::RestoreOptions(), id, db_path, db_path),
                                backup_dir + ": restoring backup " + std::to_string(id) + " into " + db_path));
  SQZ_RETURN_IF_ERROR(storage::WriteIdentityFile(db_path));
  info->backup_id = id;
  info->bytes = storage::BackupBytes(be.get(), id);
  return storage::VerifyAll(db_path, &info->contexts).WithPrefix("the restored database " + db_path);
}

// Copies (hard-links table files, which RocksDB never modifies) the RocksDB
// files of `from` into `to`.
Status CopyDatabaseFiles(const std::string& from, const std::string& to, bool logs) {
  std::vector<std::string> names;
  SQZ_RETURN_IF_ERROR(storage::ListDir(from, &names));
  for (const auto& n : names) {
    if (!storage::IsRocksFileName(n) || n == "LOCK" || n.rfind("LOG", 0) == 0) continue;
    if (!logs && n.size() > 4 && n.compare(n.size() - 4, 4, ".log") == 0) continue;
    const std::string src = from + "/" + n, dst = to + "/" + n;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(src, ec)) continue;
    const bool table = n.size() > 4 && n.compare(n.size() - 4, 4, ".sst") == 0;
    if (table && ::link(src.c_str(), dst.c_str()) == 0) continue;
    std::filesystem::copy_file(src, dst, std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return Status::IOError(src + ": cannot copy to " + to + ": " + ec.message());
  }
  return Status::OK();
}

struct Candidate {
  uint64_t id = 0;
  std::string manifest;  // encoded
};

Status RepairUnguarded(const std::string& damaged, const std::string& out, RepairReport* report) {
  RepairReport local;
  if (!report) report = &local;
  *report = RepairReport();
  {
    storage::DirState st;
    Status s = storage::InspectDatabaseDir(damaged, &st);
    if (!s.ok() && !s.IsCorruption()) return s;  // not a database at all: nothing to repair
    if (s.ok() && st != storage::DirState::kDatabase) {
      return Status::NotFound(damaged + ": no squeeze database here (nothing to repair)");
    }
  }
  std::error_code ec;
  if (std::filesystem::exists(out, ec) && std::filesystem::equivalent(out, damaged, ec)) {
    return Status::InvalidArgument(out + ": is the damaged database; repair writes a copy into a new directory");
  }
  SQZ_RETURN_IF_ERROR(storage::CheckFreshTarget(out, "repair"));

  // What the damaged database listed, if it still opens at all.
  std::set<std::string> listed_before;
  {
    Options ro;
    ro.read_only = true;
    std::unique_ptr<DB> old;
    std::vector<std::string> names;
    if (DB::Open(ro, damaged, &old).ok() && old->ListContexts(&names).ok()) {
      listed_before.insert(names.begin(), names.end());
    }
  }
  // A version that lost committed contexts (their table files are in the
  // directory, unreferenced: docs/RELIABILITY.md) opens, but only RepairDB
  // brings them back; a read-write open of the copy would delete their files
  // as obsolete. The open above refused; the names come from the version and
  // the lost manifests, so that each is reported recovered or lost.
  std::vector<storage::LostCommit> lost_commits;
  {
    std::vector<std::string> names;
    if (storage::DBImpl::FindLostCommitsAt(damaged, &names, &lost_commits).ok() && !lost_commits.empty()) {
      listed_before.insert(names.begin(), names.end());
      for (const auto& l : lost_commits) listed_before.insert(l.name);
    }
  }

  std::filesystem::create_directories(out, ec);
  if (ec) return Status::IOError(out + ": cannot create directory: " + ec.message());
  SQZ_RETURN_IF_ERROR(storage::WriteIdentityFile(out));
  SQZ_RETURN_IF_ERROR(CopyDatabaseFiles(damaged, out, /*logs=*/true));

  auto cache = rocksdb::NewLRUCache(64 << 20);
  const auto descs = storage::ColumnFamilies(cache);
  rocksdb::DBOptions dbo;
  dbo.paranoid_checks = true;
  dbo.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  // If RocksDB still opens the copy (its MANIFEST and CURRENT are sound, and
  // its version lost no commit), the log is replayed into table files (flush)
  // and every block of every table is read against its checksum: if all
  // pass, RocksDB's metadata needs no repair. Otherwise RepairDB rebuilds the
  // copy's MANIFEST from its table files and logs, and sets aside (out/lost/)
  // the tables it cannot read.
  bool sound = false;
  if (lost_commits.empty()) {
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* raw = nullptr;
    if (rocksdb::DB::Open(dbo, out, descs, &handles, &raw).ok()) {
      rocksdb::FlushOptions fo;
      fo.wait = true;
      sound = raw->Flush(fo, handles).ok() && raw->VerifyChecksum().ok();
      for (auto* h : handles) raw->DestroyColumnFamilyHandle(h);
      delete raw;
    }
  }
  if (!sound) {
    Status rs = FromRocks(rocksdb::RepairDB(out, dbo, descs, descs[0].options), out + ": RocksDB repair");
    if (!rs.ok()) {
      // RepairDB replays every log it finds into a new level-0 table; a log
      // whose writes were also flushed before the damage gives two tables
      // with the same sequence numbers, which it refuses. Start over without
      // the logs: what they alone held (writes since the last flush) is lost
      // and reported per context below.
      std::filesystem::remove_all(out, ec);
      std::filesystem::create_directories(out, ec);
      if (ec) return Status::IOError(out + ": cannot recreate directory: " + ec.message());
      SQZ_RETURN_IF_ERROR(storage::WriteIdentityFile(out));
      SQZ_RETURN_IF_ERROR(CopyDatabaseFiles(damaged, out, /*logs=*/false));
      report->logs_skipped = true;
      SQZ_RETURN_IF_ERROR(
          FromRocks(rocksdb::RepairDB(out, dbo, descs, descs[0].options), out + ": RocksDB repair (without logs)")
              .WithPrefix("after: " + rs.message()));
    }
  }
  {
    std::vector<std::string> lost;
    if (storage::ListDir(out + "/lost", &lost).ok()) {
      // Only table files are damage: RocksDB also moves the logs it
      // replayed and the old MANIFEST there.
      for (const auto& f : lost) {
        if (f.size() > 4 && f.compare(f.size() - 4, 4, ".sst") == 0) report->damaged_files.push_back(f);
      }
    }
  }

  // Reconcile the manifests with their redundant copies in the raw database.
  std::map<std::string, std::string> lost_reason;
  {
    dbo.create_missing_column_families = true;  // a family whose every table was lost
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* raw_db = nullptr;
    SQZ_RETURN_IF_ERROR(
        FromRocks(rocksdb::DB::Open(dbo, out, descs, &handles, &raw_db), out + ": opening the repaired copy"));
    std::unique_ptr<rocksdb::DB> raw(raw_db);
    struct Closer {
      rocksdb::DB* db;
      std::vector<rocksdb::ColumnFamilyHandle*>& h;
      ~Closer() {
        for (auto* x : h) db->DestroyColumnFamilyHandle(x);
      }
    } closer{raw.get(), handles};
    auto* cf_default = handles[0];
    auto* cf_manifest = handles[1];
    auto* cf_index = handles[2];
    auto* cf_kv = handles[3];
    rocksdb::WriteBatch batch;

    std::string value;
    rocksdb::Status gs = raw->Get(rocksdb::ReadOptions(), cf_default, storage::kFormatVersionKey, &value);
    uint64_t version = 0;
    if (gs.ok() && value.size() == 4 && storage::DecodeBE(value, 4, &version) && version != storage::kFormatVersion) {
      return Status::NotSupported(damaged + ": format version " + std::to_string(version) + "; this build repairs " +
                                  std::to_string(storage::kFormatVersion));
    }
    if (!gs.ok() || version != storage::kFormatVersion) {
      SQZ_RETURN_IF_ERROR(FromRocks(
          batch.Put(cf_default, storage::kFormatVersionKey, storage::EncodeBE(storage::kFormatVersion, 4)), "repair"));
    }

    // Newest readable manifest per name, from the manifest family and from
    // the copies in the index family.
    std::map<std::string, Candidate> best;
    auto offer = [&](const std::string& bytes, const std::string& where) {
      ContextInfo info;
      if (!storage::DecodeManifest(bytes, where, &info).ok()) return false;
      auto& b = best[info.name];
      if (info.id >= b.id) b = Candidate{info.id, bytes};
      return true;
    };
    std::set<std::string> manifest_keys;
    {
      std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), cf_manifest));
      for (it->SeekToFirst(); it->Valid(); it->Next()) {
        const std::string name = it->key().ToString();
        manifest_keys.insert(name);
        if (!offer(it->value().ToString(), "context '" + name + "'")) lost_reason[name] = "its manifest is unreadable";
      }
    }
    std::set<uint64_t> ids_with_records;
    for (auto* cf : {cf_index, cf_kv}) {
      std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), cf));
      for (it->SeekToFirst(); it->Valid();) {
        uint64_t id = 0;
        if (!storage::DecodeContextId(it->key().ToStringView(), &id)) {
          it->Next();
          continue;
        }
        ids_with_records.insert(id);
        if (id == UINT64_MAX) break;
        it->Seek(storage::ContextPrefix(id + 1));
      }
    }
    for (uint64_t id : ids_with_records) {
      if (raw->Get(rocksdb::ReadOptions(), cf_index, storage::ManifestCopyKey(id), &value).ok()) {
        offer(value, "copy of the manifest of context id " + std::to_string(id));
      }
    }
    // The chosen manifests are what the copy lists; every other id's records go.
    std::set<uint64_t> kept;
    uint64_t max_id = 0;
    for (const auto& [name, c] : best) {
      SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(cf_manifest, name, c.manifest), "repair"));
      lost_reason.erase(name);
      kept.insert(c.id);
      max_id = std::max(max_id, c.id);
    }
    for (const auto& name : manifest_keys) {
      if (!best.count(name)) SQZ_RETURN_IF_ERROR(FromRocks(batch.Delete(cf_manifest, name), "repair"));
    }
    for (uint64_t id : ids_with_records) {
      max_id = std::max(max_id, id);
      if (kept.count(id)) continue;
      // Not chosen: an older version of a kept name (its copy names it), or
      // records whose manifest is lost everywhere.
      if (!raw->Get(rocksdb::ReadOptions(), cf_index, storage::ManifestCopyKey(id), &value).ok()) {
        report->unnamed_ids.push_back(id);
      }
      for (auto* cf : {cf_index, cf_kv}) {
        SQZ_RETURN_IF_ERROR(
            FromRocks(batch.DeleteRange(cf, storage::ContextPrefix(id), storage::ContextEnd(id)), "repair"));
      }
    }
    uint64_t next = max_id + 1;
    if (raw->Get(rocksdb::ReadOptions(), cf_default, storage::kNextIdKey, &value).ok()) {
      uint64_t stored = 0;
      if (value.size() == 8 && storage::DecodeBE(value, 8, &stored)) next = std::max(next, stored);
    }
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Put(cf_default, storage::kNextIdKey, storage::EncodeBE(next, 8)), "repair"));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQZ_RETURN_IF_ERROR(FromRocks(raw->Write(wo, &batch), out + ": writing the reconciled manifests"));
  }

  // Every context listed now is checked record by record; the damaged ones
  // are left out of the copy.
  {
    std::unique_ptr<DB> db;
    Options o;
    o.create_if_missing = false;
    SQZ_RETURN_IF_ERROR(DB::Open(o, out, &db).WithPrefix("opening the repaired copy"));
    std::vector<std::string> names;
    SQZ_RETURN_IF_ERROR(db->ListContexts(&names));
    for (const auto& n : names) {
      Status v = db->VerifyContext(n, nullptr);
      if (v.ok()) {
        report->recovered.push_back(n);
        continue;
      }
      lost_reason[n] = "damaged: " + v.ToString();
      SQZ_RETURN_IF_ERROR(db->DropContext(n).WithPrefix("leaving out damaged context '" + n + "'"));
    }
  }
  for (const auto& n : listed_before) {
    if (!std::binary_search(report->recovered.begin(), report->recovered.end(), n) && !lost_reason.count(n)) {
      lost_reason[n] = "neither its manifest nor the copy of it survived";
    }
  }
  for (const auto& [n, why] : lost_reason) report->lost.emplace_back(n, why);
  return Status::OK();
}

}  // namespace

}  // namespace sqz
