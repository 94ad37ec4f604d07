// Deterministic contexts for the stress test, and the checks that a handle
// serves exactly one of them.
//
// Generation `gen` of a context `name` is a pure function of (name, gen):
// its token count, stored dtype, page size, window, calibration, k-means
// seed and its keys, values and queries (the synthetic generator,
// tools/synth, seeded from the pair). Its ContextInfo::model is
// "sqz-stress name=<name> gen=<gen>", so a handle says which version it
// claims to read; CheckHandle then checks that the claim is allowed and that
// every answer is that version's:
//   - the shapes and build options in ContextInfo;
//   - every stored row (ReadRows of every row of every layer and KV head): the
//     multiset of (key row, value row) pairs equals the version's exactly
//     (an order-independent sum of 64-bit row hashes; rows are stored
//     permuted), and the always rows (sinks then window, stored in token
//     order) equal the version's bit for bit;
//   - dense Attend of the version's own queries equals attention computed in
//     double from the version's data (relative error < 1e-3);
//   - one random sparse configuration (budget or calibrated threshold, flat
//     or hierarchical, GQA union or per head, shared or per-query selection,
//     T = 1 or 4): the plan is well formed (ascending disjoint segments, the
//     always set last in every set, a budget met), and Attend equals
//     attention computed in double over exactly the rows the plan names
//     (read back above).
// The checks cannot pass on data of another version, a mix of two versions,
// or a partial context.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/query.h"
#include "sqz/status.h"

namespace sqz::stress {

// Shapes of every context (small: a build takes tens of milliseconds).
constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 64, kT = 4;
constexpr int kSinks = 4;

struct VersionSpec {
  std::string name;
  uint64_t gen = 0;
  int64_t n_tokens = 0;  // 500 .. 3000
  DType dtype = DType::kF16;
  int page_rows = 16;
  int window = 64;
  bool calibrated = false;  // window queries given: thresholds calibrated
  bool read_ahead = true;
  uint64_t data_seed = 0;
  uint64_t build_seed = 0;

  std::string Model() const;  // "sqz-stress name=<name> gen=<gen>"
};

VersionSpec SpecOf(const std::string& name, uint64_t gen);
// Parses Model()'s text; false for anything else.
bool ParseModel(const std::string& model, std::string* name, uint64_t* gen);

// 64-bit mixing (splitmix64's finaliser) and a string hash.
uint64_t Mix(uint64_t x);
uint64_t HashString(const std::string& s);

// Builds (or, with `replace`, replaces) the context as generation spec.gen.
Status BuildVersion(DB* db, const VersionSpec& spec, bool replace,
                    const std::function<void(const BuildProgress&)>& on_progress = nullptr);

// What a handle reading a version must answer.
struct Reference {
  VersionSpec spec;
  std::vector<uint64_t> row_hash;              // per (layer, KV head): sum of the row-pair hashes
  std::vector<std::vector<float>> always_k;    // per (layer, KV head): [n_always, d] in stored order
  std::vector<std::vector<float>> always_v;    //
  std::vector<std::vector<float>> queries;     // per layer: [kQHeads, kT, d]
  std::vector<std::vector<double>> dense_o;    // per layer: [kQHeads, kT, d]
  std::vector<std::vector<double>> dense_lse;  // per layer: [kQHeads, kT]
};

void ComputeReference(const VersionSpec& spec, Reference* out);

// References by (name, gen), computed once per process (a few hundred KB
// each); thread-safe.
class ReferenceCache {
 public:
  std::shared_ptr<const Reference> Get(const std::string& name, uint64_t gen);

 private:
  std::mutex mu_;
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<const Reference>> refs_;
};

// Every database id (ContextInfo::id) seen, with the version it held: an id
// that shows up for two versions was reused. Thread-safe.
class IdRegistry {
 public:
  Status See(uint64_t id, const std::string& name, uint64_t gen);

 private:
  std::mutex mu_;
  std::map<uint64_t, std::pair<std::string, uint64_t>> ids_;
};

struct CheckCounters {
  int64_t handles = 0;  // handles checked
  int64_t queries = 0;  // Attend calls checked
  int64_t rows = 0;     // stored rows compared
};

// Checks a handle opened on context `name` (file comment). *gen: the version
// it serves. Any violation, and any error of the handle, is returned as a
// non-OK status whose message describes it.
Status CheckHandle(const ContextHandle& h, const std::string& name, const std::set<uint64_t>& allowed,
                   ReferenceCache* cache, IdRegistry* ids, uint64_t seed, CheckCounters* counters, uint64_t* gen);

}  // namespace sqz::stress
