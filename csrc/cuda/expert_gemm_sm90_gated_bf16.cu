// bf16 instantiations of the sm_90a expert grouped GEMM for fc1 without LoRA: the gated activation in
// the epilogue, h = act(gate) * up (expert_gemm_sm90_mainloop.cuh), on the
// three row-side tiles. A TU of its own so that it compiles in parallel with expert_gemm_sm90_bf16.cu, whose
// dispatch declares these extern.
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(, cutlass::bfloat16_t, true, false)
#endif

}  // namespace moelora::cuda::detail
