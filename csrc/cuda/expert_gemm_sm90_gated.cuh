// fc1 with its gated activation in the epilogue: the two CUTLASS pieces that turn the sm_90a expert grouped GEMM
// (expert_gemm_sm90.cuh) into h = act(x @ W_gate[e]^T) * (x @ W_up[e]^T), so that gu (rows x 2I) is never written
// and the activation stage never reads it back.
//
// W[e] holds the gate rows first and the up rows after them ([2I, K], transformers' gate_up_proj). A CTA tile of
// N columns covers N/2 outputs: its B stage is the gate rows [n N/2, (n + 1) N/2) stacked on the up rows
// [I + n N/2, I + (n + 1) N/2) (two TMA boxes of N/2 rows into one stage), so each wgmma accumulator fragment
// holds gate column j in its first half and up column j at the same place of its second half (the wgmma
// accumulator's columns are 8-column blocks in order). The epilogue then computes act(gate) * up per thread in
// fp32 from the unrounded accumulators and stores h straight from registers ([rows, I], no shared memory).
//
//  * GatedUpMainloop<Base>: CUTLASS's sm90 ptr-array TMA mainloop (Base) with its B load replaced. It keeps Base's
//    consumer (mma), pipeline, shared storage and tensor-map handling; its Params add the TMA of a half-height B box.
//  * GatedActivationEpilogue<T>: an operator-style epilogue for CUTLASS's Sm90TmaWarpSpecializedAdapter.
//
// Tiles past I: when I is not a multiple of N/2, the last tile's gate box runs into the first up rows (columns
// >= I, computed and never stored) and its up box past 2I (TMA zero-fills).
#pragma once

#include <cstdint>

#include "activation.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/numeric_conversion.h"

namespace moelora::cuda::detail {

using namespace cute;

template <class Base>
struct GatedUpMainloop : Base {
  using typename Base::TileShape;
  using typename Base::InternalElementB;
  using typename Base::InternalStrideB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TensorMapStorage;

