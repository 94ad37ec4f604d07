// CUDA detection for the GPU layer.
#include <cuda_runtime.h>

#include <string>

#include "gpu/device.h"

namespace sqz::gpu {

bool BuiltWithCuda() { return true; }

int DeviceCount(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device present";
  return n;
}

std::string DescribeDevice(int i) {
  cudaDeviceProp prop{};
  cudaError_t err = cudaGetDeviceProperties(&prop, i);
  if (err != cudaSuccess) return std::string("device ") + std::to_string(i) + ": " + cudaGetErrorString(err);
  return std::string(prop.name) + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.totalGlobalMem >> 30) + " GiB, " + std::to_string(prop.multiProcessorCount) + " SMs";
}

}  // namespace sqz::gpu
