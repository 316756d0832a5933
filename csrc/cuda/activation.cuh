// The gate nonlinearity of the gated activations (SiLU -> SwiGLU, exact erf GELU -> GeGLU), in fp32, and the
// one formula every stage that writes h uses (activation.cu, the decode GEMV's epilogue, the LoRA expand
// with the activation fused), so all paths round the same way.
#pragma once
#include <type_traits>

#include "cuda_utils.cuh"
#include "stages.h"

namespace moelora::cuda {

// 2^x and 1/x on the special function unit, denormals flushed (one instruction each; the non-flushing forms
// behind __expf / __fdividef add range checks around them: ~3 instructions per value, NOTES.md v14).
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <ActivationKind kKind>
__device__ __forceinline__ float gate_activation(float g) {
  // SiLU as g * 1 / (1 + 2^(-g log2 e)) (2 ulp): flushing changes nothing here, since a denormal 2^x adds nothing
  // to 1, and 1 / d is denormal only for d > 2^126, where g * it is 0 with or without flushing (g = -inf gives
  // NaN, as torch's silu does). An IEEE division would be ~10 instructions, which matters where the LoRA
  // expand applies the activation in its epilogue.
  if constexpr (kKind == ActivationKind::Silu) return g * rcp_ftz(1.f + ex2_ftz(g * -1.4426950408889634f));
  else return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
}

// act(gate) * up in fp32 from unrounded gate and up: activation.cu's delta path (fc1's output plus the
// overlapped LoRA's delta); the caller rounds. gated_value / gated_pair below are the same product on values
// read from gu, written out so that their call sites keep their measured instruction order.
template <ActivationKind kKind>
__device__ __forceinline__ float gated_value_fp32(float gate, float up) {
  return gate_activation<kKind>(gate) * up;
}
// h = round(act(gate) * up) from gate and up already rounded to the activation dtype (as stored in gu).
template <ActivationKind kKind, typename T>
__device__ __forceinline__ T gated_value(T gate, T up) {
  return from_float<T>(gate_activation<kKind>(to_float(gate)) * to_float(up));
}
// The same for two columns at once: gate and up each two values packed in a register (round_pack2's layout).
template <ActivationKind kKind, typename T>
__device__ __forceinline__ uint32_t gated_pair(uint32_t gate, uint32_t up) {
  return round_pack2<T>(gate_activation<kKind>(low_float<T>(gate)) * low_float<T>(up),
                        gate_activation<kKind>(high_float<T>(gate)) * high_float<T>(up));
}
// f(std::integral_constant<ActivationKind, kind>{}): the activation's kind as a compile-time constant inside f.
template <class F>
__device__ __forceinline__ void with_activation(ActivationKind kind, F&& f) {
  if (kind == ActivationKind::Silu) f(std::integral_constant<ActivationKind, ActivationKind::Silu>{});
  else f(std::integral_constant<ActivationKind, ActivationKind::Gelu>{});
}

}  // namespace moelora::cuda
