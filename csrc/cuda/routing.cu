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
  if (row < 0) return;
  if (p.gather_row_slot != nullptr) p.gather_row_slot[row] = bucket_slot(bucket, p.S);
  if (p.gather_row_token != nullptr) p.gather_row_token[row] = pair / p.k;
}

constexpr int kPlanThreads = 1024;
// cub's default (raking) scan: BLOCK_SCAN_WARP_SCANS made the routing kernels 1.2-2 µs slower (NOTES.md v10).
using PlanScan = cub::BlockScan<int, kPlanThreads>;

// Exclusive prefix sum of value(i) over i in [0, n), by one block: each thread sums a contiguous chunk, the
// block scans the chunk sums, then each thread calls emit(i, prefix, value(i)) for its chunk in order, and
// thread 0 emit(n, total, 0). A thread reads value(i) before its emit(i), and only for its own chunk, so emit
// may overwrite what value reads (the bucket offsets replace the counts in place).
template <typename ValueOf, typename Emit>
__device__ void block_prefix_sum(int n, ValueOf value, Emit emit, PlanScan::TempStorage& tmp) {
  const int chunk = ceil_div(n, kPlanThreads);
  const int begin = min(n, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(n, begin + chunk);
  int local = 0;
  for (int i = begin; i < end; ++i) local += value(i);
  int running, total;
  PlanScan(tmp).ExclusiveSum(local, running, total);
  for (int i = begin; i < end; ++i) {
    const int v = value(i);
    emit(i, running, v);
    running += v;
  }
  if (threadIdx.x == 0) emit(n, total, 0);
  __syncthreads();  // tmp is reused by the next scan; what emit wrote is read by the next one
}

// Offsets and tile tables from the bucket counts, by the whole block. `offs` holds the E * (S + 1) counts and
// one more entry (shared memory, or the global counts); the bucket offsets replace them, and every later table
// is computed from there: reading back the global tables just written would cost an L2 round trip per table.
__device__ void plan_from_counts(const RoutingParams& p, int* offs, PlanScan::TempStorage& tmp) {
  const int per_expert = p.S + 1;
  const int nbuckets = p.E * per_expert;

  for (int i = threadIdx.x; i < p.fill_count; i += blockDim.x) p.fill_words[i] = p.fill_value;
  block_prefix_sum(
      nbuckets, [&](int b) { return offs[b]; },
      [&](int b, int prefix, int) {
        offs[b] = prefix;
        p.bucket_offsets[b] = prefix;
      },
      tmp);
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) p.expert_offsets[e] = offs[e * per_expert];
  for (int i = 0; i < p.gemm_table_count; ++i)
    for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
      const int begin = offs[e * per_expert];
      write_expert_gemm_tables(p.gemm_tables[i], e, begin, offs[(e + 1) * per_expert] - begin);
    }
  block_prefix_sum(
      p.E, [&](int e) { return ceil_div(offs[(e + 1) * per_expert] - offs[e * per_expert], kTileRows); },
      [&](int e, int prefix, int) { p.expert_tile_prefix[e] = prefix; }, tmp);
  if (p.S > 0) {
    // Buckets of rows without an adapter (slot -1, the first of each expert) get no LoRA tiles. The LoRA
    // kernels look up an m-tile's bucket in lora_tile_segment instead of searching the prefix (one load, not
    // log2(buckets) dependent ones per work item).
    block_prefix_sum(
        nbuckets, [&](int b) { return b % per_expert == 0 ? 0 : ceil_div(offs[b + 1] - offs[b], kTileRows); },
        [&](int b, int prefix, int tiles) {
          p.lora_tile_prefix[b] = prefix;
          const int end = min(prefix + tiles, p.lora_tile_capacity);
          for (int t = prefix; t < end; ++t) p.lora_tile_segment[t] = b;
        },
        tmp);
  }
}

// The multi-kernel routing's plan: the counts staged in shared memory when they fit, else planned in place.
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(RoutingParams p) {
  pdl_begin();
  __shared__ PlanScan::TempStorage tmp;
  __shared__ int counts[kOneBlockMaxBuckets + 1];
  const int nbuckets = p.E * (p.S + 1);
  if (nbuckets > kOneBlockMaxBuckets) {
    plan_from_counts(p, p.bucket_counts, tmp);  // bucket_counts holds nbuckets + 1 entries
    return;
  }
  for (int b = threadIdx.x; b < nbuckets; b += blockDim.x) counts[b] = p.bucket_counts[b];
  __syncthreads();
  plan_from_counts(p, counts, tmp);
}

