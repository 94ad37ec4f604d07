// Built when the CUDA layer is off.
#include "gpu/device.h"

#ifndef SQZ_HAVE_CUDA
namespace sqz::gpu {

bool BuiltWithCuda() { return false; }

int DeviceCount(std::string* why) {
  if (why) *why = "built without CUDA (configure with -DSQZ_CUDA=ON and /usr/local/cuda present)";
  return 0;
}

std::string DescribeDevice(int) { return "no CUDA device: built without CUDA"; }

}  // namespace sqz::gpu
#endif
