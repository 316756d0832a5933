// LoRA on the (expert, slot) segments of the sorted rows, in two kernels per projection:
//
//   shrink: partial[ks, r, :R] = X[r, K-chunk ks] @ A[slot, e][:, K-chunk ks]^T      (split-K, fp32)
//           (X's row x_rows[r] with LoraShrinkParams::x_rows: fc1 reads the token's hidden row)
//   expand: D[r, n-range]     += scale[slot] * bf16(sum_ks partial[ks, r]) @ B[slot, e][n-range]^T
//
// Why this shape (benchmarks/NOTES.md, v3): at decode and mid batch sizes a segment holds a handful of
// rows, so a kernel is bound by latency, not bytes. The shrink's K loop (K = H or I, up to 14336) is split
// over CTAs so every SM streams adapter A, with the partial sums reduced by the expand in a fixed order
// (deterministic, no atomics). The expand keeps the rank-R input tile in shared memory and walks a run of
// column chunks through a ring of B / D stages; its (m-tile, chunk) units are split evenly over the CTAs.
// Each work item picks its tile path from its segment's row count (NOTES.md, v4, v7): segments of up to
// few_rows_max rows (decode, mid batch sizes) go to lora_rows_mma.cuh, which streams the adapter straight from
// global memory into mma.sync fragments; larger ones use the 64-row tensor-core tiles below, every tile of them.
// A launch with no few-rows segments (few_rows_max == 0: by default when segments average 16+ rows, stages.h
// lora_tiles_only) runs kernels built without the few-rows path (kTilesOnly), which need fewer registers and so
// hold more warps per SM.
// Tile counts come from the routing's device-side tile prefix (and its tile -> bucket table), so grids are
// sized from shapes alone and both kernels are CUDA-graph safe.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "activation.cuh"
#include "cuda_utils.cuh"
#include "lora_rows_mma.cuh"
#include "lora_t_rows.cuh"
#include "pdl.cuh"
#include "smem_tiles.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;                 // each warp owns 16 of the tile's 64 rows
constexpr int kThreads = kWarps * 32;
constexpr int kBlocksPerSm = 4;
constexpr int kPad = 8;                   // 16-byte smem row padding against bank conflicts
static_assert(kTileRows == kWarps * 16, "one 16-row fragment band per warp");

struct SegmentTile {
  int row0, rows, expert, slot;
  bool few_rows;  // the whole segment has <= few_rows_max rows: lora_rows_mma.cuh
};

// m-tile mt of segment seg (= p.tile_segment[mt], which a caller may have loaded ahead).
template <class Params>
__device__ __forceinline__ SegmentTile locate(const Params& p, int mt, int seg) {
  SegmentTile t;
  t.row0 = p.row_offsets[seg] + (mt - p.tile_prefix[seg]) * kTileRows;
  t.rows = min(kTileRows, p.row_offsets[seg + 1] - t.row0);
  t.expert = seg / p.seg_per_expert;
  t.slot = seg % p.seg_per_expert + p.slot_base;
  // The path is chosen per segment, not per tile: which rows land in a segment's last (partial) tile depends
  // on the routing's atomic order, and the two paths sum in different orders, so a per-tile choice would
  // make a row's bits depend on that order.
  t.few_rows = p.row_offsets[seg + 1] - p.row_offsets[seg] <= p.few_rows_max;
  return t;
}
template <class Params>
__device__ __forceinline__ SegmentTile locate(const Params& p, int mt) {
  return locate(p, mt, p.tile_segment[mt]);
}

