// Without the CUDA layer: ResidentKv says why it cannot run.
#include "gpu/resident.h"

namespace sqz::gpu {

Status ResidentKv::Create(int, const ResidentShape&, std::unique_ptr<ResidentKv>*) {
  return Status::NotSupported("this build has no CUDA layer (configure with /usr/local/cuda present)");
}

}  // namespace sqz::gpu

#include "gpu/merge.h"

namespace sqz::gpu {

Status MergeStatesDevice(void*, float*, const void*, const float*, int64_t, int, DType, bool, void*) {
  return Status::NotSupported("this build has no CUDA layer (configure with /usr/local/cuda present)");
}

}  // namespace sqz::gpu

#include "gpu/streams.h"

namespace sqz::gpu {

Status EnsureSideStreams(int) { return Status::OK(); }

Status ForkJoin(int, void* stream, int n, const std::function<Status(int, void*)>& enqueue) {
  for (int i = 0; i < n; ++i) SQZ_RETURN_IF_ERROR(enqueue(i, stream));
  return Status::OK();
}

}  // namespace sqz::gpu
