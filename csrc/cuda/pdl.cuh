// Programmatic dependent launch (PDL) for our kernels: the device side (every kernel starts with
// pdl_begin()) and the host launcher that sets the launch attribute when the policy asks for it.
//
// Correctness rule: a kernel launched with the attribute may start while the previous kernel on the stream
// is still running, so it must not touch what that kernel writes before griddepcontrol.wait, which returns once
// the previous grid has completed and its memory is visible. pdl_begin() waits first thing, so ordering is as
// with plain launches.
//
// It waits *before* it issues griddepcontrol.launch_dependents, so kernel N is launched only after every CTA
// of kernel N - 1 has passed its wait, i.e. after kernel N - 2 has completed. So before its own wait a kernel
// may already read what was written before its predecessor ran: the op's inputs, and the routing's tables once
// the routing is not its predecessor (finalize.cu does, through ld.global.cg so that no L1 line from an earlier
// call is hit). launch_dependents lets the next kernel launch once every CTA of this grid has issued it or exited,
// i.e. during this grid's last wave; issuing it right after the wait costs nothing because the next kernel waits
// anyway. Without the attribute (or before sm_90) both instructions are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "launch_policy.h"

namespace moelora::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Every CTA of every kernel calls this before it reads or writes anything the previous kernel may write, and
// before it exits.
__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  pdl_trigger();
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
