// LoRA on the (expert, slot) segments of the sorted rows, in two kernels per projection:
//
//   shrink: partial[ks, r, :R] = X[r, K-chunk ks] @ A[slot, e][:, K-chunk ks]^T      (split-K, fp32)
//   expand: D[r, n-range]     += scale[slot] * bf16(sum_ks partial[ks, r]) @ B[slot, e][n-range]^T
//
// Why this shape (benchmarks/NOTES.md, v3): at decode and mid batch sizes a segment holds a handful of
// rows, so a kernel is bound by latency, not bytes. The shrink's K loop (K = H or I, up to 14336) is split
// over CTAs so every SM streams adapter A, with the partial sums reduced by the expand in a fixed order
// (deterministic, no atomics). The expand keeps the rank-R input tile in shared memory and walks a range
// of N with double-buffered B chunks, instead of one tile launch-equivalent per 128 columns.
// Each work item picks its tile path from its segment's row count (NOTES.md, v4, v7): segments of up to
// few_rows_max rows (decode, mid batch sizes) go to lora_rows_mma.cuh, which streams the adapter straight from
// global memory into mma.sync fragments; larger ones use the 64-row WMMA tiles below, every tile of them.
// Tile counts come from the routing's device-side tile prefix (and its tile -> bucket table), so grids are
// sized from shapes alone and both kernels are CUDA-graph safe.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "activation.cuh"
#include "cuda_utils.cuh"
#include "lora_rows_mma.cuh"
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

template <class Params>
__device__ __forceinline__ SegmentTile locate(const Params& p, int mt) {
  const int seg = p.tile_segment[mt];
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

// ---- shrink ----------------------------------------------------------------------------------------
template <int RP>
struct ShrinkShape {
  static constexpr int kBK = 32;
  static constexpr int kStages = RP >= 128 ? 3 : 4;
  static constexpr int kLds = kBK + kPad;
  static constexpr int kStageElems = (kTileRows + RP) * kLds;
  static constexpr size_t kPipelineBytes = size_t(kStages) * kStageElems * 2;
  static constexpr int kLdc = RP + 4;
  static constexpr size_t kOutBytes = size_t(kTileRows) * kLdc * 4;
  static constexpr size_t kSmemBytes = kPipelineBytes > kOutBytes ? kPipelineBytes : kOutBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  static_assert(kSmemBytes >= size_t(kWarps) * 2 * lora_few_rows::kRowGroup * RP * 4, "room for the few-rows path's reduction");
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) lora_shrink_kernel(LoraShrinkParams p) {
  pdl_begin();
  using Shape = ShrinkShape<RP>;
  constexpr int kBK = Shape::kBK, kLds = Shape::kLds, kStages = Shape::kStages;
  __shared__ alignas(128) unsigned char smem_raw[Shape::kSmemBytes];
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  float* ctile = reinterpret_cast<float*>(smem_raw);  // after the K loop

  const T* X = static_cast<const T*>(p.X);
  const T* Abase = static_cast<const T*>(p.A);
  const int warp = threadIdx.x / 32;
  const bool vec = (p.K % 8 == 0) && (p.ldx % 8 == 0) && (p.a_expert_stride % 8 == 0) &&
                   (p.a_slot_stride % 8 == 0) && (reinterpret_cast<uintptr_t>(X) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(Abase) % 16 == 0);
  const int total = p.tile_prefix[p.nseg] * p.k_splits;

  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const int mt = item / p.k_splits, ks = item % p.k_splits;
    const SegmentTile st = locate(p, mt);
    const int k_begin = ks * p.k_chunk;
    const int k_end = min(p.K, k_begin + p.k_chunk);
    const int k_tiles = ceil_div(k_end - k_begin, kBK);
    const T* x_src = X + static_cast<int64_t>(st.row0) * p.ldx;
    const T* a_src = Abase + st.expert * p.a_expert_stride + st.slot * p.a_slot_stride;  // [R, K]
    if (st.few_rows) {  // few rows: swapped-operand mma path (lora_rows_mma.cuh)
      lora_few_rows::shrink_tile<T, RP, kWarps>(X, p.ldx, a_src, p.K, p.R,
                                            st.row0, st.rows, k_begin, k_end, vec,
                                            p.partial + static_cast<int64_t>(ks) * p.max_rows * p.R, ctile);
      continue;
    }
    const bool warp_active = warp * 16 < st.rows;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RP / 16];
#pragma unroll
    for (int j = 0; j < RP / 16; ++j) wmma::fill_fragment(acc[j], 0.f);

    auto stage_x = [&](int s) { return stage_base + s * Shape::kStageElems; };
    auto stage_a = [&](int s) { return stage_base + s * Shape::kStageElems + kTileRows * kLds; };
    auto load_stage = [&](int s, int kt) {
      const int k0 = k_begin + kt * kBK;
      load_tile<T, kTileRows, kBK, kLds, kThreads>(stage_x(s), x_src, p.ldx, st.rows, k0, k_end, vec);
      load_tile<T, RP, kBK, kLds, kThreads>(stage_a(s), a_src, p.K, p.R, k0, k_end, vec);
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
    float* dst = p.partial + (static_cast<int64_t>(ks) * p.max_rows + st.row0) * p.R;
    for (int c = threadIdx.x; c < st.rows * p.R; c += kThreads) {
      const int r = c / p.R, col = c % p.R;
      dst[c] = ctile[r * Shape::kLdc + col];
    }
    __syncthreads();  // ctile aliases the next item's pipeline buffers
  }
}

