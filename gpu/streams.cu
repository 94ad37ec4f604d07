#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <vector>

#include "cuda_util.h"
#include "gpu/streams.h"

namespace sqz::gpu {

namespace {

constexpr int kSideStreams = 8;

struct Side {
  std::vector<cudaStream_t> streams;
  std::vector<cudaEvent_t> joins;
  cudaEvent_t fork = nullptr;
};

std::mutex& Mu() {
  static std::mutex mu;
  return mu;
}

std::map<int, Side>& Pools() {
  static std::map<int, Side> pools;  // lives as long as the process (streams are never destroyed)
  return pools;
}

}  // namespace

Status EnsureSideStreams(int device) {
  std::lock_guard<std::mutex> lock(Mu());
  if (Pools().count(device)) return Status::OK();
  int prev = -1;
  SQZ_CUDA_TRY(cudaGetDevice(&prev), "cudaGetDevice");
  SQZ_CUDA_TRY(cudaSetDevice(device), "cudaSetDevice");
  Side side;
  cudaError_t err = cudaSuccess;
  const char* failed = nullptr;
  auto check = [&](cudaError_t e, const char* what) {
    if (e != cudaSuccess && err == cudaSuccess) {
      err = e;
      failed = what;
    }
  };
  check(cudaEventCreateWithFlags(&side.fork, cudaEventDisableTiming), "cudaEventCreate");
  for (int i = 0; i < kSideStreams && err == cudaSuccess; ++i) {
    cudaStream_t st = nullptr;
    cudaEvent_t ev = nullptr;
    check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    side.streams.push_back(st);
    side.joins.push_back(ev);
  }
  cudaSetDevice(prev);
  if (err != cudaSuccess) return CudaError(err, failed);
  Pools()[device] = side;
  return Status::OK();
}

Status ForkJoin(int device, void* stream, int n, const std::function<Status(int, void*)>& enqueue) {
  if (n <= 0) return Status::OK();
  auto st = static_cast<cudaStream_t>(stream);
  // (No stream or device queries here: they are not allowed while a stream
  // is being captured.)
  std::lock_guard<std::mutex> lock(Mu());
  auto it = Pools().find(device);
  if (it == Pools().end() || n == 1) {  // no side streams (no resident context on this device yet), or nothing to fork
    for (int i = 0; i < n; ++i) SQZ_RETURN_IF_ERROR(enqueue(i, stream));
    return Status::OK();
  }
  const Side& side = it->second;
  const int m = n < kSideStreams ? n : kSideStreams;
  SQZ_CUDA_TRY(cudaEventRecord(side.fork, st), "cudaEventRecord (fork)");
  for (int j = 0; j < m; ++j) SQZ_CUDA_TRY(cudaStreamWaitEvent(side.streams[j], side.fork, 0), "cudaStreamWaitEvent");
  Status result;
  for (int i = 0; i < n && result.ok(); ++i) static_cast<void>(result = enqueue(i, side.streams[i % m]));
  for (int j = 0; j < m; ++j) {
    SQZ_CUDA_TRY(cudaEventRecord(side.joins[j], side.streams[j]), "cudaEventRecord (join)");
    SQZ_CUDA_TRY(cudaStreamWaitEvent(st, side.joins[j], 0), "cudaStreamWaitEvent (join)");
  }
  return result;
}

}  // namespace sqz::gpu
