// Routing on the device: count the (token, expert) pairs per (expert, adapter-slot) bucket, then one
// block turns the counts into offsets and tile prefixes. No host sync: every size the host needs is an
// upper bound known from the shapes (T * k rows). The fewest pairs (decode) run as one barrier-free kernel,
// small problems as a single one-block kernel that counts in shared memory, larger ones as memset + count
// kernel + plan kernel.
#include <cub/block/block_scan.cuh>

#include <climits>

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

// The permute stage folded into a one-kernel routing (RoutingParams::gather_permuted): where pair `pair`'s
// hidden row comes from and sorted row `row` goes, in 16-byte vectors (H / 8 of them, H % 8 == 0), and the
// pair's bookkeeping (by one lane).
__device__ __forceinline__ const uint4* gather_source(const RoutingParams& p, int pair) {
  return static_cast<const uint4*>(p.gather_hidden) + static_cast<int64_t>(pair / p.k) * (p.H / 8);
}
__device__ __forceinline__ uint4* gather_target(const RoutingParams& p, int row) {
  return static_cast<uint4*>(p.gather_permuted) + static_cast<int64_t>(row) * (p.H / 8);
}
__device__ __forceinline__ void record_gathered_pair(const RoutingParams& p, int pair, int row, int bucket) {
  p.gather_pair_row[pair] = row;
  if (p.gather_row_slot != nullptr && row >= 0) p.gather_row_slot[row] = bucket_slot(bucket, p.S);
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
    if (lane == 0) record_gathered_pair(p, pair, row, bucket);
    if (row >= 0) warp_copy_row(gather_source(p, pair), gather_target(p, row), p.H / 8, lane);
  }
}

// Routing of at most kFewPairsMax pairs (decode: T <= 4 at top-k <= 8) without block barriers. Every warp
// holds all the pairs' buckets, one per lane, so each table entry is a count over the pairs that a lane
// computes on its own: bucket_offsets[b] = pairs in buckets below b, and (a bucket holds at most
// kFewPairsMax < kTileRows rows, so one tile) the tile prefixes count the distinct experts / adapter buckets
// below. The one-block kernel above spends its 6.7-9.5 µs on ~15 barriers over 1024 threads (NOTES.md v11);
// this one takes 3.0-4.3 µs at T=1 (v12), a launch and the ids' round trip.
// A pair's rank in its bucket is the number of earlier pairs in it: deterministic, unlike the atomics.
constexpr int kFewPairsThreads = 256;
static_assert(kFewPairsMax <= 32 && kFewPairsMax <= kTileRows, "one pair per lane, one tile per bucket");