// ---- shrink ----------------------------------------------------------------------------------------
// 64-row tiles: K steps of kBK through a kStages cp.async ring (NOTES.md v10).
// - kBK = 64 for ranks up to 32: each X row is read in 128-byte pieces, and a step's barrier pair covers twice
//   the K (qwen3 / mixtral / gpt-oss T=4096 shrinks 146 / 186 / 131 -> 121 / 161 / 109 µs).
// - Rank 64 takes kBK = 64 (three stages, 54 KB) only when its launch is mostly 64-row tiles (kLargeSegments,
//   from lora_large_segments; T=4096 -15..-21%). With mostly few-rows items the larger shared-memory carve-out
//   made them slower (qwen3 / gpt-oss T=1024 +25..37%, likely L1 they lose), and rank 32 with four such stages
//   was slower everywhere; both keep the shapes below.
// - kTilesOnly (the launch has no few-rows segments, few_rows_max == 0; ranks up to 64): the few-rows path is
//   not compiled in, and the kernel runs 6 CTAs per SM in 80 registers (rank 16: three stages; rank 64: two of
//   kBK = 64) or 8 in 64 (rank 32: two stages) instead of 4 (NOTES.md v23: mixtral T=4096's fc2 shrink
//   119 -> 112 µs at rank 16 and 198 -> 180 at rank 64; the others within 2-4 µs). Rank 16 at 8 CTAs with two
//   stages was slower there (128 µs): fewer bytes in flight per SM.
template <int RP, bool kLargeSegments = false, bool kTilesOnly = false>
struct ShrinkShape {
  static_assert(!kTilesOnly || RP <= kLoraTilesMaxRank, "the tiles-only shrink holds ranks up to 64");
  static constexpr int kBlocks = !kTilesOnly ? kBlocksPerSm : RP == 32 ? 8 : 6;  // CTAs per SM
  static constexpr bool kWideK = RP <= 32 || (RP == 64 && (kLargeSegments || kTilesOnly));
  static constexpr int kBK = kWideK ? 64 : 32;
  static constexpr int kStages = kTilesOnly ? (RP == 16 ? 3 : 2) : RP == 16 || (RP == 64 && !kWideK) ? 4 : 3;
  static constexpr int kLds = kBK + kPad;
  static constexpr int kStageElems = (kTileRows + RP) * kLds;
  static constexpr size_t kPipelineBytes = size_t(kStages) * kStageElems * 2;
  static constexpr int kLdc = RP + 4;
  static constexpr size_t kOutBytes = size_t(kTileRows) * kLdc * 4;
  static constexpr size_t kSmemBytes = kPipelineBytes > kOutBytes ? kPipelineBytes : kOutBytes;  // dynamic
  static_assert(kSmemBytes + 1024 <= 228 * 1024 / kBlocks, "kBlocks CTAs per SM");
  static_assert(kTilesOnly || kSmemBytes >= size_t(lora_few_rows::shrink_red_floats<RP, kWarps>()) * 4,
                "room for the few-rows path's reduction");
};

// Where the rows of a segment of slot `slot` go in t when the shrink writes it (p.t nullptr: nowhere).
__device__ __forceinline__ TRowsOut t_rows_out(const LoraShrinkParams& p, int slot) {
  if (p.t == nullptr) return {};
  return {p.t, p.t_cols, slot * p.R, p.slot_scale != nullptr ? p.slot_scale[slot] : 1.f};
}

