// Finalize: un-permute and reduce. Each token sums its k expert outputs weighted by topk_weights, in
// j order, in fp32: no atomics, so the result is the same on every run. With y_delta (fc2's LoRA delta, written
// beside the base GEMM when the LoRA is overlapped) each row is y + y_delta, summed in fp32.
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kInFlight = 8;  // experts of a token whose rows are loaded before they are summed

// The sorted rows and weights of experts j0 .. j0 + kInFlight - 1 of token t (row -1, weight 0 past k), through
// L2 (ld.global.cg): the first group is read before the PDL wait (pdl.cuh), so no L1 line from an earlier call
// may answer.
template <typename T>
__device__ __forceinline__ void load_group(const FinalizeParams& p, int t, int j0, int (&row)[kInFlight],
                                           float (&w)[kInFlight]) {
#pragma unroll
  for (int u = 0; u < kInFlight; ++u) {
    const bool in = j0 + u < p.k;
    const int64_t i = static_cast<int64_t>(t) * p.k + j0 + u;
    row[u] = in ? __ldcg(p.pair_row + i) : -1;
    w[u] = !in                  ? 0.f
           : p.topk_weights_fp32 ? __ldcg(static_cast<const float*>(p.topk_weights) + i)
                                 : low_float<T>(__ldcg(static_cast<const unsigned short*>(p.topk_weights) + i));
  }
}

template <typename T, bool kDelta>
__global__ void finalize_kernel(FinalizeParams p) {
  const int t = blockIdx.x;
  // The first group's rows and weights before the wait: the routing and the caller wrote them before the
  // previous kernel (fc2's GEMM or expand) ran, so under PDL only the y loads are left after it.
  int row0[kInFlight];
  float w0[kInFlight];
  load_group<T>(p, t, 0, row0, w0);
  pdl_begin();
  const auto* y = static_cast<const T*>(p.y);
  const auto* y_delta = static_cast<const T*>(p.y_delta);
  auto* out = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.H);
  for (int c = threadIdx.x; c < p.H / 8; c += blockDim.x) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // kInFlight experts at a time: their row ids, then their y slices, are loaded together (two round
    // trips per group instead of two per expert); the sum still runs in j order.
    for (int j0 = 0; j0 < p.k; j0 += kInFlight) {
      int row[kInFlight];
      float w[kInFlight];
      if (j0 == 0) {
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) row[u] = row0[u], w[u] = w0[u];
      } else {
        load_group<T>(p, t, j0, row, w);
      }
      Vec8<T> v[kInFlight], dv[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)  // row < 0: expert not on this GPU / out of range, contributes nothing
        if (row[u] >= 0) {
          v[u] = reinterpret_cast<const Vec8<T>*>(y + static_cast<int64_t>(row[u]) * p.H)[c];
          if constexpr (kDelta)
            dv[u] = reinterpret_cast<const Vec8<T>*>(y_delta + static_cast<int64_t>(row[u]) * p.H)[c];
        }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (row[u] < 0) continue;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float x = to_float(v[u].v[i]);
          if constexpr (kDelta) x += to_float(dv[u].v[i]);
          acc[i] += w[u] * x;
        }
      }
    }
    Vec8<T> o;
#pragma unroll
    for (int i = 0; i < 8; ++i) o.v[i] = from_float<T>(acc[i]);
    out[c] = o;
  }
}

}  // namespace

cudaError_t launch_finalize(const FinalizeParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const int threads = std::min(256, std::max(32, ceil_div(p.H / 8, 32) * 32));
  const bool delta = p.y_delta != nullptr;
  if (p.dtype == DType::BF16)
    return launch_kernel(delta ? finalize_kernel<__nv_bfloat16, true> : finalize_kernel<__nv_bfloat16, false>, p.T,
                         threads, 0, stream, p);
  return launch_kernel(delta ? finalize_kernel<__half, true> : finalize_kernel<__half, false>, p.T, threads, 0,
                       stream, p);
}

}  // namespace moelora::cuda
