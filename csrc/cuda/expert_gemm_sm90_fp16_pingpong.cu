// fp16 instantiation of the 64x256 pingpong tile of the sm_90a expert grouped GEMM (LargeMPingpongTile in
// expert_gemm_sm90.cuh), in a TU of its own so it compiles in parallel with expert_gemm_sm90_fp16.cu, whose
// dispatch declares it extern. NDEBUG: see expert_gemm_sm90_fp16.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#define MOELORA_EXPERT_GEMM_SM90_IMPL
#include "expert_gemm_sm90.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE(, cutlass::half_t, LargeMPingpongTile)
#endif

}  // namespace moelora::cuda::detail
