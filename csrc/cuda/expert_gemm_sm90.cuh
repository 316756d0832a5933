// Templated implementation of the sm_90a expert grouped GEMM (interface: expert_gemm_sm90.h).
//
// Two parts:
//  * declarations (always visible): the per-dtype entry points that expert_gemm_sm90_{bf16,fp16}.cu
//    define and expert_gemm_sm90.cu dispatches to, so the dispatcher stays free of CUTLASS headers;
//  * the CUTLASS template (only with MOELORA_EXPERT_GEMM_SM90_IMPL, i.e. in the TUs that include
//    expert_gemm_sm90_impl.cuh).
//
// Design (why it is graph-capturable):
//  * CUTLASS 3.x ptr-array grouped GEMM, one group per expert, GroupProblemShape with host shapes = nullptr.
//    Problem shapes, A/B/D pointer arrays and strides live in the caller's workspace and are written on the
//    device from expert_offsets on the same stream (write_expert_gemm_tables: by prepare's launch, or by the
//    routing kernel in fused_moe), so nothing on the host depends on the routing. With no host shapes the CUTLASS grid
//    is sized from sm_count alone (PersistentTileSchedulerSm90Group::get_tiled_cta_shape_mnl ->
//    total_ctas = sm_count; cluster 1x1 -> grid = sm_count persistent CTAs).
//  * Experts with 0 rows: the group tile scheduler computes ceil_div(M, tileM) * ceil_div(N, tileN) = 0
//    tiles for them and its warp-wide prefix scan walks past them, so no CTA ever touches their (valid but
//    unused) pointers. rows == 0 in total: every CTA gets an invalid tile and exits.
//  * Partial M tiles: the mainloop/epilogue rewrite the TMA descriptors per group with that group's M, so
//    TMA loads zero-fill and TMA stores clip at the expert's last row (no spill into the next expert).
//  * Host-side CUTLASS work per call: building TMA descriptor templates (cuTensorMapEncode, host only) and
//    cudaFuncSetAttribute (not a stream op): both are legal during stream capture. No cudaMalloc, no sync.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

#include "expert_gemm_sm90.h"

namespace moelora::cuda::detail {

// Per dtype: workspace size, where the group tables live and what goes in them (host only), and the GEMM itself,
// for a tile configuration that is not Auto (expert_gemm_sm90.cu resolves Auto first).
#define MOELORA_EXPERT_GEMM_DECLARE(NAME)                                                                      \
  size_t expert_gemm_sm90_##NAME##_workspace(ExpertGemmConfig tile, bool gated, bool lora_k, int num_experts,  \
                                             int sm_count);                                                    \
  ExpertGemmTables expert_gemm_sm90_##NAME##_tables(ExpertGemmConfig tile, const ExpertGemmParams& p,          \
                                                    void* workspace);                                          \
  cudaError_t expert_gemm_sm90_##NAME##_run(ExpertGemmConfig tile, const ExpertGemmParams& p, void* workspace,\
                                            size_t workspace_bytes, int sm_count, cudaStream_t stream);
MOELORA_EXPERT_GEMM_DECLARE(bf16)
MOELORA_EXPERT_GEMM_DECLARE(fp16)
#undef MOELORA_EXPERT_GEMM_DECLARE

}  // namespace moelora::cuda::detail

#if defined(MOELORA_EXPERT_GEMM_SM90_IMPL) && defined(MOELORA_WITH_CUDA) && !defined(MOELORA_NO_CUTLASS)

// A compute_90 device pass without the "a" features would compile CUTLASS's kernels to an error printf,
// while the host (which only sees 900 in __CUDA_ARCH_LIST__) would report expert_gemm_sm90_compiled().
// Refuse that build instead, so compiled() == "sm_90a code is in the binary". Other arches (sm_80) get
// CUTLASS's empty arch-guarded kernel bodies, never launched (the caller checks compute capability 9.0).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "expert_gemm_sm90: build Hopper as -gencode=arch=compute_90a,code=sm_90a (wgmma/TMA need the 'a' target)"
#endif

#include <algorithm>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "expert_gemm_sm90_gated_epilogue.cuh"
#include "expert_gemm_sm90_mainloop.cuh"
#include "pdl.cuh"

