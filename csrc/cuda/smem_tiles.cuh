// Device helpers shared by our tensor-core segment kernels (segment_gemm.cu, lora_gemm.cu): the tile ->
// segment lookup and the cp.async loaders of a row-major tile into padded shared memory.
#pragma once
#include <cstdint>

#include "cuda_utils.cuh"

namespace moelora::cuda {

// Segment owning m-tile `mt`: the last s with tile_prefix[s] <= mt (empty segments share prefixes).
__device__ __forceinline__ int segment_of_tile(const int* tile_prefix, int nseg, int mt) {
  int lo = 0, hi = nseg;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_prefix[mid] <= mt) lo = mid; else hi = mid;
  }
  return lo;
}

// Loads rows [0, nrows) x cols [k0, k0 + BK) of a row-major matrix into smem (LDS stride), zero outside
// the valid rows / below column K; row r is read at row_ptr(r). 16-byte cp.async when the layout allows it
// (`vec`), else element by element (synchronous stores; the caller's __syncthreads orders them).
template <typename T, int ROWS, int BK, int LDS, int THREADS, class RowPtr>
__device__ __forceinline__ void load_tile_rows(T* smem, RowPtr row_ptr, int nrows, int k0, int K, bool vec) {
  if (vec) {
    constexpr int kChunks = ROWS * BK / 8;
    for (int c = threadIdx.x; c < kChunks; c += THREADS) {
      const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
      const bool ok = r < nrows && k0 + kc < K;
      const T* g = ok ? row_ptr(r) + k0 + kc : row_ptr(0);
      cp_async_16(smem + r * LDS + kc, g, ok);
    }
  } else {
    for (int c = threadIdx.x; c < ROWS * BK; c += THREADS) {
      const int r = c / BK, kc = c % BK;
      const bool ok = r < nrows && k0 + kc < K;
      smem[r * LDS + kc] = ok ? row_ptr(r)[k0 + kc] : from_float<T>(0.f);
    }
  }
}

// The same for rows at a fixed stride: row r at src + r * ld.
template <typename T, int ROWS, int BK, int LDS, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t ld, int nrows, int k0, int K, bool vec) {
  load_tile_rows<T, ROWS, BK, LDS, THREADS>(smem, [=](int r) { return src + r * ld; }, nrows, k0, K, vec);
}

}  // namespace moelora::cuda
