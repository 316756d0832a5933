// The LoRA shrink writing t itself (LoraShrinkParams::t, one K split): the A operand of the LoRA's k tiles in the
// expert GEMM, with the values and roundings lora_k_operand.cu makes of a one-split partial, so that its kernel
// (and its read of the partials) is not needed.
#pragma once
#include "cuda_utils.cuh"

namespace moelora::cuda {

// Where a shrink item's sums go when it writes t (t == nullptr: its partial sums, as without).
struct TRowsOut {
  void* t = nullptr;
  int t_cols = 0;    // t's row length, a multiple of 8
  int first = 0;     // the item's slot's first column (slot R, a multiple of 8)
  float scale = 1.f; // the slot's scale
};

// Rows [row0, row0 + rows) of t: round(scale * sum_of(r, j)) in columns first + j (j < R, R a multiple of 8),
// zeros in every other column. Thread tid of nthreads writes 16-byte vectors. sum_of(r, j) must be the partial
// lora_k_operand.cu would read, plus 0 as it adds it to its zero sum (a -0 sum rounds to +0 there too).
template <typename T, class SumOf>
__device__ __forceinline__ void write_t_rows(const TRowsOut& o, int row0, int rows, int R, SumOf sum_of, int tid,
                                             int nthreads) {
  const int vecs = o.t_cols / 8, first = o.first / 8, last = first + R / 8;
  for (int e = tid; e < rows * vecs; e += nthreads) {
    const int r = e / vecs, c = e % vecs;
    Vec8<T> v;
    if (c >= first && c < last) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v.v[i] = from_float<T>(o.scale * (0.f + sum_of(r, 8 * (c - first) + i)));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v.v[i] = from_float<T>(0.f);
    }
    reinterpret_cast<Vec8<T>*>(static_cast<T*>(o.t) + static_cast<int64_t>(row0 + r) * o.t_cols)[c] = v;
  }
}

// Zeros in rows [begin, end) of t.
template <typename T>
__device__ __forceinline__ void zero_t_rows(void* t, int t_cols, int begin, int end, int tid, int nthreads) {
  Vec8<T> z;
#pragma unroll
  for (int i = 0; i < 8; ++i) z.v[i] = from_float<T>(0.f);
  auto* out = reinterpret_cast<Vec8<T>*>(static_cast<T*>(t) + static_cast<int64_t>(begin) * t_cols);
  const int64_t n = static_cast<int64_t>(end - begin) * (t_cols / 8);
  for (int64_t e = tid; e < n; e += nthreads) out[e] = z;
}

}  // namespace moelora::cuda
