// Permute: place every routed pair at its sorted row and copy its token's hidden row there, so the
// grouped GEMMs read contiguous expert-major rows. One warp per pair, 16-byte accesses.
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kInFlight = 8;  // 16-byte loads per lane issued before their stores (a 4 KB slice per warp)

template <typename T>
__global__ void permute_kernel(PermuteParams p) {
  pdl_begin();
  const int pair = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= p.T * p.k) return;
  // The token's row is read before the pair's destination is known: the first slice's loads overlap the
  // dependent id -> bucket -> offset loads, and a load -> store loop would wait a round trip per 512 bytes.
  const int nvec = p.H / 8;
  const auto* src = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.hidden) + static_cast<int64_t>(pair / p.k) * p.H);
  Vec8<T> v[kInFlight];
#pragma unroll
  for (int u = 0; u < kInFlight; ++u)
    if (lane + 32 * u < nvec) v[u] = src[lane + 32 * u];
  const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
  const int row = bucket < 0 ? -1 : p.bucket_offsets[bucket] + p.pair_rank[pair];
  if (lane == 0) {
    p.pair_row[pair] = row;
    if (p.row_slot != nullptr && row >= 0) p.row_slot[row] = bucket_slot(bucket, p.S);
    if (p.row_token != nullptr && row >= 0) p.row_token[row] = pair / p.k;
  }
  if (row < 0) return;
  auto* dst = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.permuted) + static_cast<int64_t>(row) * p.H);
  for (int c0 = lane;; c0 += 32 * kInFlight) {
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (c0 + 32 * u < nvec) dst[c0 + 32 * u] = v[u];
    if (c0 + 32 * kInFlight >= nvec) break;
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (c0 + 32 * (kInFlight + u) < nvec) v[u] = src[c0 + 32 * (kInFlight + u)];
  }
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
