// Device-side bucket of a (token, expert) pair, shared by routing.cu and permute.cu so both agree.
#pragma once

namespace moelora::cuda {

// Bucket e * (S + 1) + (slot + 1), or -1 when the expert id is outside [0, E) (for example -1 for an
// expert that lives on another GPU). Slot ids outside [-1, S) count as "no adapter": reading them
// would be out of bounds, and checking them would need a host sync.
__device__ __forceinline__ int pair_bucket(const int* topk_ids, const int* token_slots, int pair, int k, int E,
                                           int S) {
  const int e = topk_ids[pair];
  if (e < 0 || e >= E) return -1;
  int slot = token_slots == nullptr ? -1 : token_slots[pair / k];
  if (slot < -1 || slot >= S) slot = -1;
  return e * (S + 1) + slot + 1;
}

}  // namespace moelora::cuda