  static constexpr int kTileN = size<1>(TileShape{});
  static constexpr int kHalfN = kTileN / 2;
  static_assert(kHalfN % size<0>(typename Base::SmemLayoutAtomB{}) == 0, "a half tile is whole smem atoms");
  static_assert(is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD>, "cluster 1x1: no multicast");
  // The (M, N, K) tile of one B box: half the CTA tile's columns.
  using HalfTileShape = Shape<decltype(get<0>(TileShape{})), Int<kHalfN>, decltype(get<2>(TileShape{}))>;
  // A half stage of B: the first kHalfN rows of a stage of Base's SmemLayoutB (atoms stacked along N, K-major).
  using SmemLayoutBHalf =
      decltype(tile_to_shape(typename Base::SmemLayoutAtomB{}, make_shape(Int<kHalfN>{}, get<2>(TileShape{}))));
  using TmaBHalf = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(static_cast<InternalElementB const*>(nullptr), repeat_like(InternalStrideB{}, int32_t(0)),
                  InternalStrideB{}),
      SmemLayoutBHalf{}, make_shape(Int<kHalfN>{}, get<2>(TileShape{})), _1{}));

  struct Params : Base::Params {
    TmaBHalf tma_load_b_half;
  };

  // Base's parameters plus the half-box TMA. As in Base, the descriptor's tensor is a placeholder: every group's
  // address, dims and strides are written into the CTA's copy before its first load.
  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, typename Base::Arguments const& args,
                                        void* workspace) {
    static_assert(Base::IsGroupedGemmKernel, "grouped GEMM only (per-group shapes on the device)");
    auto const* ptr_b = reinterpret_cast<InternalElementB const*>(reinterpret_cast<uint64_t>(args.ptr_B) & ~uint64_t{15});
    Tensor tensor_b = make_tensor(ptr_b, make_layout(make_shape(1, 1, 1), InternalStrideB{}));
    return {Base::to_underlying_arguments(problem_shapes, args, workspace),
            make_tma_copy(SM90_TMA_LOAD{}, tensor_b, SmemLayoutBHalf{}, make_shape(Int<kHalfN>{}, get<2>(TileShape{})),
                          _1{})};
  }

  // Base's (gA, gB) (the kernel reads tile counts from them), then the gate and up halves of B tiled by the half
  // box: (kHalfN, BLK_K, n, k, l) each, the up rows offset by N/2 = I.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto [gA_mkl, gB_nkl] = Base::load_init(problem_shape_MNKL, params);
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mB = params.tma_load_b_half.get_tma_tensor(make_shape(N, K, 1));                              // (n,k,l)
    Tensor gGate = local_tile(mB, HalfTileShape{}, make_coord(_, _, _), Step<Underscore, _1, _1>{});
    Tensor gUp = local_tile(domain_offset(make_coord(N / 2, 0, 0), mB), HalfTileShape{}, make_coord(_, _, _),
                            Step<Underscore, _1, _1>{});
    return cute::make_tuple(gA_mkl, gB_nkl, gGate, gUp);
  }

  // Producer: per k tile, A's box and B's two half boxes (gate, then up) into one stage, on one barrier whose
  // transaction count (Base's TmaTransactionBytes) is A's box plus a full B tile.
  template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int /*thread_idx*/,
                           uint32_t /*block_rank_in_cluster*/, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});          // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});          // (BLK_N,BLK_K,PIPE)
    Tensor sB_halves = flat_divide(sB, Shape<Int<kHalfN>>{});                                  // (kHalfN,2,BLK_K,PIPE)
    Tensor sGate = sB_halves(_, 0, _, _);
    Tensor sUp = sB_halves(_, 1, _, _);

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor gA = get<0>(load_inputs)(_, _, m_coord, _, l_coord);                                      // (BLK_M,BLK_K,k)
    Tensor gGate = get<2>(load_inputs)(_, _, n_coord, _, l_coord);                                 // (kHalfN,BLK_K,k)
    Tensor gUp = get<3>(load_inputs)(_, _, n_coord, _, l_coord);

    auto tma_a = params.tma_load_a.get_slice(0);
    auto tma_b = params.tma_load_b_half.get_slice(0);
    Tensor tAgA = tma_a.partition_S(gA);
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tGg = tma_b.partition_S(gGate);
    Tensor tGs = tma_b.partition_D(sGate);
    Tensor tUg = tma_b.partition_S(gUp);
    Tensor tUs = tma_b.partition_D(sUp);

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, 0), tAgA(_, _, _, *k_tile_iter),
           tAsA(_, _, _, stage));
      copy(params.tma_load_b_half.with(get<1>(input_tensormaps), *barrier, 0), tGg(_, _, _, *k_tile_iter),
           tGs(_, _, _, stage));
      copy(params.tma_load_b_half.with(get<1>(input_tensormaps), *barrier, 0), tUg(_, _, _, *k_tile_iter),
           tUs(_, _, _, stage));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // The CTA's tensor maps: Base's, with B's from the half-box TMA.
  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& shared_tensormaps, int32_t sm_count,
                                      int32_t sm_idx) {
    cute::TmaDescriptor* gmem_tensormap = reinterpret_cast<cute::TmaDescriptor*>(params.tensormaps);
    cute::TmaDescriptor* tma_desc_a = &gmem_tensormap[sm_idx];
    cute::TmaDescriptor* tma_desc_b = &gmem_tensormap[sm_idx + sm_count];
    if (cute::elect_one_sync()) {
      Tensor pA = make_tensor(params.tma_load_a.get_tma_descriptor(), Int<1>{}, Int<1>{});
      Tensor sA = make_tensor(make_smem_ptr(&shared_tensormaps.smem_tensormap_A), Int<1>{}, Int<1>{});
      Tensor pB = make_tensor(params.tma_load_b_half.get_tma_descriptor(), Int<1>{}, Int<1>{});
      Tensor sB = make_tensor(make_smem_ptr(&shared_tensormaps.smem_tensormap_B), Int<1>{}, Int<1>{});
      copy(recast<uint128_t>(pA), recast<uint128_t>(sA));
      copy(recast<uint128_t>(pB), recast<uint128_t>(sB));
    }
    __syncwarp();
    return cute::make_tuple(tma_desc_a, tma_desc_b);
  }

  // A group's address, dims and strides into the CTA's tensor maps (Base's, with B's dims from the half-box TMA).
  template <class TensorMapA, class TensorMapB, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& shared_tensormaps, Params const& params,
                                                cute::tuple<TensorMapA, TensorMapB> const&,
                                                ProblemShape_MNKL problem_shape_mnkl, int32_t next_group) {
    if (!cute::elect_one_sync()) return;
    this->tensormaps_replace_global_address(shared_tensormaps, params, next_group);
    const uint32_t M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl), K = get<2>(problem_shape_mnkl);
    cute::array<uint32_t, 5> shape_a = {1, 1, 1, 1, 1}, shape_b = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> stride_a = {0, 0, 0, 0, 0}, stride_b = {0, 0, 0, 0, 0};
    Tensor tensor_a = make_tensor(static_cast<typename Base::InternalElementA const*>(nullptr),
                                  make_shape(M, K, Int<1>{}), params.dA[next_group]);
    Tensor tensor_b = make_tensor(static_cast<InternalElementB const*>(nullptr), make_shape(N, K, Int<1>{}),
                                  params.dB[next_group]);
    cute::detail::fill_tma_gmem_shape_stride(params.tma_load_a, tensor_a, shape_a, stride_a);
    cute::detail::fill_tma_gmem_shape_stride(params.tma_load_b_half, tensor_b, shape_b, stride_b);
    for (uint64_t& s : stride_a) s = s * sizeof_bits_v<typename Base::InternalElementA> / 8;
    for (uint64_t& s : stride_b) s = s * sizeof_bits_v<InternalElementB> / 8;
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_A, shape_a, stride_a);
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_B, shape_b, stride_b);
  }
};

