// Device-side bucket of a (token, expert) pair, shared by routing.cu and permute.cu so both agree, the few-pairs
// routing's per-lane view (shared with expert_gemv.cu's routed fc1), and the
// warp row copy of the few-pairs routing's gather (routing.cu).
#pragma once
#include <climits>
#include <cstdint>
#include <cuda_runtime.h>

#include "stages.h"

namespace moelora::cuda {

// Bucket e * (S + 1) + (slot + 1), or -1 when the expert id is outside [0, E) (for example -1 for an
// expert that lives on another GPU). Slot ids outside [-1, S) count as "no adapter": reading them
// would be out of bounds, and checking them would need a host sync.
// int64 ids are range-checked before narrowing, so 2^32 + 3 is dropped, not read as expert 3.
// Both loads are issued before either value is tested: a slot load behind the expert's range check would be
// a second memory round trip (at decode, most of this function's time).
__device__ __forceinline__ int pair_bucket(TopkIds topk_ids, const int* token_slots, int pair, int k, int E, int S) {
  const int64_t e = topk_ids.int64 ? static_cast<const int64_t*>(topk_ids.data)[pair]
                                   : static_cast<const int*>(topk_ids.data)[pair];
  int slot = token_slots == nullptr ? -1 : token_slots[pair / k];
  if (e < 0 || e >= E) return -1;
  if (slot < -1 || slot >= S) slot = -1;
  return static_cast<int>(e) * (S + 1) + slot + 1;
}

// The adapter slot of bucket b (pair_bucket's inverse for the slot; -1: no adapter).
__device__ __forceinline__ int bucket_slot(int bucket, int S) { return bucket % (S + 1) - 1; }

// The few-pairs routing's view of one pair per lane (lane j: pair j; every lane of the warp calls it): the pair's
// bucket, its sort key and expert (INT_MAX for dropped pairs and lanes past the pairs, above every bucket), and
// the lanes sharing its bucket / expert. Shared by routing.cu's few-pairs kernel and expert_gemv.cu's fc1 that
// routes its own rows beside it, so both sort the pairs alike. Derived from those: whether the pair is the first
// of its expert, whether it leads its bucket's LoRA tile (the first pair of a bucket with an adapter), and its rank
// in its bucket (the earlier pairs in it: deterministic, unlike atomics).
struct FewPairsLane {
  int bucket, key, expert;
  unsigned earlier, same_bucket, same_expert;
  bool first_of_expert, leads_lora_tile;
  int rank;
};
__device__ __forceinline__ FewPairsLane few_pairs_lane(TopkIds topk_ids, const int* token_slots, int lane, int pairs,
                                                       int k, int E, int S) {
  FewPairsLane l;
  l.bucket = lane < pairs ? pair_bucket(topk_ids, token_slots, lane, k, E, S) : -1;
  l.key = l.bucket < 0 ? INT_MAX : l.bucket;
  l.expert = l.bucket < 0 ? INT_MAX : l.bucket / (S + 1);
  l.earlier = (1u << lane) - 1;
  l.same_bucket = __match_any_sync(0xffffffffu, l.key);
  l.same_expert = __match_any_sync(0xffffffffu, l.expert);
  l.first_of_expert = l.bucket >= 0 && (l.same_expert & l.earlier) == 0;
  l.rank = __popc(l.same_bucket & l.earlier);
  l.leads_lora_tile = l.bucket >= 0 && l.rank == 0 && bucket_slot(l.bucket, S) >= 0;
  return l;
}

// One warp copies nvec 16-byte vectors, 8 loads per lane in flight before their stores (a load -> store
// loop would wait one memory round trip per 512 bytes).
constexpr int kCopyInFlight = 8;
__device__ __forceinline__ void warp_copy_row(const uint4* src, uint4* dst, int nvec, int lane) {
  for (int c0 = lane; c0 < nvec; c0 += 32 * kCopyInFlight) {
    uint4 v[kCopyInFlight];
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u)
      if (c0 + 32 * u < nvec) v[u] = src[c0 + 32 * u];
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u)
      if (c0 + 32 * u < nvec) dst[c0 + 32 * u] = v[u];
  }
}

}  // namespace moelora::cuda
