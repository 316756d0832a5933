// Segment GEMM: our own tensor-core grouped GEMM over row segments (WMMA / mma.sync, sm80+).
// Serves the LoRA shrink (N = rank) and expand (K = rank, accumulating into the base output with the
// slot's scaling), and the portable base GEMMs when the sm90 CUTLASS path is not used.
//
// A persistent grid walks the tiles: the number of tiles is read from the device (tile_prefix[nseg]),
// so the host sizes the grid from shapes alone, and the launch is CUDA-graph safe.
#include <mma.h>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "smem_tiles.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kPad = 8;  // smem row padding (16 bytes) against bank conflicts

template <int BM, int BN, int BK, int STAGES, int WARPS_M, int WARPS_N>
struct TileShape {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kFragsM = BM / WARPS_M / 16;
  static constexpr int kFragsN = BN / WARPS_N / 16;
  static constexpr int kLds = BK + kPad;  // smem row stride in elements (keeps 16-byte alignment)
  static constexpr int kLdc = BN + 4;     // fp32 epilogue tile stride
  static constexpr int kStageElems = (BM + BN) * kLds;
  static constexpr size_t kPipelineBytes = static_cast<size_t>(STAGES) * kStageElems * 2;  // 16-bit A and W
  static constexpr size_t kEpilogueBytes = static_cast<size_t>(BM) * kLdc * 4;
  static constexpr size_t kSmemBytes = kPipelineBytes > kEpilogueBytes ? kPipelineBytes : kEpilogueBytes;
  static_assert(BM == kTileRows, "tile rows must match the routing tile prefix");
  static_assert(kFragsM >= 1 && kFragsN >= 1, "warp tile must hold at least one 16x16 fragment");
  static_assert(BK % 16 == 0 && BN % 8 == 0 && STAGES >= 2, "tile shape");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

template <typename T, int BM, int BN, int BK, int STAGES, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(TileShape<BM, BN, BK, STAGES, WARPS_M, WARPS_N>::kThreads)
    segment_gemm_kernel(SegmentGemmParams p) {
  pdl_begin();
  using Shape = TileShape<BM, BN, BK, STAGES, WARPS_M, WARPS_N>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kLds = Shape::kLds;
  __shared__ alignas(128) unsigned char smem_raw[Shape::kSmemBytes];
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  float* ctile = reinterpret_cast<float*>(smem_raw);  // reuses the pipeline buffers after the K loop

  const T* A = static_cast<const T*>(p.A);
  const T* Wbase = static_cast<const T*>(p.W);
  T* D = static_cast<T*>(p.D);
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int n_tiles = ceil_div(p.N, BN);
  const int k_tiles = ceil_div(p.K, BK);
  const int total_tiles = p.tile_prefix[p.nseg] * n_tiles;
  const bool vec = (p.K % 8 == 0) && (p.lda % 8 == 0) && (p.ldw % 8 == 0) &&
                   (reinterpret_cast<uintptr_t>(A) % 16 == 0) && (reinterpret_cast<uintptr_t>(Wbase) % 16 == 0) &&
                   (p.w_expert_stride % 8 == 0) && (p.w_slot_stride % 8 == 0);
  const bool vec_out = (p.N % 8 == 0) && (p.ldd % 8 == 0) && (reinterpret_cast<uintptr_t>(D) % 16 == 0);

  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const int mt = tile / n_tiles, nt = tile % n_tiles;
    const int seg = segment_of_tile(p.tile_prefix, p.nseg, mt);
    const int row0 = p.row_offsets[seg] + (mt - p.tile_prefix[seg]) * BM;
    const int rows = min(BM, p.row_offsets[seg + 1] - row0);
    const int expert = seg / p.seg_per_expert;
    const int slot = seg % p.seg_per_expert + p.slot_base;
    const int n0 = nt * BN;
    const T* a_src = A + static_cast<int64_t>(row0) * p.lda;
    const T* w_src = Wbase + expert * p.w_expert_stride + slot * p.w_slot_stride + static_cast<int64_t>(n0) * p.ldw;
    const int ncols = min(BN, p.N - n0);
    // Warps whose rows are all past the segment's end skip the MMAs (decode: segments of 1-2 rows).
    const bool warp_active = warp_m * Shape::kFragsM * 16 < rows;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Shape::kFragsM][Shape::kFragsN];
#pragma unroll
    for (int i = 0; i < Shape::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Shape::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    auto stage_a = [&](int s) { return stage_base + s * Shape::kStageElems; };
    auto stage_w = [&](int s) { return stage_base + s * Shape::kStageElems + BM * kLds; };
    auto load_stage = [&](int s, int kt) {
      load_tile<T, BM, BK, kLds, kThreads>(stage_a(s), a_src, p.lda, rows, kt * BK, p.K, vec);
      load_tile<T, BN, BK, kLds, kThreads>(stage_w(s), w_src, p.ldw, ncols, kt * BK, p.K, vec);
    };
    // STAGES-deep cp.async pipeline: STAGES-1 K slices in flight while one is multiplied.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int prefetch = kt + STAGES - 1;
      if (prefetch < k_tiles) load_stage(prefetch % STAGES, prefetch);
      cp_async_commit();
      cp_async_wait<STAGES - 1>();
      __syncthreads();
      if (warp_active) {
        const T* as = stage_a(kt % STAGES);
        const T* ws = stage_w(kt % STAGES);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[Shape::kFragsM];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[Shape::kFragsN];
#pragma unroll
          for (int i = 0; i < Shape::kFragsM; ++i)
            wmma::load_matrix_sync(fa[i], as + ((warp_m * Shape::kFragsM + i) * 16) * kLds + kk, kLds);
#pragma unroll
          for (int j = 0; j < Shape::kFragsN; ++j)  // W is [N, K] row-major == B (K x N) column-major
            wmma::load_matrix_sync(fb[j], ws + ((warp_n * Shape::kFragsN + j) * 16) * kLds + kk, kLds);
#pragma unroll
          for (int i = 0; i < Shape::kFragsM; ++i)
#pragma unroll
            for (int j = 0; j < Shape::kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
      }
      __syncthreads();  // the stage just read is overwritten by a later prefetch
    }
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll
    for (int i = 0; i < Shape::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Shape::kFragsN; ++j)
        wmma::store_matrix_sync(ctile + ((warp_m * Shape::kFragsM + i) * 16) * Shape::kLdc +
                                    (warp_n * Shape::kFragsN + j) * 16,
                                acc[i][j], Shape::kLdc, wmma::mem_row_major);
    __syncthreads();
    const float alpha = p.slot_scale != nullptr ? p.slot_scale[slot] : 1.f;
    if (vec_out) {  // 8 columns (16 bytes) per access; only the segment's rows
      for (int c = threadIdx.x; c < rows * (BN / 8); c += kThreads) {
        const int r = c / (BN / 8), col = (c % (BN / 8)) * 8;
        if (col >= ncols) continue;
        auto* dst = reinterpret_cast<Vec8<T>*>(D + static_cast<int64_t>(row0 + r) * p.ldd + n0 + col);
        const float* src = ctile + r * Shape::kLdc + col;
        Vec8<T> prev;
        if (p.accumulate) prev = *dst;
        Vec8<T> out;
#pragma unroll
        for (int i = 0; i < 8; ++i) out.v[i] = from_float<T>(alpha * src[i] + (p.accumulate ? to_float(prev.v[i]) : 0.f));
        *dst = out;
      }
    } else {
      for (int c = threadIdx.x; c < rows * BN; c += kThreads) {
        const int r = c / BN, col = c % BN;
        if (col >= ncols) continue;
        T* dst = D + static_cast<int64_t>(row0 + r) * p.ldd + n0 + col;
        float v = alpha * ctile[r * Shape::kLdc + col];
        if (p.accumulate) v += to_float(*dst);
        *dst = from_float<T>(v);
      }
    }
    __syncthreads();  // ctile aliases the next tile's pipeline buffers
  }
}

