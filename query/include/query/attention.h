// Exact softmax attention of query rows over a given set of key/value rows,
// returning (O, LSE). This is the CPU reference of the attention step: it
// knows nothing of clusters or storage; the engine hands it the rows of the
// selected blocks plus the always-attended set.
//
// Thread-safety: stateless; callers pass their own scratch.
#pragma once

#include <cstdint>
#include <vector>

#include "sqz/types.h"

namespace sqz::query {

// x [rows, n] = scale * Q K^T with plain vectorisable loops, key-major (each
// row of k is loaded once for all `rows` query rows): q [rows, d], k [n, d],
// x's rows ldx apart (ldx >= n). Used for small row counts, where BLAS (and
// its threads, inside the engine's OpenMP region) costs more than it saves.
void ScoreRows(const float* q, int rows, const float* k, int64_t n, int d, float scale, float* x, int64_t ldx);

// Which implementation computes the products. Both give the same result up
// to float rounding.
enum class Kernel {
  // Plain vectorised loops, one pass over K and one over V for all m rows
  // (decode: memory bound, no threads of its own, so callers may run many
  // heads in parallel).
  kLoops,
  // OpenBLAS sgemm for Q K^T and P V (prefill: compute bound; OpenBLAS
  // threads internally).
  kBlas,
};

// For each of the m query rows q_r (q: [m, d]) over the n key/value rows
// (k, v: [n, d], row-major float32):
//   x_i = scale * q_r . k_i,  lse_r = log sum_i exp(x_i)  (natural log,
//   computed with max subtraction),  o_r = sum_i exp(x_i - lse_r) v_i.
// o: [m, d], lse: [m]. n == 0 gives the empty state (lse = -inf, o = 0).
// Rows are processed in tiles so the score scratch stays bounded. A row whose
// float32 scores overflow (a huge query norm) is recomputed in double, so
// any finite input gives a finite result. `scratch` is reused across calls.
void AttendRows(const float* q, int64_t m, const float* k, const float* v, int64_t n, int d, float scale, float* o,
                float* lse, Kernel kernel, std::vector<float>* scratch);

// A block of n key rows and n value rows in a stored dtype (e.g. a KV block as
// read from storage: k and v point into it; may be unaligned).
struct RowBlock {
  const void* k = nullptr;  // [n, d] of `dtype`
  const void* v = nullptr;  // [n, d] of `dtype`
  int64_t n = 0;
};

// AttendRows with kLoops over the rows of `blocks` in order (their
// concatenation is the key/value set), converting them to float32 a small
// L1-resident tile at a time instead of materialising float copies: decode
// then streams each stored byte once (one pass over K for all m rows, one over
// V). With AVX2 and d % 32 == 0 register-blocked kernels sum in another
// order than AttendRows (float rounding only); otherwise it is AttendRows'
// loop arithmetic bit for bit.
// Returns false, with o and lse unspecified, if a row's float32 scores
// overflow: the caller then converts the rows and calls AttendRows (whose
// double fallback handles it). Meant for few query rows (decode): the scores
// of all m rows over all keys are kept (m * n floats in `scratch`, which is
// reused across calls).
bool AttendBlocks(const float* q, int64_t m, const RowBlock* blocks, size_t n_blocks, DType dtype, int d, float scale,
                  float* o, float* lse, std::vector<float>* scratch);

}  // namespace sqz::query
