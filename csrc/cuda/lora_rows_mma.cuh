// LoRA shrink/expand for m-tiles that hold only a few rows (decode and mid batch sizes, where an (expert,
// slot) segment gets 1-16 rows), on mma.sync with the roles swapped: the adapter matrix is the 16-row "A"
// operand, loaded straight from global memory into registers, and the token rows are the 8-wide "N" side.
//
// Why (benchmarks/NOTES.md, v4): in a 64-row tensor-core tile holding 2 real rows, each K step (shrink) or
// 64-column chunk (expand) was a dependent load -> mma -> store chain with 1-2 KB in flight per CTA, and
// Nsight Compute showed the kernels at 10-20% of DRAM bandwidth, stalled on memory latency. Here a warp
// issues the 16-byte adapter loads (and the expand's D loads) of several steps before its first mma, every
// load is coalesced, and one m16n8k16 mma covers 16 adapter rows x 8 token rows, so few instructions are
// spent per byte of adapter weight.
//
// K order: see mma_operands.cuh (each lane loads 8 consecutive k; A and B fragments use the same mapping).
// Numerics as the 64-row path: fp32 accumulation, t rounded to the activation dtype
// before the expand, D = round(alpha * acc + D); summation orders are fixed by the shapes (deterministic).
#pragma once
#include <cstdint>
#include <type_traits>

#include "activation.cuh"
#include "cuda_utils.cuh"
#include "lora_t_rows.cuh"
#include "mma_operands.cuh"
#include "stages.h"

namespace moelora::cuda {

// Where an expand's result goes. Plain: D[r, n] += delta (read-modify-write). Gated (h != nullptr; fc1 with
// the activation fused): D is gu [rows, 2I], only read; h[r, n] = act(gu[r, n] + delta_n) * (gu[r, up_col + n]
// + delta_{up_col + n}) with each sum rounded to T first, for n < I = up_col.
template <typename T>
struct ExpandOut {
  T* D;
  int64_t ldd;
  T* h;
  int64_t ldh;
  int up_col;
  ActivationKind act;
};

}  // namespace moelora::cuda

