// Base expert GEMMs at decode sizes (T <= kDecodeMaxTokens): a grouped matrix-"vector" product that
// streams the routed experts' weights (interface and epilogue: stages.h).
//
// Why (benchmarks/NOTES.md, v5): at T=1 an expert has one row, and the CUTLASS grouped GEMM runs one
// 64x128 tile per 128 weight rows: qwen3 fc2 (K=768) gets 128 tiles of six K steps each, mixtral fc2
// (2 experts x 4096 rows) only 64 CTAs for 117 MB -- per-tile setup and too few CTAs streaming, ~2x the
// memory floor at qwen3 / gpt-oss T=1. Here every CTA streams 32 weight rows x K with four warps splitting K,
// several 16-byte loads per lane in flight, so ~400-2700 CTAs keep HBM busy; the gated fc1 epilogue applies
// SwiGLU / GeGLU directly (no gu round trip, no activation kernel), and the LoRA expand (rank R x the CTA's
// columns, a few KB of B) happens in the epilogue too (no expand kernels, no read-modify-write).
//
// The LoRA shrink runs in the same launch (NOTES.md v11): at decode it is a few hundred KB of A, and as a
// launch of its own it cost a kernel boundary and its latency chains twice per call (qwen3 T=1: 6.7 µs for
// the two shrinks, eager). Its CTAs stream A the way the GEMV streams W and write t in fp32; the GEMV CTAs
// need t only in their epilogue, after streaming their weights, and wait there for its elements to leave the
// routing's "pending" mark (load_t4 below; NOTES.md v20: one round trip less than v11's counter). Each shrink CTA
// takes one K range (at most kGemvShrinkSplitK, stages.h) and writes its partial sums, which the expand adds in
// range order: with all of K, mixtral's fc2 shrink (K = 14336) ran 28 dependent load rounds behind the
// saturated HBM and finished after the GEMV CTAs waiting for it (NOTES.md v19: mixtral T=1 with LoRA 297 ->
// 279 µs against a 278 µs base, gpt-oss 112 -> 105).
// The shrink CTAs are the launch's lowest block indices and wait for nothing, so a waiting GEMV CTA never
// holds back a shrink CTA as long as CTAs start in block-index order -- what the GPU does, and what cub's
// decoupled look-back scans rely on too. (A start ticket from an atomic counter would not rely on it, but
// costs each CTA a round trip before its first weight load.)
//
// fc1 with the routing beside it (ExpertGemvParams::topk_ids set; NOTES.md v29): at decode the routing kernel is
// 3-4 µs on the critical path before fc1's first weight load, for at most 32 pairs. So fc1's CTAs do not wait for
// it: each CTA recomputes, from the ids, its own tile's place in the few-pairs routing's order (route_locally;
// deterministic, pair order within a bucket, so the same rows as the routing's tables), reads X as the tokens'
// rows and streams its weights while the routing runs. It waits for the routing (griddepcontrol.wait) only after
// that, before what the routing writes: the shrink's t (its pending marks), the row maps. Each CTA waits before
// it exits, so fc1's completion still implies the routing's, which fc2 and the finalize rely on.
#include "activation.cuh"
#include "cuda_utils.cuh"
#include "mma_operands.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

using mma_operands::load_pack;
using mma_operands::mma_16816;
using mma_operands::Pack;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowGroup = 8;   // token rows per mma (its N)
constexpr int kMaxGroups = 2;  // row groups per pass: up to 16 token rows share every weight load
constexpr int kPassRows = kRowGroup * kMaxGroups;

// 32-wide k blocks in flight per warp (2 KB of W each): fewer with two row groups (registers).
template <int NG>
constexpr int kU = NG == 1 ? 4 : 2;

// Output columns per CTA: plain 32 (weight rows c0 .. c0 + 31), gated 16 (gate rows i and up rows I + i).
template <bool kGated>
constexpr int kColsPerCta = kGated ? 16 : 32;

template <bool kGated>
__host__ __device__ int column_blocks(int N) { return ceil_div(kGated ? N / 2 : N, kColsPerCta<kGated>); }

// The CTA's 32 weight rows: two 16-row blocks, each contiguous in W.
template <typename T>
struct WeightRows {
  const T* row[2][2];  // [block][h]: weight row g + 8h of the block (clamped; invalid rows load zeros)
  bool valid[2][2];
};

