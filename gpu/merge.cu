#include <cuda_runtime.h>

#include "cuda_util.h"
#include "gpu/merge.h"
#include "select.cuh"
#include "sparse_decode.cuh"

namespace sqz::gpu {

namespace {

// Grid-stride over rows; a block's threads stride over the row's elements.
template <typename E>
__global__ void MergeStatesKernel(E* o_a, float* lse_a, const E* o_b, const float* lse_b, int64_t n, int d,
                                  bool base2) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    // Natural log: e^l; base 2: 2^l. Work in the given base throughout.
    const float la = lse_a[row], lb = lse_b[row];
    const float m = fmaxf(la, lb);
    float wa = 0.f, wb = 0.f, l = -INFINITY;
    if (m != -INFINITY) {
      wa = base2 ? exp2f(la - m) : __expf(la - m);
      wb = base2 ? exp2f(lb - m) : __expf(lb - m);
      const float s = wa + wb;
      wa /= s;
      wb /= s;
      l = m + (base2 ? log2f(s) : logf(s));
    }
    E* oa = o_a + row * d;
    const E* ob = o_b + row * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      const float x = m == -INFINITY ? 0.f : wa * LoadFloat(oa + c) + wb * LoadFloat(ob + c);
      oa[c] = FromFloat<E>(x);
    }
    __syncthreads();
    if (threadIdx.x == 0) lse_a[row] = l;
  }
}

template <typename E>
cudaError_t Launch(void* o_a, float* lse_a, const void* o_b, const float* lse_b, int64_t n, int d, bool base2,
                   cudaStream_t s) {
  const int blocks = static_cast<int>(n < 65536 ? n : 65536);
  const int threads = d < 128 ? d : 128;
  MergeStatesKernel<E>
      <<<blocks, threads, 0, s>>>(static_cast<E*>(o_a), lse_a, static_cast<const E*>(o_b), lse_b, n, d, base2);
  return cudaGetLastError();
}

}  // namespace

Status MergeStatesDevice(void* o_a, float* lse_a, const void* o_b, const float* lse_b, int64_t n, int head_dim,
                         DType dtype, bool lse_base2, void* stream) {
  if (n < 0 || head_dim < 1 || head_dim > 4096) return Status::InvalidArgument("MergeStatesDevice: bad shape");
  if (n == 0) return Status::OK();
  if (!o_a || !lse_a || !o_b || !lse_b) return Status::InvalidArgument("MergeStatesDevice: null pointer");
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  switch (dtype) {
    case DType::kF32:
      e = Launch<float>(o_a, lse_a, o_b, lse_b, n, head_dim, lse_base2, s);
      break;
    case DType::kF16:
      e = Launch<__half>(o_a, lse_a, o_b, lse_b, n, head_dim, lse_base2, s);
      break;
    case DType::kBF16:
      e = Launch<__nv_bfloat16>(o_a, lse_a, o_b, lse_b, n, head_dim, lse_base2, s);
      break;
    default:
      return Status::InvalidArgument("MergeStatesDevice: dtype must be F32, F16 or BF16");
  }
  SQZ_CUDA_TRY(e, "launching the state merge");
  return Status::OK();
}

}  // namespace sqz::gpu
