#include "db_impl.h"

#include <flatbuffers/flatbuffers.h>
#include <rocksdb/cache.h>
#include <rocksdb/convenience.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

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

Status ContextExistsError(const std::string& name, const std::string& db_path) {
  return Status::AlreadyExists("context '" + name + "' already exists in " + db_path +
                               " (rebuild it with --replace / BuildOptions::replace, or drop it first)");
}

namespace {

constexpr size_t kWriterBatchBytes = size_t{32} << 20;  // flush a writer's batch past this size

std::string Be32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>((v >> (8 * (3 - i))) & 0xff);
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

}  // namespace

}  // namespace sqz::storage

namespace sqz {
Status DB::Open(const Options& options, const std::string& path, std::unique_ptr<DB>* db) {
  std::unique_ptr<storage::DBImpl> impl(new storage::DBImpl());
  SQZ_RETURN_IF_ERROR(impl->OpenImpl(options, path));
  *db = std::move(impl);
  return Status::OK();
}
}  // namespace sqz

namespace sqz::storage {

DBImpl::~DBImpl() {
  if (db_) {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    db_->Close();
  }
}

Status DBImpl::OpenImpl(const Options& options, const std::string& path) {
  path_ = path;
  std::error_code ec;
  bool exists = std::filesystem::exists(path + "/CURRENT", ec);
  if (exists && options.error_if_exists) return Status::AlreadyExists(path + ": a database already exists here");
  if (!exists && !options.create_if_missing) {
    return Status::NotFound(path + ": no squeeze database here (build one with sqctl build-index)");
  }
  if (exists) {
    std::vector<std::string> cfs;
    rocksdb::Status ls = rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), path, &cfs);
    if (!ls.ok()) return FromRocks(ls, path + ": cannot read the database");
    for (const auto& cf : cfs) {
      if (cf != kCfDefault && cf != kCfManifest && cf != kCfIndex && cf != kCfKv) {
        return Status::InvalidArgument(path + ": not a squeeze database (unknown column family '" + cf + "')");
      }
    }
  } else if (!std::filesystem::create_directories(path, ec) && ec) {
    return Status::IOError(path + ": cannot create directory: " + ec.message());
  }

  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  dbo.max_background_jobs = std::max(1, options.max_background_jobs);
  dbo.paranoid_checks = true;
  dbo.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  dbo.keep_log_file_num = 2;

  auto cache = rocksdb::NewLRUCache(std::max<size_t>(options.block_cache_bytes, 1 << 20));
  rocksdb::CompressionType zstd = rocksdb::kZSTD;
  std::vector<rocksdb::CompressionType> supported = rocksdb::GetSupportedCompressions();
  if (std::find(supported.begin(), supported.end(), zstd) == supported.end()) {
    return Status::NotSupported("this RocksDB build lacks zstd compression, which the kv column family needs");
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> descs = {
      {kCfDefault, CfOptions(cache, 4 << 10, rocksdb::kNoCompression)},
      {kCfManifest, CfOptions(cache, 4 << 10, rocksdb::kNoCompression)},
      {kCfIndex, CfOptions(cache, 16 << 10, zstd)},
      {kCfKv, CfOptions(cache, 32 << 10, zstd)},
  };
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(dbo, path, descs, &handles_, &raw);
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
      return Status::IOError(path + ": the database is in use by another process (" + s.ToString() + ")");
    }
    return FromRocks(s, path + ": cannot open the database");
  }
  db_.reset(raw);
  cf_default_ = handles_[0];
  cf_manifest_ = handles_[1];
  cf_index_ = handles_[2];
  cf_kv_ = handles_[3];
  SQZ_RETURN_IF_ERROR(CheckOrWriteFormatVersion(!exists));
  return RemoveOrphans();
}

Status DBImpl::CheckOrWriteFormatVersion(bool fresh) {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_default_, kFormatVersionKey, &v);
  if (s.IsNotFound()) {
    // A database without a version is new unless it already holds contexts.
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf_manifest_));
    it->SeekToFirst();
    if (!fresh && it->Valid()) {
      return Status::Corruption(path_ + ": the database holds contexts but no format version record");
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(db_->Put(wo, cf_default_, kFormatVersionKey, Be32(kFormatVersion)),
                     path_ + ": writing the format version");
  }
  if (!s.ok()) return FromRocks(s, path_ + ": reading the format version");
  if (v.size() != 4) return Status::Corruption(path_ + ": malformed format version record");
  uint32_t version = 0;
  for (char c : v) version = (version << 8) | static_cast<uint8_t>(c);
  if (version > kFormatVersion) {
    return Status::NotSupported(path_ + ": written by squeeze format version " + std::to_string(version) +
                                "; this build reads versions up to " + std::to_string(kFormatVersion) +
                                ". Upgrade squeeze to open it.");
  }
  if (version == 0) return Status::Corruption(path_ + ": invalid format version 0");
  return Status::OK();
}