// h[r, j] = act(acc[r, j]) * acc[r, N/2 + j] for the CTA tile's N/2 outputs, rounded once, stored from registers.
// Interface of CUTLASS's operator-style epilogues (DefaultEpilogueArray), wrapped by Sm90TmaWarpSpecializedAdapter.
template <class ElementD_>
struct GatedActivationEpilogue {
  using ElementD = ElementD_;
  using ElementC = void;
  using ElementOutput = ElementD;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using StrideD = cute::Stride<int64_t, _1, _0>*;  // per group: h's row stride (I)
  using StrideC = StrideD;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using InternalStrideC = InternalStrideD;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Named by CUTLASS's device adapter (GemmUniversalAdapter::EpilogueOutputOp); never invoked here.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<ElementD, 1, float, float>;

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ElementD** ptr_D = nullptr;  // per group: h + the expert's first row * I
    StrideD dD = nullptr;
    ActivationKind kind = ActivationKind::Silu;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr && args.dD != nullptr;
  }

  CUTLASS_HOST_DEVICE GatedActivationEpilogue(Params const& params) : params_(params) {}
  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    constexpr int kTileM = size<0>(BlockShapeMNK{}), kTileN = size<1>(BlockShapeMNK{});
    constexpr int kHalfN = kTileN / 2;
    // One wgmma atom per warpgroup tile: the fragment is the atom's values ((2 columns, 2 rows, N/8 column
    // blocks)), so value i + size/2 is value i's column plus N/2 (same row).
    static_assert(size<1>(FrgLayout{}) == 1 && size<2>(FrgLayout{}) == 1, "one MMA atom per warpgroup tile");
    static_assert(is_same_v<decltype(shape<0>(FrgLayout{})), Shape<_2, _2, Int<kTileN / 8>>>,
                  "wgmma accumulator layout: (column pair, row pair, 8-column blocks)");
    constexpr int kValues = size(FrgLayout{});

    const int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const int I = N / 2;
    const auto m_coord = get<0>(blk_coord_mnkl), n_coord = get<1>(blk_coord_mnkl);
    const int l_coord = static_cast<int>(get<3>(blk_coord_mnkl));
    ElementD* out = params_.ptr_D[l_coord];
    const int64_t ld = get<0>(params_.dD[l_coord]);

    // Each value's (row, column) in the tile.
    Tensor coords = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(blk_shape_MNK)));
    const int row0 = static_cast<int>(m_coord) * kTileM, col0 = static_cast<int>(n_coord) * kHalfN;

    auto store = [&](auto kind) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kValues / 2; i += 2) {
        const int row = row0 + get<0>(coords(i));
        const int col = col0 + get<1>(coords(i));  // even; I is a multiple of 8, so col + 1 < I too
        if (row < M && col < I) {
          cutlass::Array<float, 2> v;
          v[0] = gate_activation<decltype(kind)::value>(accumulators(i)) * accumulators(i + kValues / 2);
          v[1] = gate_activation<decltype(kind)::value>(accumulators(i + 1)) * accumulators(i + 1 + kValues / 2);
          const auto packed = cutlass::NumericArrayConverter<ElementD, float, 2>{}(v);
          *reinterpret_cast<cutlass::Array<ElementD, 2>*>(out + row * ld + col) = packed;
        }
      }
    };
    if (params_.kind == ActivationKind::Silu) store(std::integral_constant<ActivationKind, ActivationKind::Silu>{});
    else store(std::integral_constant<ActivationKind, ActivationKind::Gelu>{});
  }

 private:
  Params params_;
};

}  // namespace moelora::cuda::detail
