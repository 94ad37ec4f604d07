// sqctl synth: writes a synthetic corpus (KV files + queries files).
#include <cstdio>
#include <string>
#include <vector>

#include "cli.h"
#include "synth/synthetic.h"

namespace sqz::cli {
namespace {

Status ParseSpec(const Args& args, synth::Spec* spec) {
  long long v;
  SQZ_RETURN_IF_ERROR(args.GetInt("layers", spec->n_layers, &v));
  spec->n_layers = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("kv-heads", spec->n_kv_heads, &v));
  spec->n_kv_heads = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("q-heads", spec->n_q_heads, &v));
  spec->n_q_heads = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("tokens", spec->n_tokens, &v));
  spec->n_tokens = v;
  SQZ_RETURN_IF_ERROR(args.GetInt("head-dim", spec->head_dim, &v));
  spec->head_dim = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("window", spec->q_window, &v));
  spec->q_window = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("queries", spec->n_queries, &v));
  spec->n_queries = static_cast<int>(v);
  SQZ_RETURN_IF_ERROR(args.GetInt("seed", static_cast<long long>(spec->seed), &v));
  spec->seed = static_cast<uint64_t>(v);
  if (args.Has("dtype") && !ParseDType(args.Get("dtype"), &spec->dtype)) {
    return Status::InvalidArgument("--dtype must be F16, BF16 or F32, got '" + args.Get("dtype") + "'");
  }
  if (spec->n_layers < 1 || spec->n_kv_heads < 1 || spec->n_q_heads < 1 || spec->n_tokens < 1 ||
      spec->head_dim < 1 || spec->n_queries < 1 || spec->q_window < 0) {
    return Status::InvalidArgument("layers, heads, tokens, head-dim and queries must be positive");
  }
  if (spec->n_q_heads % spec->n_kv_heads != 0) {
    return Status::InvalidArgument("--q-heads must be a multiple of --kv-heads");
  }
  return Status::OK();
}

int RunSynth(const Args& args) {
  synth::Spec spec;
  Status s = ParseSpec(args, &spec);
  if (!s.ok()) return Fail("synth", s);
  long long n;
  s = args.GetInt("contexts", 1, &n);
  if (!s.ok() || n < 1) return Fail("synth", s.ok() ? Status::InvalidArgument("--contexts must be >= 1") : s);
  std::vector<std::string> paths;
  s = synth::WriteCorpus(spec, static_cast<int>(n), args.Get("out"), &paths);
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
