// The gate nonlinearity of the gated activations (SiLU -> SwiGLU, exact erf GELU -> GeGLU), in fp32;
// shared by activation.cu and the decode GEMV's fused epilogue (expert_gemv.cu).
#pragma once
#include "cuda_utils.cuh"
#include "stages.h"

namespace moelora::cuda {

template <ActivationKind kKind>
__device__ __forceinline__ float gate_activation(float g) {
  if constexpr (kKind == ActivationKind::Silu) return g / (1.f + __expf(-g));
  else return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
}

}  // namespace moelora::cuda