// kTokenRows: p.x_rows is set (fc1 reads the hidden states by token).
template <typename T, int RP, bool kLargeSegments, bool kTokenRows, bool kTilesOnly>
__global__ void __launch_bounds__(kThreads, (ShrinkShape<RP, kLargeSegments, kTilesOnly>::kBlocks))
    lora_shrink_kernel(LoraShrinkParams p) {
  pdl_begin();
  using Shape = ShrinkShape<RP, kLargeSegments, kTilesOnly>;
  constexpr int kBK = Shape::kBK, kLds = Shape::kLds, kStages = Shape::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];  // Shape::kSmemBytes
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  float* ctile = reinterpret_cast<float*>(smem_raw);  // after the K loop

  const T* X = static_cast<const T*>(p.X);
  const T* Abase = static_cast<const T*>(p.A);
  const int warp = threadIdx.x / 32;
  const bool vec = (p.K % 8 == 0) && (p.ldx % 8 == 0) && (p.a_expert_stride % 8 == 0) &&
                   (p.a_slot_stride % 8 == 0) && (reinterpret_cast<uintptr_t>(X) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(Abase) % 16 == 0);
  // Each item's segment is loaded one item ahead (the first one together with the item count): at decode and
  // small batch sizes an item is a few short chains of loads, and this takes one round trip off each.
  // blockIdx.x / k_splits is below the tile table's capacity (the grid is sized from it), and a segment
  // loaded for an index past the routed tiles is never used.
  const int total = p.tile_prefix[p.nseg] * p.k_splits;
  int seg_next = p.tile_segment[blockIdx.x / p.k_splits];

  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const int mt = item / p.k_splits, ks = item % p.k_splits;
    const int seg = seg_next;
    if (item + static_cast<int>(gridDim.x) < total) seg_next = p.tile_segment[(item + gridDim.x) / p.k_splits];
    const SegmentTile st = locate(p, mt, seg);
    const int k_begin = ks * p.k_chunk;
    const int k_end = min(p.K, k_begin + p.k_chunk);
    const int k_tiles = ceil_div(k_end - k_begin, kBK);
    const T* a_src = Abase + st.expert * p.a_expert_stride + st.slot * p.a_slot_stride;  // [R, K]
    if (p.t != nullptr) {  // one K split, writing t: the first tile of an expert's first adapter segment also
                           // zeroes the expert's rows without an adapter (its first bucket), which no item covers
      const int none = seg - (seg % p.seg_per_expert);
      if (p.slot_base == -1 && mt == p.tile_prefix[seg] && p.row_offsets[none + 1] == p.row_offsets[seg])
        zero_t_rows<T>(p.t, p.t_cols, p.row_offsets[none], p.row_offsets[none + 1], threadIdx.x, kThreads);
    }
    if constexpr (!kTilesOnly) {
      if (st.few_rows) {  // few rows: swapped-operand mma path (lora_rows_mma.cuh)
        lora_few_rows::shrink_tile<T, RP, kWarps, kTokenRows>(X, p.ldx, p.x_rows, a_src, p.K, p.R, st.row0, st.rows,
                                                              k_begin, k_end, vec,
                                                              p.partial + static_cast<int64_t>(ks) * p.max_rows * p.R,
                                                              t_rows_out(p, st.slot), ctile);
        continue;
      }
    }
    const bool warp_active = warp * 16 < st.rows;
    // X row r of the tile (kTokenRows: the token's hidden row), for r < rows.
    auto x_row = [&](int r) {
      return X + static_cast<int64_t>(kTokenRows ? p.x_rows[st.row0 + r] : st.row0 + r) * p.ldx;
    };
    // The 16-byte copies of this thread, set up once per tile (TileCopy16): X rows past the tile's are not
    // copied, and neither are A rows past R; their products are never written.
    const TileCopy16<T, kTileRows, kBK, kLds, kThreads> x_copy([&](int r) { return r < st.rows ? x_row(r) : X; });
    const TileCopy16<T, RP, kBK, kLds, kThreads> a_copy([&](int r) { return a_src + static_cast<int64_t>(r) * p.K; });

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RP / 16];
#pragma unroll
    for (int j = 0; j < RP / 16; ++j) wmma::fill_fragment(acc[j], 0.f);

    auto stage_x = [&](int s) { return stage_base + s * Shape::kStageElems; };
    auto stage_a = [&](int s) { return stage_base + s * Shape::kStageElems + kTileRows * kLds; };
    auto load_stage = [&](int s, int kt) {
      const int k0 = k_begin + kt * kBK;
      if (vec) {
        x_copy.issue(stage_x(s), k0, k0, k_end, st.rows);
        a_copy.issue(stage_a(s), k0, k0, k_end, p.R);
      } else {  // element copies, zero-filled (unaligned rows)
        load_tile_rows<T, kTileRows, kBK, kLds, kThreads>(stage_x(s), x_row, st.rows, k0, k_end, false);
        load_tile<T, RP, kBK, kLds, kThreads>(stage_a(s), a_src, p.K, p.R, k0, k_end, false);
      }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int prefetch = kt + kStages - 1;
      if (prefetch < k_tiles) load_stage(prefetch % kStages, prefetch);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncthreads();
      if (warp_active) {
        const T* xs = stage_x(kt % kStages);
        const T* as = stage_a(kt % kStages);
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, xs + warp * 16 * kLds + kk, kLds);
#pragma unroll
          for (int j = 0; j < RP / 16; ++j) {  // A is [R, K] row-major == (K x R) column-major
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, as + j * 16 * kLds + kk, kLds);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
          }
        }
      }
      __syncthreads();  // the stage just read is refilled by a later prefetch
    }
    cp_async_wait<0>();
    __syncthreads();

    if (warp_active) {
#pragma unroll
      for (int j = 0; j < RP / 16; ++j)
        wmma::store_matrix_sync(ctile + warp * 16 * Shape::kLdc + j * 16, acc[j], Shape::kLdc, wmma::mem_row_major);
    }
    __syncthreads();
    if (p.t != nullptr) {
      write_t_rows<T>(t_rows_out(p, st.slot), st.row0, st.rows, p.R,
                      [&](int r, int j) { return ctile[r * Shape::kLdc + j]; }, threadIdx.x, kThreads);
    } else {
      float* dst = p.partial + (static_cast<int64_t>(ks) * p.max_rows + st.row0) * p.R;
      for (int c = threadIdx.x; c < st.rows * p.R; c += kThreads) {
        const int r = c / p.R, col = c % p.R;
        dst[c] = ctile[r * Shape::kLdc + col];
      }
    }
    __syncthreads();  // ctile aliases the next item's pipeline buffers
  }
}

