// Host dispatch of the sm_90a expert grouped GEMM: picks the dtype instantiation and the tile config.
// No CUTLASS headers here (the per-dtype TUs hold the templates), so this TU compiles in seconds.
#include "expert_gemm_sm90.cuh"

#include <algorithm>

#include "pdl.cuh"

namespace moelora::cuda {

#if defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)
namespace {

// True when this TU was compiled with a compute_90 device pass. The CUTLASS kernels need sm_90a
// (wgmma/TMA/setmaxnreg); the build always pairs compute_90 with the "a" variant
// (-gencode=arch=compute_90a,code=sm_90a). nvcc's host pass only sees "900" in __CUDA_ARCH_LIST__,
// whichever variant; a plain compute_90 device pass is refused with #error in expert_gemm_sm90.cuh, so
// 900 in the list means the sm_90a kernels are really there.
constexpr bool built_for_sm90() {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs)
    if (a == 900) return true;
  return false;
#else
  return true;
#endif
}

// Config choice from the host-known row count (T*k), never from device values: average rows per expert
// m = rows_hint / E (routing skew aside). Below ~300 rows an expert's GEMM is bound by streaming W[e] from
// HBM (H100 ridge ~300 FLOP/B = m); above, by the tensor cores. Measured on the H100 (bf16, uniform random
// routing, profile_stages, per GEMM; benchmarks/NOTES.md v15), each against the next one:
//  * m <= 16, SwapAB32 (W's rows on the MMA's M side, the expert's rows on N = 32): no MMA work or shared
//    memory spent on zero-filled rows, five stages of W in flight. Both GEMMs against SmallM: mixtral T=16 /
//    64 928 / 980 -> 904 / 960 us, gpt-oss 502 / 571 -> 494 / 563, qwen3 290 / 432 -> 283 / 426. At m = 32 it
//    loses (gpt-oss T=256 587 -> 611): 32-wide wgmma tiles reread W from shared memory per 32 rows.
//  * m <= 64, SmallM (64x128x128 pingpong). Against LargeM at m = 64: qwen3 T=1024 498 -> 476 us, mixtral
//    T=256 1058 -> 1051, gpt-oss T=512 631 -> 634 (a tie).
//  * m <= 128, LargeMPingpong (64x256x64 per warpgroup, pingpong). Against LargeM at m = 128: mixtral T=512
//    1187 -> 1096 us, gpt-oss T=1024 691 -> 658, qwen3 T=2048 545 -> 521; at m = 256 it loses by 0.7-1.7% (qwen3
//    T=4096, mixtral T=1024), at m >= 512 by 25-40%.
//  * above, LargeM (128x256x64 cooperative). A 2-CTA cluster with the weight tile multicast was slower
//    (+1..+10%) except at gpt-oss T=16384 (-3%).
// p.config other than Auto (a caller's choice, e.g. to measure) is taken as is.
ExpertGemmConfig pick_tile(const ExpertGemmParams& p) {
  if (p.config != ExpertGemmConfig::Auto) return p.config;
  const long long rows = p.rows_hint > 0 ? p.rows_hint : 0, E = p.num_experts;
  if (rows <= 16 * E) return ExpertGemmConfig::SwapAB32;
  if (rows <= 64 * E) return ExpertGemmConfig::SmallM;
  if (rows <= 128 * E) return ExpertGemmConfig::LargeMPingpong;
  return ExpertGemmConfig::LargeM;
}

constexpr ExpertGemmConfig kConfigs[] = {ExpertGemmConfig::SmallM, ExpertGemmConfig::LargeM,
                                         ExpertGemmConfig::LargeMPingpong, ExpertGemmConfig::SwapAB32};

// One thread per expert, blockIdx.y picks the GEMM: prepare's launch of the group tables.
__global__ void build_expert_groups_kernel(ExpertGemmTables t0, ExpertGemmTables t1, const int* offsets0,
                                           const int* offsets1, int experts0, int experts1) {
  pdl_begin();
  const bool second = blockIdx.y == 1;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= (second ? experts1 : experts0)) return;
  const int* offsets = second ? offsets1 : offsets0;
  const int begin = offsets[e];
  write_expert_gemm_tables(second ? t1 : t0, e, begin, max(offsets[e + 1] - begin, 0));
}

}  // namespace

bool expert_gemm_sm90_compiled() { return built_for_sm90(); }

ExpertGemmConfig expert_gemm_sm90_auto_config(const ExpertGemmParams& p) { return pick_tile(p); }

size_t expert_gemm_sm90_workspace_bytes(int num_experts, int sm_count) {
  // The dtype is not an argument, so cover every instantiation (they differ by a few hundred bytes).
  size_t bytes = 0;
  for (auto tile : kConfigs)
    for (bool gated : {false, true})
      for (bool lora_k : {false, true}) {
        bytes = std::max(bytes, detail::expert_gemm_sm90_bf16_workspace(tile, gated, lora_k, num_experts, sm_count));
        bytes = std::max(bytes, detail::expert_gemm_sm90_fp16_workspace(tile, gated, lora_k, num_experts, sm_count));
      }
  return bytes;
}

