// Merging attention states on the device: (o_a, lse_a) <- (o_a, lse_a) (+)
// (o_b, lse_b), row by row, in place (the GPU form of
// sqz::MergeAttentionStates). o_*: [n, head_dim] of `dtype` (F32, F16,
// BF16); lse_*: [n] fp32, natural log, or base 2 with lse_base2. An empty
// state has lse = -inf; two empty states give o = 0, lse = -inf. Enqueued on
// `stream` (cudaStream_t; null: the legacy default stream); no allocation,
// no synchronisation. All pointers are device memory.
#pragma once

#include <cstdint>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz::gpu {

Status MergeStatesDevice(void* o_a, float* lse_a, const void* o_b, const float* lse_b, int64_t n, int head_dim,
                         DType dtype, bool lse_base2, void* stream);

}  // namespace sqz::gpu
