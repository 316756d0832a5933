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

// One thread's part of copying a ROWS x BK tile into padded shared memory (row stride LDS) with 16-byte
// cp.async, set up once per tile and issued per step. A thread always copies the same 8 columns of rows
// first, first + kRowStep, ..., from row pointers it computed once, so a copy costs a pointer add instead of
// load_tile's index arithmetic (~30 instructions per copy in the expand's SASS, about a fifth of the gated
// expand's instructions; the shrink issues five such copies per thread and K step; NOTES.md v14). A step copies the rows whose key (row % kKeyPeriod) is below its row limit
// and leaves the other rows' shared memory as it was: callers discard what those rows produce. Columns at or
// past K are zero-filled. Needs 16-byte aligned rows and columns (the callers' `vec`).
template <typename T, int ROWS, int BK, int LDS, int THREADS, int kKeyPeriod = ROWS>
struct TileCopy16 {
  static constexpr int kRowVecs = BK / 8;
  static constexpr int kRowStep = THREADS / kRowVecs;
  static constexpr int kPasses = (ROWS + kRowStep - 1) / kRowStep;
  static_assert(BK % 8 == 0 && THREADS % kRowVecs == 0, "whole 16-byte pieces, whole rows per pass");
  const T* src[kPasses];  // row first + i * kRowStep at this thread's column
  int first, col;

  // row_ptr(r): row r's first element, called for r < ROWS only.
  template <class RowPtr>
  __device__ __forceinline__ explicit TileCopy16(RowPtr row_ptr) {
    first = threadIdx.x / kRowVecs;
    col = threadIdx.x % kRowVecs * 8;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = first + i * kRowStep;
      src[i] = r < ROWS ? row_ptr(r) + col : nullptr;
    }
  }
  // Rows with key < row_limit, columns k0 + [0, BK) of K: source row pointers advanced by `offset` elements.
  __device__ __forceinline__ void issue(T* smem, int64_t offset, int k0, int K, int row_limit) const {
    const bool k_ok = k0 + col < K;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = first + i * kRowStep;
      if ((ROWS % kRowStep == 0 || r < ROWS) && r % kKeyPeriod < row_limit)
        cp_async_16(smem + r * LDS + col, k_ok ? src[i] + offset : src[i], k_ok);
    }
  }
};

}  // namespace moelora::cuda
