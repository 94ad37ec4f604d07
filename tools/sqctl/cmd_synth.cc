// sqctl synth: writes a synthetic corpus (KV files + queries files).
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cli.h"
#include "synth/synthetic.h"

namespace sqz::cli {
namespace {

constexpr int kIntMax = std::numeric_limits<int>::max();

Status ParseSpec(const Args& args, synth::Spec* spec) {
  SQZ_RETURN_IF_ERROR(args.GetInt("layers", spec->n_layers, 1, kIntMax, &spec->n_layers));
  SQZ_RETURN_IF_ERROR(args.GetInt("kv-heads", spec->n_kv_heads, 1, kIntMax, &spec->n_kv_heads));
  SQZ_RETURN_IF_ERROR(args.GetInt("q-heads", spec->n_q_heads, 1, kIntMax, &spec->n_q_heads));
  SQZ_RETURN_IF_ERROR(
      args.GetInt("tokens", spec->n_tokens, int64_t{1}, std::numeric_limits<int64_t>::max(), &spec->n_tokens));
  SQZ_RETURN_IF_ERROR(args.GetInt("head-dim", spec->head_dim, 1, kIntMax, &spec->head_dim));
  SQZ_RETURN_IF_ERROR(args.GetInt("window", spec->q_window, 0, kIntMax, &spec->q_window));
  SQZ_RETURN_IF_ERROR(args.GetInt("queries", spec->n_queries, 1, kIntMax, &spec->n_queries));
  SQZ_RETURN_IF_ERROR(args.GetUint64("seed", spec->seed, 0, std::numeric_limits<uint64_t>::max(), &spec->seed));
  if (args.Has("dtype") && !ParseDType(args.Get("dtype"), &spec->dtype)) {
    return Status::InvalidArgument("--dtype must be F16, BF16 or F32, got '" + args.Get("dtype") + "'");
  }
  if (spec->n_q_heads % spec->n_kv_heads != 0) {
    return Status::InvalidArgument("--q-heads must be a multiple of --kv-heads");
  }
  return Status::OK();
}

int RunSynth(const Args& args) {
  synth::Spec spec;
  Status s = ParseSpec(args, &spec);
  int n = 1;
  if (s.ok()) s = args.GetInt("contexts", 1, 1, kIntMax, &n);
  if (!s.ok()) return Usage("synth", s.message());
  std::vector<std::string> paths;
  s = synth::WriteCorpus(spec, n, args.Get("out"), &paths);
  if (!s.ok()) return Fail("synth", s);
  for (const auto& p : paths) std::printf("wrote %s\n", p.c_str());
  std::printf("queries files in %s/queries/ (SYNTHETIC data: LLM-like structure, not a real model)\n",
              args.Get("out").c_str());
  return 0;
}

Registrar synth_cmd({"synth",
                     "write a synthetic corpus of KV files (and matching queries files) for trying squeeze",
                     "sqctl synth --out DIR [--contexts N] [--tokens N] [--layers N] [options]",
                     {{"out", "DIR", "output directory (created)", true},
                      {"contexts", "N", "number of contexts (default 1)"},
                      {"tokens", "N", "tokens per context (default 8192)"},
                      {"layers", "N", "layers (default 4)"},
                      {"kv-heads", "N", "KV heads (default 4)"},
                      {"q-heads", "N", "query heads, a multiple of --kv-heads (default 8)"},
                      {"head-dim", "N", "head dimension (default 128)"},
                      {"dtype", "T", "F16, BF16 or F32 (default F16)"},
                      {"window", "N", "window queries per head stored as q_window (default 100; 0 = none)"},
                      {"queries", "N", "queries per head in the queries file (default 16)"},
                      {"seed", "N", "seed of the first context (default 7)"}},
                     RunSynth});

}  // namespace
}  // namespace sqz::cli