namespace moelora::cuda::detail {

using namespace cute;

// A tile configuration: the CTA tile (M x N x K as CUTLASS sees the GEMM), pingpong (two consumer warpgroups on
// tiles of their own, one's epilogue under the other's main loop) or cooperative (both on one tile), and
// whether the operands are swapped. Cluster 1x1: a 2-CTA cluster rounds every expert's tile count up to the
// cluster size and measured slower (benchmarks/NOTES.md v15).
template <class CtaTile, bool kPingpong, bool kSwap = false>
struct TileConfig {
  using TileShape = CtaTile;
  using ClusterShape = Shape<_1, _1, _1>;
  using KernelSchedule = cute::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = cute::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                               cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  static constexpr bool kSwapAB = kSwap;
};

// Decode / small rows per expert: memory bound on streaming W. Pingpong with 64-row tiles wastes the
// least MMA work on mostly-empty M tiles, keeps two consumer warpgroups alternating so the producer
// streams weight tiles continuously, and a 128-deep K tile with 4+ stages keeps ~190 KB of W in flight
// per SM. N=128 (not 256) doubles the number of tiles so more SMs stream weights when only a few experts
// are active (e.g. T=1, k=8: 8 experts x N/128 tiles).
using SmallMTile = TileConfig<Shape<_64, _128, _128>, true>;

// Prefill / many rows per expert: compute bound. The usual best Hopper bf16 tile: 128x256x64 with two
// cooperative consumer warpgroups (64x256 each).
using LargeMTile = TileConfig<Shape<_128, _256, _64>, false>;

// Between the two (64 < rows per expert <= 128; expert_gemm_sm90.cu): 64x256 per consumer warpgroup, pingpong.
// One warpgroup's epilogue overlaps the other's main loop, and the 64-row tile pads less of an expert's last
// rows than LargeM's 128; at more rows the cooperative 128x256 tile's larger MMA per loaded byte wins.
using LargeMPingpongTile = TileConfig<Shape<_64, _256, _64>, true>;

// Few rows per expert, operands swapped: D^T[e] = W[e] @ A[rows of e]^T. The weight's rows fill the MMA's
// 128-row M side and the expert's rows its N side (32), so no MMA work and no shared memory go to the
// zero-filled rows of a 64-row M tile: a stage is 32 KB of W and 8 KB of rows (SmallM: 32 + 16), which
// leaves room for five stages of W in flight. D is written column-major (= D row-major).
// Cooperative: both consumer warpgroups share one tile (64 weight rows each); the producer warp keeps
// loading the next tile's stages during the epilogue.
using SwapAB32Tile = TileConfig<Shape<_128, _32, _128>, false, true>;

// The CUTLASS kernel, entered through pdl_begin(): this CUTLASS version's sm90 ptr-array kernels have no
// grid-dependency control of their own, and a kernel launched with the PDL attribute (pdl.cuh) must wait
// for its predecessor before reading memory. Everything else (Params, shared storage, launch bounds) is the
// base kernel's.
template <class Base>
struct PdlWaitKernel : Base {
  CUTLASS_DEVICE void operator()(typename Base::Params const& params, char* smem) {
    pdl_begin();
    Base::operator()(params, smem);
  }
};

// kGated: fc1 with its gated activation in the epilogue (expert_gemm_sm90_gated_epilogue.cuh); kLoraK: the LoRA
// inside the GEMM, as more k tiles (expert_gemm_sm90_mainloop.cuh). Both: row-side tiles only.
template <class Element, class Tile, bool kGated = false, bool kLoraK = false>
struct ExpertGemmKernel {
  static_assert(!((kGated || kLoraK) && Tile::kSwapAB), "the gated and LoRA main loops need the weight's rows on N");
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per group <M, N, K>
  using ElementAcc = float;
  // Both operands K-major (TN). Plain: A = the rows [rows, K], B = W[e] [N, K] row-major == K x N column-major,
  // D [rows, N] row-major. Swapped: A = W[e] [N, K], B = the rows (K x rows column-major), D^T [N, rows]
  // column-major, which is D [rows, N] row-major. Gated: D [rows, N/2] row-major.
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cute::conditional_t<Tile::kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr bool kSwapAB = Tile::kSwapAB;
  static constexpr bool kGatedOutput = kGated;
  static constexpr bool kLoraInGemm = kLoraK;
  static constexpr bool kCustomMainloop = kGated || kLoraK;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 B (TMA)

