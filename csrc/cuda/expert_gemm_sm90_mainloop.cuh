// The expert GEMM's main loop with two options on top of CUTLASS's sm90 ptr-array TMA main loop (Base). Base keeps
// its consumer (the wgmma loop), its pipeline and shared memory; this class replaces the producer's loads and the
// tensor maps they use.
//
//  * kGated (fc1 with the activation in its epilogue, expert_gemm_sm90_gated_epilogue.cuh): W[e] holds the gate
//    rows first and the up rows after them ([2I, K], transformers' gate_up_proj). A CTA tile of N columns covers
//    N/2 outputs: its B stage is gate rows [n N/2, (n + 1) N/2) stacked on up rows [I + n N/2, I + (n + 1) N/2),
//    two TMA boxes of N/2 rows, so each wgmma accumulator fragment holds gate column j in its first half and up
//    column j at the same place of its second half. When I is not a multiple of N/2, the last tile's gate box runs
//    into the first up rows (columns >= I, computed and never stored) and its up box past 2I (TMA zero-fills).
//  * kLoraK (the LoRA inside the GEMM): the K loop runs on past the weight's K tiles over the LoRA's:
//      acc += t[rows, S R] @ Bcat[e]^T,  Bcat[e][n, s R + r] = B[s, e][n, r]
//    with t a row's scale * (its shrink output) in its slot's R columns and zeros elsewhere (written by the shrink,
//    or by lora_k_operand.cu), so the accumulators hold x W^T + scale B (A x) before the epilogue: fc1's gated
//    epilogue sees gate and up with their delta, fc2's plain epilogue stores y with it, and neither LoRA expand
//    kernel runs.
//    - Ranks 64 / 128: each 64-column panel of a LoRA k tile is 64 ranks of one slot, one TMA box (64 ranks, 1 slot,
//      rows) of B[s, e] whose 128-byte rows land as the W tiles' do, and the consumer reads it as a W tile.
//    - Ranks 16 / 32: a box of R ranks has 32- / 64-byte rows, which do not land as a slice of the W tiles'
//      128-byte swizzled rows (v24: wrong values). So B's stage of such a tile is laid out in the K-major layout of
//      R-wide swizzle atoms (32- / 64-byte swizzle): slot after slot, each one box (R ranks, rows, 1 slot), and the
//      consumer multiplies it through wgmma descriptors of that layout (t keeps A's layout).
//    Slots past S read as zeros (TMA bounds), as do t's padding columns. Rows are sorted by slot within an expert,
//    so a tile of rows holds a range of slots: the producer loads the adapters' boxes of the other slots out of
//    bounds (zeros, no traffic), and a LoRA k tile with none of the tile's slots is not multiplied at all.
//
// Per group (expert) the producer writes into the CTA's tensor maps: A's and W's addresses and A's rows (Base's
// job), and with kLoraK t's address (its first row: expert_offsets[e]) and rows, and the adapters' address for
// expert e. The group problem's K is the weight's K tiles plus t's columns (make_tables), so Base's consumer and
// the scheduler count every k tile; the weight's own TMA dims keep the weight's K.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/cutlass.h"
#include "expert_gemm_sm90.h"

namespace moelora::cuda::detail {

using namespace cute;

// The LoRA operands of a kLoraK GEMM (host arguments; expert_gemm_sm90.h LoraKOperands, typed).
struct LoraKArguments {
  const void* t = nullptr;           // [rows, t_cols], rows sorted as A's
  int t_cols = 0;                    // S * R rounded up to 128 (a whole number of k tiles of every tile shape)
  const void* b = nullptr;           // adapters' B: [S, E, N, R] (b_expert_stride = N R) or shared [S, N, R] (0)
  int64_t b_expert_stride = 0, b_slot_stride = 0;  // elements
  int S = 0, R = 0, N = 0;
  const int* expert_offsets = nullptr;  // device [E + 1]: t's first row of each group
  const int* row_slot = nullptr;     // device [rows]: each sorted row's slot (-1: none), for the tiles' slot ranges
  int k_weight = 0;                  // the weight's K (A's and W's columns)
};

template <class Base, bool kGated, bool kLoraK>
struct ExpertMainloop : Base {
  using typename Base::TileShape;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::InternalStrideA;
  using typename Base::InternalStrideB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;

