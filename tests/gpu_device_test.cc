// The CUDA layer's detection. Skips cleanly where no GPU is present (CI and
// the CPU machines); on the lent H100 it checks the device is visible.
#include <gtest/gtest.h>

#include <string>

#include "gpu/device.h"

namespace sqz::gpu {
namespace {

TEST(GpuDevice, DetectsOrSkips) {
  std::string why;
  int n = DeviceCount(&why);
  if (n == 0) GTEST_SKIP() << "no usable GPU: " << why;
  EXPECT_TRUE(BuiltWithCuda());
  std::string desc = DescribeDevice(0);
  EXPECT_NE(desc.find("sm_"), std::string::npos) << desc;
  std::printf("device 0: %s\n", desc.c_str());
}

TEST(GpuDevice, NoCudaBuildSaysWhy) {
  if (BuiltWithCuda()) GTEST_SKIP() << "built with CUDA";
  std::string why;
  EXPECT_EQ(DeviceCount(&why), 0);
  EXPECT_NE(why.find("without CUDA"), std::string::npos);
}

}  // namespace
}  // namespace sqz::gpu
