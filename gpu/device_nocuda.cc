// Built instead of device.cu when the CUDA layer is off (gpu/CMakeLists.txt).
#include "gpu/device.h"

namespace sqz::gpu {

bool BuiltWithCuda() { return false; }

int DeviceCount(std::string* why) {
  if (why) *why = "built without CUDA (configure with -DSQZ_CUDA=ON and /usr/local/cuda present)";
  return 0;
}

std::string DescribeDevice(int) { return "no CUDA device: built without CUDA"; }

}  // namespace sqz::gpu
