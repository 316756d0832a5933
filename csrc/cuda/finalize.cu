// Finalize: un-permute and reduce. Each token sums its k expert outputs weighted by topk_weights, in
// j order, in fp32: no atomics, so the result is the same on every run.
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

template <typename T>
__global__ void finalize_kernel(FinalizeParams p) {
  pdl_begin();
  const int t = blockIdx.x;
  const auto* y = static_cast<const T*>(p.y);
  auto* out = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.H);
  for (int c = threadIdx.x; c < p.H / 8; c += blockDim.x) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < p.k; ++j) {
      const int row = p.pair_row[t * p.k + j];
      if (row < 0) continue;  // expert not on this GPU / out of range: contributes nothing
      const float w = p.topk_weights[t * p.k + j];
      const Vec8<T> v = reinterpret_cast<const Vec8<T>*>(y + static_cast<int64_t>(row) * p.H)[c];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w * to_float(v.v[i]);
    }
    Vec8<T> o;
#pragma unroll
    for (int i = 0; i < 8; ++i) o.v[i] = from_float<T>(acc[i]);
    out[c] = o;
  }
}

}  // namespace

cudaError_t launch_finalize(const FinalizeParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const int threads = std::min(256, std::max(32, ceil_div(p.H / 8, 32) * 32));
  if (p.dtype == DType::BF16) return launch_kernel(finalize_kernel<__nv_bfloat16>, p.T, threads, 0, stream, p);
  return launch_kernel(finalize_kernel<__half>, p.T, threads, 0, stream, p);
}

}  // namespace moelora::cuda