// ---- expand ----------------------------------------------------------------------------------------
template <int RP>
struct ExpandShape {
  static constexpr int kBN = RP >= 128 ? 32 : 64;      // B rows per chunk (gated: half gate, half up rows)
  static constexpr int kLdt = RP + kPad;               // t tile and B chunk row stride (elements)
  static constexpr int kLdd = kBN + kPad;              // D chunk row stride (elements; gated: gate | up columns)
  static constexpr int kScratchLd = 16 + 4;            // plain: per-warp fp32 16x16 epilogue scratch
  static constexpr int kLdc = kBN + 4;                 // gated: fp32 64 x kBN chunk products, row stride
  static constexpr size_t kTBytes = size_t(kTileRows) * kLdt * 2;
  static constexpr size_t kBBytes = size_t(2) * kBN * kLdt * 2;       // double buffered
  static constexpr size_t kDBytes = size_t(2) * kTileRows * kLdd * 2;  // double buffered (plain only)
  static constexpr size_t kScratchBytes = size_t(kWarps) * 16 * kScratchLd * 4;
  static constexpr size_t kProductBytes = size_t(kTileRows) * kLdc * 4;
  // Dynamic shared memory (above the 48 KB static limit for the larger ranks).
  static constexpr size_t smem_bytes(bool gated) {
    return kTBytes + kBBytes + (gated ? kProductBytes : kDBytes + kScratchBytes);
  }
  static_assert(smem_bytes(true) <= 64 * 1024, "three or more CTAs per SM");
  static_assert(smem_bytes(false) >= size_t(2) * lora_few_rows::kRowGroup * RP * 4, "room for the few-rows path's t tile");
};

