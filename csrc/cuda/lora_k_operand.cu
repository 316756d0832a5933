// t, the A operand of the LoRA's k tiles in the expert GEMM (expert_gemm_sm90.h LoraKOperands): each routed row's
// scale * (its shrink output, the split-K sums added in order) in the R columns of its slot, zeros in every other
// column, so that t @ Bcat[e]^T is exactly the row's own adapter's delta. One warp per row, 16-byte stores.
#include <algorithm>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) lora_k_operand_kernel(LoraKOperandParams p) {
  pdl_begin();
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.max_rows || row >= *p.num_rows) return;
  const int slot = p.row_slot[row];
  const float scale = slot >= 0 && p.slot_scale != nullptr ? p.slot_scale[slot] : 1.f;
  const int first = slot >= 0 ? slot * p.R : -1;  // the slot's first column
  auto* out = reinterpret_cast<Vec8<T>*>(static_cast<T*>(p.t) + static_cast<int64_t>(row) * p.t_cols);
  for (int c = lane; c < p.t_cols / 8; c += 32) {
    const int col = 8 * c;
    Vec8<T> v;
    if (first >= 0 && col >= first && col < first + p.R) {
      float sum[8] = {};
      for (int ks = 0; ks < p.k_splits; ++ks) {
        const float* part = p.partial + (static_cast<int64_t>(ks) * p.max_rows + row) * p.R + (col - first);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] += part[e];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(scale * sum[e]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(0.f);
    }
    out[c] = v;
  }
}

}  // namespace

cudaError_t launch_lora_k_operand(const LoraKOperandParams& p, cudaStream_t stream) {
  if (p.max_rows <= 0) return cudaSuccess;
  if (p.R % 8 != 0 || p.t_cols % 8 != 0 || p.k_splits < 1) return cudaErrorInvalidValue;
  const int blocks = (p.max_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (p.dtype == DType::BF16)
    return launch_kernel(lora_k_operand_kernel<__nv_bfloat16>, blocks, kThreads, 0, stream, p);
  return launch_kernel(lora_k_operand_kernel<__half>, blocks, kThreads, 0, stream, p);
}

}  // namespace moelora::cuda
