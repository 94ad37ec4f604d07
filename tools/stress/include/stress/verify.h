// The check of a read-write database against the oracle, shared by the
// stress program's writer (at its start) and driver (after each kill), and
// the counters the roles report (tools/stress; docs/RELIABILITY.md,
// "Stress").
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "sqz/db.h"
#include "sqz/status.h"
#include "stress/content.h"
#include "stress/oracle.h"

namespace sqz::stress {

// Counters reported by each role.
struct Counters {
  std::atomic<int64_t> ops{0};        // writer: mutations and queries done
  std::atomic<int64_t> puts{0};       // builds and replaces that returned OK
  std::atomic<int64_t> drops{0};      // drops that returned OK
  std::atomic<int64_t> handles{0};    // handles checked
  std::atomic<int64_t> queries{0};    // Attend calls checked
  std::atomic<int64_t> rows{0};       // stored rows compared
  std::atomic<int64_t> lists{0};      // ListContexts checked against the oracle
  std::atomic<int64_t> verifies{0};   // VerifyContext calls
  std::atomic<int64_t> opens{0};      // reader: read-only opens
  std::atomic<int64_t> refreshes{0};  // reader: Refresh calls
  std::atomic<int64_t> transient{0};  // reader: opens retried after a documented transient error
  void Add(const CheckCounters& c) {
    handles += c.handles;
    queries += c.queries;
    rows += c.rows;
  }
  std::string ToString() const;  // "ops=.. puts=.. ..." (parsed back by the driver)
};

// Checks a read-write database against the oracle (the writer at start, the
// driver after each kill): every listed context is a version the oracle
// allows and answers as that version must; every context the oracle says
// must exist is listed; each name with an operation in flight is resolved
// (an R record appended) to what the database holds. `full` also checks
// every context that was not in flight, verifies them all (VerifyContext),
// and bounds the space of the table files by the live contexts' size.
struct VerifySummary {
  int contexts = 0;
  int resolved = 0;
  uint64_t sst_bytes = 0;
  uint64_t live_bytes = 0;     // raw K+V + index bytes of the live contexts
  uint64_t bound = 0;          // what sst_bytes may be
  double reclaim_wait_ms = 0;  // until the table files were within the bound
};
Status VerifyDatabase(DB* db, LogWriter* log, ReferenceCache* cache, IdRegistry* ids, bool full, uint64_t seed,
                      Counters* counters, VerifySummary* summary);

}  // namespace sqz::stress