// ---- expand ----------------------------------------------------------------------------------------
template <int RP>
struct ExpandShape {
  // B rows = D columns per chunk (gated: half gate, half up). 128 where four CTAs per SM still fit two
  // stages of them (rank 16): the gated expand then reads gu and writes h in 128-byte row pieces, not 64
  // (NOTES.md v10: 8-18% faster at T >= 1024 on the 64-row tiles, mixtral T=4096 425 -> 367 µs; the plain
  // one 1-6%).
  static constexpr int kBN = RP >= 128 ? 32 : (RP <= 16 ? 128 : 64);
  // Output columns per chunk, the kernel's unit of work (gated: h columns, each with its gate and up row).
  static constexpr int cols(bool gated) { return gated ? kBN / 2 : kBN; }
  // Ring of chunk stages (B rows and the D values they update); kStages - 1 chunks in flight per CTA. Three
  // for rank 32, two where three would leave fewer than four CTAs per SM.
  static constexpr int kStages = RP == 32 ? 3 : 2;
  static constexpr int kLdt = RP + kPad;   // t tile and B rows, row stride (elements)
  static constexpr int kLdd = kBN + kPad;  // D values, row stride (elements; gated: gate | up columns)
  static constexpr size_t kTBytes = size_t(kTileRows) * kLdt * 2;
  static constexpr size_t kStageBBytes = size_t(kBN) * kLdt * 2;
  static constexpr size_t kStageBytes = kStageBBytes + size_t(kTileRows) * kLdd * 2;
  static constexpr size_t kSmemBytes = kTBytes + kStages * kStageBytes;  // dynamic shared memory
  static_assert(kSmemBytes + 1024 <= 228 * 1024 / kBlocksPerSm, "kBlocksPerSm CTAs per SM");
  static_assert(kSmemBytes >= size_t(lora_few_rows::expand_smem_floats<RP, kWarps>()) * 4,
                "room for the few-rows path's t tile and write-out scratch");
  static_assert(kTBytes % 16 == 0 && kStageBBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte aligned regions");
};

// 32-bit shared-memory load of two consecutive 16-bit elements (an mma fragment register).
template <typename T>
__device__ __forceinline__ uint32_t lds_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The work: for every m-tile of an (expert, slot) segment, all its output columns, cut into chunks of kCols
// (plain: kBN columns of D; gated: kBN / 2 columns of h, each with its gate and up column). The launch's
// (m-tile, chunk) units are split evenly over the CTAs, each taking one contiguous run of them: the routing
// decides how many m-tiles there are, so a host-side split into items left up to half a wave idle (mixtral
// T=4096: 768 items on 528 CTA slots, benchmarks/NOTES.md v8). A run that crosses m-tiles is processed as one
// item per m-tile, each item a column range [n_begin, n_end) of it.
//
// An item of a large segment (more than few_rows_max rows) is a 64-row tile: t (its rank-R inputs, the split-K
// partials summed in a fixed order) in shared memory, and a ring of kStages chunk stages, each holding the
// chunk's B rows and the D values they update, copied with cp.async kStages - 1 chunks ahead. A chunk is cut
// into (16-row band, column block) items over the warps; per item a warp multiplies its band of t with the
// block's B rows (mma.sync m16n8k16, fp32) and finishes each output from the registers: v = round(D + alpha *
// product) with D read from the stage; plain, v goes back over its D value; gated (p.h set, fc1 with the
// activation fused), a block holds gate and up columns alike, so a lane has both and writes h = round(act(v_gate)
// * v_up) over the gate value. The warp then copies its item to global memory with 16-byte vectors.
// Measured on the H100 (NOTES.md v7, v8, v14): v7's register-held D values (loaded at each chunk's start) left a
// round trip per chunk exposed; the ring made the gated expand 13-23% faster at T=4096. v8-v13 rounded v into
// shared memory and finished the gated outputs in a second pass over the whole block (~50 instructions per h
// value, an issue every 1.9 cycles per scheduler at 25% occupancy); v14 finishes them in the mma epilogue.
// v8's 4-byte global stores straight from the registers were slower on mixtral / gpt-oss.
//
// kTilesOnly (the launch has no few-rows segments, few_rows_max == 0; ranks up to 64): the few-rows path is not
// compiled in and each CTA runs 8 warps in at most 64 registers, twice the warps per SM on the same shared memory
// (NOTES.md v23). Its column blocks are a quarter of a chunk (at least 16 columns), so a full tile still has an
// item or two per warp.
template <bool kTilesOnly>
constexpr int expand_warps() { return kTilesOnly ? 2 * kWarps : kWarps; }

template <typename T, int RP, bool kGated, bool kTilesOnly>
__global__ void __launch_bounds__(expand_warps<kTilesOnly>() * 32, kBlocksPerSm)
    lora_expand_kernel(LoraExpandParams p) {
  pdl_begin();
  static_assert(!kTilesOnly || RP <= kLoraTilesMaxRank, "the tiles-only expand holds ranks up to 64");
  using Shape = ExpandShape<RP>;
  constexpr int kBN = Shape::kBN, kLdt = Shape::kLdt, kLdd = Shape::kLdd, kStages = Shape::kStages;
  constexpr int kWarpsX = expand_warps<kTilesOnly>(), kThreadsX = kWarpsX * 32;
  constexpr int kSides = kGated ? 2 : 1;
  constexpr int kCols = Shape::cols(kGated);
  constexpr int kGroups = kCols / 8;   // 8-column vectors per row and chunk (the D staging)
  // Output columns per (band, column block) item: the products of one item fill 32 accumulator registers
  // (kTilesOnly: a quarter of the chunk, at least 16 columns for the write-out's whole rows).
  constexpr int kXCols = kTilesOnly ? (kCols / 4 < 16 ? 16 : kCols / 4)
                                    : kGated ? (kCols < 32 ? kCols : 32) : (kCols < 64 ? kCols : 64);
  constexpr int kXBlocks = kCols / kXCols;
  static_assert(kXBlocks == 1 || kXBlocks == 2 || kXBlocks == 4, "items: bands x (1, 2 or 4) column blocks");
  // An item's write-out: 16-byte vectors per band row, and the rows apart of a lane's successive vectors.
  constexpr int kItemRowVecs = kXCols / 8;
  constexpr int kWriteRowStep = 32 / kItemRowVecs;
  static_assert(32 % kItemRowVecs == 0 && 16 % kWriteRowStep == 0, "whole rows per warp pass");
  extern __shared__ __align__(128) unsigned char smem_raw[];  // Shape::kSmemBytes
  T* t_tile = reinterpret_cast<T*>(smem_raw);
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem_raw + Shape::kTBytes + s * Shape::kStageBytes); };
  auto stage_d = [&](int s) { return stage_b(s) + kBN * kLdt; };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;  // mma fragment coordinates
  const int wr = lane / kItemRowVecs, wx = lane % kItemRowVecs * 8;  // write-out: first row, column of a lane

  const T* Bbase = static_cast<const T*>(p.B);
  const ExpandOut<T> out{static_cast<T*>(p.D), p.ldd, static_cast<T*>(p.h), p.ldh, p.up_col, p.activation};
  T* D = out.D;
  const bool vec_b = (p.R % 8 == 0) && (p.b_expert_stride % 8 == 0) && (p.b_slot_stride % 8 == 0) &&
                     (reinterpret_cast<uintptr_t>(Bbase) % 16 == 0);
  bool vec_out = (p.N % 8 == 0) && (p.ldd % 8 == 0) && (reinterpret_cast<uintptr_t>(D) % 16 == 0);
  if constexpr (kGated)
    vec_out = vec_out && p.ldh % 8 == 0 && p.up_col % 8 == 0 && reinterpret_cast<uintptr_t>(out.h) % 16 == 0;

  // D staging: 16-byte vectors per row and chunk, and this thread's vector column (side vsd, columns vx..+7).
  constexpr int kRowVecs = kSides * kGroups;
  constexpr int kVecRowStep = kThreadsX / kRowVecs;
  static_assert(kThreadsX % kRowVecs == 0 && kTileRows % kVecRowStep == 0, "whole rows of vectors per pass");
  const int vr = threadIdx.x / kRowVecs, vsd = threadIdx.x % kRowVecs / kGroups, vx = threadIdx.x % kGroups * 8;

  const int chunks_per_tile = ceil_div(p.N, kCols);
  const int64_t units = static_cast<int64_t>(p.tile_prefix[p.nseg]) * chunks_per_tile;
  const int64_t u_end = units * (blockIdx.x + 1) / gridDim.x;
  for (int64_t u = units * blockIdx.x / gridDim.x; u < u_end;) {
    const int mt = static_cast<int>(u / chunks_per_tile), c_first = static_cast<int>(u % chunks_per_tile);
    const int chunks = static_cast<int>(u_end - u < chunks_per_tile - c_first ? u_end - u : chunks_per_tile - c_first);
    u += chunks;
    const SegmentTile st = locate(p, mt);
    const int n_begin = c_first * kCols;
    const int n_end = min(p.N, n_begin + chunks * kCols);
    const T* b_src = Bbase + st.expert * p.b_expert_stride + st.slot * p.b_slot_stride;  // [N, R]
    const float alpha = p.slot_scale != nullptr ? p.slot_scale[st.slot] : 1.f;

    if constexpr (!kTilesOnly) {
      if (st.few_rows) {  // few rows: swapped-operand mma path (lora_rows_mma.cuh)
        lora_few_rows::expand_tile<T, RP, kWarps, kGated>(p.partial, p.k_splits,
                                                          static_cast<int64_t>(p.max_rows) * p.R, b_src, p.R, vec_b,
                                                          vec_out, out, alpha, st.row0, st.rows, n_begin, n_end,
                                                          reinterpret_cast<float*>(smem_raw));
        continue;
      }
    }

    // Chunk c's B rows (gated: kCols gate rows, then the matching up rows) and, when 16-byte copies are
    // possible (vec_out), its D values for rows [0, rows): D columns [n0, n0 + kCols) (+ up_col, gated).
    // A thread copies the same (side, 8 columns) of every kVecRowStep-th row, from a pointer set once per tile:
    // the index arithmetic per 16-byte copy was ~33 instructions (a fifth of the gated kernel's, NOTES.md v14).
    // B stage row r: column n0 + r % kCols of side r / kCols; rows past n_end are not copied (TileCopy16).
    const TileCopy16<T, kBN, RP, kLdt, kThreadsX, kCols> b_copy(
        [&](int r) { return b_src + static_cast<int64_t>(r % kCols + r / kCols * p.up_col) * p.R; });
    const T* d_vec = D + static_cast<int64_t>(st.row0 + vr) * p.ldd + vx + vsd * p.up_col;
    const int64_t d_vec_step = static_cast<int64_t>(kVecRowStep) * p.ldd;
    auto load_stage = [&](int s, int c) {
      const int n0 = n_begin + c * kCols;
      T* bs = stage_b(s);
      T* ds = stage_d(s);
      if (vec_b) {
        b_copy.issue(bs, static_cast<int64_t>(n0) * p.R, 0, p.R, n_end - n0);
      } else {
#pragma unroll
        for (int sd = 0; sd < kSides; ++sd)
          load_tile<T, kCols, RP, kLdt, kThreadsX>(bs + sd * kCols * kLdt,
                                                  b_src + static_cast<int64_t>(n0 + sd * p.up_col) * p.R, p.R,
                                                  min(kCols, n_end - n0), 0, p.R, false);
      }
      if (vec_out) {  // this thread's vectors: rows vr, vr + kVecRowStep, ... of its (side, 8 columns)
        const bool ok = n0 + vx < n_end;
        const T* src = d_vec + n0;
        T* dst = ds + vr * kLdd + vsd * kCols + vx;
#pragma unroll
        for (int i = 0; i < kTileRows / kVecRowStep; ++i)
          if (vr + i * kVecRowStep < st.rows)
            cp_async_16(dst + i * kVecRowStep * kLdd, ok ? src + i * d_vec_step : D, ok);
      }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < chunks) load_stage(s, s);
      cp_async_commit();
    }

    // t = sum of the split-K partials in a fixed order, rounded to the activation dtype (zero padded).
    for (int c = threadIdx.x; c < kTileRows * RP; c += kThreadsX) {
      const int r = c / RP, col = c % RP;
      float v = 0.f;
      if (r < st.rows && col < p.R) {
        const float* src = p.partial + static_cast<int64_t>(st.row0 + r) * p.R + col;
        v = sum_splits(src, p.k_splits, static_cast<int64_t>(p.max_rows) * p.R);
      }
      t_tile[r * kLdt + col] = from_float<T>(v);
    }

    const int bands = ceil_div(st.rows, 16);  // 16-row bands of the tile
    // Chunk c's stage is waited for first; the barrier after that wait also shows every warp done with chunk
    // c - 1, whose stage the prefetch of chunk c + kStages - 1 then refills, so no barrier ends a chunk (one
    // barrier per chunk, not two; NOTES.md v18-v19: the gated expand 1-3% faster, same bits). Each iteration
    // commits one group, so chunk c's is the one with kStages - 2 newer ones at the wait.
    for (int c = 0; c < chunks; ++c) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // chunk c's stage (and, the first time, t) visible to every warp; chunk c - 1's free
      const int prefetch = c + kStages - 1;
      if (prefetch < chunks) load_stage(prefetch % kStages, prefetch);
      cp_async_commit();
      const int n0 = n_begin + c * kCols;
      const T* bs = stage_b(c % kStages);
      T* ds = stage_d(c % kStages);

      // The chunk's (16-row band, column block) items, spread over the warps so that every warp has work
      // when the tile holds more than one band (qwen3's ~28-row tiles used to leave two warps idle). A block
      // is kXCols output columns: plain, D columns; gated, h columns with their gate and up stage columns, so
      // that each lane's products hold a gate value and its up value side by side.
