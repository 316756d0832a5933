// bf16 instantiations of the sm_90a expert grouped GEMM with the gated activation in its epilogue (fc1 writes
// h = act(gate) * up: expert_gemm_sm90_gated.cuh) for the three row-side tiles, in a TU of their own so they compile
// in parallel with expert_gemm_sm90_bf16.cu, whose dispatch declares them extern.
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE_GATED(, cutlass::bfloat16_t)
#endif

}  // namespace moelora::cuda::detail