namespace moelora::cuda::lora_few_rows {

constexpr int kRowGroup = 8;  // token rows per mma (the N of m16n8k16); larger tiles loop over row groups

using mma_operands::load_pack;
using mma_operands::mma_16816;
using mma_operands::Pack;
using mma_operands::pack2;

// Rows per pass: one or two 8-row groups (NG); two share every adapter load between two mmas, for ranks
// where the registers allow it (RP <= kLoraRowPairsMaxRank). Tiles above 16 rows loop over passes.
template <int RP>
constexpr bool kRowPairs = RP <= kLoraRowPairsMaxRank;

// ---- shrink --------------------------------------------------------------------------------------------
// partial[row0 + r, j] = sum over k in [k_begin, k_end) of X[row0 + r, k] * A[j, k] for r < rows (<= 8 NG)
// (X's row x_rows[row0 + r] instead with kTokenRows, LoraShrinkParams::x_rows),
// j < R. mma: M = 16 adapter rows j, N = 8 token rows, K = k. Warp w takes the 32-wide k blocks w, w + kWarps,
// ...; the warps' sums meet in shared memory (`red`: shrink_red_floats) and are added in warp order.
// With t_out.t set they go to t instead (lora_t_rows.cuh; one K split).
// red's rows are kRedLd = RP + 4 floats apart: a lane writes token rows 2q, 2q + 1 of column g, and with a
// row stride of RP the four q of one g hit the same bank (4-way conflicts, Nsight Compute, NOTES.md v10).
template <int RP>
constexpr int kRedLd = RP + 4;
template <int RP, int kWarps>
constexpr int shrink_red_floats() { return kWarps * 2 * kRowGroup * kRedLd<RP>; }

template <typename T, int RP, int kWarps, int NG, bool kTokenRows>
__device__ void shrink_pass(const T* __restrict__ X, int64_t ldx, const int* __restrict__ x_rows,
                            const T* __restrict__ A, int64_t lda, int R, int row0, int rows, int k_begin, int k_end,
                            bool vec, float* __restrict__ partial, const TRowsOut& t_out, float* red) {
  constexpr int JB = RP / 16;                                   // 16-row blocks of A
  constexpr int U = JB >= 4 ? 1 : (JB == 2 ? 2 : 4);            // k blocks in flight per warp
  constexpr int kRedRows = 2 * kRowGroup;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int nkb = ceil_div(k_end - k_begin, 32);
  const T* xrow[NG];
#pragma unroll
  for (int ng = 0; ng < NG; ++ng) {
    const int r = row0 + min(8 * ng + g, rows - 1);
    xrow[ng] = X + static_cast<int64_t>(kTokenRows ? x_rows[r] : r) * ldx;
  }
  float c[JB][NG][4];
#pragma unroll
  for (int jb = 0; jb < JB; ++jb)
#pragma unroll
    for (int ng = 0; ng < NG; ++ng) c[jb][ng][0] = c[jb][ng][1] = c[jb][ng][2] = c[jb][ng][3] = 0.f;

  for (int kb0 = warp; kb0 < nkb; kb0 += kWarps * U) {
    Pack<T, 8> xp[U][NG], ap[U][JB][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k_begin + (kb0 + u * kWarps) * 32 + 8 * q;
      const bool k_ok = kb0 + u * kWarps < nkb && k < k_end;
#pragma unroll
      for (int ng = 0; ng < NG; ++ng) xp[u][ng] = load_pack<T, 8>(xrow[ng] + k, vec, k_ok && 8 * ng + g < rows ? 8 : 0);
#pragma unroll
      for (int jb = 0; jb < JB; ++jb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = 16 * jb + g + 8 * h;
          ap[u][jb][h] = load_pack<T, 8>(A + static_cast<int64_t>(min(j, R - 1)) * lda + k, vec, k_ok && j < R ? 8 : 0);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int jb = 0; jb < JB; ++jb)
#pragma unroll
        for (int ng = 0; ng < NG; ++ng) {
          const Pack<T, 8>& a0 = ap[u][jb][0];
          const Pack<T, 8>& a1 = ap[u][jb][1];
          mma_16816<T>(c[jb][ng], a0.w[0], a1.w[0], a0.w[1], a1.w[1], xp[u][ng].w[0], xp[u][ng].w[1]);
          mma_16816<T>(c[jb][ng], a0.w[2], a1.w[2], a0.w[3], a1.w[3], xp[u][ng].w[2], xp[u][ng].w[3]);
        }
  }
  // c[jb][ng] = {(j, r), (j, r + 1), (j + 8, r), (j + 8, r + 1)} with j = 16 jb + g, r = 8 ng + 2q.
#pragma unroll
  for (int jb = 0; jb < JB; ++jb)
#pragma unroll
    for (int ng = 0; ng < NG; ++ng) {
      constexpr int ld = kRedLd<RP>;
      float* dst = red + (warp * kRedRows + 8 * ng + 2 * q) * ld + 16 * jb + g;
      dst[0] = c[jb][ng][0];
      dst[ld] = c[jb][ng][1];
      dst[8] = c[jb][ng][2];
      dst[ld + 8] = c[jb][ng][3];
    }
  __syncthreads();
  auto sum_of = [&](int r, int j) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * kRedRows + r) * kRedLd<RP> + j];
    return v;
  };
  if (t_out.t != nullptr) {
    write_t_rows<T>(t_out, row0, rows, R, sum_of, threadIdx.x, kWarps * 32);
  } else {
    for (int e = threadIdx.x; e < rows * R; e += kWarps * 32)
      partial[static_cast<int64_t>(row0 + e / R) * R + e % R] = sum_of(e / R, e % R);
  }
  __syncthreads();  // red is rewritten by the next pass / reused by the caller
}

