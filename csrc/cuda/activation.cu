// Gated activation between fc1 and fc2: h = act(gate) * up, with gate = gu[:, :I], up = gu[:, I:].
// SiLU gives SwiGLU, exact (erf) GELU gives GeGLU. fp32 math, 16-byte accesses (I % 8 == 0).
#include "activation.cuh"
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

template <typename T, ActivationKind kKind>
__global__ void gated_activation_kernel(ActivationParams p) {
  pdl_begin();
  const int vecs_per_row = p.I / 8;
  const int64_t total = static_cast<int64_t>(*p.num_rows) * vecs_per_row;
  const auto* gu = static_cast<const T*>(p.gu);
  auto* h = reinterpret_cast<Vec8<T>*>(p.h);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = v / vecs_per_row;
    const int col = static_cast<int>(v % vecs_per_row) * 8;
    const Vec8<T> gate = *reinterpret_cast<const Vec8<T>*>(gu + row * 2 * p.I + col);
    const Vec8<T> up = *reinterpret_cast<const Vec8<T>*>(gu + row * 2 * p.I + p.I + col);
    Vec8<T> out;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float g = to_float(gate.v[i]);
      const float a = gate_activation<kKind>(g);
      out.v[i] = from_float<T>(a * to_float(up.v[i]));
    }
    h[v] = out;
  }
}

template <typename T>
cudaError_t launch_typed(const ActivationParams& p, cudaStream_t stream) {
  const int64_t vecs = static_cast<int64_t>(p.max_rows) * (p.I / 8);
  // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(static_cast<int>(std::min<int64_t>(vecs, 1 << 30)), 256), 4096));
  if (blocks == 0) return cudaSuccess;
  if (p.kind == ActivationKind::Silu)
    return launch_kernel(gated_activation_kernel<T, ActivationKind::Silu>, blocks, 256, 0, stream, p);
  return launch_kernel(gated_activation_kernel<T, ActivationKind::Gelu>, blocks, 256, 0, stream, p);
}

}  // namespace

cudaError_t launch_activation(const ActivationParams& p, cudaStream_t stream) {
  return p.dtype == DType::BF16 ? launch_typed<__nv_bfloat16>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace moelora::cuda