  // No C operand (void): D = acc, beta = 0, nothing loaded in the epilogue.
  using PlainEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Tile::TileShape,
      typename Tile::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, typename Tile::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, ElementAcc>>::CollectiveOp;
  // Gated: registers to global memory, no shared memory (so the main loop's stages take all of it).
  using CollectiveEpilogue = cute::conditional_t<
      kGated, cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GatedActivationEpilogue<Element>>,
      PlainEpilogue>;

  // The LoRA's two extra tensor maps (2 x 128 B) and its stages' k-tile flags (one 128-byte aligned block) are not
  // in the builder's stage count.
  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*,
      kAlign, ElementAcc, typename Tile::TileShape, typename Tile::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage) + (kLoraK ? 384 : 0))>,
      typename Tile::KernelSchedule>::CollectiveOp;
  using CollectiveMainloop =
      cute::conditional_t<kCustomMainloop, ExpertMainloop<BuiltMainloop, kGated, kLoraK>, BuiltMainloop>;

  using Kernel =
      PdlWaitKernel<cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(Kernel::SharedStorageSize <= 232448, "above the sm90 opt-in shared memory per block (227 KB)");

  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using StrideC = typename Kernel::InternalStrideC;
  using ElementC = typename Gemm::ElementC;  // void
  using ElementD = typename CollectiveEpilogue::ElementD;
  static_assert(cute::is_same_v<ElementD, Element>, "D has the input element type");
};

// Our per-group tables in the workspace, followed by CUTLASS's own workspace (TMA descriptor copies).
struct GroupTableLayout {
  static constexpr size_t kAlign = 256;
  static size_t up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
  size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass_ws, end;
  template <class K>
  static GroupTableLayout make(int E) {
    GroupTableLayout l{};
    size_t o = 0;
    l.shapes = o;   o = up(o + sizeof(typename K::Shape3) * E);
    l.ptr_a = o;    o = up(o + sizeof(void*) * E);
    l.ptr_b = o;    o = up(o + sizeof(void*) * E);
    l.ptr_d = o;    o = up(o + sizeof(void*) * E);
    l.stride_a = o; o = up(o + sizeof(typename K::StrideA) * E);
    l.stride_b = o; o = up(o + sizeof(typename K::StrideB) * E);
    l.stride_d = o; o = up(o + sizeof(typename K::StrideD) * E);
    l.cutlass_ws = o;
    l.end = o;
    return l;
  }
};

// The caller's allocation is at least 256-aligned in practice; align anyway.
inline char* aligned_workspace(void* workspace) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  return reinterpret_cast<char*>((base + GroupTableLayout::kAlign - 1) / GroupTableLayout::kAlign *
                                 GroupTableLayout::kAlign);
}