template <typename T, int RP, int kWarps, bool kTokenRows>
__device__ void shrink_tile(const T* __restrict__ X, int64_t ldx, const int* __restrict__ x_rows,
                            const T* __restrict__ A, int64_t lda, int R, int row0, int rows, int k_begin, int k_end,
                            bool vec, float* __restrict__ partial, const TRowsOut& t_out, float* red) {
  for (int g0 = 0; g0 < rows;) {
    const int left = rows - g0;
    if constexpr (kRowPairs<RP>) {
      if (left > kRowGroup) {
        shrink_pass<T, RP, kWarps, 2, kTokenRows>(X, ldx, x_rows, A, lda, R, row0 + g0, min(left, 2 * kRowGroup),
                                                  k_begin, k_end, vec, partial, t_out, red);
        g0 += 2 * kRowGroup;
        continue;
      }
    }
    shrink_pass<T, RP, kWarps, 1, kTokenRows>(X, ldx, x_rows, A, lda, R, row0 + g0, min(left, kRowGroup), k_begin,
                                              k_end, vec, partial, t_out, red);
    g0 += kRowGroup;
  }
}

// ---- expand ----------------------------------------------------------------------------------------
// D[row0 + r, n] = round(alpha * sum_j t[r, j] * B[n, j] + D[row0 + r, n]) for n in [n_begin, n_end) and
// r < rows (<= 8 NG), with t[r] = round(sum over ks of partial[ks, row0 + r]) in ks order. mma: M = 16
// columns n (rows of B), N = 8 token rows, K = rank. Warp w takes the 16-column blocks w, w + kWarps, ...,
// U at a time, issuing their B loads (and the D loads of its write-out items) before the mmas.
// Gated (fc1 with the activation fused, ExpandOut::h set): n runs over h's columns, each needs the gate
// column n and the up column n + up_col of D and B; D (gu) is only read and h = round(act(round(v_gate)) *
// round(v_up)) is written -- the same roundings as the plain expand followed by activation.cu.
//
// Write-out through the warp's shared-memory scratch (NOTES.md v9): the mma leaves each lane the products
// of 2 columns x 2 token rows, so with 1-2 rows per segment (decode-like batches) three in four lanes held
// nothing to write, yet every lane ran the whole epilogue (two-byte D loads, the activation, two-byte
// stores). The products now go to shared memory and the warp finishes them as (row, 8-column) items, one per
// lane, with 16-byte D loads and stores. They are stored [row][column] (v14; [column][row] before), so an
// item reads its 8 products with two 16-byte loads instead of eight 4-byte ones, and rounds two columns per
// instruction (round_pack2).
template <int RP, int NG, bool kGated>
struct ExpandPassShape {
  static constexpr int kSides = kGated ? 2 : 1;  // gate and up
  static constexpr int V = RP >= 32 ? 8 : 4;    // rank elements per lane per load: 4 lanes x V = one 4V-wide slice
  static constexpr int NL = RP / (4 * V);       // loads per B row
  // 16-column blocks in flight per warp: ~32 registers of B fragments (split between the gated sides).
  static constexpr int U1 = RP >= 64 ? 2 : RP == 32 ? (NG == 2 ? 2 : 4) : (NG == 2 ? 4 : 8);
  static constexpr int U = U1 / kSides > 0 ? U1 / kSides : 1;
  static constexpr int kRows = kRowGroup * NG;        // token rows of a pass (padded)
  static constexpr int kVecs = 2 * U;                 // 8-column vectors per row, side and iteration
  // Floats per product row of a vector: 8, padded to 12 so that a store's lanes (row 2q, column g) hit 32
  // different banks (24q + g), and rows stay 16-byte aligned for the item's two 16-byte loads.
  static constexpr int kLdr = 12;
  // Floats per vector's block of rows, padded so that the 16-byte loads of a quarter warp's items (vectors
  // cv = lane % kVecs of rows lane / kVecs) start 4 banks or more apart: without it every vector started in
  // the same bank (8-way conflicts; the plain expand was 5-13% slower in the first measurement).
  static constexpr int kVecStride = kRows * kLdr + (32 / kVecs > 4 ? 32 / kVecs : 4);
  static constexpr int kItemsPerLane = (kRows * kVecs + 31) / 32;
  static constexpr int kProducts = kSides * kVecs * kVecStride;          // floats: [side][vector][row][kLdr]
  static constexpr int kScratch = kProducts + kItemsPerLane * 32 * kSides * 4;  // + the D vectors (16 B each)
};

