// Without the CUDA layer: the GPU entry points say why they cannot run.
#include "gpu/sparse_decode.h"

namespace sqz::gpu {

Status SparseDecodeOnDevice(const HostDecodeProblem&, float*, float*, DecodeRun*) {
  return Status::NotSupported("this build has no CUDA layer (configure with /usr/local/cuda present)");
}

}  // namespace sqz::gpu

#include "gpu/resident.h"

namespace sqz::gpu {

Status ResidentKv::Create(int, const ResidentShape&, std::unique_ptr<ResidentKv>*) {
  return Status::NotSupported("this build has no CUDA layer (configure with /usr/local/cuda present)");
}

}  // namespace sqz::gpu