// The plan of a one-kernel routing, by one block: bucket counts from shared-memory atomics (no memset, no
// count kernel), then the tables. The atomics' order is arbitrary, as in count_pairs_kernel; the pair ranks it
// leaves (`ranks`) are only read by the permute kernel, which a gathering routing does not need.
__device__ void plan_in_shared_memory(const RoutingParams& p, bool ranks) {
  __shared__ PlanScan::TempStorage tmp;
  __shared__ int counts[kOneBlockMaxBuckets + 1];
  const int nbuckets = p.E * (p.S + 1);
  for (int b = threadIdx.x; b < nbuckets; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  for (int pair = threadIdx.x; pair < p.T * p.k; pair += blockDim.x) {
    const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
    if (bucket < 0) {
      if (ranks) p.pair_rank[pair] = -1;
      continue;
    }
    const int rank = atomicAdd(&counts[bucket], 1);
    if (ranks) p.pair_rank[pair] = rank;
  }
  __syncthreads();
  plan_from_counts(p, counts, tmp);
}

// The gather of a one-kernel routing: block `block` copies pairs [block * kPairs, + kPairs), kPlanThreads /
// kPairs threads per pair. It finds their sorted rows itself instead of waiting for the plan block: the row of
// pair i with bucket b is (pairs in buckets below b) + (pairs j < i in b), a count over all the pairs (at most
// kGatherMaxPairs ids, read from L2 by every block). That is bucket_offsets[b] plus i's place in b in pair
// order, so the rows agree with the plan's offsets and do not depend on atomics. The first piece of each
// hidden row is loaded before the count (the token is known without routing), so the two overlap.
constexpr int kGatherInFlight = 8;  // 16-byte loads per thread before the count
constexpr int kCountRounds = ceil_div(kGatherMaxPairs, kPlanThreads);

__device__ __forceinline__ int pair_key(const RoutingParams& p, int pair) {  // bucket, INT_MAX when dropped
  const int bucket = pair_bucket(p.topk_ids, p.token_slots, pair, p.k, p.E, p.S);
  return bucket < 0 ? INT_MAX : bucket;
}

template <int kPairs>
__device__ void gather_pairs(const RoutingParams& p, int block) {
  constexpr int kThreads = kPlanThreads / kPairs;  // per pair
  // A thread's counts for the block's pairs, four per register: each is at most kCountRounds, and a warp's sum
  // of one at most 32 * kCountRounds < 256, so the bytes never carry into each other.
  constexpr int kPacked = kPairs / 4;
  static_assert(kPairs % 4 == 0 && 32 * kCountRounds < 256, "byte-packed counts");
  __shared__ int key_s[kPairs], row_s[kPairs];
  __shared__ int partial[kPlanThreads / 32][kPairs];
  const int pairs = p.T * p.k, first = block * kPairs;
  const int j = threadIdx.x / kThreads, t = threadIdx.x % kThreads;
  const int pair = first + j;  // the pair this thread copies
  const int nvec = p.H / 8;
  const uint4* src = gather_source(p, min(pair, pairs - 1));
  uint4 v[kGatherInFlight];
#pragma unroll
  for (int u = 0; u < kGatherInFlight; ++u)
    if (pair < pairs && t + kThreads * u < nvec) v[u] = src[t + kThreads * u];

  int other_key[kCountRounds];  // the keys this thread counts, loaded together with the block's own
#pragma unroll
  for (int c = 0; c < kCountRounds; ++c) {
    const int other = threadIdx.x + c * kPlanThreads;
    other_key[c] = other < pairs ? pair_key(p, other) : INT_MAX;  // INT_MAX counts for no kept pair
  }
  if (static_cast<int>(threadIdx.x) < kPairs)
    key_s[threadIdx.x] = first + static_cast<int>(threadIdx.x) < pairs ? pair_key(p, first + threadIdx.x) : INT_MAX;
  __syncthreads();
  unsigned count[kPacked] = {};
#pragma unroll
  for (int c = 0; c < kCountRounds; ++c) {
    const int other = threadIdx.x + c * kPlanThreads, ko = other_key[c];
    if (c * kPlanThreads < pairs) {  // the same in every thread
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int ki = key_s[i];
        count[i / 4] += static_cast<unsigned>(ko < ki || (ko == ki && other < first + i)) << (8 * (i % 4));
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < kPacked; ++q) {
    const unsigned sum = __reduce_add_sync(0xffffffffu, count[q]);
    if (lane < 4) partial[warp][4 * q + lane] = (sum >> (8 * lane)) & 0xffu;
  }
  __syncthreads();
  if (warp < kPairs) {  // warp i sums pair i's row over the warps' counts
    const int row = __reduce_add_sync(0xffffffffu, partial[lane][warp]);
    if (lane == 0) {
      const int key = key_s[warp];
      row_s[warp] = key == INT_MAX ? -1 : row;
      if (first + warp < pairs) record_gathered_pair(p, first + warp, row_s[warp], key);
    }
  }
  __syncthreads();
  const int row = row_s[j];
  if (pair >= pairs || row < 0) return;
  uint4* dst = gather_target(p, row);
#pragma unroll
  for (int u = 0; u < kGatherInFlight; ++u)
    if (t + kThreads * u < nvec) dst[t + kThreads * u] = v[u];
  const int done = kThreads * kGatherInFlight;
  if (done < nvec) {  // rows longer than the first piece, with its loads in flight before their stores
    const int rest = nvec - done;
    for (int c0 = t; c0 < rest; c0 += kThreads * kGatherInFlight) {
#pragma unroll
      for (int u = 0; u < kGatherInFlight; ++u)
        if (c0 + kThreads * u < rest) v[u] = src[done + c0 + kThreads * u];
#pragma unroll
      for (int u = 0; u < kGatherInFlight; ++u)
        if (c0 + kThreads * u < rest) dst[done + c0 + kThreads * u] = v[u];
    }
  }
}

// Routing up to kOneBlockMaxPairs pairs and kOneBlockMaxBuckets buckets in one launch: block 0 plans; when the
// routing gathers, every other block copies kPairs rows (no block waits for another).
template <int kPairs>
__global__ void __launch_bounds__(kPlanThreads) routing_one_kernel(RoutingParams p) {
  pdl_begin();
  if (blockIdx.x == 0)
    plan_in_shared_memory(p, p.gather_permuted == nullptr);
  else
    gather_pairs<kPairs>(p, blockIdx.x - 1);
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
  for (int i = threadIdx.x; i < p.fill_count; i += blockDim.x) p.fill_words[i] = p.fill_value;
  // The gather's first piece of this warp's first row (pair `warp`), loaded before the routing: the source row
  // is the pair's token, known without it, so this load overlaps the ids' round trip.
  const bool gather = p.gather_permuted != nullptr;  // the rows; the maps too when only gather_pair_row is set
  const bool maps = p.gather_pair_row != nullptr;
  const int nvec = p.H / 8;
  uint4 first_piece[kCopyInFlight];
  if (gather && warp < pairs) {
    const uint4* src = gather_source(p, warp);
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u)
      if (lane + 32 * u < nvec) first_piece[u] = src[lane + 32 * u];
  }

  // Lane j: pair j. Dropped pairs (and lanes past the pairs) get key INT_MAX, above every bucket.
  const FewPairsLane pl = few_pairs_lane(p.topk_ids, p.token_slots, lane, pairs, p.k, p.E, p.S);
  const int bucket = pl.bucket, key = pl.key, expert = pl.expert;
  const bool first_of_expert = pl.first_of_expert;
  const bool lora_tile = pl.leads_lora_tile;  // this pair stands for its bucket's LoRA tile

  // This lane's pair: sorted row = pairs in lower buckets + earlier pairs of its bucket.
  int lower = 0, lora_tiles_lower = 0;
  for (int j = 0; j < pairs; ++j) {  // same trip count in every lane (the shuffles)
    const int kj = __shfl_sync(0xffffffffu, key, j);
    const bool tj = __shfl_sync(0xffffffffu, lora_tile, j);
    lower += kj < key;
    lora_tiles_lower += tj && kj < key;
  }
  const int rank = pl.rank;
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

  if (!maps) return;
  // The permute stage, one warp per pair (as permute.cu).
  for (int pair = warp; pair < pairs; pair += kFewPairsThreads / 32) {
    const int prow = __shfl_sync(0xffffffffu, row, pair);
    const int pbucket = __shfl_sync(0xffffffffu, bucket, pair);
    if (lane == 0) record_gathered_pair(p, pair, prow, pbucket);
    if (prow < 0 || !gather) continue;
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
  if (p.fill_count < 0 || (p.fill_count > 0 && p.fill_words == nullptr)) return cudaErrorInvalidValue;
  if (p.few_pairs_max < 0 || p.few_pairs_max > kFewPairsMax) return cudaErrorInvalidValue;
  // The maps without the rows: the few-pairs kernel's alone.
  if (p.gather_permuted == nullptr && p.gather_pair_row != nullptr && pairs > p.few_pairs_max)
    return cudaErrorInvalidValue;
  if (pairs <= p.few_pairs_max) return launch_kernel(routing_few_pairs_kernel, 1, kFewPairsThreads, 0, stream, p);
  if (routing_in_one_kernel(pairs, static_cast<int64_t>(nbuckets), p.few_pairs_max)) {
    if (p.gather_permuted == nullptr) return launch_kernel(routing_one_kernel<16>, 1, kPlanThreads, 0, stream, p);
    if (!routing_can_gather(pairs, static_cast<int64_t>(nbuckets), p.few_pairs_max)) return cudaErrorInvalidValue;
    if (p.gather_block_pairs == 8)
      return launch_kernel(routing_one_kernel<8>, 1 + ceil_div(pairs, 8), kPlanThreads, 0, stream, p);
    if (p.gather_block_pairs != 0 && p.gather_block_pairs != 16) return cudaErrorInvalidValue;
    return launch_kernel(routing_one_kernel<16>, 1 + ceil_div(pairs, 16), kPlanThreads, 0, stream, p);
  }
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
