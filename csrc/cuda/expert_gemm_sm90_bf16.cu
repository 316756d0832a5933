// bf16 instantiations of the sm_90a expert grouped GEMM (one TU per dtype so they compile in parallel).
// Release device code whatever the build flags: CuTe's debug asserts (e.g. in the epilogue's smem swizzle)
// put an __assertfail call inside the kernel, and ptxas then serializes every wgmma of the mainloop
// ("wgmma pipeline crossing function boundary", warning C7510). Must precede every include.
#ifndef NDEBUG
#define NDEBUG
#endif
#define MOELORA_EXPERT_GEMM_SM90_IMPL
#include "expert_gemm_sm90.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_DEFINE(bf16, cutlass::bfloat16_t)
#else
size_t expert_gemm_sm90_bf16_workspace(ExpertGemmTile, int, int) { return 0; }
ExpertGemmTables expert_gemm_sm90_bf16_tables(ExpertGemmTile, const ExpertGemmParams&, void*) { return {}; }
cudaError_t expert_gemm_sm90_bf16_run(ExpertGemmTile, const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

}  // namespace moelora::cuda::detail
