// bf16 instantiations of the sm_90a expert grouped GEMM: SmallM and LargeM, and the bf16 entry points that
// dispatch to every tile (one TU per dtype so they compile in parallel).
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
// The other tiles are instantiated in expert_gemm_sm90_swap.cu and expert_gemm_sm90_pingpong.cu, the gated and
// LoRA GEMMs in expert_gemm_sm90_{gated,lora_fc1,lora_fc2}_bf16.cu.
MOELORA_EXPERT_GEMM_INSTANTIATE(extern, cutlass::bfloat16_t, SwapAB32Tile)
MOELORA_EXPERT_GEMM_INSTANTIATE(extern, cutlass::bfloat16_t, LargeMPingpongTile)
MOELORA_EXPERT_GEMM_INSTANTIATE_VARIANTS(extern, cutlass::bfloat16_t)
MOELORA_EXPERT_GEMM_DEFINE(bf16, cutlass::bfloat16_t)
#else
size_t expert_gemm_sm90_bf16_workspace(ExpertGemmConfig, bool, bool, int, int) { return 0; }
ExpertGemmTables expert_gemm_sm90_bf16_tables(ExpertGemmConfig, const ExpertGemmParams&, void*) { return {}; }
cudaError_t expert_gemm_sm90_bf16_run(ExpertGemmConfig, const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

}  // namespace moelora::cuda::detail
