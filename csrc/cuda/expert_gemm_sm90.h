// Hopper (sm_90a) expert-major grouped GEMM: D[r, :] = A[r, :] @ W[e]^T for every expert e and every
// row r in [expert_offsets[e], expert_offsets[e+1]). Built on the CUTLASS 3.x ptr-array grouped GEMM;
// problem shapes, pointers and strides are written on the device from expert_offsets, so a call does no
// host sync, no allocation and no host decision on tensor values (CUDA-graph capturable).
// Plain C++ on purpose: no torch and no CUTLASS types here (implementation: expert_gemm_sm90.cuh,
// dispatch: expert_gemm_sm90.cu).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

namespace moelora::cuda {

enum class DType { BF16, FP16 };

struct ExpertGemmParams {
  const void* A;               // [rows, K] row-major, rows sorted by expert
  const void* W;               // [E, N, K] row-major (weight of expert e = W + e*N*K)
  void* D;                     // [rows, N] row-major
  const int* expert_offsets;   // device [E+1]; expert e owns rows [off[e], off[e+1])
  int num_experts, N, K;
  DType dtype;
  int rows_hint;               // host upper bound of the rows (T*k); only picks the tile configuration
};

bool expert_gemm_sm90_compiled();                                   // false when built without sm90a CUTLASS
// Bytes of workspace for one GEMM with this many experts and this SM count (any dtype and config).
size_t expert_gemm_sm90_workspace_bytes(int num_experts, int sm_count);

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

}  // namespace moelora::cuda