// The tables of p in the workspace as plain data (ExpertGemmTables): the device-side writer
// (write_expert_gemm_tables) fills CUTLASS's per-group shape and stride types as raw ints, which the asserts
// below pin down.
template <class Element, class Tile, bool kGated, bool kLoraK>
ExpertGemmTables make_tables(const ExpertGemmParams& p, void* workspace) {
  using K = ExpertGemmKernel<Element, Tile, kGated, kLoraK>;
  using RowMajorStride = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;  // one dynamic stride: mode 0
  using ColMajorStride = cute::Stride<cute::Int<1>, int64_t, cute::Int<0>>;  // one dynamic stride: mode 1
  static_assert(sizeof(typename K::Shape3) == 3 * sizeof(int), "group shape = {M, N, K} ints");
  static_assert(cute::is_same_v<typename K::StrideA, RowMajorStride> && cute::is_same_v<typename K::StrideB, RowMajorStride> &&
                    cute::is_same_v<typename K::StrideD, cute::conditional_t<Tile::kSwapAB, ColMajorStride, RowMajorStride>> &&
                    sizeof(RowMajorStride) == sizeof(int64_t) && sizeof(ColMajorStride) == sizeof(int64_t),
                "packed strides are one int64 each");
  char* ws = aligned_workspace(workspace);
  const GroupTableLayout l = GroupTableLayout::make<K>(p.num_experts);
  ExpertGemmTables t{};
  t.shapes = reinterpret_cast<int*>(ws + l.shapes);
  t.ptr_a = reinterpret_cast<const void**>(ws + l.ptr_a);
  t.ptr_b = reinterpret_cast<const void**>(ws + l.ptr_b);
  t.ptr_d = reinterpret_cast<void**>(ws + l.ptr_d);
  t.strides[0] = reinterpret_cast<int64_t*>(ws + l.stride_a);
  t.strides[1] = reinterpret_cast<int64_t*>(ws + l.stride_b);
  t.strides[2] = reinterpret_cast<int64_t*>(ws + l.stride_d);
  // D's row length: N, or N/2 when the gated epilogue writes act(gate) * up.
  t.ldd = kGated ? p.N / 2 : p.N;
  // Packed strides are leading dimensions only: K for both operands (rows and W[e] alike), ldd for D (its row
  // stride; swapped, the column stride of D^T), whatever the rows per expert.
  t.stride_values[0] = cute::get<0>(cutlass::make_cute_packed_stride(typename K::StrideA{}, cute::make_shape(1, p.K, 1)));
  t.stride_values[1] = cute::get<0>(cutlass::make_cute_packed_stride(typename K::StrideB{}, cute::make_shape(1, p.K, 1)));
  if constexpr (Tile::kSwapAB)
    t.stride_values[2] = cute::get<1>(cutlass::make_cute_packed_stride(typename K::StrideD{}, cute::make_shape(t.ldd, 1, 1)));
  else
    t.stride_values[2] = cute::get<0>(cutlass::make_cute_packed_stride(typename K::StrideD{}, cute::make_shape(1, t.ldd, 1)));
  t.A = static_cast<const char*>(p.A);
  t.W = static_cast<const char*>(p.W);
  t.D = static_cast<char*>(p.D);
  t.N = p.N;
  t.K = p.K;
  // The group problem's K: the weight's, or with the LoRA inside its k tiles then t's columns.
  constexpr int kTileK = cute::size<2>(typename Tile::TileShape{});
  t.shape_k = kLoraK ? (p.K + kTileK - 1) / kTileK * kTileK + p.lora_k.t_cols : p.K;
  t.element_bytes = sizeof(Element);
  t.swap_ab = Tile::kSwapAB;
  return t;
}

template <class K>
typename K::Gemm::Arguments make_arguments(const GroupTableLayout& l, char* ws, int E, int sm_count,
                                           const ExpertGemmParams* p = nullptr) {
  using ElementA = typename K::Gemm::ElementA;
  using ElementB = typename K::Gemm::ElementB;
  cutlass::KernelHardwareInfo hw{};
  hw.device_id = 0;  // only read by CUTLASS when sm_count <= 0, which we reject
  hw.sm_count = sm_count;
  hw.max_active_clusters = 0;  // unused with a 1x1 cluster

  typename K::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {E, reinterpret_cast<typename K::Shape3*>(ws + l.shapes), nullptr};
  args.mainloop.ptr_A = reinterpret_cast<const ElementA**>(ws + l.ptr_a);
  args.mainloop.dA = reinterpret_cast<typename K::StrideA*>(ws + l.stride_a);
  args.mainloop.ptr_B = reinterpret_cast<const ElementB**>(ws + l.ptr_b);
  args.mainloop.dB = reinterpret_cast<typename K::StrideB*>(ws + l.stride_b);
  if constexpr (K::kCustomMainloop) {
    if (p != nullptr) {
      LoraKArguments& lora = args.mainloop.lora;
      lora.k_weight = p->K;
      if constexpr (K::kLoraInGemm) {
        const LoraKOperands& o = p->lora_k;
        lora.t = o.t; lora.t_cols = o.t_cols;
        lora.b = o.b; lora.b_expert_stride = o.b_expert_stride; lora.b_slot_stride = o.b_slot_stride;
        lora.S = o.S; lora.R = o.R; lora.N = p->N;
        lora.expert_offsets = p->expert_offsets;
        lora.row_slot = o.row_slot;
      }
    }
  }
  if constexpr (K::kGatedOutput) {
    args.epilogue.kind = p != nullptr && p->gated == GatedOutput::Gelu ? ActivationKind::Gelu : ActivationKind::Silu;
  } else {
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = nullptr;
  }
  args.epilogue.ptr_D = reinterpret_cast<typename K::ElementD**>(ws + l.ptr_d);
  args.epilogue.dD = reinterpret_cast<typename K::StrideD*>(ws + l.stride_d);
  args.hw_info = hw;
  // Consecutive tiles share the weight tile, so CTAs running at the same time read it through L2 once when an
  // expert has several tiles of rows: along M (the rows' side) for the plain tiles, along N when swapped.
  args.scheduler.raster_order = K::kSwapAB ? cutlass::gemm::kernel::detail::RasterOrderOptions::AlongN
                                        : cutlass::gemm::kernel::detail::RasterOrderOptions::AlongM;
  return args;
}

