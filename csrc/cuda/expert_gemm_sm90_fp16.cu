// fp16 instantiations of the sm_90a expert grouped GEMM (one TU per dtype so they compile in parallel).
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
using Element_fp16 = cutlass::half_t;

size_t expert_gemm_sm90_fp16_workspace(ExpertGemmTile tile, int num_experts, int sm_count) {
  return tile == ExpertGemmTile::SmallM ? expert_gemm_workspace_bytes<Element_fp16, SmallMTile>(num_experts, sm_count)
                                        : expert_gemm_workspace_bytes<Element_fp16, LargeMTile>(num_experts, sm_count);
}

cudaError_t expert_gemm_sm90_fp16_run(ExpertGemmTile tile, const ExpertGemmParams& p, void* workspace,
                                      size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  return tile == ExpertGemmTile::SmallM
             ? expert_gemm_run<Element_fp16, SmallMTile>(p, workspace, workspace_bytes, sm_count, stream)
             : expert_gemm_run<Element_fp16, LargeMTile>(p, workspace, workspace_bytes, sm_count, stream);
}
#else
size_t expert_gemm_sm90_fp16_workspace(ExpertGemmTile, int, int) { return 0; }
cudaError_t expert_gemm_sm90_fp16_run(ExpertGemmTile, const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

}  // namespace moelora::cuda::detail
