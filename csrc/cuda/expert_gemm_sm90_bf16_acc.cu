// bf16 accumulating instantiations (D = A @ W^T + D, ExpertGemmParams::accumulate) of the sm_90a expert
// grouped GEMM, in a TU of their own so they compile in parallel with the plain ones.
// Release device code whatever the build flags (see expert_gemm_sm90_bf16.cu). Must precede every include.
#ifndef NDEBUG
#define NDEBUG
#endif
#define MOELORA_EXPERT_GEMM_SM90_IMPL
#include "expert_gemm_sm90.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_DEFINE_ACC(bf16, cutlass::bfloat16_t)
#else
size_t expert_gemm_sm90_bf16_acc_workspace(ExpertGemmTile, int, int) { return 0; }
cudaError_t expert_gemm_sm90_bf16_acc_run(ExpertGemmTile, const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

}  // namespace moelora::cuda::detail
