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
#include "activation.cuh"
#include "cuda_utils.cuh"
#include "mma_operands.cuh"
#include "pdl.cuh"
#include "smem_tiles.cuh"
#include "stages.h"

namespace moelora::cuda {
namespace {

using mma_operands::load_pack;
using mma_operands::mma_16816;
using mma_operands::Pack;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowGroup = 8;  // token rows per mma (its N)
constexpr int kU = 4;         // 32-wide k blocks in flight per warp (2 KB of W each)

// Output columns per CTA: plain 32 (weight rows c0 .. c0 + 31), gated 16 (gate rows i and up rows I + i).
template <bool kGated>
constexpr int kColsPerCta = kGated ? 16 : 32;

template <bool kGated>
__host__ __device__ int column_blocks(int N) { return ceil_div(kGated ? N / 2 : N, kColsPerCta<kGated>); }

template <typename T, bool kGated, ActivationKind kAct>
__global__ void __launch_bounds__(kThreads, 4) expert_gemv_kernel(ExpertGemvParams p) {
  pdl_begin();
  __shared__ float red[kWarps][2][16][kRowGroup];  // per warp: two 16-row weight blocks x 8 token rows
  __shared__ float t_s[kRowGroup][kLoraMaxRank];    // LoRA: the row group's shrink output, rounded
  __shared__ int slot_s[kRowGroup];                 // LoRA: each row's adapter slot (-1: none)

  const int col_blocks = column_blocks<kGated>(p.N);
  const int tile = blockIdx.x / col_blocks, cb = blockIdx.x % col_blocks;
  if (tile >= p.expert_tile_prefix[p.E]) return;
  const int e = segment_of_tile(p.expert_tile_prefix, p.E, tile);
  const int tile_row0 = p.expert_offsets[e] + (tile - p.expert_tile_prefix[e]) * kTileRows;
  const int tile_rows = min(kTileRows, p.expert_offsets[e + 1] - tile_row0);

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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int nkb = ceil_div(p.K, 32);
  const bool lora = p.lora_partial != nullptr;
  const int bucket0 = e * p.seg_per_expert;  // the expert's slot -1 bucket; slot s is bucket0 + 1 + s
  const T* lora_b = lora ? static_cast<const T*>(p.lora_B) + e * p.b_expert_stride : nullptr;

  const T* wrow[2][2];  // [block][h]: weight row g + 8h of the block (clamped; invalid rows load zeros)
  bool wvalid[2][2];
#pragma unroll
  for (int jb = 0; jb < 2; ++jb)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = g + 8 * h;
      wvalid[jb][h] = j < wrows[jb];
      wrow[jb][h] = W + static_cast<int64_t>(wrow0[jb] + (wvalid[jb][h] ? j : 0)) * p.K;
    }

  for (int g0 = 0; g0 < tile_rows; g0 += kRowGroup) {  // one pass unless a token named an expert twice
    const int rows = min(kRowGroup, tile_rows - g0);
    const int row0 = tile_row0 + g0;
    const T* xrow = X + static_cast<int64_t>(row0 + min(g, rows - 1)) * p.K;
    float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};

    for (int kb0 = warp; kb0 < nkb; kb0 += kWarps * kU) {
      Pack<T, 8> xp[kU], wp[kU][2][2];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int k = (kb0 + u * kWarps) * 32 + 8 * q;
        const int valid = kb0 + u * kWarps < nkb ? max(0, min(8, p.K - k)) : 0;
        xp[u] = load_pack<T, 8>(xrow + k, vec, g < rows ? valid : 0);
#pragma unroll
        for (int jb = 0; jb < 2; ++jb)
#pragma unroll
          for (int h = 0; h < 2; ++h) wp[u][jb][h] = load_pack<T, 8>(wrow[jb][h] + k, vec, wvalid[jb][h] ? valid : 0);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int jb = 0; jb < 2; ++jb) {
          mma_16816<T>(c[jb], wp[u][jb][0].w[0], wp[u][jb][1].w[0], wp[u][jb][0].w[1], wp[u][jb][1].w[1],
                       xp[u].w[0], xp[u].w[1]);
          mma_16816<T>(c[jb], wp[u][jb][0].w[2], wp[u][jb][1].w[2], wp[u][jb][0].w[3], wp[u][jb][1].w[3],
                       xp[u].w[2], xp[u].w[3]);
        }
    }
    // c[jb] = {(j, r), (j, r + 1), (j + 8, r), (j + 8, r + 1)} with weight row j = g, token row r = 2q.
#pragma unroll
    for (int jb = 0; jb < 2; ++jb) {
      red[warp][jb][g][2 * q] = c[jb][0];
      red[warp][jb][g][2 * q + 1] = c[jb][1];
      red[warp][jb][g + 8][2 * q] = c[jb][2];
      red[warp][jb][g + 8][2 * q + 1] = c[jb][3];
    }
    if (lora) {  // each row's slot, and t = sum of the split-K partials in ks order, rounded as in lora_gemm.cu
      if (threadIdx.x < kRowGroup) {
        int slot = -1;
        const int row = row0 + threadIdx.x;
        if (static_cast<int>(threadIdx.x) < rows) {
          for (int s = 0; s + 1 < p.seg_per_expert; ++s)
            if (row >= p.bucket_offsets[bucket0 + 1 + s] && row < p.bucket_offsets[bucket0 + 2 + s]) slot = s;
        }
        slot_s[threadIdx.x] = slot;
      }
      for (int i = threadIdx.x; i < rows * p.R; i += kThreads) {
        const int r = i / p.R, j = i % p.R;
        const float* src = p.lora_partial + static_cast<int64_t>(row0 + r) * p.R + j;
        float v = 0.f;
        for (int ks = 0; ks < p.lora_k_splits; ++ks) v += src[static_cast<int64_t>(ks) * p.max_rows * p.R];
        t_s[r][j] = to_float(from_float<T>(v));
      }
    }
    __syncthreads();