#pragma unroll 1
      for (int it = warp; it < bands * kXBlocks; it += kWarpsX) {
        // Item it: block it / bands of band it % bands (kXBlocks <= 2: no division); with 4 blocks, block
        // it % 4 of band it / 4.
        const int xb = kXBlocks <= 2 ? (it >= bands ? 1 : 0) : it % kXBlocks;
        const int band = kXBlocks <= 2 ? it - xb * bands : it / kXBlocks;
        const int r0 = band * 16, xc = xb * kXCols;  // band's first row, block's first column
        // acc[sd][j]: the 16 x 8 products of stage columns sd * kCols + xc + 8j .. + 7 (gated: sd 0 gate, 1 up).
        float acc[kSides][kXCols / 8][4];
#pragma unroll
        for (int sd = 0; sd < kSides; ++sd)
#pragma unroll
          for (int j = 0; j < kXCols / 8; ++j) acc[sd][j][0] = acc[sd][j][1] = acc[sd][j][2] = acc[sd][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < RP; kk += 16) {
          const T* ta = t_tile + (r0 + g) * kLdt + kk + 2 * q;
          const uint32_t a0 = lds_pair(ta), a1 = lds_pair(ta + 8 * kLdt), a2 = lds_pair(ta + 8),
                         a3 = lds_pair(ta + 8 * kLdt + 8);
#pragma unroll
          for (int sd = 0; sd < kSides; ++sd)
#pragma unroll
            for (int j = 0; j < kXCols / 8; ++j) {
              const T* tb = bs + (sd * kCols + xc + 8 * j + g) * kLdt + kk + 2 * q;
              mma_operands::mma_16816<T>(acc[sd][j], a0, a1, a2, a3, lds_pair(tb), lds_pair(tb + 8));
            }
        }
        // Finished from the registers: acc[sd][j] = {(r, x), (r, x + 1), (r + 8, x), (r + 8, x + 1)} with
        // r = r0 + g, x = xc + 8j + 2q. v = round(D + alpha * product) per side, two columns per register;
        // plain, v goes back over its D values; gated, h = round(act(v_gate) * v_up) goes over the gate values.
        // The write-out below copies them with 16-byte vectors.
        auto finish = [&](auto act) {
#pragma unroll
          for (int j = 0; j < kXCols / 8; ++j)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const int r = r0 + g + 8 * hh, x = xc + 8 * j + 2 * q;
              uint32_t v[kSides];
#pragma unroll
              for (int sd = 0; sd < kSides; ++sd) {
                float d0, d1;
                if (vec_out) {
                  const uint32_t d = lds_pair(ds + r * kLdd + sd * kCols + x);
                  d0 = low_float<T>(d);
                  d1 = high_float<T>(d);
                } else {  // element loads from D (no D values were staged)
                  const int col = n0 + x;
                  const T* src = D + static_cast<int64_t>(st.row0 + r) * p.ldd + col + sd * p.up_col;
                  const bool row_ok = r < st.rows;
                  d0 = row_ok && col < n_end ? to_float(src[0]) : 0.f;
                  d1 = row_ok && col + 1 < n_end ? to_float(src[1]) : 0.f;
                }
                v[sd] = round_pack2<T>(alpha * acc[sd][j][2 * hh] + d0, alpha * acc[sd][j][2 * hh + 1] + d1);
              }
              uint32_t o = v[0];
              if constexpr (kGated) o = gated_pair<decltype(act)::value, T>(v[0], v[kSides - 1]);
              *reinterpret_cast<uint32_t*>(ds + r * kLdd + x) = o;  // x even: 4-byte aligned
            }
        };
        with_activation(kGated ? p.activation : ActivationKind::Silu, finish);
        __syncwarp();
        // Write-out of the band's rows: lane -> (row wr + i * kWriteRowStep, 8 columns at wx).