template <typename T, int BM, int BN, int BK, int STAGES, int WARPS_M, int WARPS_N>
cudaError_t launch_shape(const SegmentGemmParams& p, int sm_count, int blocks_per_sm, cudaStream_t stream) {
  static_assert(BM == kTileRows, "m-tiles are routing's kTileRows-row tiles");
  const int n_tiles = ceil_div(p.N, BN);
  const int64_t tiles_ub = segment_tiles_upper_bound(p.max_rows, p.max_active_segments) * n_tiles;
  const int grid = static_cast<int>(std::min<int64_t>(tiles_ub, static_cast<int64_t>(sm_count) * blocks_per_sm));
  if (grid <= 0) return cudaSuccess;
  using Shape = TileShape<BM, BN, BK, STAGES, WARPS_M, WARPS_N>;
  return launch_kernel(segment_gemm_kernel<T, BM, BN, BK, STAGES, WARPS_M, WARPS_N>, grid, Shape::kThreads, 0,
                       stream, p);
}

template <typename T>
cudaError_t launch_typed(const SegmentGemmParams& p, SegmentGemmShape shape, int sm_count, cudaStream_t stream) {
  if (shape == SegmentGemmShape::Wide)  // base GEMM / expand: wide N, short K (expand: K = rank)
    return launch_shape<T, kTileRows, 128, 32, 2, 2, 4>(p, sm_count, 2, stream);  // 8 warps, 32x32 per warp
  // shrink: N = rank (narrow), long K: deeper pipeline keeps more of A and W in flight
  return launch_shape<T, kTileRows, 32, 64, 3, 4, 1>(p, sm_count, 3, stream);  // 4 warps, 16x32 per warp (3/SM: registers)
}

}  // namespace

cudaError_t launch_segment_gemm(const SegmentGemmParams& p, SegmentGemmShape shape, int sm_count,
                                cudaStream_t stream) {
  if (p.max_rows == 0 || p.N == 0) return cudaSuccess;
  return p.dtype == DType::BF16 ? launch_typed<__nv_bfloat16>(p, shape, sm_count, stream)
                                : launch_typed<__half>(p, shape, sm_count, stream);
}

}  // namespace moelora::cuda