template <class Element, class Tile, bool kGated, bool kLoraK>
size_t expert_gemm_workspace_bytes(int num_experts, int sm_count) {
  using K = ExpertGemmKernel<Element, Tile, kGated, kLoraK>;
  if (num_experts <= 0 || sm_count <= 0) return 0;
  const GroupTableLayout l = GroupTableLayout::make<K>(num_experts);
  // CUTLASS's workspace here depends only on sm_count (per-SM TMA descriptor copies), not on the routing;
  // the arguments only need a valid group count and sm_count.
  auto args = make_arguments<K>(l, nullptr, num_experts, sm_count);
  return l.end + GroupTableLayout::up(K::Gemm::get_workspace_size(args)) + GroupTableLayout::kAlign;
}

template <class Element, class Tile, bool kGated, bool kLoraK>
cudaError_t check_params(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count) {
  using K = ExpertGemmKernel<Element, Tile, kGated, kLoraK>;
  if (p.num_experts <= 0 || sm_count <= 0 || p.N <= 0 || p.K <= 0) return cudaErrorInvalidValue;
  // TMA: 16-byte aligned rows and base pointers (gated: D's rows of N/2, and the up rows start at row N/2).
  if (p.N % K::kAlign != 0 || p.K % K::kAlign != 0) return cudaErrorInvalidValue;
  if (kGated && (p.N / 2) % K::kAlign != 0) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(p.A) | reinterpret_cast<uintptr_t>(p.W) | reinterpret_cast<uintptr_t>(p.D)) % 16)
    return cudaErrorInvalidValue;
  if (workspace == nullptr ||
      workspace_bytes < expert_gemm_workspace_bytes<Element, Tile, kGated, kLoraK>(p.num_experts, sm_count))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// The grouped GEMM over tables written on this stream (write_expert_gemm_tables).