Status DBImpl::RemoveOrphans() {
  // Committed context ids.
  std::set<uint64_t> live;
  uint64_t max_id = 0;
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf_manifest_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      // Copy: RocksDB values carry no alignment guarantee, FlatBuffers
      // readers need their scalars aligned.
      const std::string val = it->value().ToString();
      flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(val.data()), val.size());
      if (!fb::VerifyManifestBuffer(v)) {
        return Status::Corruption(path_ + ": manifest of context '" + it->key().ToString() +
                                  "' fails FlatBuffers verification");
      }
      uint64_t id = fb::GetManifest(val.data())->context_id();
      live.insert(id);
      max_id = std::max(max_id, id);
    }
    SQZ_RETURN_IF_ERROR(FromRocks(it->status(), path_ + ": scanning manifests"));
  }
  // Any context id present in the index or kv families without a manifest is
  // the leftover of a build that never committed (or of a drop whose
  // compaction did not finish): remove it. Seeking from id to id+1 visits one
  // key per context, not every record.
  std::set<uint64_t> orphans;
  for (auto* cf : {cf_index_, cf_kv_}) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf));
    for (it->SeekToFirst(); it->Valid();) {
      uint64_t id = 0;
      if (!DecodeContextId(it->key().ToStringView(), &id)) {
        return Status::Corruption(path_ + ": malformed key in column family " + cf->GetName());
      }
      max_id = std::max(max_id, id);
      if (!live.count(id)) orphans.insert(id);
      if (id == UINT64_MAX) break;
      it->Seek(ContextPrefix(id + 1));
    }
    SQZ_RETURN_IF_ERROR(FromRocks(it->status(), path_ + ": scanning " + cf->GetName()));
  }
  next_ctx_id_ = max_id + 1;
  if (orphans.empty()) return Status::OK();
  rocksdb::WriteBatch batch;
  for (uint64_t id : orphans) SQZ_RETURN_IF_ERROR(DeleteContextData(id, &batch));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  SQZ_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), path_ + ": removing leftovers of unfinished builds"));
  for (uint64_t id : orphans) SQZ_RETURN_IF_ERROR(CompactContext(id));
  return Status::OK();
}

Status DBImpl::DeleteContextData(uint64_t ctx, rocksdb::WriteBatch* batch) {
  std::string begin = ContextPrefix(ctx);
  std::string end = ctx == UINT64_MAX ? std::string(9, '\xff') : ContextPrefix(ctx + 1);
  SQZ_RETURN_IF_ERROR(FromRocks(batch->DeleteRange(cf_index_, begin, end), "range delete"));
  return FromRocks(batch->DeleteRange(cf_kv_, begin, end), "range delete");
}

Status DBImpl::CompactContext(uint64_t ctx) {
  std::string b = ContextPrefix(ctx);
  std::string e = ctx == UINT64_MAX ? std::string(9, '\xff') : ContextPrefix(ctx + 1);
  rocksdb::Slice begin(b), end(e);
  rocksdb::CompactRangeOptions co;
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForceOptimized;
  for (auto* cf : {cf_index_, cf_kv_}) {
    SQZ_RETURN_IF_ERROR(FromRocks(db_->CompactRange(co, cf, &begin, &end), path_ + ": compacting"));
  }
  return Status::OK();
}

// --- contexts ----------------------------------------------------------------

Status DBImpl::ListContexts(std::vector<std::string>* names) {
  names->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf_manifest_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) names->push_back(it->key().ToString());
  return FromRocks(it->status(), path_ + ": listing contexts");
}

Status DBImpl::GetManifest(const std::string& name, std::string* bytes) {
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_manifest_, name, bytes);
  if (s.IsNotFound()) {
    return Status::NotFound("no context named '" + name + "' in " + path_ + " (sqctl list shows the contexts)");
  }
  SQZ_RETURN_IF_ERROR(FromRocks(s, "reading the manifest of context '" + name + "'"));
  flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size());
  if (!fb::VerifyManifestBuffer(v)) {
    return Status::Corruption("manifest of context '" + name + "' fails FlatBuffers verification");
  }
  return Status::OK();
}

