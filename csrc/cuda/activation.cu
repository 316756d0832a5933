// Gated activation between fc1 and fc2: h = act(gate) * up, with gate = gu[:, :I], up = gu[:, I:].
// SiLU gives SwiGLU, exact (erf) GELU gives GeGLU. fp32 math, 16-byte accesses (I % 8 == 0).
#include "activation.cuh"
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kInFlight = 4;                   // 16-byte gate and up vectors per lane loaded before their stores
constexpr int kItemVecs = 32 * kInFlight;      // vectors of a row per work item (one warp)

// Work item = (row, kItemVecs vectors of it), one warp each, grid-stride: a row the fused LoRA expand
// already did is skipped by a flag check, and the rows left (those without an adapter) still spread over
// the whole grid.
template <typename T, ActivationKind kKind>
__global__ void __launch_bounds__(kThreads) gated_activation_kernel(ActivationParams p) {
  pdl_begin();
  const int vecs_per_row = p.I / 8;
  const int items_per_row = ceil_div(vecs_per_row, kItemVecs);
  const int64_t items = static_cast<int64_t>(*p.num_rows) * items_per_row;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32; item < items;
       item += warps) {
    const int64_t row = item / items_per_row;
    if (p.row_slot != nullptr && p.row_slot[row] >= 0) continue;  // done by the LoRA expand
    const int c0 = static_cast<int>(item % items_per_row) * kItemVecs + lane;
    const auto* gate = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.gu) + row * 2 * p.I);
    const auto* up = gate + vecs_per_row;
    auto* h = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.h) + row * p.I);
    Vec8<T> g[kInFlight], u[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i)
      if (c0 + 32 * i < vecs_per_row) {
        g[i] = gate[c0 + 32 * i];
        u[i] = up[c0 + 32 * i];
      }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i)
      if (c0 + 32 * i < vecs_per_row) {
        Vec8<T> o;
#pragma unroll
        for (int e = 0; e < 8; ++e) o.v[e] = gated_value<kKind>(g[i].v[e], u[i].v[e]);
        h[c0 + 32 * i] = o;
      }
  }
}

template <typename T>
cudaError_t launch_typed(const ActivationParams& p, cudaStream_t stream) {
  // A warp per item, up to 4096 blocks (the grid-stride loop covers the rest).
  const int64_t items = static_cast<int64_t>(p.max_rows) * ceil_div(p.I / 8, kItemVecs);
  const int blocks = static_cast<int>(std::min<int64_t>((items + kWarpsPerBlock - 1) / kWarpsPerBlock, 4096));
  if (blocks == 0) return cudaSuccess;
  if (p.kind == ActivationKind::Silu)
    return launch_kernel(gated_activation_kernel<T, ActivationKind::Silu>, blocks, kThreads, 0, stream, p);
  return launch_kernel(gated_activation_kernel<T, ActivationKind::Gelu>, blocks, kThreads, 0, stream, p);
}

}  // namespace

cudaError_t launch_activation(const ActivationParams& p, cudaStream_t stream) {
  return p.dtype == DType::BF16 ? launch_typed<__nv_bfloat16>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace moelora::cuda