__global__ void __launch_bounds__(kFewPairsThreads) routing_few_pairs_kernel(RoutingParams p) {
  pdl_begin();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int pairs = p.T * p.k;
  const int per_expert = p.S + 1, nbuckets = p.E * per_expert;
  if (static_cast<int>(threadIdx.x) < p.zero_count) p.zero_ints[threadIdx.x] = 0;
  // The gather's first piece of this warp's first row (pair `warp`), loaded before the routing: the source row
  // is the pair's token, known without it, so this load overlaps the ids' round trip.
  const bool gather = p.gather_permuted != nullptr;
  const int nvec = p.H / 8;
  uint4 first_piece[kCopyInFlight];
  if (gather && warp < pairs) {
    const uint4* src = gather_source(p, warp);
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u)
      if (lane + 32 * u < nvec) first_piece[u] = src[lane + 32 * u];
  }

  // Lane j: pair j. Dropped pairs (and lanes past the pairs) get key INT_MAX, above every bucket.
  const int bucket = lane < pairs ? pair_bucket(p.topk_ids, p.token_slots, lane, p.k, p.E, p.S) : -1;
  const int key = bucket < 0 ? INT_MAX : bucket;
  const int expert = bucket < 0 ? INT_MAX : bucket / per_expert;
  const unsigned earlier = (1u << lane) - 1;
  const unsigned same_bucket = __match_any_sync(0xffffffffu, key);
  const unsigned same_expert = __match_any_sync(0xffffffffu, expert);
  const bool first_of_expert = bucket >= 0 && (same_expert & earlier) == 0;
  // The first pair of a bucket with an adapter stands for that bucket's LoRA tile.
  const bool lora_tile = bucket >= 0 && (same_bucket & earlier) == 0 && bucket_slot(bucket, p.S) >= 0;

  // This lane's pair: sorted row = pairs in lower buckets + earlier pairs of its bucket.
  int lower = 0, lora_tiles_lower = 0;
  for (int j = 0; j < pairs; ++j) {  // same trip count in every lane (the shuffles)
    const int kj = __shfl_sync(0xffffffffu, key, j);
    const bool tj = __shfl_sync(0xffffffffu, lora_tile, j);
    lower += kj < key;
    lora_tiles_lower += tj && kj < key;
  }
  const int rank = __popc(same_bucket & earlier);
  const int row = bucket < 0 ? -1 : lower + rank;
  if (warp == 0 && lane < pairs) {
    p.pair_rank[lane] = bucket < 0 ? -1 : rank;
    if (p.lora_tile_segment != nullptr && lora_tile && lora_tiles_lower < p.lora_tile_capacity)
      p.lora_tile_segment[lora_tiles_lower] = bucket;
  }

  // The tables: kEntries entries per thread per pass (bucket b = base + u * kFewPairsThreads + lane), each a
  // count over the pairs; the pairs are the outer loop, so each pair is shuffled once per pass.
  constexpr int kEntries = 8;
  for (int base = warp * 32; base <= nbuckets; base += kFewPairsThreads * kEntries) {  // whole warps
    int rows[kEntries] = {}, tiles[kEntries] = {};
    for (int j = 0; j < pairs; ++j) {
      const int kj = __shfl_sync(0xffffffffu, key, j);
      const int tj = __shfl_sync(0xffffffffu, lora_tile ? 1 : 0, j);
#pragma unroll
      for (int u = 0; u < kEntries; ++u) {
        const bool below = kj < base + u * kFewPairsThreads + lane;
        rows[u] += below;
        tiles[u] += below ? tj : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < kEntries; ++u) {
      const int b = base + u * kFewPairsThreads + lane;
      if (b > nbuckets) break;
      p.bucket_offsets[b] = rows[u];
      if (p.lora_tile_prefix != nullptr) p.lora_tile_prefix[b] = tiles[u];
    }
  }
  // Per expert e: rows and (distinct experts = tiles) below e, and below e + 1 (the CUTLASS tables' row count).
  for (int e0 = warp * 32; e0 <= p.E; e0 += kFewPairsThreads) {  // whole warps
    const int me = e0 + lane;
    int rows = 0, tiles = 0, rows_next = 0;
    for (int j = 0; j < pairs; ++j) {
      const int ej = __shfl_sync(0xffffffffu, expert, j);
      const bool fj = __shfl_sync(0xffffffffu, first_of_expert, j);
      rows += ej < me;
      tiles += fj && ej < me;
      rows_next += ej <= me;
    }
    if (me > p.E) continue;
    p.expert_offsets[me] = rows;
    p.expert_tile_prefix[me] = tiles;
    if (me < p.E)
      for (int i = 0; i < p.gemm_table_count; ++i) write_expert_gemm_tables(p.gemm_tables[i], me, rows, rows_next - rows);
  }

  if (!gather) return;
  // The permute stage, one warp per pair (as routing_one_block_kernel).
  for (int pair = warp; pair < pairs; pair += kFewPairsThreads / 32) {
    const int prow = __shfl_sync(0xffffffffu, row, pair);
    const int pbucket = __shfl_sync(0xffffffffu, bucket, pair);
    if (lane == 0) record_gathered_pair(p, pair, prow, pbucket);
    if (prow < 0) continue;
    const uint4* src = gather_source(p, pair);
    uint4* dst = gather_target(p, prow);
    int done = 0;
    if (pair == warp) {  // the first piece is in registers
#pragma unroll
      for (int u = 0; u < kCopyInFlight; ++u)
        if (lane + 32 * u < nvec) dst[lane + 32 * u] = first_piece[u];
      done = 32 * kCopyInFlight;
    }
    if (done < nvec) warp_copy_row(src + done, dst + done, nvec - done, lane);
  }
}

}  // namespace

cudaError_t launch_routing(const RoutingParams& p, cudaStream_t stream) {
  const int pairs = p.T * p.k;
  const size_t nbuckets = static_cast<size_t>(p.E) * (p.S + 1);
  if (p.zero_count < 0 || p.zero_count > 32 || (p.zero_count > 0 && p.zero_ints == nullptr)) return cudaErrorInvalidValue;
  if (p.few_pairs_max < 0 || p.few_pairs_max > kFewPairsMax) return cudaErrorInvalidValue;
  if (pairs <= p.few_pairs_max) return launch_kernel(routing_few_pairs_kernel, 1, kFewPairsThreads, 0, stream, p);
  if (routing_in_one_kernel(pairs, static_cast<int64_t>(nbuckets), p.few_pairs_max))
    return launch_kernel(routing_one_block_kernel, 1, kPlanThreads, 0, stream, p);
  if (p.gather_permuted != nullptr) return cudaErrorInvalidValue;  // only a one-kernel routing gathers
  cudaError_t err = cudaMemsetAsync(p.bucket_counts, 0, nbuckets * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  if (pairs > 0) {
    err = launch_kernel(count_pairs_kernel, ceil_div(pairs, 256), 256, 0, stream, p);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(plan_kernel, 1, kPlanThreads, 0, stream, p);
}

}  // namespace moelora::cuda