// This lane's rows of the two 16-row blocks of W (row stride K) that start at rows first[jb] and hold
// count[jb] valid rows.
template <typename T>
__device__ __forceinline__ WeightRows<T> weight_rows(const T* W, int64_t K, const int (&first)[2],
                                                     const int (&count)[2]) {
  const int g = (threadIdx.x % 32) / 4;
  WeightRows<T> w;
#pragma unroll
  for (int jb = 0; jb < 2; ++jb)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = g + 8 * h;
      w.valid[jb][h] = j < count[jb];
      w.row[jb][h] = W + (first[jb] + (w.valid[jb][h] ? j : 0)) * K;
    }
  return w;
}

// How the weight stream's 16-byte loads ask for their bytes (mma_operands.cuh load_stream_pack; NOTES.md v31). A
// lane loads 16 bytes of a weight row, four lanes 64 contiguous bytes, the CTA's four warps a row's 256 contiguous
// bytes per batch; nothing reads a weight byte twice. 256-byte L2 fills (kLoadL2Fill): -15..-45 µs at mixtral
// T = 2 / 4, -3..-7 at gpt-oss. No L1 line as well (kLoadNoL1): at qwen3 (K <= 2048) another -3..-5 µs per call,
// while gpt-oss and mixtral (K 2880, 4096) lose 2-6 µs with it. That threshold is fit on those three shapes; why
// L1 allocation matters only there is not known. Both forms, as inline asm, cost the gated GEMVs 16-34 bytes of
// spills that the plain C++ load does not; they are measured with them.
using mma_operands::kLoadL2Fill;
using mma_operands::kLoadNoL1;
using mma_operands::kLoadPlain;
using mma_operands::load_stream_pack;