// One work item = one 64-row m-tile x a range of N: t (the tile's rank-R inputs) in shared memory, and each
// chunk's kBN rows of B copied with cp.async into a double buffer one chunk ahead.
// Plain: D[r, n] += alpha * t[r] . B[n], each warp taking its 16 rows through mma -> scratch -> epilogue one
// 16x16 block at a time; the chunk's D values come through shared memory with B, one chunk ahead, so their
// round trip overlaps the previous chunk (10-16% faster than loading them at the chunk's start, NOTES.md v7).
// kGated (fc1 with the activation fused, p.h set; see ExpandOut): a chunk holds kBN / 2 gate rows of B and the
// matching up rows; the warps owning rows write the 64 x kBN products to shared memory, then every thread
// takes (row, 8 columns) items of the epilogue, which reads gate and up from D and writes h. Measured on the
// H100 (benchmarks/NOTES.md, v7): the whole-block epilogue made the gated expand up to 23% faster (the
// activation's arithmetic is spread over all warps, not only those owning rows) but the plain one 25-30%
// slower, hence the two epilogues.
template <typename T, int RP, bool kGated>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) lora_expand_kernel(LoraExpandParams p) {
  pdl_begin();
  using Shape = ExpandShape<RP>;
  constexpr int kBN = Shape::kBN, kLdt = Shape::kLdt;
  constexpr int kSides = kGated ? 2 : 1;
  constexpr int kCols = kBN / kSides;  // output columns per chunk
  extern __shared__ __align__(128) unsigned char smem_raw[];  // Shape::smem_bytes(kGated)
  T* t_tile = reinterpret_cast<T*>(smem_raw);
  T* b_buf = reinterpret_cast<T*>(smem_raw + Shape::kTBytes);
  T* d_buf = reinterpret_cast<T*>(smem_raw + Shape::kTBytes + Shape::kBBytes);  // plain only
  float* epilogue_smem =
      reinterpret_cast<float*>(smem_raw + Shape::kTBytes + Shape::kBBytes + (kGated ? 0 : Shape::kDBytes));
  constexpr int kLdd = Shape::kLdd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* Bbase = static_cast<const T*>(p.B);
  const ExpandOut<T> out{static_cast<T*>(p.D), p.ldd, static_cast<T*>(p.h), p.ldh, p.up_col, p.activation};
  T* D = out.D;
  const bool vec_b = (p.R % 8 == 0) && (p.b_expert_stride % 8 == 0) && (p.b_slot_stride % 8 == 0) &&
                     (reinterpret_cast<uintptr_t>(Bbase) % 16 == 0);
  bool vec_out = (p.N % 8 == 0) && (p.ldd % 8 == 0) && (reinterpret_cast<uintptr_t>(D) % 16 == 0);
  if constexpr (kGated)
    vec_out = vec_out && p.ldh % 8 == 0 && p.up_col % 8 == 0 && reinterpret_cast<uintptr_t>(out.h) % 16 == 0;
  const int n_ranges = ceil_div(p.N, p.n_range);
  const int total = p.tile_prefix[p.nseg] * n_ranges;

  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const int mt = item / n_ranges, nr = item % n_ranges;
    const SegmentTile st = locate(p, mt);
    const int n_begin = nr * p.n_range;
    const int n_end = min(p.N, n_begin + p.n_range);
    const int chunks = ceil_div(n_end - n_begin, kCols);
    const T* b_src = Bbase + st.expert * p.b_expert_stride + st.slot * p.b_slot_stride;  // [N, R]
    const float alpha = p.slot_scale != nullptr ? p.slot_scale[st.slot] : 1.f;
    const int my_row0 = warp * 16;
    const bool warp_active = my_row0 < st.rows;

    if (st.few_rows) {  // few rows: swapped-operand mma path (lora_rows_mma.cuh)
      lora_few_rows::expand_tile<T, RP, kWarps, kGated>(p.partial, p.k_splits, static_cast<int64_t>(p.max_rows) * p.R,
                                                        b_src, p.R, vec_b, out, alpha, st.row0, st.rows, n_begin,
                                                        n_end, reinterpret_cast<float*>(smem_raw));
      continue;
    }

    auto load_chunk = [&](int stage, int c) {
      const int n0 = n_begin + c * kCols;
#pragma unroll
      for (int sd = 0; sd < kSides; ++sd)
        load_tile<T, kCols, RP, kLdt, kThreads>(b_buf + (stage * kBN + sd * kCols) * kLdt,
                                                b_src + static_cast<int64_t>(n0 + sd * p.up_col) * p.R, p.R,
                                                min(kCols, n_end - n0), 0, p.R, vec_b);
    };
    // Plain path: the chunk's D values, rows [0, rows) x its kBN columns, when 16-byte copies are possible
    // (vec_out); else its epilogue reads D from global memory.
    auto load_d = [&](int stage, int c) {
      const int n0 = n_begin + c * kBN;
      T* dst = d_buf + stage * kTileRows * kLdd;
      constexpr int kVecs = kBN / 8;
      for (int v = threadIdx.x; v < st.rows * kVecs; v += kThreads) {
        const int r = v / kVecs, col = n0 + (v % kVecs) * 8;
        const bool ok = col < n_end;
        cp_async_16(dst + r * kLdd + (col - n0), ok ? D + static_cast<int64_t>(st.row0 + r) * p.ldd + col : D, ok);
      }
    };
    auto load_stage = [&](int stage, int c) {
      load_chunk(stage, c);
      if constexpr (!kGated)
        if (vec_out) load_d(stage, c);
    };
    load_stage(0, 0);
    cp_async_commit();

    // t = sum of the split-K partials in a fixed order, rounded to the activation dtype (zero padded).
    for (int c = threadIdx.x; c < kTileRows * RP; c += kThreads) {
      const int r = c / RP, col = c % RP;
      float v = 0.f;
      if (r < st.rows && col < p.R) {
        const float* src = p.partial + static_cast<int64_t>(st.row0 + r) * p.R + col;
        v = sum_splits(src, p.k_splits, static_cast<int64_t>(p.max_rows) * p.R);
      }
      t_tile[r * kLdt + col] = from_float<T>(v);
    }

    // The rank-R products of 16 rows (this warp's) x 16 B rows (block j of the chunk in buffer `bs`).
    auto block_products = [&](const T* bs, int j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < RP; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B [N, R] row-major
        wmma::load_matrix_sync(fa, t_tile + my_row0 * kLdt + kk, kLdt);
        wmma::load_matrix_sync(fb, bs + j * 16 * kLdt + kk, kLdt);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      return acc;
    };

    if constexpr (!kGated) {
      constexpr int kLds = Shape::kScratchLd;
      float* scratch = epilogue_smem + warp * 16 * kLds;
      const int rmw_row = my_row0 + lane / 2, rmw_col = (lane % 2) * 8;  // this lane's 8 columns of a 16x16 block
      const int64_t d_row = static_cast<int64_t>(st.row0 + rmw_row) * p.ldd;
      for (int c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) load_stage((c + 1) % 2, c + 1);
        cp_async_commit();
        const int n0 = n_begin + c * kBN;
        cp_async_wait<1>();
        __syncthreads();
        if (warp_active) {
          const T* bs = b_buf + (c % 2) * kBN * kLdt;
          const T* ds = d_buf + (c % 2) * kTileRows * kLdd + rmw_row * kLdd + rmw_col;
#pragma unroll
          for (int j = 0; j < kBN / 16; ++j) {
            wmma::store_matrix_sync(scratch, block_products(bs, j), kLds, wmma::mem_row_major);
            __syncwarp();
            // Read-modify-write of the 16x16 block: lane -> (row, 8 columns), rows past the segment skipped.
            const int gcol = n0 + j * 16 + rmw_col;
            if (rmw_row < st.rows && gcol < n_end) {
              T* dst = D + d_row + gcol;
              const float* src = scratch + (lane / 2) * kLds + rmw_col;
              if (vec_out) {
                const Vec8<T> prev = *reinterpret_cast<const Vec8<T>*>(ds + j * 16);
                Vec8<T> o;
#pragma unroll
                for (int i = 0; i < 8; ++i) o.v[i] = from_float<T>(alpha * src[i] + to_float(prev.v[i]));
                *reinterpret_cast<Vec8<T>*>(dst) = o;
              } else {
                for (int i = 0; i < 8 && gcol + i < n_end; ++i) dst[i] = from_float<T>(alpha * src[i] + to_float(dst[i]));
              }
            }
            __syncwarp();  // scratch is reused by the next block
          }
        }
        __syncthreads();  // the chunk's buffers are refilled by the next prefetch
      }
    } else {
      constexpr int kLdc = Shape::kLdc;
      constexpr int kGroups = kCols / 8;                      // 8-column epilogue groups per row
      constexpr int kItems = kTileRows * kGroups / kThreads;  // epilogue items per thread and chunk
      static_assert(kTileRows * kGroups % kThreads == 0, "whole epilogue items per thread");
      float* products = epilogue_smem;                         // [64, kLdc]: gate columns, then up columns
      for (int c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) load_chunk((c + 1) % 2, c + 1);
        cp_async_commit();
        const int n0 = n_begin + c * kCols;
        // gate and up D values loaded into registers before waiting for the chunk's B. Through shared memory, as
        // on the plain path, was measured mixed here (qwen3 / gpt-oss faster, mixtral 4% slower, and rank 64's
        // 63.5 KB leave 3 CTAs per SM; NOTES.md v7).
        Vec8<T> prev[kItems][2];  // gate, up
#pragma unroll
        for (int it = 0; it < kItems; ++it) {
          const int e = threadIdx.x + it * kThreads, r = e / kGroups, gcol = n0 + (e % kGroups) * 8;
          if (vec_out && r < st.rows && gcol < n_end)
#pragma unroll
            for (int sd = 0; sd < 2; ++sd)
              prev[it][sd] = *reinterpret_cast<const Vec8<T>*>(D + static_cast<int64_t>(st.row0 + r) * p.ldd + gcol +
                                                               sd * p.up_col);
        }
        cp_async_wait<1>();
        __syncthreads();
        if (warp_active) {
          const T* bs = b_buf + (c % 2) * kBN * kLdt;
#pragma unroll
          for (int j = 0; j < kBN / 16; ++j)
            wmma::store_matrix_sync(products + my_row0 * kLdc + j * 16, block_products(bs, j), kLdc, wmma::mem_row_major);
        }
        // The products are complete, and this chunk's B buffer is free for the prefetch two chunks on (the
        // next iteration's barrier orders this epilogue's reads of `products` before the next chunk's writes).
        __syncthreads();
#pragma unroll
        for (int it = 0; it < kItems; ++it) {
          const int e = threadIdx.x + it * kThreads, r = e / kGroups, gcol = n0 + (e % kGroups) * 8;
          if (r >= st.rows || gcol >= n_end) continue;
          const float* src = products + r * kLdc + (gcol - n0);  // gate products; up products kCols on
          const T* gu_row = D + static_cast<int64_t>(st.row0 + r) * p.ldd;
          T* dst = out.h + static_cast<int64_t>(st.row0 + r) * p.ldh + gcol;
          if (vec_out) {
            Vec8<T> o;
#pragma unroll
            for (int i = 0; i < 8; ++i)
              o.v[i] = gated_value(from_float<T>(alpha * src[i] + to_float(prev[it][0].v[i])),
                                   from_float<T>(alpha * src[kCols + i] + to_float(prev[it][1].v[i])), p.activation);
            *reinterpret_cast<Vec8<T>*>(dst) = o;
          } else {
            for (int i = 0; i < 8 && gcol + i < n_end; ++i)
              dst[i] = gated_value(from_float<T>(alpha * src[i] + to_float(gu_row[gcol + i])),
                                   from_float<T>(alpha * src[kCols + i] + to_float(gu_row[p.up_col + gcol + i])),
                                   p.activation);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // t_tile, B and the epilogue's shared memory are rewritten by the next item
  }
}

// Work items wanted per launch: two waves of resident CTAs, so the tail of uneven items is short.
int target_items(int sm_count) { return 2 * sm_count * kBlocksPerSm; }


// How many pieces to cut each m-tile's work into so the launch has target_items() work items.
int splits_to_fill(int max_rows, int max_active_segments, int sm_count) {
  const int64_t m_tiles = std::max<int64_t>(1, segment_tiles_upper_bound(max_rows, max_active_segments));
  return static_cast<int>(std::max<int64_t>(1, (target_items(sm_count) + m_tiles - 1) / m_tiles));
}

// Calls f(std::integral_constant<int, RP>{}) with the rank padded to the kernels' instantiations.
template <typename F>
void dispatch_padded_rank(int R, F&& f) {
  if (R <= 16) f(std::integral_constant<int, 16>{});
  else if (R <= 32) f(std::integral_constant<int, 32>{});
  else if (R <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

template <typename T, int RP>
cudaError_t launch_shrink_typed(const LoraShrinkParams& p, int sm_count, cudaStream_t stream) {
  const int64_t items_ub = segment_tiles_upper_bound(p.max_rows, p.max_active_segments) * p.k_splits;
  const int grid = static_cast<int>(std::min<int64_t>(items_ub, int64_t(sm_count) * kBlocksPerSm));
  return grid > 0 ? launch_kernel(lora_shrink_kernel<T, RP>, grid, kThreads, 0, stream, p) : cudaSuccess;
}

template <typename T, int RP>
cudaError_t launch_expand_typed(const LoraExpandParams& p, int sm_count, cudaStream_t stream) {
  const int64_t items_ub = segment_tiles_upper_bound(p.max_rows, p.max_active_segments) * ceil_div(p.N, p.n_range);
  const int grid = static_cast<int>(std::min<int64_t>(items_ub, int64_t(sm_count) * kBlocksPerSm));
  if (grid == 0) return cudaSuccess;
  auto launch = [&](auto kernel, size_t smem) {
    // Set on every launch (a host-side attribute, not a stream operation: fine during graph capture), so it
    // holds on whichever device is current.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    return err != cudaSuccess ? err : launch_kernel(kernel, grid, kThreads, smem, stream, p);
  };
  using Shape = ExpandShape<RP>;
  return p.h != nullptr ? launch(lora_expand_kernel<T, RP, true>, Shape::smem_bytes(true))
                        : launch(lora_expand_kernel<T, RP, false>, Shape::smem_bytes(false));
}

}  // namespace

int lora_k_chunk(int K, int k_splits) { return ceil_div(ceil_div(K, k_splits), 32) * 32; }

int lora_k_splits(int K, int max_rows, int max_active_segments, int sm_count) {
  // Enough (m-tile, K-chunk) items to fill the GPU, but chunks of at least 4 K-steps of 32.
  const int splits = std::min(splits_to_fill(max_rows, max_active_segments, sm_count), std::max(1, ceil_div(K, 128)));
  return ceil_div(K, lora_k_chunk(K, splits));
}

int lora_n_range(int N, int R, int max_rows, int max_active_segments, int sm_count) {
  const int bn = R > 64 ? 32 : 64;  // ExpandShape<RP>::kBN
  const int splits = std::min(splits_to_fill(max_rows, max_active_segments, sm_count), ceil_div(N, bn));
  return ceil_div(ceil_div(N, splits), bn) * bn;
}

cudaError_t launch_lora_shrink(const LoraShrinkParams& p, int sm_count, cudaStream_t stream) {
  if (p.max_rows == 0 || p.R == 0) return cudaSuccess;
  if (p.R > kLoraMaxRank) return cudaErrorInvalidValue;
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