// Shared memory (floats) the few-rows expand needs: the t tile, then kWarps scratch areas.
template <int RP, int kWarps>
constexpr int expand_smem_floats() {
  constexpr int a = ExpandPassShape<RP, 1, false>::kScratch, b = ExpandPassShape<RP, 1, true>::kScratch;
  constexpr int c = kRowPairs<RP> ? ExpandPassShape<RP, 2, false>::kScratch : 0;
  constexpr int d = kRowPairs<RP> ? ExpandPassShape<RP, 2, true>::kScratch : 0;
  constexpr int ab = a > b ? a : b, cd = c > d ? c : d;
  return 2 * kRowGroup * RP + kWarps * (ab > cd ? ab : cd);
}

template <typename T, int RP, int kWarps, int NG, bool kGated>
__device__ void expand_pass(const float* __restrict__ partial, int k_splits, int64_t split_stride,
                            const T* __restrict__ B, int R, bool vec_b, bool vec_out, const ExpandOut<T>& out,
                            float alpha, int row0, int rows, int n_begin, int n_end, float* smem) {
  using Shape = ExpandPassShape<RP, NG, kGated>;
  constexpr int V = Shape::V, NL = Shape::NL, kSides = Shape::kSides, U = Shape::U;
  constexpr int kRows = Shape::kRows, kLdr = Shape::kLdr, kVecs = Shape::kVecs, kVecStride = Shape::kVecStride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int nblocks = ceil_div(n_end - n_begin, 16);
  T* D = out.D;
  const int64_t ldd = out.ldd;
  float* t_smem = smem;                                                  // 16 * RP floats
  float* vs = smem + 2 * kRowGroup * RP + warp * Shape::kScratch;        // this warp's products
  T* dvec = reinterpret_cast<T*>(vs + Shape::kProducts);                 // and its D vectors

  for (int e = threadIdx.x; e < kRows * RP; e += kWarps * 32) {
    const int r = e / RP, j = e % RP;
    float v = 0.f;
    if (r < rows && j < R) {
      const float* src = partial + static_cast<int64_t>(row0 + r) * R + j;
      v = sum_splits(src, k_splits, split_stride);
    }
    t_smem[e] = v;
  }
  __syncthreads();
  // t fragments (the mma's B operand, token row 8 ng + g): slice l, lane q holds ranks 4V l + V q + [0, V).
  uint32_t tb[NG][NL][V / 2];
#pragma unroll
  for (int ng = 0; ng < NG; ++ng)
#pragma unroll
    for (int l = 0; l < NL; ++l)
#pragma unroll
      for (int i = 0; i < V / 2; ++i) {
        const float* src = t_smem + (8 * ng + g) * RP + 4 * V * l + V * q + 2 * i;
        tb[ng][l][i] = pack2(from_float<T>(src[0]), from_float<T>(src[1]));
      }

  // Write-out items of an iteration: (row r, vector cv) for r < rows, cv < kVecs; vector cv covers columns
  // 8 (cv % 2) + [0, 8) of the iteration's block u = cv / 2. Lane `lane` takes items lane, lane + 32, ...
  const int items = rows * kVecs;
  for (int cb0 = warp; cb0 < nblocks; cb0 += kWarps * U) {
    auto block_ok = [&](int u) { return cb0 + u * kWarps < nblocks; };
    auto block_col = [&](int u) { return n_begin + (cb0 + u * kWarps) * 16; };
    // This lane's write-out item k: row r, 8-column vector cv at column col; ok = it is a real item.
    struct Item {
      int it, r, cv, col;
      bool ok;
    };
    auto item = [&](int k) {
      Item x;
      x.it = lane + 32 * k;
      x.r = x.it / kVecs;
      x.cv = x.it % kVecs;
      x.col = block_col(x.cv / 2) + 8 * (x.cv % 2);
      x.ok = x.it < items && block_ok(x.cv / 2) && x.col < n_end;
      return x;
    };
    Pack<T, V> bp[U][kSides][NL][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = block_col(u) + g + 8 * h;
        const bool n_ok = block_ok(u) && n < n_end;
#pragma unroll
        for (int sd = 0; sd < kSides; ++sd) {
          const T* brow = B + static_cast<int64_t>((n_ok ? n : n_begin) + sd * out.up_col) * R;
#pragma unroll
          for (int l = 0; l < NL; ++l) {
            const int j0 = 4 * V * l + V * q;
            bp[u][sd][l][h] = load_pack<T, V>(brow + j0, vec_b, n_ok ? max(0, min(V, R - j0)) : 0);
          }
        }
      }
    }
    // This lane's D vectors, copied into its own slots of the scratch with cp.async (in flight with the B
    // loads, holding no registers); with !vec_out the write-out loads elements instead.
    if (vec_out) {
#pragma unroll
      for (int k = 0; k < Shape::kItemsPerLane; ++k) {
        const Item x = item(k);
        if (x.ok) {
#pragma unroll
          for (int sd = 0; sd < kSides; ++sd)
            cp_async_16(dvec + (x.it * kSides + sd) * 8,
                        D + static_cast<int64_t>(row0 + x.r) * ldd + x.col + sd * out.up_col, true);
        }
      }
      cp_async_commit();
    }
    // Products to the scratch: c = {(n, r), (n, r + 1), (n + 8, r), (n + 8, r + 1)} with n = g, r = 8 ng + 2q
    // (block-local); column n of block u is column n % 8 of vector 2u + n / 8, stored at [row][column].
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int ng = 0; ng < NG; ++ng)
#pragma unroll
        for (int sd = 0; sd < kSides; ++sd) {
          float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int l = 0; l < NL; ++l)
