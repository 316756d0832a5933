// Finalize: un-permute and reduce. Each token sums its k expert outputs weighted by topk_weights, in
// j order, in fp32 (finalize.cuh): no atomics, so the result is the same on every run. At decode the fc2 GEMV
// does this itself (ExpertGemvParams::finalize_done).
#include "cuda_utils.cuh"
#include "finalize.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kMaxThreads = 256;

template <typename T>
__global__ void finalize_kernel(FinalizeParams p) {
  pdl_begin();
  const int t = blockIdx.x;
  auto* out = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.H);
  for (int c = threadIdx.x; c < p.H / 8; c += blockDim.x) out[c] = finalize_vector<T>(p, t, c);
}

}  // namespace

cudaError_t launch_finalize(const FinalizeParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const int threads = std::min(kMaxThreads, std::max(32, ceil_div(p.H / 8, 32) * 32));
  if (p.dtype == DType::BF16) return launch_kernel(finalize_kernel<__nv_bfloat16>, p.T, threads, 0, stream, p);
  return launch_kernel(finalize_kernel<__half>, p.T, threads, 0, stream, p);
}

}  // namespace moelora::cuda
