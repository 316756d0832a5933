// fp16 instantiations of LargeM's alternative prefill tiles of the sm_90a expert grouped GEMM
// (LargeMPingpongTile, LargeMCluster2Tile in expert_gemm_sm90.cuh), in a TU of their own so they compile in
// parallel with expert_gemm_sm90_fp16.cu, whose dispatch declares them extern. NDEBUG: see expert_gemm_sm90_fp16.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#define MOELORA_EXPERT_GEMM_SM90_IMPL
#include "expert_gemm_sm90.cuh"

namespace moelora::cuda::detail {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
MOELORA_EXPERT_GEMM_INSTANTIATE(, cutlass::half_t, LargeMPingpongTile)
MOELORA_EXPERT_GEMM_INSTANTIATE(, cutlass::half_t, LargeMCluster2Tile)
#endif

}  // namespace moelora::cuda::detail
