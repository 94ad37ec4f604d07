// DBImpl: the RocksDB-backed implementation of sqz::DB, plus the internal
// record-level API used by the index builder (writes) and the query engine
// (reads). Not part of the public API.
#pragma once

#include <rocksdb/db.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "format.h"
#include "format_generated.h"

namespace sqz::storage {

class ContextWriter;

class DBImpl final : public DB {
 public:
  ~DBImpl() override;

  // --- sqz::DB -------------------------------------------------------------
  const std::string& path() const override { return path_; }
  bool read_only() const override { return false; }
  Status Refresh() override { return Status::OK(); }
  Status ListContexts(std::vector<std::string>* names) override;
  Status DescribeContext(const std::string& name, ContextInfo* info) override;
  Status DropContext(const std::string& name) override;
  Status VerifyContext(const std::string& name, VerifyReport* report) override;

  // --- Writing a context (index builder) -----------------------------------
  // Reserves a fresh context id and returns a writer for its records. Nothing
  // written through it is visible until CommitContext.
  Status BeginContext(std::unique_ptr<ContextWriter>* writer);

  // Atomically publishes the context written by `writer` under
  // `manifest->name`: flushes its records to SST files, then writes the
  // manifest (synced WAL) and, with `replace`, range-deletes the previous
  // context of that name in the same batch. AlreadyExists if the name exists
  // and !replace. `manifest_bytes` is a finished Manifest FlatBuffer.
  Status CommitContext(ContextWriter* writer, const std::string& name, std::string_view manifest_bytes,
                       bool replace);

  // Removes everything written under the writer's id (build failed).
  Status AbortContext(ContextWriter* writer);

  // --- Reading (query engine, verify) --------------------------------------
  // The verified Manifest bytes of `name`. NotFound if absent, Corruption if
  // the FlatBuffer does not verify.
  Status GetManifest(const std::string& name, std::string* bytes);
  // The verified HeadIndex bytes of (ctx, layer, head).
  Status GetHeadIndex(uint64_t ctx, uint32_t layer, uint32_t head, std::string* bytes);
  // Reads KV blocks (ctx, layer, head, blocks[i]) into values[i] (pinned from
  // the block cache where possible). Corruption if any is missing.
  Status MultiGetBlocks(uint64_t ctx, uint32_t layer, uint32_t head, const uint32_t* blocks, size_t n,
                        std::vector<rocksdb::PinnableSlice>* values);

  rocksdb::DB* raw() { return db_.get(); }
  rocksdb::ColumnFamilyHandle* cf_manifest() { return cf_manifest_; }
  rocksdb::ColumnFamilyHandle* cf_index() { return cf_index_; }
  rocksdb::ColumnFamilyHandle* cf_kv() { return cf_kv_; }

 private:
  friend class sqz::DB;
  DBImpl() = default;

  Status OpenImpl(const Options& options, const std::string& path);
  Status CheckOrWriteFormatVersion(bool fresh);
  Status RemoveOrphans();
  Status DeleteContextData(uint64_t ctx, rocksdb::WriteBatch* batch);
  Status CompactContext(uint64_t ctx);

  std::string path_;
  std::unique_ptr<rocksdb::DB> db_;
  rocksdb::ColumnFamilyHandle* cf_default_ = nullptr;
  rocksdb::ColumnFamilyHandle* cf_manifest_ = nullptr;
  rocksdb::ColumnFamilyHandle* cf_index_ = nullptr;
  rocksdb::ColumnFamilyHandle* cf_kv_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::mutex commit_mu_;  // serialises commits and drops
  std::atomic<uint64_t> next_ctx_id_{1};
};

// Buffers the records of one uncommitted context and writes them in batches
// (WAL off: durability comes from the flush in CommitContext).
// Not thread-safe: one builder thread per writer.
class ContextWriter {
 public:
  uint64_t id() const { return id_; }
  Status PutHeadIndex(uint32_t layer, uint32_t head, std::string_view bytes);
  // value: K rows [n, d] then V rows [n, d] in the stored dtype.
  Status PutBlock(uint32_t layer, uint32_t head, uint32_t block, std::string_view value);
  // Writes what is buffered.
  Status Flush();
  uint64_t bytes_written() const { return bytes_written_; }

 private:
  friend class DBImpl;
  ContextWriter(DBImpl* db, uint64_t id) : db_(db), id_(id) {}
  DBImpl* db_;
  uint64_t id_;
  rocksdb::WriteBatch batch_;
  uint64_t bytes_written_ = 0;
};

// The AlreadyExists error for a context name that is taken (one wording for
// the builder's early check and the commit's atomic one).
Status ContextExistsError(const std::string& name, const std::string& db_path);

// Converts a RocksDB status, prefixing `what` (e.g. "reading manifest of 'x'").
Status FromRocks(const rocksdb::Status& s, std::string_view what);

// Casts the public handle to the implementation (all DBs are DBImpl).
inline DBImpl* Impl(DB* db) { return static_cast<DBImpl*>(db); }

}  // namespace sqz::storage
