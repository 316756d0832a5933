// fc1's gated activation in the expert GEMM's epilogue: h[r, j] = act(gate[r, j]) * up[r, j] from the
// accumulators of a tile whose B stage holds the gate rows in its first half and the up rows in its second
// (ExpertMainloop<..., kGated = true>, expert_gemm_sm90_mainloop.cuh), computed in fp32 and rounded once, stored
// from registers ([rows, I], no shared memory). gu (rows x 2I) is never written and the activation stage never
// reads it back.
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
    with_activation(params_.kind, store);
  }

 private:
  Params params_;
};

}  // namespace moelora::cuda::detail