  static_assert(Base::IsGroupedGemmKernel, "grouped GEMM only (per-group shapes on the device)");
  static_assert(is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD>, "cluster 1x1: no multicast");
  static constexpr int kTileM = size<0>(TileShape{});
  static constexpr int kTileN = size<1>(TileShape{});
  static constexpr int kTileK = size<2>(TileShape{});
  static constexpr int kBoxN = kGated ? kTileN / 2 : kTileN;  // rows of one W box
  static_assert(kBoxN % size<0>(typename Base::SmemLayoutAtomB{}) == 0, "a W box is whole smem atoms");
  // 64-column panels per k tile (128-byte swizzled rows of bf16 / fp16): the smem tiles are panel-major.
  static constexpr int kPanelK = 64;
  static constexpr int kPanels = kTileK / kPanelK;
  static_assert(kTileK % kPanelK == 0 && sizeof(InternalElementB) == 2, "16-bit operands, 64-column panels");
  // Stage offsets (elements) the adapters' boxes are written at: stages of kTileN x kTileK, panel-major (all rows of
  // columns 0-63, then of 64-127), rows of 64 columns.
  using PlainLayoutB = decltype(get_nonswizzle_portion(SmemLayoutB{}));
  static_assert(PlainLayoutB{}(0, 0, 1) == kTileN * kTileK && PlainLayoutB{}(1, 0, 0) == kPanelK &&
                    (kPanels == 1 || PlainLayoutB{}(0, kPanelK, 0) == kTileN * kPanelK),
                "B stages: panel-major rows of 64 columns");

  // B's stage of a LoRA k tile of rank 16 / 32: K-major atoms of R columns (32- / 64-byte swizzle), rows first, then
  // slots (R columns each), then stages, so slot a of a tile sits at a kTileN R offset, row r of it at r R.
  static constexpr int kStages = Base::DispatchPolicy::Stages;
  template <int R>
  using NarrowAtomB = cute::conditional_t<R == 16, GMMA::Layout_K_SW32_Atom<InternalElementB>,
                                          GMMA::Layout_K_SW64_Atom<InternalElementB>>;
  template <int R>
  using SmemLayoutBNarrow = decltype(tile_to_shape(
      NarrowAtomB<R>{}, make_shape(Int<kTileN>{}, Int<kTileK>{}, Int<kStages>{}), Step<_1, _2, _3>{}));
  template <int R>
  static constexpr bool narrow_layout_ok() {
    using Plain = decltype(get_nonswizzle_portion(SmemLayoutBNarrow<R>{}));
    return cosize(SmemLayoutBNarrow<R>{}) == cosize(SmemLayoutB{}) && Plain{}(1, 0, 0) == R &&
           Plain{}(0, R, 0) == kTileN * R && Plain{}(0, 0, 1) == kTileN * kTileK;
  }
  static_assert(narrow_layout_ok<16>() && narrow_layout_ok<32>(), "narrow LoRA stages: slot-major rows of R columns");

  static constexpr uint64_t kCacheHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);  // CuTe's default

