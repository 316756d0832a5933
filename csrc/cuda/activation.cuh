// The gate nonlinearity of the gated activations (SiLU -> SwiGLU, exact erf GELU -> GeGLU), in fp32, and the
// one formula every stage that writes h uses (activation.cu, the decode GEMV's epilogue, the LoRA expand
// with the activation fused), so all paths round the same way.
#pragma once
#include "cuda_utils.cuh"
#include "stages.h"

namespace moelora::cuda {

template <ActivationKind kKind>
__device__ __forceinline__ float gate_activation(float g) {
  // __fdividef: two instructions instead of the IEEE division's ~10 (2 ulp; g -> -inf gives -0, not NaN),
  // which matters where the LoRA expand applies the activation in its epilogue.
  if constexpr (kKind == ActivationKind::Silu) return __fdividef(g, 1.f + __expf(-g));
  else return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
}

// h = round(act(gate) * up) from gate and up already rounded to the activation dtype (as stored in gu).
template <ActivationKind kKind, typename T>
__device__ __forceinline__ T gated_value(T gate, T up) {
  return from_float<T>(gate_activation<kKind>(to_float(gate)) * to_float(up));
}
template <typename T>
__device__ __forceinline__ T gated_value(T gate, T up, ActivationKind kind) {
  return kind == ActivationKind::Silu ? gated_value<ActivationKind::Silu>(gate, up)
                                      : gated_value<ActivationKind::Gelu>(gate, up);
}

}  // namespace moelora::cuda
