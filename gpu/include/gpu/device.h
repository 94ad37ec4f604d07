// What the CUDA layer sees of the machine: the layer's CUDA detection. Its
// other entry point: gpu/resident.h (KV pages in GPU memory, decode over
// them with the kernels of gpu/sparse_decode.cuh).
//
// Thread-safety: all functions may be called from any thread.
#pragma once

#include <string>

namespace sqz::gpu {

// True when this build includes the CUDA layer (SQZ_CUDA found nvcc).
bool BuiltWithCuda();

// Number of CUDA devices usable now (0 without CUDA, without a driver, or
// without a GPU). Never fails: the reason for 0 goes to *why when given.
int DeviceCount(std::string* why = nullptr);

// One line describing device `i` ("NVIDIA H100 80GB HBM3, sm_90, 79 GiB"),
// or the reason none is there.
std::string DescribeDevice(int i);

}  // namespace sqz::gpu
