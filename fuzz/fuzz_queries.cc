// libFuzzer target: the queries-file reader (query/eval.h ReadQueriesFile),
// which sqctl query and eval run on user files. Input: a context's shapes
// (fuzz/fuzz_common.h, kQueriesPrefixBytes), then the safetensors file.
//
// Asserts, beyond "no crash, leak, hang or unbounded allocation": what it
// returns on success has the promised form: at least one layer, layers
// distinct, sorted and inside the context, each [n_q_heads, T >= 1,
// head_dim] of finite values; on failure, a message.
#include <cmath>
#include <cstdint>
#include <vector>

#include "fuzz_common.h"
#include "query/eval.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sqz;
  if (size < fuzz::kQueriesPrefixBytes) return 0;
  const ContextInfo info = fuzz::QueriesContext(data);
  fuzz::MemFile file(data + fuzz::kQueriesPrefixBytes, size - fuzz::kQueriesPrefixBytes);
  std::vector<query::LayerQueries> out;
  const Status s = query::ReadQueriesFile(file.path(), info, &out);
  if (!s.ok()) {
    SQZ_FUZZ_CHECK(!s.message().empty());
    return 0;
  }
  SQZ_FUZZ_CHECK(!out.empty());
  for (size_t i = 0; i < out.size(); ++i) {
    const query::LayerQueries& lq = out[i];
    SQZ_FUZZ_CHECK(lq.layer >= 0 && lq.layer < info.n_layers && (i == 0 || lq.layer > out[i - 1].layer));
    SQZ_FUZZ_CHECK(lq.T >= 1);
    SQZ_FUZZ_CHECK(lq.q.size() == static_cast<size_t>(info.n_q_heads) * lq.T * info.head_dim);
    for (float x : lq.q) SQZ_FUZZ_CHECK(std::isfinite(x));
  }
  return 0;
}
