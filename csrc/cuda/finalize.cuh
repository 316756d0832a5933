// One 8-column vector of the finalize (out[t] = sum_j topk_weights[t, j] * y[pair_row[t, j]], in j order, fp32),
// shared by the finalize kernel (finalize.cu) and the decode GEMV that folds the finalize in (expert_gemv.cu), so
// both give the same bits.
#pragma once
#include "cuda_utils.cuh"
#include "stages.h"

namespace moelora::cuda {

constexpr int kFinalizeInFlight = 8;  // experts of a token whose rows are loaded before they are summed

// Vector c (columns 8c .. 8c + 7) of token t. kFromL2: y was written by other CTAs of the running launch, so its
// loads skip L1 (ld.global.cg).
template <typename T, bool kFromL2 = false>
__device__ __forceinline__ Vec8<T> finalize_vector(const FinalizeParams& p, int t, int c) {
  const auto* y = static_cast<const T*>(p.y);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  // kFinalizeInFlight experts at a time: their row ids, then their y slices, are loaded together (two round
  // trips per group instead of two per expert); the sum still runs in j order.
  for (int j0 = 0; j0 < p.k; j0 += kFinalizeInFlight) {
    int row[kFinalizeInFlight];
    float w[kFinalizeInFlight];
    Vec8<T> v[kFinalizeInFlight];
#pragma unroll
    for (int u = 0; u < kFinalizeInFlight; ++u) {
      const bool in = j0 + u < p.k;
      row[u] = in ? p.pair_row[t * p.k + j0 + u] : -1;
      w[u] = !in ? 0.f
             : p.topk_weights_fp32 ? static_cast<const float*>(p.topk_weights)[t * p.k + j0 + u]
                                   : to_float(static_cast<const T*>(p.topk_weights)[t * p.k + j0 + u]);
    }
#pragma unroll
    for (int u = 0; u < kFinalizeInFlight; ++u)  // row < 0: expert not on this GPU / out of range, contributes nothing
      if (row[u] >= 0) {
        const auto* src = reinterpret_cast<const Vec8<T>*>(y + static_cast<int64_t>(row[u]) * p.H) + c;
        if constexpr (kFromL2) {
          const uint4 bits = __ldcg(reinterpret_cast<const uint4*>(src));
          v[u] = *reinterpret_cast<const Vec8<T>*>(&bits);
        } else {
          v[u] = *src;
        }
      }
#pragma unroll
    for (int u = 0; u < kFinalizeInFlight; ++u) {
      if (row[u] < 0) continue;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w[u] * to_float(v[u].v[i]);
    }
  }
  Vec8<T> o;
#pragma unroll
  for (int i = 0; i < 8; ++i) o.v[i] = from_float<T>(acc[i]);
  return o;
}

}  // namespace moelora::cuda
