// DBImpl: the RocksDB-backed implementation of sqz::DB and storage::Store
// (private to storage/).
//
// Versions and readers:
// - A read-write DB holds one RocksDB instance. A ContextSnapshot holds a
//   RocksDB snapshot on it, so a replace or drop committed later is not seen
//   by it; the dropped ranges are compacted away (reclaimed) once no
//   snapshot older than the drop remains, on a background thread.
// - A read-only DB opens a RocksDB secondary instance (no lock, nothing
//   written to the directory) and never catches it up: the instance is the
//   version. Refresh() opens a new instance; snapshots keep the one they were
//   opened on alive (its open table files stay readable after the writer
//   deletes them).
#pragma once

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "format.h"
#include "sqz/db.h"
#include "storage/store.h"
#include "util/guard.h"

namespace sqz::storage {

// One open RocksDB instance with its column families.
struct RocksView {
  ~RocksView();
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::ColumnFamilyHandle* cf_default = nullptr;
  rocksdb::ColumnFamilyHandle* cf_manifest = nullptr;
  rocksdb::ColumnFamilyHandle* cf_index = nullptr;
  rocksdb::ColumnFamilyHandle* cf_kv = nullptr;
  std::string secondary_dir;          // read-only instances: their private scratch directory (outside the database)
  std::unique_ptr<rocksdb::Env> env;  // SetSecondaryFileSystemForTest's, when set (outlives db)
  void SetDb(rocksdb::DB* raw);       // takes the opened instance; handles already filled, in ColumnFamilies' order

  // Read-only instances: the table files ("000041.sst") in the directory,
  // listed just before the instance read RocksDB's MANIFEST
  // (DBImpl::FindLostCommits).
  std::vector<std::string> tables_listed;
  // Read-only instances: the writer's MANIFEST changed while this one opened
  // (a flush, a compaction or an open of the writer's ran meanwhile), so its
  // version may be older than some of tables_listed.
  bool moved = false;

  // A degraded open (docs/RELIABILITY.md, "Damage is contained"): table files
  // of the index or kv family that are missing, of the wrong size or
  // unreadable. Each holds the records of the contexts first_id..last_id
  // (one context below level 0). Empty for a healthy database.
  struct DamagedTable {
    std::string file;     // "000021.sst"
    std::string family;   // "index" or "kv"
    std::string problem;  // "is missing", "has 100 bytes (the MANIFEST says 200)", ...
    uint64_t first_id = 0, last_id = 0;
    bool copy_only = false;  // holds nothing but a context's redundant manifest copy
  };
  std::vector<DamagedTable> damaged;
  // What is wrong with context `id`'s table files; empty when nothing is.
  std::string DamageOf(uint64_t id) const;
  // A damaged file holds records of context `id` (not only its manifest copy).
  bool RecordsDamaged(uint64_t id) const;
};

// A committed context that the database's version has lost (DBImpl::FindLostCommits).
struct LostCommit {
  std::string name;
  uint64_t id = 0;
  std::vector<std::string> files;  // table files, unreferenced by the version, that hold its manifest or its copy
};

class SnapshotImpl;

class DBImpl final : public DB, public Store {
 public:
  ~DBImpl() override;

  // --- sqz::DB -------------------------------------------------------------
  const std::string& path() const override { return path_; }
  bool read_only() const override { return read_only_; }
  // Each entry point runs under util::Guarded: no exception escapes it.
  Status Refresh() override {
    return util::Guarded("DB::Refresh", [&] { return RefreshUnguarded(); });
  }
  Status ListContexts(std::vector<std::string>* names) override {
    return util::Guarded("DB::ListContexts", [&] { return ListContextsUnguarded(names); });
  }
  Status DescribeContext(const std::string& name, ContextInfo* info) override {
    return util::Guarded("DB::DescribeContext", [&] { return DescribeContextUnguarded(name, info); });
  }
  Status DropContext(const std::string& name) override {
    return util::Guarded("DB::DropContext", [&] { return DropContextUnguarded(name); });
  }
  Status VerifyContext(const std::string& name, VerifyReport* report) override {
    return util::Guarded("DB::VerifyContext", [&] { return VerifyContextUnguarded(name, report); });
  }
  Status Backup(const std::string& backup_dir, BackupInfo* info) override {
    return util::Guarded("DB::Backup", [&] { return BackupUnguarded(backup_dir, info); });
  }
  Store* store() override { return this; }
  Status RefreshUnguarded();
  Status ListContextsUnguarded(std::vector<std::string>* names);
  Status DescribeContextUnguarded(const std::string& name, ContextInfo* info);
  Status DropContextUnguarded(const std::string& name);
  Status VerifyContextUnguarded(const std::string& name, VerifyReport* report);
  Status BackupUnguarded(const std::string& backup_dir, BackupInfo* info);

  // --- storage::Store ------------------------------------------------------
  Status BeginContext(const std::string& name, bool replace, const ContextInfo& shape,
                      std::unique_ptr<ContextWriter>* out) override;
  Status OpenSnapshot(const std::string& name, std::unique_ptr<ContextSnapshot>* out) override;

  // --- internal (writer, snapshots) -----------------------------------------
  std::shared_ptr<RocksView> view() const;
  Status CommitContext(const ContextInfo& info, bool replace);
  Status AbortContext(uint64_t id);
  // sqctl repair: FindLostCommits on the database at `path` (opened as a
  // probe, nothing written), and the contexts its version lists.
  static Status FindLostCommitsAt(const std::string& path, std::vector<std::string>* listed,
                                  std::vector<LostCommit>* lost);
  // Runs PurgeObsoleteFiles on the reclaimer thread 100 ms and 1.1 s from
  // now. Thread-safe (also called from RocksDB's threads).
  void SchedulePurge();
  // Snapshot bookkeeping for deferred reclamation (read-write only).
  const rocksdb::Snapshot* AcquireSnapshot();
  void ReleaseSnapshot(const rocksdb::Snapshot* s);

