#include "stress/verify.h"

#include <chrono>
#include <filesystem>
#include <memory>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "sqz/query.h"

namespace sqz::stress {

std::string Counters::ToString() const {
  std::ostringstream s;
  s << "ops=" << ops << " puts=" << puts << " drops=" << drops << " handles=" << handles << " queries=" << queries
    << " rows=" << rows << " lists=" << lists << " verifies=" << verifies << " opens=" << opens
    << " refreshes=" << refreshes << " transient=" << transient;
  return s.str();
}

namespace {

// Bytes of the table files (*.sst) in the database directory.
uint64_t TableBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::error_code fec;
    if (e.path().extension() == ".sst" && e.is_regular_file(fec)) total += e.file_size(fec);
  }
  return total;
}

std::string TableFiles(const std::string& dir) {
  std::string out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::error_code fec;
    if (e.path().extension() == ".sst")
      out += e.path().filename().string() + " " + std::to_string(e.file_size(fec)) + "; ";
  }
  return out;
}

}  // namespace

Status VerifyDatabase(DB* db, LogWriter* log, ReferenceCache* cache, IdRegistry* ids, bool full, uint64_t seed,
                      Counters* counters, VerifySummary* summary) {
  *summary = VerifySummary();
  OracleState state;
  size_t position = 0;
  log->Snapshot(&state, &position);
  std::vector<std::string> listed;
  SQZ_RETURN_IF_ERROR(db->ListContexts(&listed).WithPrefix("ListContexts"));
  ++counters->lists;
  const std::set<std::string> listed_set(listed.begin(), listed.end());
  for (const auto& name : listed) {
    if (!state.names().count(name)) {
      return Status::Corruption("the database lists context '" + name + "', which the oracle never built");
    }
  }
  uint64_t seq = 0;
  for (const auto& [name, ns] : state.names()) {
    const std::set<uint64_t> allowed = state.Allowed(name);
    const bool is_listed = listed_set.count(name) != 0;
    if (!is_listed && !allowed.count(0)) {
      return Status::Corruption("context '" + name + "' is missing; the oracle allows " + AllowedToString(allowed));
    }
    uint64_t gen = 0;
    if (is_listed && (full || ns.in_flight)) {
      std::unique_ptr<ContextHandle> h;
      SQZ_RETURN_IF_ERROR(ContextHandle::Open(db, name, &h).WithPrefix("opening listed context '" + name + "'"));
      CheckCounters c;
      SQZ_RETURN_IF_ERROR(CheckHandle(*h, name, allowed, cache, ids, Mix(seed ^ ++seq), &c, &gen));
      counters->Add(c);
      if (full) {
        VerifyReport report;
        SQZ_RETURN_IF_ERROR(db->VerifyContext(name, &report).WithPrefix("VerifyContext '" + name + "'"));
        ++counters->verifies;
        ContextInfo info;
        SQZ_RETURN_IF_ERROR(db->DescribeContext(name, &info).WithPrefix("DescribeContext '" + name + "'"));
        if (info.model != h->info().model || info.id != h->info().id) {
          return Status::Corruption("context '" + name + "': DescribeContext (" + info.model + ", id " +
                                    std::to_string(info.id) + ") disagrees with its handle");
        }
        summary->live_bytes += info.kv_bytes + info.index_bytes;
      }
      ++summary->contexts;
    } else if (is_listed) {
      ++summary->contexts;
    }
    if (ns.in_flight) {
      Record r;
      r.type = 'R';
      r.gen = gen;
      r.name = name;
      SQZ_RETURN_IF_ERROR(log->Append(r));
      ++summary->resolved;
    }
  }
  if (full) {
    // Reclaimed at the open: what a drop, a replace or a killed build left
    // is gone, so the table files hold the live contexts and little else:
    // keys and block overheads (about 1.5% of the smallest KV pages), a few
    // KB per file, less what the compressed index family saves. The smallest
    // context is 256 KB. Files a compaction made obsolete go within about a
    // second (storage/db_impl.cc, PurgeObsoleteFiles), and RocksDB rewrites
    // new tables once (docs/RELIABILITY.md, "Stress"): wait for that.
    const uint64_t bound = summary->live_bytes + summary->live_bytes / 40 + (uint64_t{128} << 10);
    summary->bound = bound;
    const auto t0 = std::chrono::steady_clock::now();
    while (true) {
      summary->sst_bytes = TableBytes(db->path());
      summary->reclaim_wait_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (summary->sst_bytes <= bound) break;
      if (summary->reclaim_wait_ms > 5000) {
        return Status::Corruption("space not reclaimed: 5 s after the open the table files hold " +
                                  std::to_string(summary->sst_bytes) + " bytes, the " +
                                  std::to_string(summary->contexts) + " live contexts " +
                                  std::to_string(summary->live_bytes) + " (bound " + std::to_string(bound) +
                                  "); files: " + TableFiles(db->path()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  return Status::OK();
}

}  // namespace sqz::stress