#pragma unroll
            for (int s = 0; s < V / 4; ++s)
              mma_16816<T>(c, bp[u][sd][l][0].w[2 * s], bp[u][sd][l][1].w[2 * s], bp[u][sd][l][0].w[2 * s + 1],
                           bp[u][sd][l][1].w[2 * s + 1], tb[ng][l][2 * s], tb[ng][l][2 * s + 1]);
          // c[0..1]: vector 2u, rows 8 ng + 2q and + 1, column g; c[2..3]: the same of vector 2u + 1.
          float* dst = vs + (sd * kVecs + 2 * u) * kVecStride + (8 * ng + 2 * q) * kLdr + g;
          dst[0] = c[0];
          dst[kLdr] = c[1];
          dst[kVecStride] = c[2];
          dst[kVecStride + kLdr] = c[3];
        }
    cp_async_wait<0>();  // this lane's D vectors (a lane reads back only its own copies)
    __syncwarp();
    // Finish the items: v = round(alpha * product + D) per side, two columns per rounding; gated, h =
    // round(act(v_gate) * v_up), with the activation's kind a compile-time constant.
    auto finish = [&](auto act) {
#pragma unroll
      for (int k = 0; k < Shape::kItemsPerLane; ++k) {
        const Item x = item(k);
        if (!x.ok) continue;
        const int it = x.it, r = x.r, cv = x.cv, col = x.col;
        // products of the item's 8 columns, per side (the up side kVecs vectors further)
        const float* pg = vs + cv * kVecStride + r * kLdr;
        float pr[kSides][8];
#pragma unroll
        for (int sd = 0; sd < kSides; ++sd) {
          const float4 lo = *reinterpret_cast<const float4*>(pg + sd * kVecs * kVecStride);
          const float4 hi = *reinterpret_cast<const float4*>(pg + sd * kVecs * kVecStride + 4);
          pr[sd][0] = lo.x; pr[sd][1] = lo.y; pr[sd][2] = lo.z; pr[sd][3] = lo.w;
          pr[sd][4] = hi.x; pr[sd][5] = hi.y; pr[sd][6] = hi.z; pr[sd][7] = hi.w;
        }
        const int64_t drow = static_cast<int64_t>(row0 + r) * ldd;
        if (vec_out) {
          uint4 dw[kSides];
#pragma unroll
          for (int sd = 0; sd < kSides; ++sd) dw[sd] = *reinterpret_cast<const uint4*>(dvec + (it * kSides + sd) * 8);
          uint32_t o[4];
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            uint32_t v[kSides];
#pragma unroll
            for (int sd = 0; sd < kSides; ++sd) {
              const uint32_t d = (&dw[sd].x)[w];
              v[sd] = round_pack2<T>(alpha * pr[sd][2 * w] + low_float<T>(d), alpha * pr[sd][2 * w + 1] + high_float<T>(d));
            }
            o[w] = v[0];
            if constexpr (kGated) o[w] = gated_pair<decltype(act)::value, T>(v[0], v[kSides - 1]);
          }
          T* dst = kGated ? out.h + static_cast<int64_t>(row0 + r) * out.ldh + col : D + drow + col;
          *reinterpret_cast<uint4*>(dst) = make_uint4(o[0], o[1], o[2], o[3]);
        } else {  // unaligned or odd widths: element loads and stores
          for (int i = 0; i < 8 && col + i < n_end; ++i) {
            const T v = from_float<T>(alpha * pr[0][i] + to_float(D[drow + col + i]));
            if constexpr (kGated) {
              const T up = from_float<T>(alpha * pr[kSides - 1][i] + to_float(D[drow + col + i + out.up_col]));
              out.h[static_cast<int64_t>(row0 + r) * out.ldh + col + i] = gated_value<decltype(act)::value>(v, up);
            } else {
              D[drow + col + i] = v;
            }
          }
        }
      }
    };
    with_activation(kGated ? out.act : ActivationKind::Silu, finish);
    __syncwarp();  // the scratch is rewritten by the next iteration
  }
  __syncthreads();  // t_smem is rewritten by the next pass / reused by the caller
}

template <typename T, int RP, int kWarps, bool kGated>
__device__ void expand_tile(const float* __restrict__ partial, int k_splits, int64_t split_stride,
                            const T* __restrict__ B, int R, bool vec_b, bool vec_out, const ExpandOut<T>& out,
                            float alpha, int row0, int rows, int n_begin, int n_end, float* smem) {
  for (int g0 = 0; g0 < rows;) {
    const int left = rows - g0;
    if constexpr (kRowPairs<RP>) {
      if (left > kRowGroup) {
        expand_pass<T, RP, kWarps, 2, kGated>(partial, k_splits, split_stride, B, R, vec_b, vec_out, out, alpha,
                                              row0 + g0, min(left, 2 * kRowGroup), n_begin, n_end, smem);
        g0 += 2 * kRowGroup;
        continue;
      }
    }
    expand_pass<T, RP, kWarps, 1, kGated>(partial, k_splits, split_stride, B, R, vec_b, vec_out, out, alpha,
                                          row0 + g0, min(left, kRowGroup), n_begin, n_end, smem);
    g0 += kRowGroup;
  }
}

}  // namespace moelora::cuda::lora_few_rows