template <class Element, class Tile, bool kGated, bool kLoraK>
cudaError_t expert_gemm_run(const ExpertGemmParams& p, void* workspace, size_t workspace_bytes, int sm_count,
                            cudaStream_t stream) {
  using K = ExpertGemmKernel<Element, Tile, kGated, kLoraK>;
  if (cudaError_t err = check_params<Element, Tile, kGated, kLoraK>(p, workspace, workspace_bytes, sm_count);
      err != cudaSuccess)
    return err;
  char* ws = aligned_workspace(workspace);
  const GroupTableLayout l = GroupTableLayout::make<K>(p.num_experts);
  auto args = make_arguments<K>(l, ws, p.num_experts, sm_count, &p);
  typename K::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (gemm.initialize(args, ws + l.cutlass_ws, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
  if (gemm.run(stream, /*cuda_adapter=*/nullptr, /*launch_with_pdl=*/pdl_launch_enabled()) !=
      cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

// f.template operator()<Tile>() for the tile struct of a configuration (never Auto).
template <class F>
auto with_tile(ExpertGemmConfig tile, F&& f) {
  switch (tile) {
    case ExpertGemmConfig::SmallM:
      return f.template operator()<SmallMTile>();
    case ExpertGemmConfig::SwapAB32:
      return f.template operator()<SwapAB32Tile>();
    case ExpertGemmConfig::LargeMPingpong:
      return f.template operator()<LargeMPingpongTile>();
    default:
      return f.template operator()<LargeMTile>();
  }
}

// f.template operator()<Tile, kGated, kLoraK>(): the GEMM of p's tile with its output (plain or gated) and its LoRA
// (none, or inside the GEMM). The swapped tile has neither (expert_gemm_sm90_gated_supported /
// expert_gemm_sm90_lora_k_supported keep callers off it); it runs plain there, never reached.
template <class F>
auto with_tile_variant(ExpertGemmConfig tile, bool gated, bool lora_k, F&& f) {
  return with_tile(tile, [&]<class Tile>() {
    if constexpr (!Tile::kSwapAB) {
      if (gated && lora_k) return f.template operator()<Tile, true, true>();
      if (gated) return f.template operator()<Tile, true, false>();
      if (lora_k) return f.template operator()<Tile, false, true>();
    }
    return f.template operator()<Tile, false, false>();
  });
}

// Explicit instantiation of one (element, tile, gated, LoRA) GEMM: EXTERN empty defines it in this TU, `extern`
// declares it defined in another (SwapAB32, LargeMPingpong, the gated and the LoRA GEMMs compile in TUs of their
// own, in parallel: expert_gemm_sm90_swap.cu, expert_gemm_sm90_pingpong.cu, expert_gemm_sm90_gated_*.cu,
// expert_gemm_sm90_lora_*.cu).
#define MOELORA_EXPERT_GEMM_INSTANTIATE_ONE(EXTERN, ELEMENT, TILE, GATED, LORA_K)                              \
  EXTERN template size_t expert_gemm_workspace_bytes<ELEMENT, TILE, GATED, LORA_K>(int, int);                  \
  EXTERN template ExpertGemmTables make_tables<ELEMENT, TILE, GATED, LORA_K>(const ExpertGemmParams&, void*);  \
  EXTERN template cudaError_t expert_gemm_run<ELEMENT, TILE, GATED, LORA_K>(const ExpertGemmParams&, void*,    \
                                                                            size_t, int, cudaStream_t);
#define MOELORA_EXPERT_GEMM_INSTANTIATE(EXTERN, ELEMENT, TILE) \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ONE(EXTERN, ELEMENT, TILE, false, false)
// One variant (gated, LoRA) of the three row-side tiles.
#define MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(EXTERN, ELEMENT, GATED, LORA_K)                              \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ONE(EXTERN, ELEMENT, SmallMTile, GATED, LORA_K)                              \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ONE(EXTERN, ELEMENT, LargeMTile, GATED, LORA_K)                              \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ONE(EXTERN, ELEMENT, LargeMPingpongTile, GATED, LORA_K)
// Every row-side variant but the plain one, each in its TU (expert_gemm_sm90_{gated,lora_fc1,lora_fc2}_*.cu).
#define MOELORA_EXPERT_GEMM_INSTANTIATE_VARIANTS(EXTERN, ELEMENT)                                              \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(EXTERN, ELEMENT, true, false)                                      \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(EXTERN, ELEMENT, true, true)                                       \
  MOELORA_EXPERT_GEMM_INSTANTIATE_ROW_TILES(EXTERN, ELEMENT, false, true)

// Per-dtype entry points (expert_gemm_sm90_{bf16,fp16}.cu define them for their element type).
#define MOELORA_EXPERT_GEMM_DEFINE(NAME, ELEMENT)                                                              \
  size_t expert_gemm_sm90_##NAME##_workspace(ExpertGemmConfig tile, bool gated, bool lora_k, int num_experts,  \
                                             int sm_count) {                                                   \
    return with_tile_variant(tile, gated, lora_k, [&]<class Tile, bool kGated, bool kLoraK>() {               \
      return expert_gemm_workspace_bytes<ELEMENT, Tile, kGated, kLoraK>(num_experts, sm_count);                \
    });                                                                                                        \
  }                                                                                                            \
  ExpertGemmTables expert_gemm_sm90_##NAME##_tables(ExpertGemmConfig tile, const ExpertGemmParams& p,          \
                                                    void* workspace) {                                         \
    return with_tile_variant(tile, p.gated != GatedOutput::None, p.lora_k.t != nullptr,                       \
                             [&]<class Tile, bool kGated, bool kLoraK>() {                                     \
                               return make_tables<ELEMENT, Tile, kGated, kLoraK>(p, workspace);                \
                             });                                                                               \
  }                                                                                                            \
  cudaError_t expert_gemm_sm90_##NAME##_run(ExpertGemmConfig tile, const ExpertGemmParams& p, void* workspace,\
                                            size_t workspace_bytes, int sm_count, cudaStream_t stream) {      \
    return with_tile_variant(tile, p.gated != GatedOutput::None, p.lora_k.t != nullptr,                       \
                             [&]<class Tile, bool kGated, bool kLoraK>() {                                     \
                               return expert_gemm_run<ELEMENT, Tile, kGated, kLoraK>(p, workspace,             \
                                                                                     workspace_bytes,          \
                                                                                     sm_count, stream);        \
                             });                                                                               \
  }

}  // namespace moelora::cuda::detail

#endif  // MOELORA_EXPERT_GEMM_SM90_IMPL && MOELORA_WITH_CUDA && !MOELORA_NO_CUTLASS
