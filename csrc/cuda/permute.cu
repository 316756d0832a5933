// Permute: place every routed pair at its sorted row and copy its token's hidden row there, so the
// grouped GEMMs read contiguous expert-major rows. One warp per pair, 16-byte accesses. Either in one launch, or
// the row indices first (a thread per pair) and the copy second, so that what needs only the indices (fc1's LoRA
// shrink on token rows) can run beside the copy.
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kInFlight = 8;  // 16-byte loads per lane issued before their stores (a 4 KB slice per warp)

// The pair's bucket and sorted row (-1: dropped).
struct PairPlace {
  int bucket, row;
};
__device__ __forceinline__ PairPlace place_pair(const PermuteParams& p, int pair) {
  const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
  return {bucket, bucket < 0 ? -1 : p.bucket_offsets[bucket] + p.pair_rank[pair]};
}

// pair_row and the row maps.
__device__ __forceinline__ void record_pair(const PermuteParams& p, int pair, PairPlace at) {
  p.pair_row[pair] = at.row;
  if (at.row < 0) return;
  if (p.row_slot != nullptr) p.row_slot[at.row] = bucket_slot(at.bucket, p.S);
  if (p.row_token != nullptr) p.row_token[at.row] = pair / p.k;
}

// Stage::Rows: a thread per pair.
__global__ void permute_rows_kernel(PermuteParams p) {
  pdl_begin();
  const int pair = blockIdx.x * blockDim.x + threadIdx.x;
  if (pair < p.T * p.k) record_pair(p, pair, place_pair(p, pair));
}

// kRowsKnown: Stage::Copy, pair_row written by permute_rows_kernel; otherwise both.
template <typename T, bool kRowsKnown>
__global__ void permute_kernel(PermuteParams p) {
  pdl_begin();
  const int pair = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= p.T * p.k) return;
  // The token's row is read before the pair's destination is known: the first slice's loads overlap the
  // dependent id -> bucket -> offset loads (or the pair_row load), and a load -> store loop would wait a round
  // trip per 512 bytes.
  const int nvec = p.H / 8;
  const auto* src = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.hidden) + static_cast<int64_t>(pair / p.k) * p.H);
  Vec8<T> v[kInFlight];
#pragma unroll
  for (int u = 0; u < kInFlight; ++u)
    if (lane + 32 * u < nvec) v[u] = src[lane + 32 * u];
  int row;
  if constexpr (kRowsKnown) {
    row = p.pair_row[pair];
  } else {
    const PairPlace at = place_pair(p, pair);
    row = at.row;
    if (lane == 0) record_pair(p, pair, at);
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
  constexpr int kThreads = kWarpsPerBlock * 32;
  using Stage = PermuteParams::Stage;
  if (p.stage == Stage::Rows) return launch_kernel(permute_rows_kernel, ceil_div(pairs, kThreads), kThreads, 0, stream, p);
  const int blocks = ceil_div(pairs, kWarpsPerBlock);
  const bool copy = p.stage == Stage::Copy;
  if (p.dtype == DType::BF16)
    return launch_kernel(copy ? permute_kernel<__nv_bfloat16, true> : permute_kernel<__nv_bfloat16, false>, blocks,
                         kThreads, 0, stream, p);
  return launch_kernel(copy ? permute_kernel<__half, true> : permute_kernel<__half, false>, blocks, kThreads, 0,
                       stream, p);
}

}  // namespace moelora::cuda
