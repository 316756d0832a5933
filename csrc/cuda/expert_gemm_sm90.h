// Hopper (sm_90a) expert-major grouped GEMM: D[r, :] = A[r, :] @ W[e]^T for every expert e and every
// row r in [expert_offsets[e], expert_offsets[e+1]). Built on the CUTLASS 3.x ptr-array grouped GEMM;
// problem shapes, pointers and strides are written on the device from expert_offsets, so a call does no
// host sync, no allocation and no host decision on tensor values (CUDA-graph capturable).
// Plain C++ on purpose: no torch and no CUTLASS types here (implementation: expert_gemm_sm90.cuh,
// dispatch: expert_gemm_sm90.cu).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

namespace moelora::cuda {

enum class DType { BF16, FP16 };

// Tile configuration of the grouped GEMM (expert_gemm_sm90.cu: what each is for, and the rule Auto applies):
//  * SmallM / LargeM / LargeMPingpong: D = A @ W[e]^T with the rows on the MMA's M side (64-row pingpong,
//    128-row cooperative, 64-row-per-warpgroup pingpong tiles);
//  * SwapAB32: operands swapped, D^T = W[e] @ A^T, W's rows on the 128-row M side and the expert's rows on
//    N (32): few rows per expert.
enum class ExpertGemmConfig { Auto, SmallM, LargeM, LargeMPingpong, SwapAB32 };

// fc1 with its gated activation fused into the GEMM (anything but None): W[e] holds the gate rows first and the up
// rows after them (N = 2I), and D [rows, N/2] receives h[r, j] = act(gate[r, j]) * up[r, j] computed in fp32 from
// the GEMM's accumulators and rounded once (expert_gemm_sm90_gated_epilogue.cuh), so gu is never written. SiLU -> SwiGLU,
// GELU (erf) -> GeGLU. Row-side tiles only: see expert_gemm_sm90_gated_supported.
enum class GatedOutput { None, Silu, Gelu };

// The LoRA inside the GEMM (t != nullptr): the K loop runs on past the weight's K over t_cols more columns,
//   D[r] = A[r] @ W[e]^T + t[r] @ Bcat[e]^T,  Bcat[e][n, s R + r'] = B[s, e][n, r'],
// so that with t[r] = scale[slot] * (A[slot, e] @ x_r) in the R columns of the row's slot (zeros elsewhere and for
// rows without an adapter: the shrink, lora_t_rows.cuh, or lora_k_operand.cu) the GEMM adds the row's LoRA delta
// before its epilogue (fc1: before the gated activation; fc2: no read-modify-write of D). Row-side tiles only:
// expert_gemm_sm90_lora_k_supported.
struct LoraKOperands {
  const void* t = nullptr;            // [rows, t_cols], rows as A's
  int t_cols = 0;                     // S * R rounded up to a multiple of 128
  const void* b = nullptr;            // the adapters' B: [S, E, N, R], or [S, N, R] shared by the experts
  int64_t b_expert_stride = 0;        // elements: N * R, or 0 when shared
  int64_t b_slot_stride = 0;          // elements: E * N * R, or N * R when shared
  int S = 0, R = 0;                   // expert_gemm_lora_k_rank(R)
  const int* row_slot = nullptr;      // device [rows]: each sorted row's slot (-1: none); a tile's LoRA k tiles of
                                      // slots none of its rows has are skipped
};

struct ExpertGemmParams {
  const void* A;               // [rows, K] row-major, rows sorted by expert
  const void* W;               // [E, N, K] row-major (weight of expert e = W + e*N*K)
  void* D;                     // [rows, N] row-major
  const int* expert_offsets;   // device [E+1]; expert e owns rows [off[e], off[e+1])
  int num_experts, N, K;
  DType dtype;
  int rows_hint;               // host upper bound of the rows (T*k); only picks the tile configuration
  ExpertGemmConfig config = ExpertGemmConfig::Auto;  // Auto: chosen from rows_hint / num_experts
  GatedOutput gated = GatedOutput::None;             // None: D = A @ W[e]^T [rows, N]
  LoraKOperands lora_k;                              // t == nullptr: no LoRA in the GEMM
};

bool expert_gemm_sm90_compiled();                                   // false when built without sm90a CUTLASS
// The configuration a call with p runs: p.config, or for Auto the size rule's choice (host only).
ExpertGemmConfig expert_gemm_sm90_auto_config(const ExpertGemmParams& p);
// Bytes of workspace for one GEMM with this many experts and this SM count (any dtype and config).
size_t expert_gemm_sm90_workspace_bytes(int num_experts, int sm_count);
// Whether p can run with a gated output (host only, from shapes): compiled for sm_90a, a row-side tile (the size
// rule's choice is not SwapAB32, whose D is written transposed) and N/2 a multiple of 8.
bool expert_gemm_sm90_gated_supported(const ExpertGemmParams& p);
// Whether p can run with the LoRA inside (host only, from shapes): a row-side tile, R 64 or 128 and t_cols a
// multiple of 128 holding S * R columns.
bool expert_gemm_sm90_lora_k_supported(const ExpertGemmParams& p);
// t_cols for S slots of rank R.
inline int expert_gemm_lora_k_cols(int S, int R) { return (S * R + 127) / 128 * 128; }
// The ranks whose LoRA k tiles the GEMM lays out (expert_gemm_sm90_mainloop.cuh: 16 / 32 in 32- / 64-byte swizzled
// boxes per slot, 64 / 128 in 64-rank panels); the host rule and the kernel's can_implement both ask this.
constexpr bool expert_gemm_lora_k_rank(int R) { return R == 16 || R == 32 || R == 64 || R == 128; }

// Two steps, so the tables of several GEMMs that share expert_offsets (fc1 and fc2) are written by one
// launch before the first of them runs:
//  * prepare: writes the group tables (problem shapes, pointers, strides) of gemms[0..count) into their
//    workspaces, from the device expert offsets (one kernel launch when the GEMMs share a configuration);
//  * run: the grouped GEMM D = A @ W[e]^T per expert, reading the tables prepare wrote on the same stream.
// No host sync, graph-capturable. Return cudaErrorNotSupported when not compiled, cudaErrorInvalidValue for
// bad arguments (N or K not a multiple of 8, workspace too small, sm_count <= 0, ...). Workspaces must stay
// alive until the GEMMs have run on `stream`.
cudaError_t expert_gemm_sm90_prepare(const ExpertGemmParams* gemms, void* const* workspaces, int count,
                                     size_t workspace_bytes, int sm_count, cudaStream_t stream);
cudaError_t expert_gemm_sm90_run(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                                 cudaStream_t stream);
// prepare + run of one GEMM.
cudaError_t expert_gemm_sm90(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes,
                             int sm_count, cudaStream_t stream);

// The group tables of one GEMM as plain data: where they live in its workspace and what goes in them, so that
// a kernel that computes the expert offsets anyway (the routing) writes them instead of prepare's launch.
// Entry e, for the expert's rows [begin, begin + m): shape {m, N, shape_k} (shape_k = K, or with the LoRA inside the
// weight's k tiles and then t's columns); pointers A + begin * K, W + e * N * K
// and D + begin * ldd (elements; ldd = N, or N/2 with a gated output); three strides (A, B, D), each one 64-bit
// value, the same for every expert.
// With swap_ab (SwapAB32) the GEMM's A operand is the weight and its B the rows: shape {N, m, K},
// pointers W + e * N * K, A + begin * K, D + begin * ldd (D written column-major, i.e. D^T).
struct ExpertGemmTables {
  int* shapes;  // [E][3]
  const void** ptr_a;
  const void** ptr_b;
  void** ptr_d;
  int64_t* strides[3];  // [E] each
  int64_t stride_values[3];
  const char* A;
  const char* W;
  char* D;
  int N, K, element_bytes;
  int ldd;      // D's row length: N, or N/2 with a gated output
  int shape_k;  // the group problem's K
  bool swap_ab;
};
// Host only (no launch): the tables of p's configuration in `workspace`. Same errors as prepare; after the
// entries are written on `stream` (write_expert_gemm_tables, every e < num_experts), run may follow.
cudaError_t expert_gemm_sm90_tables(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                                    ExpertGemmTables* tables);

#if defined(__CUDACC__)
__device__ __forceinline__ void write_expert_gemm_tables(const ExpertGemmTables& t, int e, int begin, int m) {
  const char* rows = t.A + static_cast<int64_t>(begin) * t.K * t.element_bytes;
  const char* weight = t.W + static_cast<int64_t>(e) * t.N * t.K * t.element_bytes;
  t.shapes[3 * e] = t.swap_ab ? t.N : m;
  t.shapes[3 * e + 1] = t.swap_ab ? m : t.N;
  t.shapes[3 * e + 2] = t.shape_k;
  t.ptr_a[e] = t.swap_ab ? weight : rows;
  t.ptr_b[e] = t.swap_ab ? rows : weight;
  t.ptr_d[e] = t.D + static_cast<int64_t>(begin) * t.ldd * t.element_bytes;
#pragma unroll
  for (int i = 0; i < 3; ++i) t.strides[i][e] = t.stride_values[i];
}
#endif

}  // namespace moelora::cuda
