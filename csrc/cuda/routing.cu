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
using PlanScan = cub::BlockScan<int, kPlanThreads>;

// Exclusive prefix sum of value(i) for i in [0, n) into out[0..n], by one block: each thread sums a
// contiguous chunk, the block scans the chunk sums, then each thread writes its chunk and calls
// emit(i, offset_i, value_i). `out` may hold the values themselves (in place): a thread reads each of its
// values before overwriting it, and no thread reads another's.
template <typename ValueOf, typename Emit>
__device__ void block_prefix_sum(int n, ValueOf value, int* out, Emit emit, PlanScan::TempStorage& tmp) {
  const int chunk = ceil_div(n, kPlanThreads);
  const int begin = min(n, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(n, begin + chunk);
  int local = 0;
  for (int i = begin; i < end; ++i) local += value(i);
  int running, total;
  PlanScan(tmp).ExclusiveSum(local, running, total);
  for (int i = begin; i < end; ++i) {
    const int v = value(i);
    out[i] = running;
    emit(i, running, v);
    running += v;
  }
  if (threadIdx.x == 0) out[n] = total;
  __syncthreads();  // tmp is reused by the next scan; out is read by the next one
}

// Offsets and tile tables, by the whole block. offs[0 .. E * (S + 1)] holds the bucket counts on entry and
// the bucket offsets on exit; it is the block's working copy (shared memory in the one-block kernel, so
// the later phases read it without global round trips), copied to p.bucket_offsets unless it is that.
__device__ void plan_in_place(const RoutingParams& p, int* offs, PlanScan::TempStorage& tmp) {
  const int per_expert = p.S + 1;
  const int nbuckets = p.E * per_expert;
  int* global_offsets = offs == p.bucket_offsets ? nullptr : p.bucket_offsets;
  block_prefix_sum(nbuckets, [&](int b) { return offs[b]; }, offs, [&](int b, int off, int) {
    if (global_offsets != nullptr) global_offsets[b] = off;
  }, tmp);
  if (global_offsets != nullptr && threadIdx.x == 0) global_offsets[nbuckets] = offs[nbuckets];
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) p.expert_offsets[e] = offs[e * per_expert];
  auto rows_of = [&](int b) { return offs[b + 1] - offs[b]; };
  block_prefix_sum(
      p.E, [&](int e) { return ceil_div(offs[(e + 1) * per_expert] - offs[e * per_expert], kTileRows); },
      p.expert_tile_prefix, [](int, int, int) {}, tmp);
  if (p.S > 0) {
    // Buckets of rows without an adapter (slot -1, the first of each expert) get no LoRA tiles. Each tile's
    // bucket is written as the prefix is: the LoRA kernels look an m-tile's bucket up there (one load, not
    // log2(buckets) dependent ones per work item).
    block_prefix_sum(
        nbuckets, [&](int b) { return b % per_expert == 0 ? 0 : ceil_div(rows_of(b), kTileRows); },
        p.lora_tile_prefix, [&](int b, int first, int tiles) {
          const int end = min(first + tiles, p.lora_tile_capacity);
          for (int t = first; t < end; ++t) p.lora_tile_segment[t] = b;
        }, tmp);
  }
}

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(RoutingParams p) {
  pdl_begin();
  __shared__ PlanScan::TempStorage tmp;
  // The counts go to bucket_offsets first (the scan runs in place there; bucket_counts has no room for the
  // total).
  const int nbuckets = p.E * (p.S + 1);
  for (int b = threadIdx.x; b < nbuckets; b += blockDim.x) p.bucket_offsets[b] = p.bucket_counts[b];
  __syncthreads();
  plan_in_place(p, p.bucket_offsets, tmp);
}

// Decode-sized routing in one launch: no memset, no count kernel. The pair ranks come from shared-memory
// atomics (their order is arbitrary, as in count_pairs_kernel; it never changes the math), and the plan
// works on shared memory (one_block_smem_bytes: the bucket counts -> offsets, then the gathered pairs' rows).
constexpr int kOneBlockPairsPerThread = kOneBlockMaxPairs / kPlanThreads;
static_assert(kOneBlockMaxPairs % kPlanThreads == 0, "pairs per thread");

size_t one_block_smem_bytes(int pairs, int nbuckets, bool gather) {
  return sizeof(int) * (static_cast<size_t>(nbuckets) + 1 + (gather ? pairs : 0));
}

__global__ void __launch_bounds__(kPlanThreads) routing_one_block_kernel(RoutingParams p) {
  pdl_begin();
  __shared__ PlanScan::TempStorage tmp;
  extern __shared__ int one_block_smem[];
  int* offs = one_block_smem;  // [nbuckets + 1]
  const int nbuckets = p.E * (p.S + 1);
  const int pairs = p.T * p.k;
  for (int b = threadIdx.x; b <= nbuckets; b += blockDim.x) offs[b] = 0;
  // Every pair's ids are loaded before the first atomic (one memory round trip, not one per pair of a thread).
  int bucket[kOneBlockPairsPerThread];
#pragma unroll
  for (int u = 0; u < kOneBlockPairsPerThread; ++u) {
    const int pair = threadIdx.x + u * kPlanThreads;
    bucket[u] = pair < pairs ? pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S) : -1;
  }
  __syncthreads();
  int rank[kOneBlockPairsPerThread];
#pragma unroll
  for (int u = 0; u < kOneBlockPairsPerThread; ++u) {
    const int pair = threadIdx.x + u * kPlanThreads;
    rank[u] = bucket[u] < 0 ? -1 : atomicAdd(&offs[bucket[u]], 1);
    if (pair < pairs) p.pair_rank[pair] = rank[u];
  }
  __syncthreads();
  plan_in_place(p, offs, tmp);  // ends with a barrier
  if (p.gather_permuted == nullptr) return;
  // The permute stage (permute.cu): each pair's sorted row, then one warp per pair copies the token's
  // hidden row there.
  int* row_of_pair = offs + nbuckets + 1;  // [pairs]
#pragma unroll
  for (int u = 0; u < kOneBlockPairsPerThread; ++u) {
    const int pair = threadIdx.x + u * kPlanThreads;
    if (pair >= pairs) continue;
    const int row = bucket[u] < 0 ? -1 : offs[bucket[u]] + rank[u];
    row_of_pair[pair] = row;
    p.gather_pair_row[pair] = row;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int pair = warp; pair < pairs; pair += kPlanThreads / 32) {
    const int row = row_of_pair[pair];
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
  if (routing_fits_one_block(pairs, static_cast<int64_t>(nbuckets))) {
    const size_t smem = one_block_smem_bytes(pairs, static_cast<int>(nbuckets), p.gather_permuted != nullptr);
    // A host-side attribute (not a stream operation, so fine during graph capture), set on every launch so
    // that it holds on whichever device is current.
    cudaError_t err = cudaFuncSetAttribute(routing_one_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(one_block_smem_bytes(kOneBlockMaxPairs,
                                                                                 kOneBlockMaxBuckets, true)));
    return err != cudaSuccess ? err : launch_kernel(routing_one_block_kernel, 1, kPlanThreads, smem, stream, p);
  }
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