#pragma unroll
        for (int i = 0; i < 16 / kWriteRowStep; ++i) {
          const int r = r0 + wr + i * kWriteRowStep, x = xc + wx, col = n0 + x;
          if (r >= st.rows || col >= n_end) continue;
          const T* v = ds + r * kLdd + x;
          T* dst = kGated ? out.h + static_cast<int64_t>(st.row0 + r) * p.ldh + col
                          : D + static_cast<int64_t>(st.row0 + r) * p.ldd + col;
          if (vec_out) {
            *reinterpret_cast<Vec8<T>*>(dst) = *reinterpret_cast<const Vec8<T>*>(v);
          } else {
            for (int e = 0; e < 8 && col + e < n_end; ++e) dst[e] = v[e];
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // t and the stages are rewritten by the next item
  }
}

// Shrink work items wanted per launch: `waves` waves of resident CTAs (default 2), so the tail of uneven
// items is short.
int target_items(int sm_count, int waves) { return waves * sm_count * kBlocksPerSm; }

// How many K-chunks to cut each m-tile's shrink into so the launch has target_items() work items.
int splits_to_fill(int max_rows, int max_active_segments, int sm_count, int waves) {
  const int64_t m_tiles = std::max<int64_t>(1, segment_tiles_upper_bound(max_rows, max_active_segments));
  return static_cast<int>(std::max<int64_t>(1, (target_items(sm_count, waves) + m_tiles - 1) / m_tiles));
}