Status DBImpl::DescribeContext(const std::string& name, ContextInfo* info) {
  std::string bytes;
  SQZ_RETURN_IF_ERROR(GetManifest(name, &bytes));
  const fb::Manifest* m = fb::GetManifest(bytes.data());
  *info = ContextInfo();
  info->name = name;
  info->id = m->context_id();
  info->model = m->model() ? m->model()->str() : "";
  info->n_layers = m->n_layers();
  info->n_kv_heads = m->n_kv_heads();
  info->n_q_heads = m->n_q_heads();
  info->head_dim = m->head_dim();
  info->n_tokens = m->n_tokens();
  info->dtype = static_cast<DType>(m->dtype());
  info->window = m->window();
  info->n_sinks = m->n_sinks();
  info->n_clustered = m->n_clustered();
  info->fine_ratio = m->fine_ratio();
  info->coarse_ratio = m->coarse_ratio();
  info->kmeans_iters = m->kmeans_iters();
  info->seed = m->seed();
  if (m->fine_clusters()) info->fine_clusters.assign(m->fine_clusters()->begin(), m->fine_clusters()->end());
  if (m->coarse_clusters()) info->coarse_clusters.assign(m->coarse_clusters()->begin(), m->coarse_clusters()->end());
  info->calibration_queries = m->calibration_queries();
  if (m->thresholds()) {
    for (const fb::Threshold* t : *m->thresholds()) {
      info->thresholds.push_back({t->quantile(), t->flat(), t->coarse(), t->fine()});
    }
  }
  info->kv_bytes = m->kv_bytes();
  info->index_bytes = m->index_bytes();
  info->build_seconds = m->build_seconds();
  info->created_unix = m->created_unix();

  std::string b = ContextPrefix(info->id), e = ContextPrefix(info->id + 1);
  rocksdb::Range r(b, e);
  for (auto* cf : {cf_index_, cf_kv_}) {
    uint64_t size = 0;
    rocksdb::SizeApproximationOptions so;
    so.include_memtables = true;
    so.include_files = true;
    SQZ_RETURN_IF_ERROR(FromRocks(db_->GetApproximateSizes(so, cf, &r, 1, &size), "estimating context size"));
    info->bytes_on_disk += size;
  }
  return Status::OK();
}

Status DBImpl::DropContext(const std::string& name) {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(commit_mu_);
    std::string bytes;
    SQZ_RETURN_IF_ERROR(GetManifest(name, &bytes));
    id = fb::GetManifest(bytes.data())->context_id();
    rocksdb::WriteBatch batch;
    SQZ_RETURN_IF_ERROR(FromRocks(batch.Delete(cf_manifest_, name), "drop"));
    SQZ_RETURN_IF_ERROR(DeleteContextData(id, &batch));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQZ_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "dropping context '" + name + "'"));
  }
  return CompactContext(id);
}

// --- writing -----------------------------------------------------------------

Status DBImpl::BeginContext(std::unique_ptr<ContextWriter>* writer) {
  uint64_t id = next_ctx_id_.fetch_add(1);
  writer->reset(new ContextWriter(this, id));
  return Status::OK();
}

Status ContextWriter::PutHeadIndex(uint32_t layer, uint32_t head, std::string_view bytes) {
  SQZ_RETURN_IF_ERROR(FromRocks(batch_.Put(db_->cf_index(), HeadKey(id_, layer, head),
                                           rocksdb::Slice(bytes.data(), bytes.size())),
                                "buffering an index record"));
  bytes_written_ += bytes.size();
  return batch_.GetDataSize() >= kWriterBatchBytes ? Flush() : Status::OK();
}

Status ContextWriter::PutBlock(uint32_t layer, uint32_t head, uint32_t block, std::string_view value) {
  SQZ_RETURN_IF_ERROR(FromRocks(batch_.Put(db_->cf_kv(), BlockKey(id_, layer, head, block),
                                           rocksdb::Slice(value.data(), value.size())),
                                "buffering a KV block"));
  bytes_written_ += value.size();
  return batch_.GetDataSize() >= kWriterBatchBytes ? Flush() : Status::OK();
}

