// Synthetic KV corpora with LLM-like structure (clearly labelled synthetic:
// every file carries __metadata__["synthetic"] = "true").
//
// Per (layer, KV head): keys drawn around a set of topic directions, with
// tokens grouped in contiguous topic runs (like paragraphs); a few large
// outlier channels shared by all keys; token 0 an attention sink (large key
// along a direction the queries favour). Query heads are of two kinds:
// "concentrated" heads whose queries point at a few topics (their attention
// mass lands on a few clusters), and "spread" heads with small, random queries
// (attention spread over many keys). Window queries (q_window) and the fresh
// queries of the queries file come from the same per-head distribution.
//
// Everything is deterministic in (spec.seed, layer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::synth {

struct Spec {
  int n_layers = 4;
  int n_kv_heads = 4;
  int n_q_heads = 8;  // multiple of n_kv_heads
  int64_t n_tokens = 8192;
  int head_dim = 128;
  DType dtype = DType::kF16;           // dtype written to the files
  int q_window = 100;                  // window queries per head (0: no q_window tensors)
  int n_queries = 16;                  // queries per head in the queries file
  int n_topics = 64;                   // topic directions per KV head
  double concentrated_fraction = 0.5;  // share of query heads that are concentrated
  uint64_t seed = 7;
};

enum class HeadKind { kConcentrated, kSpread };
const char* HeadKindName(HeadKind k);

// Kind of query head `q_head` of layer `layer` (deterministic).
HeadKind KindOf(const Spec& spec, int layer, int q_head);

struct Layer {
  std::vector<float> k;         // [n_kv_heads, n_tokens, head_dim]
  std::vector<float> v;         // [n_kv_heads, n_tokens, head_dim]
  std::vector<float> q_window;  // [n_q_heads, q_window, head_dim] (empty if spec.q_window == 0)
  std::vector<float> queries;   // [n_q_heads, n_queries, head_dim]
};

// Generates one layer (float32; the files round to spec.dtype).
void GenerateLayer(const Spec& spec, int layer, Layer* out);

// Writes the KV file (layers.{i}.k/v[/q_window], metadata n_q_heads, model,
// synthetic, head_kinds) and the queries file (layers.{i}.q) of one context.
// Either path may be empty to skip that file.
Status WriteContextFiles(const Spec& spec, const std::string& kv_path, const std::string& queries_path);

// Writes n_contexts contexts into `dir` (created if needed) as
// ctx_000.safetensors ... and queries/ctx_000.safetensors ...; context i uses
// seed spec.seed + i. Returns the KV file paths in *kv_paths.
Status WriteCorpus(const Spec& spec, int n_contexts, const std::string& dir, std::vector<std::string>* kv_paths);

}  // namespace sqz::synth