// Calls f(std::integral_constant<int, RP>{}) with the rank padded to the kernels' instantiations.
template <typename F>
void dispatch_padded_rank(int R, F&& f) {
  if (R <= 16) f(std::integral_constant<int, 16>{});
  else if (R <= 32) f(std::integral_constant<int, 32>{});
  else if (R <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// Every segment of the launch on the 64-row tiles (few_rows_max == 0): the tiles-only kernel runs it, unless
// MOELORA_LORA_TILES_KERNEL=0 asked for the default kernel's 64-row path (stages.h, tiles_kernel).
template <typename Params>
bool tiles_only_launch(const Params& p) {
  return p.few_rows_max == 0 && p.tiles_kernel;
}

// kernel<<<grid, threads, smem>>>(p), its dynamic shared memory allowed first. The attribute is host-side
// (not a stream operation: fine during graph capture) and set on every launch, so that it holds on whichever
// device is current.
template <typename Params>
cudaError_t launch_with_smem(void (*kernel)(Params), int grid, size_t smem, cudaStream_t stream, const Params& p,
                             int threads = kThreads) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return err != cudaSuccess ? err : launch_kernel(kernel, grid, threads, smem, stream, p);
}

template <typename T, int RP>
cudaError_t launch_shrink_typed(const LoraShrinkParams& p, int sm_count, cudaStream_t stream) {
  const int64_t items_ub = segment_tiles_upper_bound(p.max_rows, p.max_active_segments) * p.k_splits;
  const int grid = static_cast<int>(std::min<int64_t>(items_ub, int64_t(sm_count) * kBlocksPerSm));
  if (grid == 0) return cudaSuccess;
  const bool token_rows = p.x_rows != nullptr;
  if constexpr (RP <= kLoraTilesMaxRank) {
    if (tiles_only_launch(p)) {
      using Shape = ShrinkShape<RP, false, true>;
      const int grid_t = static_cast<int>(std::min<int64_t>(items_ub, int64_t(sm_count) * Shape::kBlocks));
      constexpr size_t smem_t = Shape::kSmemBytes;
      return token_rows ? launch_with_smem(lora_shrink_kernel<T, RP, false, true, true>, grid_t, smem_t, stream, p)
                        : launch_with_smem(lora_shrink_kernel<T, RP, false, false, true>, grid_t, smem_t, stream, p);
    }
  }
  if constexpr (RP == 64) {  // the only rank whose shape depends on it (ShrinkShape)
    if (lora_large_segments(p.max_rows, p.max_active_segments)) {
      constexpr size_t smem = ShrinkShape<RP, true>::kSmemBytes;
      return token_rows ? launch_with_smem(lora_shrink_kernel<T, RP, true, true, false>, grid, smem, stream, p)
                        : launch_with_smem(lora_shrink_kernel<T, RP, true, false, false>, grid, smem, stream, p);
    }
  }
  constexpr size_t smem = ShrinkShape<RP, false>::kSmemBytes;
  return token_rows ? launch_with_smem(lora_shrink_kernel<T, RP, false, true, false>, grid, smem, stream, p)
                    : launch_with_smem(lora_shrink_kernel<T, RP, false, false, false>, grid, smem, stream, p);
}

template <typename T, int RP>
cudaError_t launch_expand_typed(const LoraExpandParams& p, int sm_count, cudaStream_t stream) {
  // One CTA per resident slot; the kernel splits the (m-tile, chunk) units evenly over them.
  const int cols = ExpandShape<RP>::cols(p.h != nullptr);
  const int64_t units_ub = segment_tiles_upper_bound(p.max_rows, p.max_active_segments) * ceil_div(p.N, cols);
  const int grid = static_cast<int>(std::min<int64_t>(units_ub, int64_t(sm_count) * kBlocksPerSm));
  if (grid == 0) return cudaSuccess;
  constexpr size_t smem = ExpandShape<RP>::kSmemBytes;
  if constexpr (RP <= kLoraTilesMaxRank) {
    if (tiles_only_launch(p)) {
      constexpr int threads = expand_warps<true>() * 32;
      return p.h != nullptr ? launch_with_smem(lora_expand_kernel<T, RP, true, true>, grid, smem, stream, p, threads)
                            : launch_with_smem(lora_expand_kernel<T, RP, false, true>, grid, smem, stream, p, threads);
    }
  }
  return p.h != nullptr ? launch_with_smem(lora_expand_kernel<T, RP, true, false>, grid, smem, stream, p)
                        : launch_with_smem(lora_expand_kernel<T, RP, false, false>, grid, smem, stream, p);
}

}  // namespace

