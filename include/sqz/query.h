// Querying a context: sparse attention of query vectors over a stored context.
//
// For each query head the engine scores the KV head's centroids, selects the
// clusters that will get attention mass (threshold or budget, flat or
// hierarchical), reads only their key/value blocks, and computes exact softmax
// attention over the selected keys plus the always-attended window and sinks.
// It returns the output O and the log-sum-exp LSE (natural log) so a caller
// can merge it with attention over its own tokens (MergeAttentionStates).
//
// Thread-safety: a ContextHandle is immutable after Open; Attend may be called
// from many threads at once. The DB must outlive every handle opened on it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/status.h"

namespace sqz {

enum class SelectionMode : uint8_t {
  kDense = 0,      // attend every fixed key (exact dense attention)
  kBudget = 1,     // keep clusters by decreasing estimated mass up to `budget`
  kThreshold = 2,  // keep clusters whose per-key estimated probability > tau
};

enum class GqaPolicy : uint8_t {
  // Budget mode: the group selects jointly (mean estimated mass over its
  // query heads), so `budget` bounds the keys read per KV head. Threshold
  // mode: each query head attends the union of its group's selections.
  kUnion = 0,
  kPerHead = 1,  // each query head attends its own selection (reads: the union)
};

struct QueryOptions {
  SelectionMode mode = SelectionMode::kBudget;
  // Budget mode: fraction of the clustered keys to keep (0..1]. 1 = dense.
  // Per KV head under kUnion (the keys read); per query head under kPerHead.
  double budget = 0.125;
  // Threshold mode: use the context's calibrated thresholds at this quantile
  // (must be one the context was calibrated for) when >= 0; otherwise the
  // explicit `threshold` (flat) / `threshold_coarse` + `threshold` (hier).
  double threshold_quantile = -1;
  float threshold = 0;
  float threshold_coarse = 0;
  // Two-level lookup: coarse centroids first, then only children of kept
  // coarse clusters. In budget mode the coarse level keeps
  // min(1, coarse_budget_factor * budget) of the keys.
  bool hierarchical = false;
  double coarse_budget_factor = 2.0;
  GqaPolicy gqa = GqaPolicy::kUnion;
  // Prefill (T > 1): false = one selection per head shared by the T queries
  // (mean of the estimated probabilities); true = each query selects alone.
  bool per_query_selection = false;
  // Softmax scale; 0 means 1/sqrt(head_dim).
  float softmax_scale = 0;
};

// Statistics of one Attend call for one KV head.
struct HeadStats {
  int64_t keys_selected = 0;      // clustered keys read (union over the group)
  int64_t keys_attended = 0;      // keys attended incl. window and sinks, summed over the group's query heads and queries
  int64_t clusters_scored = 0;    // centroid dot products per query (coarse + fine)
  int64_t clusters_selected = 0;  // fine clusters read
  uint64_t bytes_read = 0;        // K+V bytes of the blocks read (stored dtype)
};

struct AttendStats {
  std::vector<HeadStats> heads;  // per KV head
  // Stage times are summed over KV heads, which run in parallel for decode:
  // they are thread-seconds (compare them with each other, not with wall time).
  double seconds_score = 0;      // centroid scoring + selection
  double seconds_read = 0;       // block reads from storage / cache
  double seconds_attend = 0;     // attention over the selected keys
  int64_t keys_selected() const;
  uint64_t bytes_read() const;
};

class ContextHandle {
 public:
  // Loads the manifest and every head's centroids of context `name`.
  // NotFound if the context does not exist.
  static Status Open(DB* db, const std::string& name, std::unique_ptr<ContextHandle>* out);

  virtual ~ContextHandle() = default;
  virtual const ContextInfo& info() const = 0;

  // Attention for one layer.
  //   q:   [n_q_heads, T, head_dim] float32, row-major (post-RoPE queries)
  //   o:   [n_q_heads, T, head_dim] float32 (written)
  //   lse: [n_q_heads, T] float32 (written; natural log)
  // Errors: InvalidArgument for a layer out of range, T < 1, NaN/Inf in q,
  // a threshold quantile the context lacks, or an uncalibrated context in
  // threshold-quantile mode; IOError/Corruption from storage.
  virtual Status Attend(int layer, const float* q, int T, const QueryOptions& options, float* o, float* lse,
                        AttendStats* stats = nullptr) const = 0;
};

// Merges attention state (o_b, lse_b) into (o_a, lse_a), in place:
//   lse = log(e^lse_a + e^lse_b), o = (e^lse_a o_a + e^lse_b o_b) / e^lse.
// o_*: [n, head_dim]; lse_*: [n]. An empty state has lse = -inf (its o is
// ignored); merging two empty states gives an empty state with o = 0.
void MergeAttentionStates(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n,
                          int head_dim);

}  // namespace sqz
