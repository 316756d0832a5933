// Host-side launchers of the CUDA stages of fused_moe, with plain parameter structs (no torch types).
// Pipeline (csrc/cuda/fused_moe_cuda.cpp runs them in this order):
//   routing -> permute -> fc1 GEMM (+ LoRA shrink/expand) -> activation -> fc2 GEMM (+ LoRA) -> finalize
// and when experts get few rows (decode; see expert_gemv.cu below), with the permute inside the one-block routing
// and the LoRA shrink and expand inside the GEMV launches:
//   routing + permute -> fc1 GEMV (+ LoRA, activation) -> fc2 GEMV (+ LoRA) -> finalize
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "expert_gemm_sm90.h"  // DType

namespace moelora::cuda {

// Gate nonlinearity of the gated activation: SiLU (SwiGLU) or exact GELU (GeGLU).
enum class ActivationKind { Silu, Gelu };

// Rows of one segment GEMM tile; also the granularity of the tile prefix arrays built by routing.
constexpr int kTileRows = 64;

// Host upper bound of the kTileRows-row m-tiles over row segments (sizes the segment and LoRA kernels'
// grids and routing's LoRA tile table): every non-empty segment adds at most one partial tile.
inline int64_t segment_tiles_upper_bound(int max_rows, int max_active_segments) {
  return (static_cast<int64_t>(max_rows) + kTileRows - 1) / kTileRows +
         (max_active_segments < max_rows ? max_active_segments : max_rows);
}

// The caller's topk_ids, int32 or int64, read as they are (no conversion kernel per call).
struct TopkIds {
  const void* data;  // [T * k]
  bool int64;
};

// ---- routing.cu: bucket the T*k (token, expert) pairs by (expert, adapter slot) -------------------
// A bucket is b = e * (S + 1) + (slot + 1): expert-major, and inside an expert the rows without an
// adapter come first, then slot 0, 1, ... Pairs whose expert id is outside [0, E) are dropped; slot ids
// outside [-1, S) are treated as -1 (the host cannot check them without a sync).
struct RoutingParams {
  TopkIds topk_ids;
  const int* token_slots;   // [T] or nullptr (no LoRA; then S must be 0)
  int T, k, E, S;
  int* bucket_counts;       // [E*(S+1) + 1] workspace
  int* pair_rank;           // [T*k] rank of each pair inside its bucket (workspace)
  int* bucket_offsets;      // [E*(S+1)+1] out: first sorted row of each bucket
  int* expert_offsets;      // [E+1] out: first sorted row of each expert
  int* expert_tile_prefix;  // [E+1] out: prefix sum of ceil(rows/kTileRows) per expert
  int* lora_tile_prefix;    // [E*(S+1)+1] out (only when S > 0): same per bucket, 0 for slot -1 buckets
  int* lora_tile_segment;   // [lora_tile_capacity] out (only when S > 0): bucket of each LoRA m-tile
  int lora_tile_capacity;   // segment_tiles_upper_bound(T * k, E * S)
  // Optional: the permute stage folded into a one-kernel routing (one launch less). When gather_permuted is
  // set (only when routing_can_gather), it writes pair_row, the gathered rows and the row maps as
  // launch_permute would, with each pair's place inside its bucket in pair order. The few-pairs kernel also
  // writes the maps alone (gather_pair_row set, gather_permuted null: fc1's decode GEMV reads the tokens' rows).
  const void* gather_hidden;  // [T, H]
  void* gather_permuted;      // [T*k, H]
  int* gather_pair_row;       // [T*k]
  int* gather_row_slot;       // [T*k] or nullptr: as PermuteParams::row_slot
  int* gather_row_token;      // [T*k] or nullptr: as PermuteParams::row_token
  int gather_block_pairs;     // pairs per gather block: 8 or 16 (0: 16)
  int H;
  // Optional: the sm90 base GEMMs' group tables (expert_gemm_sm90.h), written from the expert offsets by the
  // plan (one launch less than expert_gemm_sm90_prepare). Their expert count is E.
  ExpertGemmTables gemm_tables[2];
  int gemm_table_count;
  // Optional: words the plan sets to fill_value (the decode GEMVs' lora_t, to kLoraTPending).
  unsigned* fill_words;
  int fill_count;
  unsigned fill_value;
  // Up to this many pairs (<= kFewPairsMax; 0: never) the barrier-free few-pairs kernel does all of it.
  int few_pairs_max;
};
// Sizes of the routing launches:
//  * up to few_pairs_max (kFewPairsMax by default) pairs: one kernel without block barriers, one pair per lane
//    (routing.cu, routing_few_pairs_kernel; decode at top-k <= 8);
//  * up to kOneBlockMaxPairs pairs and kOneBlockMaxBuckets buckets: one kernel whose first block counts in
//    shared memory and plans (and whose other blocks, when it gathers, copy the rows);
//  * larger: memset + count kernel + plan kernel.
// The single-kernel sizes leave bucket_counts unused and can do the permute stage (gather_permuted).
constexpr int kFewPairsMax = 32;
constexpr int kOneBlockMaxPairs = 4096;
constexpr int kOneBlockMaxBuckets = 8192;  // 32 KB of shared-memory counters
inline bool routing_in_one_kernel(int pairs, int64_t nbuckets, int few_pairs_max) {
  return pairs <= few_pairs_max || (pairs <= kOneBlockMaxPairs && nbuckets <= kOneBlockMaxBuckets);
}
// Up to kGatherMaxPairs pairs a one-kernel routing can also gather (gather_permuted): its blocks then hold one
// 1024-thread block per SM, 16 pairs each, so 2048 pairs are one wave with the plan block on H100 / H200. Above
// it the permute kernel is faster (each gather block counts over all the pairs: gpt-oss T=1024, 4096 pairs,
// 18.6 µs against 17.5 for routing + permute; NOTES.md v20).
constexpr int kGatherMaxPairs = 2048;
inline bool routing_can_gather(int pairs, int64_t nbuckets, int few_pairs_max) {
  return routing_in_one_kernel(pairs, nbuckets, few_pairs_max) && pairs <= kGatherMaxPairs;  // few_pairs_max <= 32
}
cudaError_t launch_routing(const RoutingParams& p, cudaStream_t stream);

// ---- permute.cu: sorted-row map and the gather of hidden rows into expert-major order ---------------
struct PermuteParams {
  const void* hidden;        // [T, H]
  TopkIds topk_ids;
  const int* token_slots;    // [T] or nullptr
  const int* pair_rank;      // [T*k] from routing
  const int* bucket_offsets; // [E*(S+1)+1] from routing
  int T, k, E, S, H;
  int* pair_row;             // [T*k] out: sorted row of pair (t, j), -1 when dropped
  void* permuted;            // [T*k, H] out: permuted[pair_row[p]] = hidden[p / k]
  int* row_slot;             // [T*k] out, or nullptr: the adapter slot of each sorted row (-1: none)
  int* row_token;            // [T*k] out, or nullptr: the token of each sorted row (LoraShrinkParams::x_rows)
  DType dtype;
  // What launch_permute runs. Rows then Copy (two launches) lets fc1's LoRA shrink, which needs only the row
  // indices (row_token, row_slot), run on a second stream beside the copy.
  enum class Stage { RowsAndCopy, Rows, Copy } stage;
};
cudaError_t launch_permute(const PermuteParams& p, cudaStream_t stream);

// ---- segment_gemm.cu: D[rows of seg] (+)= alpha(slot) * A[rows of seg] @ W(seg)^T -------------------
// Our own tensor-core (mma.sync via WMMA, sm80+) grouped GEMM over row segments. Used for the LoRA
// shrink/expand and for the portable base GEMMs. The segment list is the bucket/expert layout built by
// routing: segment s covers sorted rows [row_offsets[s], row_offsets[s+1]) and belongs to
// expert = s / seg_per_expert, slot = s % seg_per_expert + slot_base. Its weight is
// W + expert * w_expert_stride + slot * w_slot_stride, an [N, K] row-major matrix with row stride ldw.
// Shared-outer gating is w_expert_stride = 0. Tiles come from tile_prefix (kTileRows rows each), so the
// grid is sized on the host without knowing the routing.
struct SegmentGemmParams {
  const void* A; int64_t lda;          // activations, sorted row r at A + r * lda
  const void* W; int64_t ldw;
  int64_t w_expert_stride, w_slot_stride;  // in elements
  void* D; int64_t ldd;
  const int* row_offsets;              // [nseg+1]
  const int* tile_prefix;              // [nseg+1]
  int nseg, seg_per_expert, slot_base;
  const float* slot_scale;             // alpha per slot, or nullptr for 1
  int N, K;
  bool accumulate;                     // D = alpha * acc + D   instead of   D = alpha * acc
  int max_rows;                        // host upper bound of the rows (T*k), sizes the grid
  int max_active_segments;             // host upper bound of the non-empty segments with tiles
  DType dtype;
};
enum class SegmentGemmShape { Wide, Narrow };  // Wide: N-blocks of 128 (base, expand); Narrow: 32 (shrink)
cudaError_t launch_segment_gemm(const SegmentGemmParams& p, SegmentGemmShape shape, int sm_count,
                                cudaStream_t stream);

// ---- lora_gemm.cu: LoRA shrink (split-K) and expand over the (expert, slot) segments ----------------
// Segments and tiles as for the segment GEMM (slot = s % seg_per_expert + slot_base; slot -1 buckets have
// no tiles). Adapter matrices of segment (e, slot) start at base + e * expert_stride + slot * slot_stride
// (shared-outer gating: expert_stride = 0). Ranks up to kLoraMaxRank; above it the host uses the segment
// GEMM path. Segments with few rows (<= few_rows_max) take a path built for streaming the adapter weights
// (lora_rows_mma.cuh), the others the 64-row tensor-core tiles; kLoraFewRows is the default threshold.
constexpr int kLoraMaxRank = 128;
constexpr int kLoraFewRows = 16;
// Ranks up to this take the few-rows path 16 token rows per pass (two 8-row groups sharing each adapter
// load: lora_rows_mma.cuh kRowPairs); above it, 8 rows per pass. Rank 64 joined in v17 (benchmarks/NOTES.md):
// its 9-16-row segments had read every adapter byte twice; at 128 registers it spills as little as before,
// and qwen3 / gpt-oss T=1024 rank 64 went 1024 / 1089 -> 926 / 1008 µs.
constexpr int kLoraRowPairsMaxRank = 64;
// Ranks up to this let the expand's few-rows path take segments of up to 2 kLoraFewRows rows when the
// segments are small (fused_moe_cuda.cpp make_lora_workspace): two 16-row passes, B read twice, beat the
// 64-row tiles there at rank 16 / 32 (NOTES.md v9), but not at rank 64 (gpt-oss T=1024: 1008 -> 1037 µs, v17).
constexpr int kLoraExpandPairsMaxRank = 32;
// Host shape rule: the segments average more than kLoraFewRows rows (rows T * k over the E * S adapter
// segments), so most LoRA work items are 64-row tiles. It picks the rank-64 shrink's tile shape (lora_gemm.cu
// ShrinkShape) and the expand's few-rows threshold (fused_moe_cuda.cpp).
inline bool lora_large_segments(int64_t rows, int64_t active_segments) {
  return rows > kLoraFewRows * active_segments;
}
// Host shape rules (benchmarks/NOTES.md v23): when the segments average at least kLoraFewRows rows, every segment
// takes the 64-row tiles in both LoRA kernels (few_rows_max = 0), and ranks up to kLoraTilesMaxRank run the
// tiles-only kernels (lora_gemm.cu: no few-rows path compiled in, 1.5-2x the warps per SM). Graph-replayed LoRA
// calls at rank 16 / 64: qwen3 T=2048 853 -> 814 / 1098 -> 1054 µs, mixtral T=512 1252 -> 1239 / 1432 -> 1389.
// The expand takes them from kLoraExpandTilesMinRows rows on average (qwen3 T=1024 689 -> 682 / 931 -> 900 µs);
// the shrinks there lost (rank 64's +17 µs), and below 8 rows so did the expand at rank 16 (qwen3 T=512 +5 µs).
constexpr int kLoraTilesMaxRank = 64;
constexpr int kLoraExpandTilesMinRows = 8;
inline bool lora_tiles_only(int64_t rows, int64_t active_segments, int min_avg_rows = kLoraFewRows) {
  return rows >= int64_t{min_avg_rows} * active_segments;
}
struct LoraShrinkParams {
  const void* X; int64_t ldx;               // sorted activations [rows, K]
  // nullptr, or [rows]: sorted row r reads row x_rows[r] of X. fc1 passes the hidden states [T, H] and each
  // row's token where the T * k gathered rows exceed half the L2: T rows, which stay in L2 (fused_moe_cuda.cpp).
  const int* x_rows;
  const void* A;                            // per segment [R, K] row-major
  int64_t a_expert_stride, a_slot_stride;   // elements
  float* partial;                           // out: [k_splits, max_rows, R] fp32 partial sums
  const int* row_offsets;                   // [nseg+1]
  const int* tile_prefix;                   // [nseg+1]
  const int* tile_segment;                  // [m-tiles] segment of each m-tile (routing's lora_tile_segment)
  int nseg, seg_per_expert, slot_base;
  int R, K, k_chunk, k_splits;              // K-chunk ks covers [ks * k_chunk, min(K, (ks+1) * k_chunk))
  int max_rows, max_active_segments;        // host upper bounds (grid sizing, partial layout)
  int few_rows_max;                        // segments with at most this many rows: lora_rows_mma.cuh
  // With few_rows_max == 0 and R <= kLoraTilesMaxRank: the tiles-only kernel (lora_gemm.cu), else the default
  // kernel's 64-row path (MOELORA_LORA_TILES_KERNEL=0; the same bits).
  bool tiles_kernel = true;
  // The LoRA inside the next base GEMM, with one K split (k_splits == 1): t != nullptr has the shrink write that
  // GEMM's A operand t itself instead of `partial` (what lora_k_operand.cu would make of it, the same bits): each
  // segment row's slot_scale[slot] * sums rounded in its slot's R columns, zeros in its other t_cols. Each
  // expert's rows without an adapter are zeroed by the item of its first adapter tile; an expert without adapter
  // rows is not written (its GEMM tiles hold no slot and read none of t).
  void* t = nullptr;
  int t_cols = 0;                           // multiple of 8, at least S R
  const float* slot_scale = nullptr;        // [S] or nullptr for 1
  DType dtype;
};
struct LoraExpandParams {
  const float* partial; int k_splits;       // t = sum over ks of partial[ks] (fixed order)
  const void* B;                            // per segment [N, R] row-major
  int64_t b_expert_stride, b_slot_stride;
  void* D; int64_t ldd;                     // D[r, :N] += slot_scale[slot] * t[r] @ B^T
  const float* slot_scale;                  // [S] or nullptr for 1
  const int* row_offsets;
  const int* tile_prefix;
  const int* tile_segment;
  int nseg, seg_per_expert, slot_base;
  int R, N;                                 // N: output columns (gated: h columns)
  int max_rows, max_active_segments;
  int few_rows_max;                        // as for the shrink
  bool tiles_kernel = true;                 // as for the shrink
  // fc1 with the gated activation fused (h != nullptr): D is the base output gu [rows, 2I], only read; N = I
  // and h[r, n] = round(act(round(v[n])) * round(v[up_col + n])) with v = D[r] + scale * delta, for the rows
  // with an adapter (the activation stage does the others: ActivationParams::bucket_offsets). Saves gu's
  // read-modify-write and the activation's pass over those rows (benchmarks/NOTES.md, v7).
  void* h; int64_t ldh; int up_col;
  ActivationKind activation;
  DType dtype;
};
// Host heuristics (shapes only, no routing values): split counts that fill the GPU with work items.
// `waves`: shrink work items wanted per launch, in waves of resident CTAs (kLoraShrinkWaves).
constexpr int kLoraShrinkWaves = 2;
int lora_k_splits(int K, int max_rows, int max_active_segments, int sm_count, int waves = kLoraShrinkWaves);
int lora_k_chunk(int K, int k_splits);
// The K-chunks of lora_k_chunk(K, splits) that cover K: the launch's split count for `splits` wanted.
int lora_k_split_count(int K, int splits);
cudaError_t launch_lora_shrink(const LoraShrinkParams& p, int sm_count, cudaStream_t stream);
cudaError_t launch_lora_expand(const LoraExpandParams& p, int sm_count, cudaStream_t stream);

// ---- expert_gemv.cu: the base GEMMs when experts get few rows -----------------------------------------
// With few routed rows per expert (decode: T <= kDecodeMaxTokens; or T * k <= kGemvMaxAvgRows * E) the base
// GEMM is a matrix-"vector" product that streams W. One CTA per (64-row expert tile, 32 weight rows); each
// warp takes a quarter of K and loads W straight into mma.sync fragments (mma_operands.cuh), up to 16 token
// rows per pass share every weight load, the warps' sums meet in shared memory in a fixed order. Tiles come
// from routing's expert tile prefix (grid sized from shapes). Epilogue, per output (row r, weight row n):
// v = acc + LoRA delta, where the delta of a row with an adapter (slot s) is slot_scale[s] * round(t[r]) .
// B[s, e][n] -- the LoRA expand, fused. out = round(v), or gated (fc1) h = round(act(round(v_gate)) *
// round(v_up)) with gate / up = weight rows i and I + i.
// With LoRA the same launch also runs the shrink t[r] = A[s, e] @ X[r] (fp32, one CTA per (LoRA m-tile, 32
// ranks), the GEMV's streaming with A's rows as the weight rows): those CTAs are the first to start, and the
// GEMV CTAs wait for their t (written over the routing's kLoraTPending) only in their epilogue, after streaming
// W. No shrink launch.
// Measured on the H100 (benchmarks/NOTES.md, v5/v6): the GEMV wins at T = 1 on every benchmark shape, is
// within run-to-run spread at T = 4 (mixtral T = 4 varies 790-910 µs on either path) and loses from T = 8..16
// up, so by default only T <= kDecodeMaxTokens takes it; MOELORA_GEMV_AVG_ROWS extends it to
// T * k <= avg * E (default kGemvMaxAvgRows = 0: off).
constexpr int kDecodeMaxTokens = 4;
constexpr int kGemvMaxAvgRows = 0;
struct ExpertGemvParams {
  const void* X;               // [rows, K] sorted activations
  const void* W;               // [E, N, K]
  void* D;                     // [rows, N], or [rows, N / 2] when gated
  const int* expert_offsets;   // [E + 1]
  const int* expert_tile_prefix;  // [E + 1] (kTileRows-row tiles)
  int E, N, K;
  bool gated;
  ActivationKind activation;   // when gated
  int max_rows;                // host upper bound of the rows (T * k): sizes the grid
  DType dtype;
  // LoRA (lora_A == nullptr: none). Rows of bucket b = e * seg_per_expert + 1 + s hold slot s.
  const void* lora_A;          // A[s, e] = lora_A + e * a_expert_stride + s * a_slot_stride, [R, K] row-major
  int64_t a_expert_stride, a_slot_stride;
  const void* lora_B;          // B[s, e] = lora_B + e * b_expert_stride + s * b_slot_stride, [N, R] row-major
  int64_t b_expert_stride, b_slot_stride;
  int R;                       // <= kLoraMaxRank
  const float* slot_scale;     // [S] or nullptr for 1
  float* lora_t;               // [lora_k_splits, max_rows, R]: the shrink's fp32 partial sums, kLoraTPending before
  int lora_k_splits;           // K ranges of the shrink (gemv_lora_k_splits), summed in order by the expand
  const int* bucket_offsets;   // [E * seg_per_expert + 1]
  int seg_per_expert;          // S + 1
  const int* lora_tile_prefix;   // [E * seg_per_expert + 1] routing's LoRA m-tiles per bucket (prefix)
  const int* lora_tile_segment;  // [lora_tile_capacity] bucket of each LoRA m-tile
  int lora_tile_capacity;
  const int* row_slot;         // [max_rows] each sorted row's adapter slot (routing / permute's row_slot)
  // fc1 at decode with the routing beside it (topk_ids.data != nullptr; fused_moe_cuda.cpp routing_beside_fc1):
  // each CTA finds its tile's rows from the ids itself, in the few-pairs routing's order (expert_gemv.cu
  // route_locally), X is the tokens' rows [T, K], and the CTA waits for the routing (PDL) only after its weight
  // stream, before it reads or writes what the routing writes (t, the row maps). At most kFewPairsMax pairs.
  TopkIds topk_ids;
  const int* token_slots;      // [T] or nullptr (no LoRA)
  int T, k, S;
  // false: the weight stream's loads as plain ld.global (MOELORA_GEMV_LOAD_HINTS=0), instead of with 256-byte L2
  // fills and, where K <= 2048, no L1 line (mma_operands.cuh load_stream_pack; NOTES.md v31).
  bool weight_load_hints = true;
};
// What the routing writes into every element of lora_t before a GEMV launch with LoRA (RoutingParams::fill_words):
// a NaN bit pattern that no arithmetic produces. The expand loads an element again while it still reads this.
constexpr unsigned kLoraTPending = 0xffffffffu;
cudaError_t launch_expert_gemv(const ExpertGemvParams& p, cudaStream_t stream);
// The GEMV launch's LoRA shrink splits K into ranges of at most kGemvShrinkSplitK (multiples of 512, the 16 k
// blocks of one pass of the CTA's warps), one CTA each, so that a shrink CTA runs at most 4 dependent load
// rounds and is done before the GEMV CTAs that wait for it have streamed their weights: unsplit, mixtral's fc2
// shrink (K = 14336) was 28 rounds behind a saturated HBM. Measured on the H100 (NOTES.md v19, graph, T=1):
// 2048 and 1024 alike at rank 16, 2048 faster by 1-4 µs at rank 64 (the expand reads R floats per range),
// 512 slower. `split_k` = 0: one range.
constexpr int kGemvShrinkSplitK = 2048;
inline int gemv_lora_k_splits(int K, int split_k = kGemvShrinkSplitK) {
  if (split_k <= 0 || K <= 0) return 1;
  const int chunk = (split_k + 511) / 512 * 512;
  return (K + chunk - 1) / chunk;
}

// ---- activation.cu: h[r, i] = act(gu[r, i]) * gu[r, I + i] for the routed rows ---------------------
struct ActivationParams {
  const void* gu;            // [rows, 2I]
  // nullptr, or [rows, 2I] added to gu before the activation, in fp32: the LoRA delta that fc1's expand wrote
  // into a zeroed buffer while the base GEMM ran (LoRA overlapped, fused_moe_cuda.cpp).
  const void* gu_delta;
  void* h;                   // [rows, I]
  const int* num_rows;       // device scalar: rows actually routed (expert_offsets[E])
  // nullptr, or the routing's bucket offsets [E * per_expert + 1]: only the rows without an adapter (each
  // expert's first bucket) are done; fc1's LoRA expand with the activation fused wrote the others' h.
  const int* bucket_offsets;
  int num_experts, per_expert;
  int sm_count;              // sizes the bucket_offsets launch
  int max_rows, I;
  ActivationKind kind;
  DType dtype;
};
cudaError_t launch_activation(const ActivationParams& p, cudaStream_t stream);

// ---- finalize.cu: out[t] = sum_j topk_weights[t, j] * (y + y_delta)[pair_row[t, j]], in j order -----
struct FinalizeParams {
  const void* y;             // [rows, H]
  const void* y_delta;       // nullptr, or [rows, H] added to y (fc2's LoRA delta when overlapped)
  const int* pair_row;       // [T*k]
  const void* topk_weights;  // [T*k], float32 or the activation dtype (read as given)
  bool topk_weights_fp32;
  void* out;                 // [T, H]
  int T, k, H;
  DType dtype;
};
cudaError_t launch_finalize(const FinalizeParams& p, cudaStream_t stream);

// ---- lora_k_operand.cu: t for the LoRA inside the expert GEMM (expert_gemm_sm90.h LoraKOperands) --------
// Per routed row r with an adapter (slot = row_slot[r] >= 0): t[r, slot R + j] = round(scale[slot] *
// sum_ks partial[ks, r, j]) for j < R (the shrink's split-K sums in ks order, as the expand kernels take them),
// every other column 0; rows without an adapter all 0. Rows past the routed count are not written.
struct LoraKOperandParams {
  const float* partial;      // [k_splits, max_rows, R]
  int k_splits;
  const int* row_slot;       // [max_rows]: each sorted row's slot (-1: none)
  const float* slot_scale;   // [S], or nullptr: every slot scales by 1
  const int* num_rows;       // device scalar: rows actually routed (expert_offsets[E])
  void* t;                   // [max_rows, t_cols]
  int max_rows, R, t_cols;   // R and t_cols multiples of 8
  DType dtype;
};
cudaError_t launch_lora_k_operand(const LoraKOperandParams& p, cudaStream_t stream);

}  // namespace moelora::cuda
