// bf16 and fp16 instantiations of the swapped-operand tile (SwapAB32Tile: few rows per expert) of the sm_90a
// expert grouped GEMM, in a TU of their own so they compile in parallel with expert_gemm_sm90_{bf16,fp16}.cu,
// whose dispatch declares them extern.
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE(, cutlass::bfloat16_t, SwapAB32Tile)
MOELORA_EXPERT_GEMM_INSTANTIATE(, cutlass::half_t, SwapAB32Tile)
#endif

}  // namespace moelora::cuda::detail
