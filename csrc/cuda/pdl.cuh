// Programmatic dependent launch (PDL) for our kernels: the device side (every kernel starts with
// pdl_begin()) and the host launcher that sets the launch attribute when the policy asks for it.
//
// Correctness rule: a kernel launched with the attribute may start while the previous kernel on the stream
// is still running, so it must not touch global memory before griddepcontrol.wait, which returns once the
// previous grid has completed and its memory is visible. pdl_begin() does that first thing, so ordering is
// as with plain launches (and transitively so: a grid cannot complete before its own wait returned).
// griddepcontrol.launch_dependents lets the *next* kernel launch once every CTA of this grid has issued it
// or exited, i.e. during this grid's last wave; launching it from the top costs nothing because the next
// kernel waits anyway. Without the attribute (or before sm_90) both instructions are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "launch_policy.h"

namespace moelora::cuda {

__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_launch_enabled().
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_launch_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace moelora::cuda
