// Kernel launches with programmatic dependent launch (PDL, sm_90): a kernel
// launched with `pdl` may be scheduled while the previous kernel in its
// stream is still running; it calls WaitForPrevious() before it reads what
// that kernel wrote or writes what that kernel reads (griddepcontrol.wait
// returns once the previous grid has completed and its memory is visible,
// and is a no-op in a kernel launched without the attribute). A kernel calls
// LetDependentsLaunch() once the next kernel's blocks may take SM resources
// (else that happens as its blocks exit). Every kernel of a chain waits, so
// the order is transitive: a kernel sees the writes of all earlier ones.
// Stream capture records these launches as programmatic graph edges.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace sqz::gpu {

__device__ inline void WaitForPrevious() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ inline void LetDependentsLaunch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <typename... KArgs, typename... Args>
cudaError_t LaunchKernel(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr{};
  if (pdl) {
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attr;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace sqz::gpu
