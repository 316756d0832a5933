// Permute: place every routed pair at its sorted row and copy its token's hidden row there, so the
// grouped GEMMs read contiguous expert-major rows. One warp per pair, 16-byte accesses.
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void permute_kernel(PermuteParams p) {
  pdl_begin();
  const int pair = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= p.T * p.k) return;
  const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
  const int row = bucket < 0 ? -1 : p.bucket_offsets[bucket] + p.pair_rank[pair];
  if (lane == 0) p.pair_row[pair] = row;
  if (row < 0) return;
  const auto* src = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.hidden) + static_cast<int64_t>(pair / p.k) * p.H);
  auto* dst = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.permuted) + static_cast<int64_t>(row) * p.H);
  for (int c = lane; c < p.H / 8; c += 32) dst[c] = src[c];
}

}  // namespace

cudaError_t launch_permute(const PermuteParams& p, cudaStream_t stream) {
  const int pairs = p.T * p.k;
  if (pairs == 0) return cudaSuccess;
  const int blocks = ceil_div(pairs, kWarpsPerBlock);
  constexpr int kThreads = kWarpsPerBlock * 32;
  if (p.dtype == DType::BF16) return launch_kernel(permute_kernel<__nv_bfloat16>, blocks, kThreads, 0, stream, p);
  return launch_kernel(permute_kernel<__half>, blocks, kThreads, 0, stream, p);
}

}  // namespace moelora::cuda
