// Gated activation between fc1 and fc2: h = act(gate) * up, with gate = gu[:, :I], up = gu[:, I:].
// SiLU gives SwiGLU, exact (erf) GELU gives GeGLU. fp32 math, 16-byte accesses (I % 8 == 0).
// With gu_delta (fc1's LoRA delta, written beside the base GEMM when the LoRA is overlapped) gate and up are
// gu + gu_delta, summed in fp32.
#include "activation.cuh"
#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kInFlight = 4;                   // 16-byte gate and up vectors per lane loaded before their stores
constexpr int kItemVecs = 32 * kInFlight;      // vectors of a row per work item (one warp)

// Item `item` of row `row`: kItemVecs vectors of its h columns, by one warp; h is stored only when `store`.
template <typename T, ActivationKind kKind, bool kDelta = false>
__device__ __forceinline__ void activation_item(const ActivationParams& p, int64_t row, int item, int lane,
                                                bool store = true) {
  const int vecs_per_row = p.I / 8;
  const int c0 = item * kItemVecs + lane;
  const auto* gate = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.gu) + row * 2 * p.I);
  const auto* up = gate + vecs_per_row;
  auto* h = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.h) + row * p.I);
  Vec8<T> g[kInFlight], u[kInFlight], dg[kInFlight], du[kInFlight];
#pragma unroll
  for (int i = 0; i < kInFlight; ++i)
    if (c0 + 32 * i < vecs_per_row) {
      g[i] = gate[c0 + 32 * i];
      u[i] = up[c0 + 32 * i];
      if constexpr (kDelta) {  // the delta's row has gu's layout: gate columns, then up columns
        const auto* delta = reinterpret_cast<const Vec8<T>*>(static_cast<const T*>(p.gu_delta) + row * 2 * p.I);
        dg[i] = delta[c0 + 32 * i];
        du[i] = delta[vecs_per_row + c0 + 32 * i];
      }
    }
#pragma unroll
  for (int i = 0; i < kInFlight; ++i)
    if (store && c0 + 32 * i < vecs_per_row) {
      Vec8<T> o;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if constexpr (kDelta)
          o.v[e] = from_float<T>(gated_value_fp32<kKind>(to_float(g[i].v[e]) + to_float(dg[i].v[e]),
                                                         to_float(u[i].v[e]) + to_float(du[i].v[e])));
        else
          o.v[e] = gated_value<kKind>(g[i].v[e], u[i].v[e]);
      }
      h[c0 + 32 * i] = o;
    }
}

// Every routed row: work item = (row, kItemVecs vectors of it), one warp each, grid-stride. The items run over
// the host's bound of the rows (max_rows) and each loads its gu before the routed row count has come back, which
// decides only whether it stores: the count's round trip overlaps the rows' loads instead of preceding them
// (gu holds max_rows rows; those past the count are read and dropped, and exist only when ids are dropped).
template <typename T, ActivationKind kKind, bool kDelta>
__global__ void __launch_bounds__(kThreads) gated_activation_kernel(ActivationParams p) {
  pdl_begin();
  const int num_rows = *p.num_rows;
  const int items_per_row = ceil_div(p.I / 8, kItemVecs);
  const int64_t items = static_cast<int64_t>(p.max_rows) * items_per_row;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32; item < items;
       item += warps) {
    const int64_t row = item / items_per_row;
    activation_item<T, kKind, kDelta>(p, row, static_cast<int>(item % items_per_row), threadIdx.x % 32,
                                      row < num_rows);
  }
}

// With LoRA: only the rows without an adapter, i.e. each expert's first bucket (rows [bucket_offsets[e * P],
// bucket_offsets[e * P + 1])). Blocks are (expert, chunk) pairs; a chunk's warps take every (chunks * 8)-th
// (row, item) pair of that bucket. A flag load per item of every row instead (most of them skipped) took 20 / 53
// µs for the 1 in 8 rows at qwen3 / mixtral T=4096 (NOTES.md v13), against 7 / 29 µs of bytes.
template <typename T, ActivationKind kKind>
__global__ void __launch_bounds__(kThreads) gated_activation_buckets_kernel(ActivationParams p, int chunks) {
  pdl_begin();
  const int items_per_row = ceil_div(p.I / 8, kItemVecs);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stride = chunks * kWarpsPerBlock;
  for (int b = blockIdx.x; b < p.num_experts * chunks; b += gridDim.x) {
    const int e = b / chunks, chunk = b % chunks;
    const int begin = p.bucket_offsets[e * p.per_expert], end = p.bucket_offsets[e * p.per_expert + 1];
    const int64_t items = static_cast<int64_t>(end - begin) * items_per_row;
    for (int64_t i = chunk * kWarpsPerBlock + warp; i < items; i += stride)
      activation_item<T, kKind>(p, begin + i / items_per_row, static_cast<int>(i % items_per_row), lane);
  }
}

template <typename T>
cudaError_t launch_typed(const ActivationParams& p, cudaStream_t stream) {
  if (p.bucket_offsets != nullptr) {
    if (p.gu_delta != nullptr) return cudaErrorInvalidValue;  // the bucket kernel has no delta (not needed)
    // (expert, chunk) blocks, about four per SM over all experts (the buckets' sizes are device values).
    if (p.num_experts <= 0 || p.per_expert <= 0 || p.sm_count <= 0) return cudaErrorInvalidValue;
    const int chunks = std::max(1, ceil_div(4 * p.sm_count, p.num_experts));
    const int blocks = static_cast<int>(std::min<int64_t>(int64_t(p.num_experts) * chunks, 65535));
    if (p.kind == ActivationKind::Silu)
      return launch_kernel(gated_activation_buckets_kernel<T, ActivationKind::Silu>, blocks, kThreads, 0, stream, p,
                           chunks);
    return launch_kernel(gated_activation_buckets_kernel<T, ActivationKind::Gelu>, blocks, kThreads, 0, stream, p,
                         chunks);
  }
  // A warp per item, up to 4096 blocks (the grid-stride loop covers the rest).
  const int64_t items = static_cast<int64_t>(p.max_rows) * ceil_div(p.I / 8, kItemVecs);
  const int blocks = static_cast<int>(std::min<int64_t>((items + kWarpsPerBlock - 1) / kWarpsPerBlock, 4096));
  if (blocks == 0) return cudaSuccess;
  const bool delta = p.gu_delta != nullptr;
  if (p.kind == ActivationKind::Silu)
    return launch_kernel(delta ? gated_activation_kernel<T, ActivationKind::Silu, true>
                               : gated_activation_kernel<T, ActivationKind::Silu, false>,
                         blocks, kThreads, 0, stream, p);
  return launch_kernel(delta ? gated_activation_kernel<T, ActivationKind::Gelu, true>
                             : gated_activation_kernel<T, ActivationKind::Gelu, false>,
                       blocks, kThreads, 0, stream, p);
}

}  // namespace

cudaError_t launch_activation(const ActivationParams& p, cudaStream_t stream) {
  return p.dtype == DType::BF16 ? launch_typed<__nv_bfloat16>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace moelora::cuda