  // One W box: (kBoxN, BLK_K) of Base's stage layout, and its TMA.
  using BoxTileShape = Shape<Int<kTileM>, Int<kBoxN>, Int<kTileK>>;
  using SmemLayoutBBox = decltype(tile_to_shape(typename Base::SmemLayoutAtomB{}, make_shape(Int<kBoxN>{}, Int<kTileK>{})));
  using TmaW = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(static_cast<InternalElementB const*>(nullptr), repeat_like(InternalStrideB{}, int32_t(0)),
                  InternalStrideB{}),
      SmemLayoutBBox{}, make_shape(Int<kBoxN>{}, Int<kTileK>{}), _1{}));
  // t's TMA is A's type: the same element, layout and box.
  using TmaT = typename Base::TMA_A;

  struct LoraKState {
    TmaT tma_t;
    cute::TmaDescriptor b_desc;        // one expert's adapters (encode_adapters_descriptor)
    const InternalElementA* t;
    const char* b;
    int64_t b_expert_bytes;
    const int* expert_offsets;
    const int* row_slot;
    int t_cols;
    int rank;                          // R
    int slots;                         // S
    int n_half;                        // gated: the up rows' first row (I)
  };
  struct NoLoraK {};

  struct Arguments : Base::Arguments {
    LoraKArguments lora;
  };
  struct Params : Base::Params {
    TmaW tma_w;
    int k_weight;
    int k_tiles_weight;
    cute::conditional_t<kLoraK, LoraKState, NoLoraK> lora;
  };

  // With the LoRA, each stage also carries whether its k tile is to be multiplied (the producer's flag, per stage
  // and barrier phase: the producer writes the flag of a stage's next use before that use's barrier arrive, while
  // the consumer may still read the one of its current use).
  struct LoraTensorStorage : Base::TensorStorage {
    uint8_t k_tile_active[kStages][2];
  };
  using TensorStorage = cute::conditional_t<kLoraK, LoraTensorStorage, typename Base::TensorStorage>;

  struct LoraTensorMaps : Base::TensorMapStorage {
    cute::TmaDescriptor smem_tensormap_T;
    cute::TmaDescriptor smem_tensormap_BL;
  };
  using TensorMapStorage = cute::conditional_t<kLoraK, LoraTensorMaps, typename Base::TensorMapStorage>;
  static constexpr int kTensorMaps = kLoraK ? 4 : 2;  // per SM in the workspace: A, W, then t, adapters' B

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int sm_count) {
    return kTensorMaps * sizeof(cute::TmaDescriptor) * sm_count;
  }

  // Base's parameters plus the W box TMA and the LoRA's. As in Base, the A / W / t descriptors' tensors are
  // placeholders: each group's address, dims and strides go into the CTA's copy before its first load. The
  // adapters' descriptor is complete here (its shape is the same for every expert; only the address moves).
  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
    auto const* ptr_w = reinterpret_cast<InternalElementB const*>(reinterpret_cast<uint64_t>(args.ptr_B) & ~uint64_t{15});
    Tensor tensor_w = make_tensor(ptr_w, make_layout(make_shape(1, 1, 1), InternalStrideB{}));
    Params p{Base::to_underlying_arguments(problem_shapes, args, workspace),
             make_tma_copy(SM90_TMA_LOAD{}, tensor_w, SmemLayoutBBox{}, make_shape(Int<kBoxN>{}, Int<kTileK>{}), _1{}),
             args.lora.k_weight, (args.lora.k_weight + kTileK - 1) / kTileK, {}};
    if constexpr (kLoraK) {
      const LoraKArguments& l = args.lora;
      auto const* ptr_t = static_cast<InternalElementA const*>(l.t);
      Tensor tensor_t = make_tensor(ptr_t, make_layout(make_shape(1, 1, 1), InternalStrideA{}));
      p.lora.tma_t = make_tma_copy(SM90_TMA_LOAD{}, tensor_t, SmemLayoutA{}(_, _, Int<0>{}),
                                   make_shape(Int<kTileM>{}, Int<kTileK>{}), _1{});
      p.lora.t = ptr_t;
      p.lora.b = static_cast<const char*>(l.b);
      p.lora.b_expert_bytes = l.b_expert_stride * 2;
      p.lora.expert_offsets = l.expert_offsets;
      p.lora.row_slot = l.row_slot;
      p.lora.t_cols = l.t_cols;
      p.lora.rank = l.R;
      p.lora.n_half = l.N / 2;
      p.lora.slots = l.S;
      encode_adapters_descriptor(l, &p.lora.b_desc);  // can_implement has checked that it encodes
    }
    return p;
  }

  // The adapters' descriptor for expert 0 (the producer moves its address per group), dims innermost first.
  //  * Ranks 64 / 128: (ranks, slots, rows) with the byte strides of slots and rows; box (64 ranks, 1 slot, kBoxN
  //    rows), 128-byte swizzle as the W tiles.
  //  * Ranks 16 / 32: (ranks, rows, slots); box (R ranks, kBoxN rows, 1 slot), 32- / 64-byte swizzle
  //    (SmemLayoutBNarrow).
  static CUresult encode_adapters_descriptor(const LoraKArguments& l, cute::TmaDescriptor* desc) {
    const bool narrow = l.R < kPanelK;
    const cuuint64_t slot_bytes = cuuint64_t(l.b_slot_stride) * 2, row_bytes = cuuint64_t(l.R) * 2;
    cuuint64_t dims[3] = {cuuint64_t(l.R), cuuint64_t(narrow ? l.N : l.S), cuuint64_t(narrow ? l.S : l.N)};
    cuuint64_t strides[2] = {narrow ? row_bytes : slot_bytes, narrow ? slot_bytes : row_bytes};
    cuuint32_t box[3] = {cuuint32_t(narrow ? l.R : kPanelK), cuuint32_t(narrow ? kBoxN : 1),
                         cuuint32_t(narrow ? 1 : kBoxN)};
    cuuint32_t elem_strides[3] = {1, 1, 1};
    const CUtensorMapSwizzle swizzle = !narrow     ? CU_TENSOR_MAP_SWIZZLE_128B
                                       : l.R == 16 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                   : CU_TENSOR_MAP_SWIZZLE_64B;
    return CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        desc, TMA::to_CUtensorMapDataType<InternalElementB>(), 3, const_cast<void*>(l.b), dims, strides, box,
        elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  }

  static bool lora_args_ok(Arguments const& args) {
    if constexpr (!kLoraK) {
      return args.lora.k_weight > 0;
    } else {
      const LoraKArguments& l = args.lora;
      if (!(args.lora.k_weight > 0 && expert_gemm_lora_k_rank(l.R) && l.S > 0 && l.t != nullptr && l.b != nullptr &&
            l.expert_offsets != nullptr && l.row_slot != nullptr && l.t_cols > 0 && l.t_cols % 128 == 0 && l.t_cols >= l.S * l.R &&
            (reinterpret_cast<uintptr_t>(l.t) | reinterpret_cast<uintptr_t>(l.b)) % 16 == 0 &&
            (l.b_expert_stride * 2) % 16 == 0 && (l.b_slot_stride * 2) % 16 == 0))
        return false;
      cute::TmaDescriptor desc;
      return encode_adapters_descriptor(l, &desc) == CUDA_SUCCESS;
    }
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
    return Base::can_implement(problem_shapes, args) && lora_args_ok(args);
  }

  // Base's (gA, gB) (the kernel reads tile counts from them), the W boxes (gate and up halves when gated, both the
  // same otherwise), and t's tiles: (box rows, BLK_K, n, k, l) / (BLK_M, BLK_K, m, k, l).
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto [gA_mkl, gB_nkl] = Base::load_init(problem_shape_MNKL, params);
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mW = params.tma_w.get_tma_tensor(make_shape(N, params.k_weight, 1));
    Tensor gW0 = local_tile(mW, BoxTileShape{}, make_coord(_, _, _), Step<Underscore, _1, _1>{});
    Tensor gW1 = local_tile(domain_offset(make_coord(kGated ? N / 2 : 0, 0, 0), mW), BoxTileShape{},
                            make_coord(_, _, _), Step<Underscore, _1, _1>{});
    if constexpr (kLoraK) {
      Tensor mT = params.lora.tma_t.get_tma_tensor(make_shape(M, params.lora.t_cols, 1));
      Tensor gT = local_tile(mT, TileShape{}, make_coord(_, _, _), Step<_1, Underscore, _1>{});
      return cute::make_tuple(gA_mkl, gB_nkl, gW0, gW1, gT);
    } else {
      return cute::make_tuple(gA_mkl, gB_nkl, gW0, gW1);
    }
  }

  // Producer: per k tile, one stage on one barrier whose transaction count (Base's TmaTransactionBytes) is a full
  // A tile plus a full B tile. Weight tiles: A's box and one or two W boxes; LoRA tiles: t's box and, per 64-column
  // panel, one adapter box per W box.
  template <class LoadInputs, class TensorMaps, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, TensorMaps const& input_tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int /*thread_idx*/,
                           uint32_t /*block_rank_in_cluster*/, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});          // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});          // (BLK_N,BLK_K,PIPE)
    Tensor sB_boxes = flat_divide(sB, Shape<Int<kBoxN>>{});                        // (kBoxN,BLK_N/kBoxN,BLK_K,PIPE)
    Tensor sW0 = sB_boxes(_, 0, _, _);
    Tensor sW1 = sB_boxes(_, kGated ? 1 : 0, _, _);

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor gA = get<0>(load_inputs)(_, _, m_coord, _, l_coord);                                      // (BLK_M,BLK_K,k)
    Tensor gW0 = get<2>(load_inputs)(_, _, n_coord, _, l_coord);                                   // (kBoxN,BLK_K,k)
    Tensor gW1 = get<3>(load_inputs)(_, _, n_coord, _, l_coord);

    auto tma_a = params.tma_load_a.get_slice(0);
    auto tma_w = params.tma_w.get_slice(0);
    Tensor tAgA = tma_a.partition_S(gA);
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tW0g = tma_w.partition_S(gW0);
    Tensor tW0s = tma_w.partition_D(sW0);
    Tensor tW1g = tma_w.partition_S(gW1);
    Tensor tW1s = tma_w.partition_D(sW1);

    // With the LoRA: the slots of this tile's rows. Rows are sorted by slot within an expert (the routing's
    // buckets, no adapter first), so they are [first row's slot, last row's slot]; a LoRA k tile holding none of
    // them multiplies zeros of t, and the consumer skips it.
    int slot_lo = 0, slot_hi = -1;
    if constexpr (kLoraK) {
      const int row0 = static_cast<int>(m_coord) * kTileM;
      const int last = min(row0 + kTileM, group_rows_) - 1;
      if (last >= row0) {
        slot_lo = max(params.lora.row_slot[group_first_row_ + row0], 0);
        slot_hi = params.lora.row_slot[group_first_row_ + last];
      }
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      const int kt = *k_tile_iter;
      const bool weight_tile = !kLoraK || kt < params.k_tiles_weight;
      bool active = true;
      if constexpr (kLoraK) {
        if (!weight_tile) {  // the tile's columns [c0, c0 + kTileK) of t are slots [c0 / R, (c0 + kTileK - 1) / R]
          const int c0 = (kt - params.k_tiles_weight) * kTileK;
          active = c0 / params.lora.rank <= slot_hi && (c0 + kTileK - 1) / params.lora.rank >= slot_lo;
        }
        // Before the arrive (in producer_acquire), which releases it to the consumer's wait. The consumer's phase
        // of this use is the producer's flipped.
        shared_tensors.k_tile_active[smem_pipe_write.index()][smem_pipe_write.phase() ^ 1] = active;
      }
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (weight_tile) {
        copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, 0), tAgA(_, _, _, kt), tAsA(_, _, _, stage));
        copy(params.tma_w.with(get<1>(input_tensormaps), *barrier, 0), tW0g(_, _, _, kt), tW0s(_, _, _, stage));
        if constexpr (kGated)
          copy(params.tma_w.with(get<1>(input_tensormaps), *barrier, 0), tW1g(_, _, _, kt), tW1s(_, _, _, stage));
      } else if constexpr (kLoraK) {
        // A skipped tile still completes its stage's transaction: boxes past t's columns and past the slots, which
        // the TMA zero-fills without reading memory.
        load_lora_tile(params, load_inputs, input_tensormaps, *barrier, m_coord, n_coord, l_coord,
                       kt - params.k_tiles_weight, active, slot_lo, slot_hi, stage, shared_tensors);
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // Consumer (with the LoRA): Base's wgmma loop, with the k tiles the producer marked inactive waited for and
  // released but not multiplied, and the LoRA k tiles of ranks 16 / 32 read through descriptors of their B layout
  // (SmemLayoutBNarrow). The first k tile is the weight's, so the accumulators' zeroing stays in it.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    if constexpr (!kLoraK) {
      Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors, params);
    } else {
      Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});      // (BLK_M,BLK_K,PIPE)
      Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});      // (BLK_N,BLK_K,PIPE)
      constexpr int kWarpGroups = size(typename Base::TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
      Layout warp_group_thread_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
      const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
      typename Base::TiledMma tiled_mma;
      auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
      Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));                  // (MMA,MMA_M,MMA_K,PIPE)
      Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));                  // (MMA,MMA_N,MMA_K,PIPE)
      Tensor sB16 = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutBNarrow<16>{});
      Tensor sB32 = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutBNarrow<32>{});
      Tensor tCrB16 = thread_mma.make_fragment_B(thread_mma.partition_B(sB16));
      Tensor tCrB32 = thread_mma.make_fragment_B(thread_mma.partition_B(sB32));

      PipelineState smem_pipe_release = smem_pipe_read;
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      warpgroup_fence_operand(accum);
      if (k_tile_count > 0) {  // the first (weight) k tile: one k block at a time, zeroing with the first
        pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
        const int read_stage = smem_pipe_read.index();
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
          cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        ++smem_pipe_read;
        --k_tile_count;
      }
      warpgroup_fence_operand(accum);
      // `count` k tiles through B fragments `frag_b`. One loop per B layout: a layout chosen per k tile inside the
      // loop makes the compiler serialize the wgmmas (ptxas C7519, "warpgroup.arrive is injected").
      auto k_tiles = [&](auto const& frag_b, int count) {
        CUTLASS_PRAGMA_NO_UNROLL
        for (; count > 0; --count) {
          pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
          const int read_stage = smem_pipe_read.index();
          if (shared_tensors.k_tile_active[read_stage][smem_pipe_read.phase()]) {  // the same for the warpgroup
            warpgroup_fence_operand(accum);
            warpgroup_arrive();
            cute::gemm(tiled_mma, tCrA(_, _, _, read_stage), frag_b(_, _, _, read_stage), accum);
            warpgroup_commit_batch();
            warpgroup_wait<1>();  // Base's K_PIPE_MMAS: the previous tile's wgmmas are done
          } else {
            warpgroup_wait<0>();  // nothing issued now: the previous tile's wgmmas must be done before its release
          }
          warpgroup_fence_operand(accum);
          pipeline.consumer_release(smem_pipe_release);
          ++smem_pipe_read;
          ++smem_pipe_release;
        }
      };
      if (params.lora.rank >= kPanelK) {
        k_tiles(tCrB, k_tile_count);
      } else {  // the weight's k tiles, then the LoRA's of ranks 16 / 32 through their layout
        const int weight_left = max(min(k_tile_count, params.k_tiles_weight - 1), 0);
        k_tiles(tCrB, weight_left);
        if (params.lora.rank == 16)
          k_tiles(tCrB16, k_tile_count - weight_left);
        else
          k_tiles(tCrB32, k_tile_count - weight_left);
      }
      warpgroup_fence_operand(accum);
    }
  }

  // LoRA k tile j: t's box (A's place in the stage) and the adapters' boxes (W's place), for the box's rows (gate
  // and up halves when gated). Ranks 64 / 128: 64-column panel q = j kPanels + p is ranks [64 (q % (R / 64)), +64)
  // of slot q / (R / 64). Ranks 16 / 32: slot j kTileK / R + a at a kTileN R (SmemLayoutBNarrow). The boxes of
  // slots outside the tile's rows' [slot_lo, slot_hi] are read at slot S (zeros: those columns of t are zero).
  template <class LoadInputs, class TensorMaps, class Barrier, class MCoord, class NCoord, class LCoord>
  CUTLASS_DEVICE void load_lora_tile(Params const& params, LoadInputs const& load_inputs,
                                     TensorMaps const& input_tensormaps, Barrier& barrier, MCoord m_coord,
                                     NCoord n_coord, LCoord l_coord, int j, bool active, int slot_lo, int slot_hi,
                                     int stage, TensorStorage& shared_tensors) {
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor gT = get<4>(load_inputs)(_, _, m_coord, _, l_coord);
    auto tma_t = params.lora.tma_t.get_slice(0);
    const int t_tile = active ? j : params.lora.t_cols / kTileK + j;  // inactive: past t's columns
    copy(params.lora.tma_t.with(get<2>(input_tensormaps), barrier, 0), tma_t.partition_S(gT)(_, _, _, t_tile),
         tma_t.partition_D(sA)(_, _, _, stage));
    auto* b_desc = get<3>(input_tensormaps);
    auto* stage_b = shared_tensors.smem_B.data() + stage * (kTileN * kTileK);
    const int row0 = static_cast<int>(n_coord) * kBoxN;
    const int R = params.lora.rank;
    auto* bar = reinterpret_cast<uint64_t*>(&barrier);
    auto read_slot = [&](int slot) { return slot >= slot_lo && slot <= slot_hi ? slot : params.lora.slots; };
    if (R < kPanelK) {
      const int slots_per_tile = kTileK / R;
      for (int a = 0; a < slots_per_tile; ++a) {
        const int slot = read_slot(j * slots_per_tile + a);
        auto* box = stage_b + a * (kTileN * R);
        SM90_TMA_LOAD_3D::copy(b_desc, bar, kCacheHint, box, 0, row0, slot);
        if constexpr (kGated)
          SM90_TMA_LOAD_3D::copy(b_desc, bar, kCacheHint, box + kBoxN * R, 0, row0 + params.lora.n_half, slot);
      }
      return;
    }
    const int panels_per_slot = R / kPanelK;
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < kPanels; ++p) {
      const int q = j * kPanels + p;
      const int slot = read_slot(q / panels_per_slot), rank0 = q % panels_per_slot * kPanelK;
      auto* panel = stage_b + p * (kTileN * kPanelK);
      SM90_TMA_LOAD_3D::copy(b_desc, bar, kCacheHint, panel, rank0, slot, row0);
      if constexpr (kGated)
        SM90_TMA_LOAD_3D::copy(b_desc, bar, kCacheHint, panel + kBoxN * kPanelK, rank0, slot,
                               row0 + params.lora.n_half);
    }
  }

  // The CTA's tensor maps: A's from Base's TMA, W's from the box TMA, then t's and the adapters'.
  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& shared_tensormaps, int32_t sm_count,
                                      int32_t sm_idx) {
    cute::TmaDescriptor* gmem = reinterpret_cast<cute::TmaDescriptor*>(params.tensormaps);
    if (cute::elect_one_sync()) {
      shared_tensormaps.smem_tensormap_A = *params.tma_load_a.get_tma_descriptor();
      shared_tensormaps.smem_tensormap_B = *params.tma_w.get_tma_descriptor();
      if constexpr (kLoraK) {
        shared_tensormaps.smem_tensormap_T = *params.lora.tma_t.get_tma_descriptor();
        shared_tensormaps.smem_tensormap_BL = params.lora.b_desc;
      }
    }
    __syncwarp();
    if constexpr (kLoraK)
      return cute::make_tuple(&gmem[sm_idx], &gmem[sm_idx + sm_count], &gmem[sm_idx + 2 * sm_count],
                              &gmem[sm_idx + 3 * sm_count]);
    else
      return cute::make_tuple(&gmem[sm_idx], &gmem[sm_idx + sm_count]);
  }

  // A group's addresses, dims and strides into the CTA's tensor maps: A's rows and W's rows and K (the weight's K,
  // not the problem's), t's address and rows, the adapters' address.
  template <class TensorMaps, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& shared_tensormaps, Params const& params,
                                                TensorMaps const&, ProblemShape_MNKL problem_shape_mnkl,
                                                int32_t next_group) {
    if constexpr (kLoraK) {  // the group's rows, for load()'s tile slot ranges (every lane: load elects its own)
      group_first_row_ = params.lora.expert_offsets[next_group];
      group_rows_ = get<0>(problem_shape_mnkl);
    }
    if (!cute::elect_one_sync()) return;
    this->tensormaps_replace_global_address(shared_tensormaps, params, next_group);
    const uint32_t M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const uint32_t K = static_cast<uint32_t>(params.k_weight);
    replace_dims_strides(shared_tensormaps.smem_tensormap_A, params.tma_load_a,
                         make_tensor(static_cast<InternalElementA const*>(nullptr), make_shape(M, K, Int<1>{}),
                                     params.dA[next_group]));
    replace_dims_strides(shared_tensormaps.smem_tensormap_B, params.tma_w,
                         make_tensor(static_cast<InternalElementB const*>(nullptr), make_shape(N, K, Int<1>{}),
                                     params.dB[next_group]));
    if constexpr (kLoraK) {
      const auto& l = params.lora;
      cute::tma_descriptor_replace_addr_in_shared_mem(
          shared_tensormaps.smem_tensormap_T, l.t + static_cast<int64_t>(l.expert_offsets[next_group]) * l.t_cols);
      replace_dims_strides(shared_tensormaps.smem_tensormap_T, l.tma_t,
                           make_tensor(static_cast<InternalElementA const*>(nullptr),
                                       make_shape(M, static_cast<uint32_t>(l.t_cols), Int<1>{}),
                                       InternalStrideA{static_cast<int64_t>(l.t_cols), Int<1>{}, Int<0>{}}));
      cute::tma_descriptor_replace_addr_in_shared_mem(shared_tensormaps.smem_tensormap_BL,
                                                      l.b + static_cast<int64_t>(next_group) * l.b_expert_bytes);
    }
  }

  // A tensor map's dims and byte strides in shared memory, for `tensor` (a null-based tensor of the group's shape
  // and strides) through `tma`'s mode mapping.
  template <class Tma, class GTensor>
  CUTLASS_DEVICE static void replace_dims_strides(cute::TmaDescriptor& smem_desc, Tma const& tma, GTensor const& tensor) {
    cute::array<uint32_t, 5> shape = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> stride = {0, 0, 0, 0, 0};
    cute::detail::fill_tma_gmem_shape_stride(tma, tensor, shape, stride);
    for (uint64_t& s : stride) s = s * sizeof_bits_v<typename GTensor::value_type> / 8;
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(smem_desc, shape, stride);
  }

  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage& shared_tensormaps, TensorMaps const& input_tensormaps) {
    if (cute::elect_one_sync()) {
      cute::tma_desc_commit_group();
      cute::tma_desc_wait_group();
    }
    // The whole warp (aligned instructions).
    tma_descriptor_cp_fence_release(get<0>(input_tensormaps), shared_tensormaps.smem_tensormap_A);
    tma_descriptor_cp_fence_release(get<1>(input_tensormaps), shared_tensormaps.smem_tensormap_B);
    if constexpr (kLoraK) {
      tma_descriptor_cp_fence_release(get<2>(input_tensormaps), shared_tensormaps.smem_tensormap_T);
      tma_descriptor_cp_fence_release(get<3>(input_tensormaps), shared_tensormaps.smem_tensormap_BL);
    }
  }

  // The producer warp's current group (set by tensormaps_perform_update, which the kernel calls before the
  // group's first load): its first row and row count.
  int group_first_row_ = 0;
  int group_rows_ = 0;

  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_fence_acquire(TensorMaps const& input_tensormaps) {
    cute::tma_descriptor_fence_acquire(get<0>(input_tensormaps));
    cute::tma_descriptor_fence_acquire(get<1>(input_tensormaps));
    if constexpr (kLoraK) {
      cute::tma_descriptor_fence_acquire(get<2>(input_tensormaps));
      cute::tma_descriptor_fence_acquire(get<3>(input_tensormaps));
    }
  }
};

}  // namespace moelora::cuda::detail