bool expert_gemm_sm90_gated_supported(const ExpertGemmParams& p) {
  return built_for_sm90() && p.N > 0 && p.N % 16 == 0 && pick_tile(p) != ExpertGemmConfig::SwapAB32;
}

bool expert_gemm_sm90_lora_k_supported(const ExpertGemmParams& p) {
  const LoraKOperands& l = p.lora_k;
  return built_for_sm90() && pick_tile(p) != ExpertGemmConfig::SwapAB32 && expert_gemm_lora_k_rank(l.R) && l.S > 0 &&
         l.t_cols == expert_gemm_lora_k_cols(l.S, l.R);
}

namespace {
// p's gated output and LoRA, where it asks for them, are ones its tile has.
bool variant_supported(const ExpertGemmParams& p) {
  return (p.gated == GatedOutput::None || expert_gemm_sm90_gated_supported(p)) &&
         (p.lora_k.t == nullptr || expert_gemm_sm90_lora_k_supported(p));
}
}  // namespace

cudaError_t expert_gemm_sm90_tables(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                                    ExpertGemmTables* tables) {
  if (!built_for_sm90()) return cudaErrorNotSupported;
  if (tables == nullptr || p.num_experts <= 0 || sm_count <= 0 || workspace == nullptr ||
      workspace_bytes < expert_gemm_sm90_workspace_bytes(p.num_experts, sm_count))
    return cudaErrorInvalidValue;
  if (!variant_supported(p)) return cudaErrorInvalidValue;
  const ExpertGemmConfig tile = pick_tile(p);
  *tables = p.dtype == DType::BF16 ? detail::expert_gemm_sm90_bf16_tables(tile, p, workspace)
                                   : detail::expert_gemm_sm90_fp16_tables(tile, p, workspace);
  return cudaSuccess;
}

cudaError_t expert_gemm_sm90_prepare(const ExpertGemmParams* gemms, void* const* workspaces, int count,
                                     size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  if (!built_for_sm90()) return cudaErrorNotSupported;
  if (count <= 0 || gemms == nullptr || workspaces == nullptr) return cudaErrorInvalidValue;
  // Two GEMMs' tables per launch.
  for (int i = 0; i < count; i += 2) {
    const int n = std::min(2, count - i);
    ExpertGemmTables t[2];
    for (int j = 0; j < n; ++j) {
      const cudaError_t err = expert_gemm_sm90_tables(gemms[i + j], workspaces[i + j], workspace_bytes, sm_count, &t[j]);
      if (err != cudaSuccess) return err;
    }
    const ExpertGemmParams& g1 = gemms[i + n - 1];
    constexpr int kThreads = 128;
    const int max_e = std::max(gemms[i].num_experts, g1.num_experts);
    const cudaError_t err =
        launch_kernel(build_expert_groups_kernel, dim3((max_e + kThreads - 1) / kThreads, n), kThreads, 0, stream,
                      t[0], t[n - 1], gemms[i].expert_offsets, g1.expert_offsets, gemms[i].num_experts,
                      g1.num_experts);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t expert_gemm_sm90_run(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                                 cudaStream_t stream) {
  if (!built_for_sm90()) return cudaErrorNotSupported;
  if (!variant_supported(p)) return cudaErrorInvalidValue;
  const ExpertGemmConfig tile = pick_tile(p);
  switch (p.dtype) {
    case DType::BF16:
      return detail::expert_gemm_sm90_bf16_run(tile, p, workspace, workspace_bytes, sm_count, stream);
    case DType::FP16:
      return detail::expert_gemm_sm90_fp16_run(tile, p, workspace, workspace_bytes, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t expert_gemm_sm90(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                             cudaStream_t stream) {
  if (cudaError_t err = expert_gemm_sm90_prepare(&p, &workspace, 1, workspace_bytes, sm_count, stream);
      err != cudaSuccess)
    return err;
  return expert_gemm_sm90_run(p, workspace, workspace_bytes, sm_count, stream);
}

#else  // built without CUDA CUTLASS support

bool expert_gemm_sm90_compiled() { return false; }
ExpertGemmConfig expert_gemm_sm90_auto_config(const ExpertGemmParams& p) { return p.config; }
size_t expert_gemm_sm90_workspace_bytes(int, int) { return 0; }
bool expert_gemm_sm90_gated_supported(const ExpertGemmParams&) { return false; }
bool expert_gemm_sm90_lora_k_supported(const ExpertGemmParams&) { return false; }
cudaError_t expert_gemm_sm90_prepare(const ExpertGemmParams*, void* const*, int, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t expert_gemm_sm90_tables(const ExpertGemmParams&, void*, size_t, int, ExpertGemmTables*) {
  return cudaErrorNotSupported;
}
cudaError_t expert_gemm_sm90_run(const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t expert_gemm_sm90(const ExpertGemmParams&, void*, size_t, int, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

}  // namespace moelora::cuda