    // Sum of the warps in warp order (deterministic), plus the row's LoRA delta, then the epilogue.
    auto total = [&](int jb, int j, int r) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][jb][j][r];
      if (lora && slot_s[r] >= 0) {
        const int slot = slot_s[r];
        const T* b = lora_b + slot * p.b_slot_stride + static_cast<int64_t>(wrow0[jb] + j) * p.R;
        float delta = 0.f;
#pragma unroll 8
        for (int i = 0; i < p.R; ++i) delta += t_s[r][i] * to_float(b[i]);
        v += p.slot_scale[slot] * delta;
      }
      return v;
    };
    if constexpr (kGated) {
      const int j = threadIdx.x % 16, r = threadIdx.x / 16;  // 16 columns x 8 rows = 128 threads
      if (r < rows && j < wrows[0]) {
        const int row = row0 + r;
        float gate = total(0, j, r), up = total(1, j, r);
        gate = to_float(from_float<T>(gate));  // gu is rounded to the activation dtype, as on the GEMM path
        up = to_float(from_float<T>(up));
        D[static_cast<int64_t>(row) * half + wrow0[0] + j] = from_float<T>(gate_activation<kAct>(gate) * up);
      }
    } else {
      for (int o = threadIdx.x; o < 32 * kRowGroup; o += kThreads) {  // 32 columns x 8 rows
        const int jb = (o % 32) / 16, j = o % 16, r = o / 32;
        if (r >= rows || j >= wrows[jb]) continue;
        const int row = row0 + r, col = wrow0[jb] + j;
        D[static_cast<int64_t>(row) * p.N + col] = from_float<T>(total(jb, j, r));
      }
    }
    __syncthreads();  // red is rewritten by the next row group
  }
}

template <typename T, bool kGated>
cudaError_t launch_typed(const ExpertGemvParams& p, cudaStream_t stream) {
  const int64_t tiles_ub = segment_tiles_upper_bound(p.max_rows, p.E < p.max_rows ? p.E : p.max_rows);
  const int64_t grid = tiles_ub * column_blocks<kGated>(p.N);
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>(grid);
  if constexpr (kGated) {
    if (p.activation == ActivationKind::Gelu)
      return launch_kernel(expert_gemv_kernel<T, true, ActivationKind::Gelu>, blocks, kThreads, 0, stream, p);
  }
  // The plain epilogue has no activation: one instantiation.
  return launch_kernel(expert_gemv_kernel<T, kGated, ActivationKind::Silu>, blocks, kThreads, 0, stream, p);
}

}  // namespace

cudaError_t launch_expert_gemv(const ExpertGemvParams& p, cudaStream_t stream) {
  if (p.max_rows == 0 || p.N == 0) return cudaSuccess;
  if ((p.gated && p.N % 2 != 0) || (p.lora_partial != nullptr && (p.R <= 0 || p.R > kLoraMaxRank)))
    return cudaErrorInvalidValue;
  if (p.dtype == DType::BF16)
    return p.gated ? launch_typed<__nv_bfloat16, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
  return p.gated ? launch_typed<__half, true>(p, stream) : launch_typed<__half, false>(p, stream);
}

}  // namespace moelora::cuda