// Sums over k < K of the pass's rows [row0, row0 + rows) of X (row stride ldx) times the CTA's weight rows,
// into red[warp][jb][j][r] (each warp a quarter of the k blocks).
// `row_token` (shared memory; nullptr: X's rows are the sorted rows): the X row of each of the pass's rows.
template <typename T, int NG, int kLoad>
__device__ __forceinline__ void gemv_pass(const T* X, int64_t ldx, int K, int row0, int rows, const int* row_token,
                                          const WeightRows<T>& w, bool vec, float (*red)[2][16][kPassRows]) {
  constexpr int U = kU<NG>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int nkb = ceil_div(K, 32);
  const T* xrow[NG];
#pragma unroll
  for (int ng = 0; ng < NG; ++ng) {
    const int r = min(8 * ng + g, rows - 1);
    xrow[ng] = X + (row_token != nullptr ? row_token[r] : row0 + r) * ldx;
  }
  float c[2][NG][4];
#pragma unroll
  for (int jb = 0; jb < 2; ++jb)
#pragma unroll
    for (int ng = 0; ng < NG; ++ng) c[jb][ng][0] = c[jb][ng][1] = c[jb][ng][2] = c[jb][ng][3] = 0.f;

  for (int kb0 = warp; kb0 < nkb; kb0 += kWarps * U) {
    Pack<T, 8> xp[U][NG], wp[U][2][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = (kb0 + u * kWarps) * 32 + 8 * q;
      const int valid = kb0 + u * kWarps < nkb ? max(0, min(8, K - k)) : 0;
#pragma unroll
      for (int ng = 0; ng < NG; ++ng) xp[u][ng] = load_pack<T, 8>(xrow[ng] + k, vec, 8 * ng + g < rows ? valid : 0);
#pragma unroll
      for (int jb = 0; jb < 2; ++jb)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wp[u][jb][h] = load_stream_pack<T, kLoad>(w.row[jb][h] + k, vec, w.valid[jb][h] ? valid : 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int jb = 0; jb < 2; ++jb)
#pragma unroll
        for (int ng = 0; ng < NG; ++ng) {
          mma_16816<T>(c[jb][ng], wp[u][jb][0].w[0], wp[u][jb][1].w[0], wp[u][jb][0].w[1], wp[u][jb][1].w[1],
                       xp[u][ng].w[0], xp[u][ng].w[1]);
          mma_16816<T>(c[jb][ng], wp[u][jb][0].w[2], wp[u][jb][1].w[2], wp[u][jb][0].w[3], wp[u][jb][1].w[3],
                       xp[u][ng].w[2], xp[u][ng].w[3]);
        }
  }
  // c[jb][ng] = {(j, r), (j, r + 1), (j + 8, r), (j + 8, r + 1)} with weight row j = g, token row r = 8 ng + 2q.
#pragma unroll
  for (int jb = 0; jb < 2; ++jb)
#pragma unroll
    for (int ng = 0; ng < NG; ++ng) {
      const int r = 8 * ng + 2 * q;
      red[warp][jb][g][r] = c[jb][ng][0];
      red[warp][jb][g][r + 1] = c[jb][ng][1];
      red[warp][jb][g + 8][r] = c[jb][ng][2];
      red[warp][jb][g + 8][r + 1] = c[jb][ng][3];
    }
}

// One pass over the rows [row0, row0 + rows), rows <= kPassRows: one or two 8-row groups per weight load.
template <typename T, int kLoad>
__device__ __forceinline__ void gemv_rows(const T* X, int64_t ldx, int K, int row0, int rows, const int* row_token,
                                          const WeightRows<T>& w, bool vec, float (*red)[2][16][kPassRows]) {
  if (rows > kRowGroup)
    gemv_pass<T, 2, kLoad>(X, ldx, K, row0, rows, row_token, w, vec, red);
  else
    gemv_pass<T, 1, kLoad>(X, ldx, K, row0, rows, row_token, w, vec, red);
}

// The tile of a CTA of fc1 with the routing beside it, found from the ids by every warp alike (only warp 0
// writes): the few-pairs routing's order (routing.cu routing_few_pairs_kernel), one pair per lane. `lora` false:
// tile `tile` is the tile-th expert with rows, in ascending order (one kTileRows tile each: at most 32 pairs);
// true: the tile-th bucket with an adapter (the LoRA m-tiles). tile_s = {expert (-1: no such tile), first sorted
// row, rows, slot}; token_s / slot_s: each of the tile's rows' token and slot.
__device__ void route_locally(const ExpertGemvParams& p, int tile, bool lora, int* tile_s, int* token_s,
                              int* slot_s) {
  const int lane = threadIdx.x % 32;
  const bool writer = threadIdx.x < 32;
  const int pairs = p.T * p.k;
  const FewPairsLane pl = few_pairs_lane(p.topk_ids, p.token_slots, lane, pairs, p.k, p.E, p.S);
  const int bucket = pl.bucket, key = pl.key, expert = pl.expert;
  // The lane standing for its tile: the first pair of its expert, or of its bucket with an adapter.
  const bool leads = lora ? pl.leads_lora_tile : pl.first_of_expert;
  int lower = 0, lower_expert = 0, tiles_lower = 0;
  for (int j = 0; j < pairs; ++j) {  // same trip count in every lane (the shuffles)
    const int kj = __shfl_sync(0xffffffffu, key, j);
    const int ej = __shfl_sync(0xffffffffu, expert, j);
    const bool lj = __shfl_sync(0xffffffffu, leads, j);
    lower += kj < key;
    lower_expert += ej < expert;
    tiles_lower += lj && (lora ? kj < key : ej < expert);
  }
  const unsigned found = __ballot_sync(0xffffffffu, leads && tiles_lower == tile);
  if (found == 0) {
    if (writer && lane == 0) tile_s[0] = -1;
    return;
  }
  const int lead = __ffs(found) - 1;
  const int t_key = __shfl_sync(0xffffffffu, key, lead), t_expert = __shfl_sync(0xffffffffu, expert, lead);
  const int row0 = __shfl_sync(0xffffffffu, lora ? lower : lower_expert, lead);
  const int row = lower + pl.rank;  // this pair's sorted row
  if (writer && (lora ? key == t_key : expert == t_expert)) {
    token_s[row - row0] = lane / p.k;
    slot_s[row - row0] = bucket_slot(bucket, p.S);
  }
  if (writer && lane == lead) {
    tile_s[0] = expert;
    tile_s[1] = row0;
    tile_s[2] = __popc(lora ? pl.same_bucket : pl.same_expert);
    tile_s[3] = bucket_slot(bucket, p.S);
  }
}

// Output (weight row j of block jb, token row r) of a pass: the warps' sums added in warp order.
__device__ __forceinline__ float warp_sum(const float (*red)[2][16][kPassRows], int jb, int j, int r) {
  float v = 0.f;
#pragma unroll
  for (int wi = 0; wi < kWarps; ++wi) v += red[wi][jb][j][r];
  return v;
}

// The launch's LoRA shrink CTAs: one per (LoRA m-tile, 32 ranks, K range).
__host__ __device__ inline int lora_rank_blocks(int R) { return ceil_div(R, 32); }
__host__ __device__ inline int lora_shrink_ctas(const ExpertGemvParams& p) {
  return p.lora_A == nullptr ? 0 : p.lora_tile_capacity * lora_rank_blocks(p.R) * p.lora_k_splits;
}
// The shrink's K ranges: [s * chunk, min(K, (s + 1) * chunk)), chunk a multiple of the 32-wide k blocks (so the
// ranges keep 16-byte rows). gemv_lora_k_splits never makes one empty; one would write zeros.
__host__ __device__ inline int lora_k_chunk(const ExpertGemvParams& p) {
  return ceil_div(ceil_div(p.K, p.lora_k_splits), 32) * 32;
}
// Elements of one K range's partial sums in lora_t.
__host__ __device__ inline int64_t lora_split_stride(const ExpertGemvParams& p) {
  return static_cast<int64_t>(p.max_rows) * p.R;
}

// The shrink's partial sums announce themselves: the routing fills lora_t with kLoraTPending (a NaN that no
// arithmetic writes: the GPU's NaN results are 0x7fffffff), each element is stored once, and a GEMV CTA that
// loads an element still pending loads it again. So the expand's first load of t is also its readiness check,
// one memory round trip after the weight stream instead of a counter's and then t's.
__device__ __forceinline__ bool pending(float v) { return __float_as_uint(v) == kLoraTPending; }
__device__ __forceinline__ void store_t(float* ptr, float v) {
  if (pending(v)) v = __uint_as_float(0x7fffffffu);  // arithmetic never yields the mark; a stored value never is it
  asm volatile("st.relaxed.gpu.global.f32 [%0], %1;" ::"l"(ptr), "f"(v) : "memory");
}
__device__ __forceinline__ float4 load_t4_once(const float* ptr) {
  float4 v;
  asm volatile("ld.relaxed.gpu.global.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(ptr) : "memory");
  return v;
}
__device__ __forceinline__ float load_t1_once(const float* ptr) {
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
  return v;
}
__device__ __forceinline__ float4 load_t4(const float* ptr) {
  float4 v = load_t4_once(ptr);
  while (pending(v.x) || pending(v.y) || pending(v.z) || pending(v.w)) {
    __nanosleep(32);
    v = load_t4_once(ptr);
  }
  return v;
}
__device__ __forceinline__ float load_t1(const float* ptr) {
  float v = load_t1_once(ptr);
  while (pending(v)) {
    __nanosleep(32);
    v = load_t1_once(ptr);
  }
  return v;
}

// Shrink CTA `cta` = (m-tile, rank block, K range s): t_s[r, r0 .. r0 + 32) = A[slot, e][r0 .. r0 + 32, range]
// @ X[r, range] for the rows r of the LoRA m-tile, summed over the warps in warp order (each element stored once,
// over the routing's pending mark). The expand adds the ranges' t_s in order. With the routing beside fc1
// (p.topk_ids set) the m-tile comes from route_locally, X holds the tokens' rows, and the CTA waits for the
// routing before its first store (the routing writes the pending marks).
template <typename T, bool kRouted, int kLoad>
__device__ void lora_shrink_cta(const ExpertGemvParams& p, int cta, float (*red)[2][16][kPassRows], int* tile_s,
                                int* token_s, int* slot_s) {
  constexpr bool routed = kRouted;
  const int rblocks = lora_rank_blocks(p.R);
  const int split = cta % p.lora_k_splits;
  cta /= p.lora_k_splits;
  const int mt = cta / rblocks, r0 = (cta % rblocks) * 32;
  const int k0 = split * lora_k_chunk(p), klen = max(0, min(lora_k_chunk(p), p.K - k0));
  int seg = -1, tile_row0 = 0, tile_rows = 0;
  if constexpr (routed) {
    route_locally(p, mt, true, tile_s, token_s, slot_s);
    __syncthreads();
    if (tile_s[0] >= 0) {
      seg = tile_s[0] * p.seg_per_expert + 1 + tile_s[3];
      tile_row0 = tile_s[1];
      tile_rows = tile_s[2];
    }
  } else if (mt < p.lora_tile_prefix[p.E * p.seg_per_expert]) {
    seg = p.lora_tile_segment[mt];
    tile_row0 = p.bucket_offsets[seg] + (mt - p.lora_tile_prefix[seg]) * kTileRows;
    tile_rows = min(kTileRows, p.bucket_offsets[seg + 1] - tile_row0);
  }
  bool waited = !routed;
  if (seg >= 0) {
    const int e = seg / p.seg_per_expert, slot = seg % p.seg_per_expert - 1;
    const T* X = static_cast<const T*>(p.X);
    const T* A = static_cast<const T*>(p.lora_A) + e * p.a_expert_stride + slot * p.a_slot_stride;  // [R, K]
    // The A offsets are multiples of K elements, so K % 8 == 0 keeps 16-byte rows when the base is aligned.
    const bool vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.lora_A) % 16 == 0;
    const int first[2] = {r0, r0 + 16};  // A's rows as the two weight blocks
    const int count[2] = {max(0, min(16, p.R - r0)), max(0, min(16, p.R - r0 - 16))};
    const WeightRows<T> w = weight_rows(A + k0, p.K, first, count);
    float* t = p.lora_t + split * lora_split_stride(p);
    for (int g0 = 0; g0 < tile_rows; g0 += kPassRows) {
      const int rows = min(kPassRows, tile_rows - g0);
      gemv_rows<T, kLoad>(X + k0, p.K, klen, tile_row0 + g0, rows, routed ? token_s + g0 : nullptr, w, vec, red);
      if (!waited) {
        pdl_begin();
        waited = true;
      }
      __syncthreads();
      for (int o = threadIdx.x; o < 32 * rows; o += kThreads) {
        const int jb = (o % 32) / 16, j = o % 16, r = o / 32, col = r0 + 16 * jb + j;
        if (col >= p.R) continue;
        store_t(t + static_cast<int64_t>(tile_row0 + g0 + r) * p.R + col, warp_sum(red, jb, j, r));
      }
      __syncthreads();  // red is rewritten by the next pass
    }
  }
  if (!waited) pdl_begin();  // before it exits (pdl.cuh)
}

// delta[jb][j][r] = scale[s] * sum_i round(t[row0 + r, i]) * B[s, e][wrow0[jb] + j, i] for the pass's rows r
// with an adapter (slot s = slot_s[r]), by the whole CTA: the B row and t of each (weight row, token row) in
// 16-byte pieces, one piece per thread, summed over the pieces by a shuffle tree (fixed order). Every load
// is independent of the others, so the expand costs one memory round trip after the weight stream.
template <typename T>
__device__ __forceinline__ void lora_delta(const ExpertGemvParams& p, const T* lora_b, int row0, int rows,
                                           const int (&wrow0)[2], const int (&wrows)[2], const int* slot_s,
                                           float (*delta)[16][kPassRows]) {
  const int pieces = p.R / 8;  // 16-byte pieces of a B row
  const bool vec = p.R % 8 == 0 && (pieces & (pieces - 1)) == 0 && reinterpret_cast<uintptr_t>(p.lora_B) % 16 == 0;
  if (vec) {
    const int per_row = 32 * pieces, items = rows * per_row;
    for (int base = 0; base < items; base += kThreads) {  // same trip count in every lane (the shuffles)
      const int o = base + threadIdx.x;
      const int r = o / per_row, jj = (o / pieces) % 32, c = o % pieces;
      const int jb = jj / 16, j = jj % 16;
      const int slot = o < items ? slot_s[r] : -1;
      const bool active = slot >= 0 && j < wrows[jb];
      float part = 0.f, scale = 1.f;
      if (active) {
        const T* b = lora_b + slot * p.b_slot_stride + static_cast<int64_t>(wrow0[jb] + j) * p.R + 8 * c;
        const float* ts = p.lora_t + static_cast<int64_t>(row0 + r) * p.R + 8 * c;
        const Vec8<T> bv = *reinterpret_cast<const Vec8<T>*>(b);
        float4 t0 = load_t4(ts), t1 = load_t4(ts + 4);
        for (int s = 1; s < p.lora_k_splits; ++s) {  // the K ranges' partial sums, in range order
          const float* tp = ts + s * lora_split_stride(p);
          const float4 u0 = load_t4(tp), u1 = load_t4(tp + 4);
          t0.x += u0.x; t0.y += u0.y; t0.z += u0.z; t0.w += u0.w;
          t1.x += u1.x; t1.y += u1.y; t1.z += u1.z; t1.w += u1.w;
        }
        if (p.slot_scale != nullptr) scale = p.slot_scale[slot];
        const float tv[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) part += to_float(from_float<T>(tv[i])) * to_float(bv.v[i]);
      }
      for (int m = 1; m < pieces; m <<= 1) part += __shfl_xor_sync(0xffffffffu, part, m);
      if (active && c == 0) delta[jb][j][r] = scale * part;
    }
    return;
  }
  // Ranks that are not a power-of-two multiple of 8, or an unaligned B: one thread per output, element loads.
  for (int o = threadIdx.x; o < 32 * rows; o += kThreads) {
    const int r = o / 32, jb = (o % 32) / 16, j = o % 16;
    const int slot = slot_s[r];
    if (slot < 0 || j >= wrows[jb]) continue;
    const T* b = lora_b + slot * p.b_slot_stride + static_cast<int64_t>(wrow0[jb] + j) * p.R;
    const float* t = p.lora_t + static_cast<int64_t>(row0 + r) * p.R;
    float d = 0.f;
    for (int i = 0; i < p.R; ++i) {
      float ti = load_t1(t + i);
      for (int s = 1; s < p.lora_k_splits; ++s) ti += load_t1(t + s * lora_split_stride(p) + i);  // range order
      d += to_float(from_float<T>(ti)) * to_float(b[i]);
    }
    delta[jb][j][r] = (p.slot_scale != nullptr ? p.slot_scale[slot] : 1.f) * d;
  }
}

// kLora: p.lora_A != nullptr. Its own instantiation, so that the plain GEMV's registers do not grow with the
// shrink CTAs' code.
// kRouted: fc1 with the routing beside it (p.topk_ids set), which waits for the routing only after its weight stream
// (top of this file); an instantiation of its own, so that the other GEMVs' code is as without it.
template <typename T, bool kGated, ActivationKind kAct, bool kLora, bool kRouted, int kLoad>
__global__ void __launch_bounds__(kThreads, 4) expert_gemv_kernel(ExpertGemvParams p) {
  constexpr bool routed = kRouted;
  bool waited = !routed;
  if constexpr (!routed) pdl_begin();
  __shared__ float red[kWarps][2][16][kPassRows];          // per warp: two 16-row weight blocks x the pass's rows
  __shared__ float delta_s[kLora ? 2 : 1][16][kPassRows];  // LoRA: the pass rows' expand output, scaled
  __shared__ int slot_s[kPassRows];                         // LoRA: each row's adapter slot (-1: none)
  __shared__ int tile_s[routed ? 4 : 3];                    // the tile's expert, first row, rows (routed: slot)
  __shared__ int token_s[routed ? kFewPairsMax : 1];        // routed: each of the tile's rows' token
  __shared__ int local_slot_s[routed ? kFewPairsMax : 1];   // routed: and slot

  const int shrink_ctas = lora_shrink_ctas(p);
  int cta = blockIdx.x;
  if constexpr (kLora) {  // the first CTAs are the shrink's (see the top of this file)
    if (cta < shrink_ctas) {
      lora_shrink_cta<T, kRouted, kLoad>(p, cta, red, tile_s, token_s, local_slot_s);
      return;
    }
    cta -= shrink_ctas;
  }

  // The tile's expert, found by the whole CTA in one round of loads: a binary search over the tile prefix
  // would be log2(E) dependent loads before the first weight load (several µs at decode, NOTES.md v6). Routed:
  // from the ids (one round of loads too).
  const int col_blocks = column_blocks<kGated>(p.N);
  const int tile = cta / col_blocks, cb = cta % col_blocks;
  if constexpr (routed) {
    route_locally(p, tile, false, tile_s, token_s, local_slot_s);
  } else {
    if (threadIdx.x == 0) tile_s[0] = -1;
    __syncthreads();
    for (int i = threadIdx.x; i < p.E; i += kThreads) {
      const int first = p.expert_tile_prefix[i];
      if (first <= tile && tile < p.expert_tile_prefix[i + 1]) {  // exactly one expert owns the tile
        const int row0 = p.expert_offsets[i] + (tile - first) * kTileRows;
        tile_s[0] = i;
        tile_s[1] = row0;
        tile_s[2] = min(kTileRows, p.expert_offsets[i + 1] - row0);
      }
    }
  }
  __syncthreads();
  const int e = tile_s[0];
  if (e < 0) {  // past the routed tiles (the grid is sized from shapes)
    if (!waited) pdl_begin();
    return;
  }
  const int tile_row0 = tile_s[1], tile_rows = tile_s[2];

  // The CTA's two 16-row weight blocks: first row and valid rows of each.
  const int half = p.N / 2;
  int wrow0[2], wrows[2];
  if constexpr (kGated) {
    const int c0 = cb * 16;
    wrow0[0] = c0; wrow0[1] = half + c0;
    wrows[0] = wrows[1] = min(16, half - c0);
  } else {
    const int c0 = cb * 32;
    wrow0[0] = c0; wrow0[1] = c0 + 16;
    wrows[0] = min(16, p.N - c0); wrows[1] = max(0, min(16, p.N - c0 - 16));
  }

  const T* X = static_cast<const T*>(p.X);
  const T* W = static_cast<const T*>(p.W) + static_cast<int64_t>(e) * p.N * p.K;
  T* D = static_cast<T*>(p.D);
  const bool vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0;
  const T* lora_b = kLora ? static_cast<const T*>(p.lora_B) + e * p.b_expert_stride : nullptr;
  const WeightRows<T> w = weight_rows(W, p.K, wrow0, wrows);

  for (int g0 = 0; g0 < tile_rows; g0 += kPassRows) {  // one pass unless the expert has more than 16 rows here
    const int rows = min(kPassRows, tile_rows - g0);
    const int row0 = tile_row0 + g0;
    // LoRA: each row's slot (written by the routing / permute), needed only after the weight stream, is loaded
    // before it.
    int my_slot = -1;
    if constexpr (kLora) {
      if (static_cast<int>(threadIdx.x) < rows)
        my_slot = routed ? local_slot_s[g0 + threadIdx.x] : p.row_slot[row0 + threadIdx.x];
    }
    gemv_rows<T, kLoad>(X, p.K, p.K, row0, rows, routed ? token_s + g0 : nullptr, w, vec, red);
    if (!waited) {  // routed: before t (the routing's pending marks) and the epilogue
      pdl_begin();
      waited = true;
    }
    if constexpr (kLora) {
      if (threadIdx.x < kPassRows) slot_s[threadIdx.x] = my_slot;
      __syncthreads();
      lora_delta<T>(p, lora_b, row0, rows, wrow0, wrows, slot_s, delta_s);  // waits for t (load_t4)
    }
    __syncthreads();

    // Sum of the warps in warp order (deterministic), plus the row's LoRA delta, then the epilogue.
    auto total = [&](int jb, int j, int r) {
      float v = warp_sum(red, jb, j, r);
      if constexpr (kLora) {
        if (slot_s[r] >= 0) v += delta_s[jb][j][r];
      }
      return v;
    };
    if constexpr (kGated) {
      for (int o = threadIdx.x; o < 16 * rows; o += kThreads) {  // 16 columns x the pass's rows
        const int j = o % 16, r = o / 16;
        if (j >= wrows[0]) continue;
        const int row = row0 + r;
        // gate and up rounded to the activation dtype first, as gu is on the GEMM path
        D[static_cast<int64_t>(row) * half + wrow0[0] + j] =
            gated_value<kAct>(from_float<T>(total(0, j, r)), from_float<T>(total(1, j, r)));
      }
    } else {
      for (int o = threadIdx.x; o < 32 * rows; o += kThreads) {  // 32 columns x the pass's rows
        const int jb = (o % 32) / 16, j = o % 16, r = o / 32;
        if (j >= wrows[jb]) continue;
        const int row = row0 + r, col = wrow0[jb] + j;
        D[static_cast<int64_t>(row) * p.N + col] = from_float<T>(total(jb, j, r));
      }
    }
    __syncthreads();  // red, delta_s and slot_s are rewritten by the next pass
  }
  if (!waited) pdl_begin();  // (the loop above runs at least once)
}

template <typename T, bool kGated, bool kLora, bool kRouted, int kLoad>
cudaError_t launch_with_load(const ExpertGemvParams& p, cudaStream_t stream) {
  const int64_t tiles_ub = segment_tiles_upper_bound(p.max_rows, p.E < p.max_rows ? p.E : p.max_rows);
  const int64_t grid = tiles_ub * column_blocks<kGated>(p.N) + lora_shrink_ctas(p);
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>(grid);
  if constexpr (kGated) {
    if (p.activation == ActivationKind::Gelu)
      return launch_kernel(expert_gemv_kernel<T, true, ActivationKind::Gelu, kLora, kRouted, kLoad>, blocks,
                           kThreads, 0, stream, p);
  }
  // The plain epilogue has no activation: one instantiation.
  return launch_kernel(expert_gemv_kernel<T, kGated, ActivationKind::Silu, kLora, kRouted, kLoad>, blocks,
                       kThreads, 0, stream, p);
}

// The weight loads' form (load_stream_pack): by K, or plain (ExpertGemvParams::weight_load_hints).
template <typename T, bool kGated, bool kLora, bool kRouted>
cudaError_t launch_typed(const ExpertGemvParams& p, cudaStream_t stream) {
  if (!p.weight_load_hints) return launch_with_load<T, kGated, kLora, kRouted, kLoadPlain>(p, stream);
  return p.K <= 2048 ? launch_with_load<T, kGated, kLora, kRouted, kLoadNoL1>(p, stream)
                     : launch_with_load<T, kGated, kLora, kRouted, kLoadL2Fill>(p, stream);
}

// Routed only for fc1 (the gated GEMV; launch_expert_gemv checks).
template <typename T, bool kGated>
cudaError_t launch_typed(const ExpertGemvParams& p, cudaStream_t stream) {
  if constexpr (kGated) {
    if (p.topk_ids.data != nullptr)
      return p.lora_A != nullptr ? launch_typed<T, true, true, true>(p, stream)
                                 : launch_typed<T, true, false, true>(p, stream);
  }
  return p.lora_A != nullptr ? launch_typed<T, kGated, true, false>(p, stream)
                             : launch_typed<T, kGated, false, false>(p, stream);
}

}  // namespace