 private:
  friend class sqz::DB;
  DBImpl() = default;

  Status OpenImpl(const Options& options, const std::string& path);
  Status OpenSnapshotImpl(const std::string& name, std::unique_ptr<SnapshotImpl>* out);
  Status OpenView(bool fresh_dir, std::shared_ptr<RocksView>* out);
  // How OpenRocks opens RocksDB: read-write, as a secondary instance (the
  // readers' normal open), with OpenForReadOnly (a reader's degraded open,
  // which sees every table file the MANIFEST names), or as a probe
  // (OpenForReadOnly that loads no table file up front: a look at the
  // version before a read-write open).
  enum class OpenMode { kReadWrite, kSecondary, kReadOnly, kProbe };
  // `paranoid` off lets a table file that cannot be loaded pass the open.
  rocksdb::Status OpenRocks(bool fresh_dir, bool paranoid, OpenMode mode, RocksView* v);
  // After an open that failed (or a reader that found a context's records
  // missing): finds the table files that are missing, truncated or
  // unreadable. With damage confined to the index and kv families, opens a
  // degraded view into *out in which every other context works; *found
  // false when no table file is damaged (the failure was something else).
  Status OpenDegraded(std::shared_ptr<RocksView>* out, bool* found);
  // The probe of OpenDegraded: a read-only view (OpenForReadOnly, paranoid
  // checks off) whose `damaged` lists what it found.
  Status FindDamagedTables(std::shared_ptr<RocksView>* probe);
  // Committed contexts that `v`'s version lacks although a table file in the
  // directory that the version does not reference holds their manifest (in
  // the manifest family, or its copy in the index family): RocksDB dropped
  // the MANIFEST records of their commit as a torn tail (docs/RELIABILITY.md).
  // Unreferenced files alone prove nothing: a crash leaves the outputs of
  // unfinished flushes and compactions (uncommitted records, copies of
  // referenced data) and files made obsolete but not yet deleted (dropped or
  // replaced contexts). Finds nothing when v->moved.
  Status FindLostCommits(RocksView* v, std::vector<LostCommit>* lost);
  // FindLostCommits as an open's error: Corruption naming the contexts, the
  // files and sqctl repair; OK when nothing was lost.
  Status CheckLostCommits(RocksView* v);
  // Before a read-write open of an existing database, which deletes every
  // table file its version does not reference: CheckLostCommits on a probe.
  Status ProbeBeforeReadWriteOpen();
  Status CheckFormatVersion(RocksView* v, bool fresh);
  Status OpenSecondary(std::shared_ptr<RocksView>* out, bool* moved);
  Status OpenConsistentSecondary(std::shared_ptr<RocksView>* out);
  Status CheckComplete(RocksView* v, Status* incomplete);
  Status RecoverOnOpen();
  Status CheckManifestsAgainstCopies(RocksView* v, std::set<uint64_t>* ids);
  Status DeleteContextData(uint64_t ctx, rocksdb::WriteBatch* batch);
  Status CompactContext(uint64_t ctx);
  void SettleContext(uint64_t ctx);
  Status GetManifest(RocksView* v, const rocksdb::ReadOptions& ro, const std::string& name, ContextInfo* info);
  // Compacts every dropped range no live snapshot still needs and deletes
  // its reclaim marker. Thread-safe.
  Status Reclaim();
  void ReclaimLoop();
  void PurgeObsoleteFiles();

  Options options_;
  std::string path_;
  bool read_only_ = false;
  std::shared_ptr<rocksdb::Cache> cache_;

  mutable std::mutex view_mu_;
  std::shared_ptr<RocksView> view_;

  std::mutex commit_mu_;  // serialises commits, drops and id reservation
  uint64_t next_ctx_id_ = 1;

  // Deferred reclamation (read-write only).
  std::mutex reclaim_mu_;
  std::condition_variable reclaim_cv_;
  std::multiset<uint64_t> live_snapshots_;  // sequence numbers of open snapshots
  std::map<uint64_t, uint64_t> pending_;    // dropped context id -> sequence number of its drop
  bool reclaim_wanted_ = false;
  int purge_passes_ = 0;  // PurgeObsoleteFiles passes still to run, the next at purge_due_
  std::chrono::steady_clock::time_point purge_due_;
  bool stop_ = false;
  std::thread reclaimer_;
};

// Test hook: called each time a read-only open (or Refresh) finds its view
// partial and is about to take a new one (tests/query_snapshot_test.cc).
// Empty: nothing.
void SetViewRetryHookForTest(std::function<void()> hook);

// Test hook: read-only opens reach the files through `fs` (null: the
// default file system), e.g. to act between RocksDB's reads.
void SetSecondaryFileSystemForTest(std::shared_ptr<rocksdb::FileSystem> fs);

// Converts a RocksDB status, prefixing `what` (e.g. "reading manifest of 'x'").
Status FromRocks(const rocksdb::Status& s, std::string_view what);

// The column families of a squeeze database with their options (all four,
// in the order default, manifest, index, kv).
std::vector<rocksdb::ColumnFamilyDescriptor> ColumnFamilies(const std::shared_ptr<rocksdb::Cache>& cache);

}  // namespace sqz::storage
