// fp16 instantiations of the sm_90a expert grouped GEMM for fc1 reading the tokens' rows in place (A's rows gathered
// by cp.async from x through row_token, expert_gemm_sm90_mainloop.cuh kGatherA): the gated LargeM tile without and
// with the LoRA inside. A TU of its own so that it compiles in parallel with expert_gemm_sm90_fp16.cu, whose dispatch
// declares these extern.
#include "expert_gemm_sm90_impl.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE_GATHER(, cutlass::half_t)
#endif

}  // namespace moelora::cuda::detail
