// Routing on the device: count the (token, expert) pairs per (expert, adapter-slot) bucket, then one
// block turns the counts into offsets and tile prefixes. No host sync: every size the host needs is an
// upper bound known from the shapes (T * k rows). Small problems (decode) run as a single one-block
// kernel that counts in shared memory; larger ones as memset + count kernel + plan kernel.
#include <cub/block/block_scan.cuh>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

// One thread per pair. The atomic's order decides a pair's position inside its bucket; that position
// never changes the math (every row of a GEMM is computed the same way wherever it sits), so the
// output stays deterministic.
__global__ void count_pairs_kernel(RoutingParams p) {
  pdl_begin();
  const int pair = blockIdx.x * blockDim.x + threadIdx.x;
  if (pair >= p.T * p.k) return;
  const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
  p.pair_rank[pair] = bucket < 0 ? -1 : atomicAdd(&p.bucket_counts[bucket], 1);
}

constexpr int kPlanThreads = 1024;
// cub's default (raking) scan: BLOCK_SCAN_WARP_SCANS made the routing kernels 1.2-2 µs slower (NOTES.md v10).
using PlanScan = cub::BlockScan<int, kPlanThreads>;

// Exclusive prefix sum of value(i) for i in [0, n) into out[0..n], by one block: each thread sums a
// contiguous chunk, the block scans the chunk sums, then each thread writes its chunk.
template <typename ValueOf>
__device__ void block_prefix_sum(int n, ValueOf value, int* out, PlanScan::TempStorage& tmp) {
  const int chunk = ceil_div(n, kPlanThreads);
  const int begin = min(n, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(n, begin + chunk);
  int local = 0;
  for (int i = begin; i < end; ++i) local += value(i);
  int running, total;
  PlanScan(tmp).ExclusiveSum(local, running, total);
  for (int i = begin; i < end; ++i) {
    out[i] = running;
    running += value(i);
  }
  if (threadIdx.x == 0) out[n] = total;
  __syncthreads();  // tmp is reused by the next scan; out is read by the next one
}

// Offsets and tile tables from the bucket counts (global or shared memory), by the whole block.
__device__ void plan_from_counts(const RoutingParams& p, const int* counts, PlanScan::TempStorage& tmp) {
  const int per_expert = p.S + 1;
  const int nbuckets = p.E * per_expert;

  if (static_cast<int>(threadIdx.x) < p.zero_count) p.zero_ints[threadIdx.x] = 0;
  block_prefix_sum(nbuckets, [&](int b) { return counts[b]; }, p.bucket_offsets, tmp);
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) p.expert_offsets[e] = p.bucket_offsets[e * per_expert];
  for (int i = 0; i < p.gemm_table_count; ++i)
    for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
      const int begin = p.bucket_offsets[e * per_expert];
      write_expert_gemm_tables(p.gemm_tables[i], e, begin, p.bucket_offsets[(e + 1) * per_expert] - begin);
    }
  __syncthreads();
  const int* expert_offsets = p.expert_offsets;
  block_prefix_sum(
      p.E, [&](int e) { return ceil_div(expert_offsets[e + 1] - expert_offsets[e], kTileRows); },
      p.expert_tile_prefix, tmp);
  if (p.S > 0) {
    // Buckets of rows without an adapter (slot -1, the first of each expert) get no LoRA tiles.
    block_prefix_sum(
        nbuckets, [&](int b) { return b % per_expert == 0 ? 0 : ceil_div(counts[b], kTileRows); },
        p.lora_tile_prefix, tmp);
    // The LoRA kernels look up an m-tile's bucket here instead of searching the prefix (one load, not
    // log2(buckets) dependent ones per work item).
    for (int b = threadIdx.x; b < nbuckets; b += blockDim.x) {
      const int end = min(p.lora_tile_prefix[b + 1], p.lora_tile_capacity);
      for (int t = p.lora_tile_prefix[b]; t < end; ++t) p.lora_tile_segment[t] = b;
    }
  }
}

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(RoutingParams p) {
  pdl_begin();
  __shared__ PlanScan::TempStorage tmp;
  plan_from_counts(p, p.bucket_counts, tmp);
}

// Decode-sized routing in one launch: no memset, no count kernel. The pair ranks come from shared-memory
// atomics (their order is arbitrary, as in count_pairs_kernel; it never changes the math).
__global__ void __launch_bounds__(kPlanThreads) routing_one_block_kernel(RoutingParams p) {
  pdl_begin();
  __shared__ PlanScan::TempStorage tmp;
  __shared__ int counts[kOneBlockMaxBuckets];
  const int nbuckets = p.E * (p.S + 1);
  for (int b = threadIdx.x; b < nbuckets; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  for (int pair = threadIdx.x; pair < p.T * p.k; pair += blockDim.x) {
    const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
    p.pair_rank[pair] = bucket < 0 ? -1 : atomicAdd(&counts[bucket], 1);
  }
  __syncthreads();
  plan_from_counts(p, counts, tmp);  // ends with a barrier: bucket_offsets and pair_rank are visible here
  if (p.gather_permuted == nullptr) return;
  // The permute stage (permute.cu), one warp per pair: sorted row, then the token's hidden row copied there.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int pair = warp; pair < p.T * p.k; pair += kPlanThreads / 32) {
    const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
    const int row = bucket < 0 ? -1 : p.bucket_offsets[bucket] + p.pair_rank[pair];
    if (lane == 0) {
      p.gather_pair_row[pair] = row;
      if (p.gather_row_slot != nullptr && row >= 0) p.gather_row_slot[row] = bucket_slot(bucket, p.S);
    }
    if (row < 0) continue;
    const int nvec = p.H / 8;  // 16-byte vectors of 2-byte elements (H % 8 == 0)
    warp_copy_row(static_cast<const uint4*>(p.gather_hidden) + static_cast<int64_t>(pair / p.k) * nvec,
                  static_cast<uint4*>(p.gather_permuted) + static_cast<int64_t>(row) * nvec, nvec, lane);
  }
}

}  // namespace

cudaError_t launch_routing(const RoutingParams& p, cudaStream_t stream) {
  const int pairs = p.T * p.k;
  const size_t nbuckets = static_cast<size_t>(p.E) * (p.S + 1);
  if (p.zero_count < 0 || p.zero_count > 32 || (p.zero_count > 0 && p.zero_ints == nullptr)) return cudaErrorInvalidValue;
  if (routing_fits_one_block(pairs, static_cast<int64_t>(nbuckets)))
    return launch_kernel(routing_one_block_kernel, 1, kPlanThreads, 0, stream, p);
  if (p.gather_permuted != nullptr) return cudaErrorInvalidValue;  // only the one-block kernel gathers
  cudaError_t err = cudaMemsetAsync(p.bucket_counts, 0, nbuckets * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  if (pairs > 0) {
    err = launch_kernel(count_pairs_kernel, ceil_div(pairs, 256), 256, 0, stream, p);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(plan_kernel, 1, kPlanThreads, 0, stream, p);
}

}  // namespace moelora::cuda