cudaError_t launch_expert_gemv(const ExpertGemvParams& p, cudaStream_t stream) {
  if (p.max_rows == 0 || p.N == 0) return cudaSuccess;
  if (p.gated && p.N % 2 != 0) return cudaErrorInvalidValue;
  // The routing beside fc1: the few-pairs routing's order, one pair per lane (route_locally).
  if (p.topk_ids.data != nullptr &&
      (!p.gated || p.k <= 0 || p.T <= 0 || p.T * p.k > kFewPairsMax || p.T * p.k != p.max_rows ||
       p.S + 1 != p.seg_per_expert))
    return cudaErrorInvalidValue;
  if (p.lora_A != nullptr && (p.R <= 0 || p.R > kLoraMaxRank || p.lora_k_splits < 1 || p.lora_B == nullptr ||
                              p.lora_t == nullptr ||
                              p.row_slot == nullptr || p.lora_tile_prefix == nullptr ||
                              p.lora_tile_segment == nullptr || p.lora_tile_capacity < 0))
    return cudaErrorInvalidValue;
  if (p.dtype == DType::BF16)
    return p.gated ? launch_typed<__nv_bfloat16, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
  return p.gated ? launch_typed<__half, true>(p, stream) : launch_typed<__half, false>(p, stream);
}

}  // namespace moelora::cuda
