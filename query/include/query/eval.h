// Accuracy of sparse attention against dense attention (the library behind
// `sqctl eval`).
//
// For each layer given, the reference is dense attention over ALL fixed keys
// computed independently in double precision from the stored values (every
// block read and converted, then scored in double). For each configuration the
// engine's own Attend and selection run, and per (layer, query head, query):
//   recall  = true attention mass (softmax over all fixed keys) on the keys
//             attended (the always set plus the attended clusters);
//   oracle  = the mass of the always set plus the k clustered keys of largest
//             true probability, k = the number of clustered keys attended
//             (the best any selection of that size could do);
//   error   = ||O - O_dense|| / ||O_dense||  (relative L2 error of the output).
// Each (layer, query head) is classified from the dense attention:
// "concentrated" if the oracle at budget `classify_budget` captures at least
// `classify_mass` of the mass (mean over its queries), else "spread".
//
// Thread-safety: Evaluate only reads the handle; it may run concurrently with
// other users of the handle.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sqz/query.h"
#include "sqz/status.h"

namespace sqz::query {

struct EvalConfig {
  std::string name;  // e.g. "budget=0.125 flat"
  QueryOptions options;
};

// Dense, then for each budget a flat and a hierarchical budget configuration,
// then for each calibrated quantile of the context a flat and a hierarchical
// threshold configuration. per_query_selection: each query selects alone (as
// in decode), otherwise the prefill shared selection over a layer's queries.
std::vector<EvalConfig> DefaultEvalConfigs(const ContextInfo& info, const std::vector<double>& budgets,
                                           bool per_query_selection = true);

// The queries of one layer.
struct LayerQueries {
  int layer = 0;
  int T = 0;
  std::vector<float> q;  // [n_q_heads, T, head_dim]
};

struct EvalOptions {
  double classify_budget = 0.125;
  double classify_mass = 0.9;
};

// Statistics over (layer, query head, query) samples.
struct EvalAggregate {
  int64_t samples = 0;
  double recall_mean = 0;
  double recall_min = 0;  // worst
  double oracle_mean = 0;
  double oracle_min = 0;
  double ratio = 0;  // recall_mean / oracle_mean (1 when both are 0)
  double error_mean = 0;
  double error_max = 0;      // worst
  double keys_fraction = 0;  // mean fraction of the clustered keys attended
};

struct EvalConfigResult {
  EvalConfig config;
  EvalAggregate all;
  EvalAggregate concentrated;
  EvalAggregate spread;
  // Clustered keys read per Attend call and KV head (the union over the
  // group) / clustered keys, over all calls. With per-query selection each
  // query is its own call (a decode step); otherwise one call per layer.
  double read_fraction = 0;
  uint64_t bytes_read = 0;   // KV bytes read by all the Attend calls
  uint64_t bytes_dense = 0;  // KV bytes dense Attend calls would read instead
  double seconds = 0;        // wall time of the Attend calls
  // The same statistics per (layer, query head), in the order of
  // EvalReport::heads.
  std::vector<EvalAggregate> per_head;
};

// The classification of one (layer, query head).
struct EvalHead {
  int layer = 0;
  int q_head = 0;
  bool concentrated = false;
  double oracle_mass = 0;  // mean over its queries of the oracle at classify_budget
};

struct EvalReport {
  std::string context;
  int layers = 0;                  // layers evaluated
  int64_t heads_concentrated = 0;  // (layer, query head) pairs
  int64_t heads_spread = 0;
  std::vector<EvalHead> heads;
  std::vector<EvalConfigResult> results;
};

// Reads every `layers.{i}.q` tensor [n_q_heads, T, head_dim] (F32/F16/BF16)
// of the safetensors file `path` (other tensors are ignored), converted to
// float32, sorted by layer. Errors (naming the file and tensor): IOError /
// Corruption from the reader; InvalidArgument for no such tensor, a layer
// outside the context, a shape that does not match the context, a dtype that
// is not float, or a NaN/Inf value.
Status ReadQueriesFile(const std::string& path, const ContextInfo& info, std::vector<LayerQueries>* out);

// Evaluates every configuration on the given layers' queries.
// Errors: those of Attend (bad layer, shape, NaN, uncalibrated quantile), and
// InvalidArgument if a LayerQueries has the wrong size.
Status Evaluate(const ContextHandle& handle, const std::vector<LayerQueries>& queries,
                const std::vector<EvalConfig>& configs, const EvalOptions& options, EvalReport* report);

// Human-readable table (one line per configuration and head kind).
std::string FormatEvalReport(const EvalReport& report);

}  // namespace sqz::query