Status ContextWriter::Flush() {
  if (batch_.Count() == 0) return Status::OK();
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;  // durability comes from the memtable flush before commit
  Status s = FromRocks(db_->raw()->Write(wo, &batch_), db_->path() + ": writing context records");
  batch_.Clear();
  return s;
}

Status DBImpl::CommitContext(ContextWriter* writer, const std::string& name, std::string_view manifest_bytes,
                             bool replace) {
  if (name.empty()) return Status::InvalidArgument("context name is empty");
  {
    flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(manifest_bytes.data()), manifest_bytes.size());
    if (!fb::VerifyManifestBuffer(v)) return Status::InvalidArgument("commit: manifest fails verification");
  }
  SQZ_RETURN_IF_ERROR(writer->Flush());
  // Records were written without WAL: make them durable before the manifest
  // can point at them.
  rocksdb::FlushOptions fo;
  fo.wait = true;
  SQZ_RETURN_IF_ERROR(FromRocks(db_->Flush(fo, {cf_index_, cf_kv_}), path_ + ": flushing context records"));

  uint64_t old_id = 0;
  bool had_old = false;
  {
    std::lock_guard<std::mutex> lock(commit_mu_);
    std::string old;
    rocksdb::Status gs = db_->Get(rocksdb::ReadOptions(), cf_manifest_, name, &old);
    if (gs.ok()) {
      if (!replace) {
        return ContextExistsError(name, path_);
      }
      flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(old.data()), old.size());
      if (v.VerifyBuffer<fb::Manifest>(nullptr)) {
        old_id = fb::GetManifest(old.data())->context_id();
        had_old = true;
      }
    } else if (!gs.IsNotFound()) {
      return FromRocks(gs, "reading the manifest of '" + name + "'");
    }
    rocksdb::WriteBatch batch;
    SQZ_RETURN_IF_ERROR(FromRocks(
        batch.Put(cf_manifest_, name, rocksdb::Slice(manifest_bytes.data(), manifest_bytes.size())), "commit"));
    if (had_old) SQZ_RETURN_IF_ERROR(DeleteContextData(old_id, &batch));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQZ_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "committing context '" + name + "'"));
  }
  if (had_old) return CompactContext(old_id);
  return Status::OK();
}

Status DBImpl::AbortContext(ContextWriter* writer) {
  writer->batch_.Clear();
  rocksdb::WriteBatch batch;
  SQZ_RETURN_IF_ERROR(DeleteContextData(writer->id(), &batch));
  SQZ_RETURN_IF_ERROR(FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), "removing an unfinished context"));
  return CompactContext(writer->id());
}

// --- reading -------------------------------------------------------------------

Status DBImpl::GetHeadIndex(uint64_t ctx, uint32_t layer, uint32_t head, std::string* bytes) {
  const std::string where = "index record of layer " + std::to_string(layer) + " head " + std::to_string(head);
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  rocksdb::Status s = db_->Get(ro, cf_index_, HeadKey(ctx, layer, head), bytes);
  if (s.IsNotFound()) return Status::Corruption(where + " is missing");
  SQZ_RETURN_IF_ERROR(FromRocks(s, "reading the " + where));
  flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size());
  if (!v.VerifyBuffer<fb::HeadIndex>(nullptr)) {
    return Status::Corruption(where + " fails FlatBuffers verification");
  }
  return Status::OK();
}

Status DBImpl::MultiGetBlocks(uint64_t ctx, uint32_t layer, uint32_t head, const uint32_t* blocks, size_t n,
                              std::vector<rocksdb::PinnableSlice>* values) {
  std::vector<std::string> keys(n);
  std::vector<rocksdb::Slice> slices(n);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = BlockKey(ctx, layer, head, blocks[i]);
    slices[i] = keys[i];
  }
  values->clear();
  values->resize(n);
  std::vector<rocksdb::Status> statuses(n);
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  if (n > 0) db_->MultiGet(ro, cf_kv_, n, slices.data(), values->data(), statuses.data(), /*sorted_input=*/false);
  for (size_t i = 0; i < n; ++i) {
    if (statuses[i].IsNotFound()) {
      return Status::Corruption("KV block " + std::to_string(blocks[i]) + " of layer " + std::to_string(layer) +
                                " head " + std::to_string(head) + " is missing");
    }
    SQZ_RETURN_IF_ERROR(FromRocks(statuses[i], "reading a KV block"));
  }
  return Status::OK();
}

}  // namespace sqz::storage
