// bf16 instantiations of the sm_90a expert grouped GEMM for fc2 with LoRA: the LoRA as more k tiles
// (t and the adapters' B) and the plain epilogue (expert_gemm_sm90_mainloop.cuh), on the
// three row-side tiles. A TU of its own so that it compiles in parallel with expert_gemm_sm90_bf16.cu, whose
// dispatch declares these extern.
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(, cutlass::bfloat16_t, false, true)
#endif

}  // namespace moelora::cuda::detail