int lora_k_chunk(int K, int k_splits) { return ceil_div(ceil_div(K, k_splits), 32) * 32; }

int lora_k_splits(int K, int max_rows, int max_active_segments, int sm_count, int waves) {
  // Enough (m-tile, K-chunk) items to fill the GPU, but chunks of at least 4 K-steps of 32.
  const int splits =
      std::min(splits_to_fill(max_rows, max_active_segments, sm_count, waves), std::max(1, ceil_div(K, 128)));
  return lora_k_split_count(K, splits);
}

int lora_k_split_count(int K, int splits) { return ceil_div(K, lora_k_chunk(K, splits)); }

cudaError_t launch_lora_shrink(const LoraShrinkParams& p, int sm_count, cudaStream_t stream) {
  if (p.max_rows == 0 || p.R == 0) return cudaSuccess;
  if (p.R > kLoraMaxRank) return cudaErrorInvalidValue;
  if (p.t != nullptr && (p.k_splits != 1 || p.R % 8 != 0 || p.t_cols % 8 != 0)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_padded_rank(p.R, [&](auto rp) {
    err = p.dtype == DType::BF16 ? launch_shrink_typed<__nv_bfloat16, decltype(rp)::value>(p, sm_count, stream)
                                 : launch_shrink_typed<__half, decltype(rp)::value>(p, sm_count, stream);
  });
  return err;
}

cudaError_t launch_lora_expand(const LoraExpandParams& p, int sm_count, cudaStream_t stream) {
  if (p.max_rows == 0 || p.N == 0) return cudaSuccess;
  if (p.R > kLoraMaxRank) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_padded_rank(p.R, [&](auto rp) {
    err = p.dtype == DType::BF16 ? launch_expand_typed<__nv_bfloat16, decltype(rp)::value>(p, sm_count, stream)
                                 : launch_expand_typed<__half, decltype(rp)::value>(p, sm_count, stream);
  });
  return err;
}

}  // namespace moelora::cuda
