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
// The other tiles are instantiated in expert_gemm_sm90_fp16_swap.cu and expert_gemm_sm90_fp16_pingpong.cu.
MOELORA_EXPERT_GEMM_INSTANTIATE(extern, cutlass::half_t, SwapABTile<32>)
MOELORA_EXPERT_GEMM_INSTANTIATE(extern, cutlass::half_t, LargeMPingpongTile)
MOELORA_EXPERT_GEMM_DEFINE(fp16, cutlass::half_t)
#else
size_t expert_gemm_sm90_fp16_workspace(ExpertGemmConfig, int, int) { return 0; }
ExpertGemmTables expert_gemm_sm90_fp16_tables(ExpertGemmConfig, const ExpertGemmParams&, void*) { return {}; }
cudaError_t expert_gemm_sm90_fp16_run(ExpertGemmConfig, const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

}  // namespace moelora::cuda::detail
