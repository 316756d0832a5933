// CUDA entry of moelora::fused_moe: checks the arguments, takes the workspace from PyTorch's caching
// allocator on the current stream, and launches the stages in order (see stages.h); with few rows per expert the
// LoRA stages run on a second stream beside the base GEMMs, forked from and joined back into the current one
// (use_lora_overlap). No host sync and no host decision that depends on tensor values, so the op can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "../check_message.h"
#include "../fused_moe_args.h"
#include "expert_gemm_sm90.h"
#include "launch_policy.h"
#include "stages.h"

namespace moelora {
namespace {

using OptTensor = std::optional<at::Tensor>;
namespace mc = moelora::cuda;

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
}

// For the features that are on by default: true only when `name` is set to "0".
bool env_zero(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// A switch with a computed default: `name` set to "0" turns it off, to anything else non-empty on; unset or
// empty, `fallback` decides.
bool env_switch(const char* name, bool fallback) { return !env_zero(name) && (env_flag(name) || fallback); }

mc::DType to_dtype(at::ScalarType t) { return t == at::kBFloat16 ? mc::DType::BF16 : mc::DType::FP16; }

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Which implementation runs the base fc1/fc2 GEMMs: CUTLASS sm90 on Hopper unless MOELORA_PORTABLE=1.
bool use_sm90(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor, device) == 0 && mc::expert_gemm_sm90_compiled() &&
         !env_flag("MOELORA_PORTABLE");
}

// PDL for the activation and the finalize launches at every size (Hopper and later), unless MOELORA_PDL=0
// (NOTES.md v21). Each follows a GEMM or LoRA kernel launched plainly, so the CUTLASS GEMMs keep the start that PDL
// spoiled in v5 / v15, and only the short kernel's launch overlaps the long one's last wave; the finalize also
// loads its rows and weights before its wait (finalize.cu). Measured on the H100 (graph replays, plain -> PDL):
// the base call at qwen3 / gpt-oss T=256 -2..-5 µs, the LoRA call at T = 16-64 (LoRA beside the GEMMs) -2..-6 µs;
// T = 16-4096 otherwise within the runs' spread. Every other PDL launch (use_pdl) needs this to hold too.
bool use_pdl_tail(int device) {
  return !env_zero("MOELORA_PDL") && device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9;
}

// PDL on every launch of the call (launch_policy.h), where use_pdl_tail holds (`pdl_tail`): MOELORA_PDL=1 always,
// by default for the decode GEMV path (T <= kDecodeMaxTokens). Measured on the H100 (benchmarks/NOTES.md v5, v12,
// v15, v30), graph replays, PDL against plain launches: at T = 1 the base call is 1.5-3 µs faster on every shape and
// the call with LoRA 0-6 µs (mixtral 305 -> 299), in three runs; from 64 rows per expert on it is slower (mixtral
// T=256 +15%, T=1024 +23%, qwen3 T=256 with LoRA +4%), up to +24% at prefill (v5). At T = 2-4 it was mixed before
// every kernel waited before it triggered (v12: mixtral base +9 µs); since then (v30, four runs of 60-100
// interleaved replays) it gains the base call 1.1-6.4 µs on qwen3 / gpt-oss and the call with LoRA 0.1-1.9 µs
// there; mixtral spreads by more than that between runs (T=2 base -7..+15 µs, LoRA +1..+3; T=4 base -1..-29, LoRA
// -4..-11). MOELORA_DECODE_T2_PDL=0 keeps T = 2-4 plain (to compare).
bool use_pdl(bool pdl_tail, const FusedMoeDims& d, bool decode) {
  const bool decode_pdl = decode && (d.T == 1 || (d.T <= mc::kDecodeMaxTokens && !env_zero("MOELORA_DECODE_T2_PDL")));
  return pdl_tail && env_switch("MOELORA_PDL", decode_pdl);
}

// Contiguous and 16-byte aligned: the permute stage and the CUTLASS (TMA) GEMMs move 16-byte vectors. A view
// that starts mid-vector (storage offset not a multiple of 8 elements) is copied once per call; the LoRA
// kernels and the GEMV check alignment themselves and fall back to element loads.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// One LoRA pair (shrink with A, expand with B) on top of a base GEMM output. Segments are the routing
// buckets: expert-major, slot -1 first (those get no tiles).
struct LoraSide {
  const at::Tensor& a;  // [S, E, R, K] or [S, R, K] when shared
  const at::Tensor& b;  // [S, E, N, R] or [S, N, R] when shared
  bool shared_a, shared_b;
};

// Adapter (slot s, expert e) of a LoRA tensor with `matrix` elements per matrix starts at element
// s * slot + e * expert. Shared-outer gating: a shared side has no expert offset.
struct AdapterStrides {
  int64_t expert, slot;
};
AdapterStrides adapter_strides(bool shared, int64_t matrix, int64_t E) {
  return shared ? AdapterStrides{0, matrix} : AdapterStrides{matrix, E * matrix};
}

// The LoRA kernels in use: lora_gemm.cu (split-K shrink + N-range expand) for ranks up to kLoraMaxRank,
// else (or with MOELORA_LORA_SEGMENT_GEMM=1, kept for comparison) the generic segment GEMM, which
// rounds the shrink output through a [rows, R] buffer.
bool use_lora_kernels(int64_t R) { return R <= mc::kLoraMaxRank && !env_flag("MOELORA_LORA_SEGMENT_GEMM"); }

// An integer knob (environment variable `name`) from its text: empty, `fallback`; otherwise an integer in
// [0, 2^20], or an error naming the variable -- not a silent fallback, which would let a measurement report a
// setting that never ran (as for MOELORA_GEMM_TILE).
int knob_int(const char* name, const std::string& text, int fallback) {
  if (text.empty()) return fallback;
  char* end = nullptr;
  const long x = std::strtol(text.c_str(), &end, 10);
  MOELORA_CHECK(*end == '\0' && x >= 0 && x <= (1 << 20), name, ": expected an integer in [0, 1048576], got '", text,
                "'");
  return static_cast<int>(x);
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v == nullptr ? fallback : knob_int(name, v, fallback);
}

// The part of a two-GEMM knob's value for GEMM `which` (0: fc1, 1: fc2): "A" holds for both, "A<sep>B" is A for
// fc1 and B for fc2.
std::string knob_part(const std::string& text, char sep, int which) {
  const size_t at = text.find(sep);
  if (at == std::string::npos) return text;
  return which == 0 ? text.substr(0, at) : text.substr(at + 1);
}

// Few routed rows per expert (decode, T <= kDecodeMaxTokens, or T * k <= kGemvMaxAvgRows * E on average;
// MOELORA_GEMV_AVG_ROWS overrides the latter) run the base GEMMs as expert_gemv.cu (fc1 with the gated
// activation fused, both with the LoRA shrink and expand in the same launch) on every GPU, unless
// MOELORA_DECODE_GEMV=0. Its LoRA holds ranks up to kLoraMaxRank, so adapters on the segment-GEMM path (rank >
// kLoraMaxRank, or MOELORA_LORA_SEGMENT_GEMM=1 to compare) keep the grouped-GEMM path.
bool use_decode_gemv(const FusedMoeDims& d) {
  if (env_zero("MOELORA_DECODE_GEMV")) return false;
  const int64_t avg_rows = env_int("MOELORA_GEMV_AVG_ROWS", mc::kGemvMaxAvgRows);
  const bool few_rows = d.T <= mc::kDecodeMaxTokens || d.T * d.k <= avg_rows * d.E;
  return few_rows && (!d.has_lora || use_lora_kernels(d.R));
}

// LoRA workspace: split-K partial sums (lora_gemm.cu) or the rounded shrink output (segment GEMM).
struct LoraWorkspace {
  bool lora_kernels = false;  // use_lora_kernels(R), decided once per call
  int few_rows_max = mc::kLoraFewRows;  // MOELORA_LORA_FEW_ROWS overrides (0: 64-row tiles only; large: none)
  int expand_few_rows_max = mc::kLoraFewRows;  // the expand's own threshold: MOELORA_LORA_EXPAND_FEW_ROWS
  bool tiles_kernel = true;  // the tiles-only LoRA kernels where few_rows_max == 0 (MOELORA_LORA_TILES_KERNEL=0: off)
  at::Tensor buf;  // the shrinks' fp32 partial sums: allocate_partials, or at decode make_lora_workspace
  bool partials_pending = false;  // buf is allocate_partials' to size (the lora_gemm.cu shrinks, not at decode)
  int k_splits_fc1 = 1, k_splits_fc2 = 1;
};

// `decode`: the GEMV launches run the LoRA (lora_in_gemv); buf holds their shrinks' partial sums, [K ranges, pairs,
// R] fp32, fc1's ranges and then fc2's.
LoraWorkspace make_lora_workspace(const FusedMoeDims& d, const at::TensorOptions& act_options, int sm_count,
                                  bool decode) {
  LoraWorkspace ws;
  const int pairs = static_cast<int>(d.T * d.k);
  const int active = static_cast<int>(d.E * d.S);
  ws.lora_kernels = use_lora_kernels(d.R);
  // Segments of 16+ rows on average (the expand: 8+): every segment on the 64-row tiles, the tiles-only kernels
  // (stages.h).
  const bool tiles_rank = d.R <= mc::kLoraTilesMaxRank;
  const bool tiles_only = tiles_rank && mc::lora_tiles_only(pairs, active);
  const bool expand_tiles_only = tiles_rank && mc::lora_tiles_only(pairs, active, mc::kLoraExpandTilesMinRows);
  ws.few_rows_max = env_int("MOELORA_LORA_FEW_ROWS", tiles_only ? 0 : mc::kLoraFewRows);
  ws.tiles_kernel = !env_zero("MOELORA_LORA_TILES_KERNEL");
  // The expand's threshold (benchmarks/NOTES.md v9): when the segments average at most kLoraFewRows rows,
  // those of up to twice that also take the few-rows path (two passes of 16 rows, B read twice) -- cheaper
  // than 64-row tiles next to few-rows ones, whose work items cost unevenly (qwen3 / gpt-oss T=1024:
  // -5..-25% per expand); with larger segments the 64-row tiles stay (qwen3 T=4096: +35% otherwise). Only
  // up to kLoraExpandPairsMaxRank: at rank 64 the 64-row tiles stay faster (gpt-oss T=1024 +3% end to end
  // otherwise, NOTES.md v17; +4% in v9, when its passes held 8 rows).
  const char* both = std::getenv("MOELORA_LORA_FEW_ROWS");
  const bool small_segments = d.R <= mc::kLoraExpandPairsMaxRank && !mc::lora_large_segments(pairs, active);
  const int expand_default = both != nullptr && both[0] != '\0' ? ws.few_rows_max
                             : expand_tiles_only               ? 0
                             : small_segments                  ? 2 * mc::kLoraFewRows
                                                               : mc::kLoraFewRows;
  ws.expand_few_rows_max = env_int("MOELORA_LORA_EXPAND_FEW_ROWS", expand_default);
  if (ws.lora_kernels && decode) {
    // The GEMV launches' shrink partial sums, one [pairs, R] per K range (stages.h, gemv_lora_k_splits);
    // MOELORA_GEMV_SHRINK_SPLIT_K=N sets the range length (0: one range), for measuring (NOTES.md v19).
    const int split_k = env_int("MOELORA_GEMV_SHRINK_SPLIT_K", mc::kGemvShrinkSplitK);
    ws.k_splits_fc1 = mc::gemv_lora_k_splits(static_cast<int>(d.H), split_k);
    ws.k_splits_fc2 = mc::gemv_lora_k_splits(static_cast<int>(d.I), split_k);
    // fc1's ranges, then fc2's: the routing marks both pending before either launch (kLoraTPending).
    ws.buf = at::empty({ws.k_splits_fc1 + ws.k_splits_fc2, pairs, d.R}, act_options.dtype(at::kFloat));
  } else if (ws.lora_kernels) {
    // MOELORA_LORA_SHRINK_WAVES=N (default 2): the shrink's split-K target, for measuring (NOTES.md v9).
    // MOELORA_LORA_SHRINK_SPLITS=N (N >= 1) sets the split count itself, up to one per 32 of K (to measure, and for
    // the tests of the one-split shrink writing t).
    const int waves = std::max(1, env_int("MOELORA_LORA_SHRINK_WAVES", mc::kLoraShrinkWaves));
    const int forced = env_int("MOELORA_LORA_SHRINK_SPLITS", 0);
    auto split_count = [&](int K) {
      return forced > 0 ? mc::lora_k_split_count(K, forced) : mc::lora_k_splits(K, pairs, active, sm_count, waves);
    };
    ws.k_splits_fc1 = split_count(static_cast<int>(d.H));
    ws.k_splits_fc2 = split_count(static_cast<int>(d.I));
    // buf (the shrinks' partial sums) once the call knows which shrinks write t themselves (allocate_partials).
    ws.partials_pending = true;
  } else {
    ws.buf = at::empty({pairs, d.R}, act_options);
  }
  return ws;
}

// Whether the LoRA shrink with this many K splits writes the GEMM's t itself (LoRA inside the GEMM): with one split
// unless MOELORA_LORA_SHRINK_T=0 (lora_t_rows.cuh; the same bits as lora_k_operand.cu, one kernel and t's fp32 round
// trip less: 2 x 6.5 µs at qwen3 T=1024, NOTES.md v26).
bool shrink_writes_t(int k_splits) { return k_splits == 1 && !env_zero("MOELORA_LORA_SHRINK_T"); }

// The lora_gemm.cu shrinks' fp32 partial sums, [K splits, pairs, R], shared by fc1 and fc2 (fc2's shrink runs after
// fc1's LoRA has read them): none for a side whose shrink writes the GEMM's t itself (`into_t`). Only where
// make_lora_workspace left them pending.
void allocate_partials(LoraWorkspace& ws, const FusedMoeDims& d, const at::TensorOptions& act_options,
                       const bool (&into_t)[2]) {
  if (!ws.partials_pending) return;
  ws.partials_pending = false;
  const int64_t fc1 = into_t[0] && shrink_writes_t(ws.k_splits_fc1) ? 0 : ws.k_splits_fc1;
  const int64_t fc2 = into_t[1] && shrink_writes_t(ws.k_splits_fc2) ? 0 : ws.k_splits_fc2;
  ws.buf = at::empty({std::max(fc1, fc2), d.T * d.k, d.R}, act_options.dtype(at::kFloat));
}

// fc1's LoRA expand writes h itself (activation fused) unless MOELORA_LORA_FUSED_ACT=0 (kept to compare).
bool use_fused_lora_activation() { return !env_zero("MOELORA_LORA_FUSED_ACT"); }

// fc1's CUTLASS GEMM writes h = act(gate) * up from its accumulators (expert_gemm_sm90_gated_epilogue.cuh) instead
// of gu for the activation stage, on the row-side tiles (more than 16 rows per expert), in calls without LoRA or
// with fc1's LoRA inside the GEMM (otherwise the delta must reach gate and up before the activation).
// MOELORA_GATED_FC1=0 keeps gu and the activation stage, to compare. h differs from the unfused path's in the last bit where gate and up round:
// the unfused path rounds them to the dtype before the activation, the fused one does not.
bool use_gated_fc1(const mc::ExpertGemmParams& fc1) {
  return !env_zero("MOELORA_GATED_FC1") && mc::expert_gemm_sm90_gated_supported(fc1);
}

// The LoRA inside a base GEMM (expert_gemm_sm90_mainloop.cuh; ranks 16, 32, 64, 128): the shrink's output goes into t
// (run_lora_shrink_to_t) and the GEMM's K loop runs on over t and the adapters' B, so no expand kernel runs; fc1's
// delta reaches its gated epilogue and fc2's y gets no read-modify-write. t holds every slot's columns (S R, zero
// but in the row's slot); a tile of rows multiplies only the LoRA k tiles that hold one of its rows' slots (rows
// are sorted by slot), so the GEMM does up to S times the LoRA's own MMA work where a tile holds many slots. Per
// GEMM, for the LoRA that runs after the base GEMMs (not beside them), where t's columns are at most the weight's
// K, and at ranks 64 / 128 where the experts average at most 512 rows. Measured on the H100 (8 slots, graph
// replays, expand kernels -> in the GEMM, NOTES.md v24-v25):
// - rank 64: qwen3 T=1024 / 4096 904 -> 873 / 1359 -> 1252 µs, gpt-oss 982 -> 976 / 2115 -> 2034; mixtral T=4096
//   (1024 rows per expert) 5099 -> 5450 (its base spread 4581-4854 in the same run);
// - rank 16: qwen3 T=1024 / 4096 / 16384 680 -> 647 / 1128 -> 1014 / 3485 -> 3152, gpt-oss T=256 / 4096 / 16384
//   692 -> 669 / 1900 -> 1763 / 6487 -> 6246, mixtral T=256 1175 -> 1149, T=1024-16384 within +-16 µs.
// MOELORA_LORA_IN_GEMM=0 keeps the expand kernels (to compare), =1 takes it wherever the kernels support it,
// <fc1>/<fc2> per GEMM (e.g. 1/0).
// `t` and `row_slot` nullptr: the operands' shapes only, for the rule.
mc::LoraKOperands lora_k_operands(const LoraSide& side, const void* t, const int* row_slot, const FusedMoeDims& d,
                                  int N) {
  mc::LoraKOperands o{};
  o.t = t;
  o.row_slot = row_slot;
  o.S = static_cast<int>(d.S);
  o.R = static_cast<int>(d.R);
  o.t_cols = mc::expert_gemm_lora_k_cols(o.S, o.R);
  o.b = side.b.data_ptr();
  const AdapterStrides sb = adapter_strides(side.shared_b, static_cast<int64_t>(N) * d.R, d.E);
  o.b_expert_stride = sb.expert;
  o.b_slot_stride = sb.slot;
  return o;
}
// MOELORA_LORA_IN_GEMM for GEMM `which` (0: fc1, 1: fc2): one value for both or <fc1>/<fc2>; -1 where unset or
// empty (the rule), else 0 / 1. Read in every non-decode call with adapters, so a bad value is an error there.
int lora_in_gemm_knob(int which) {
  const char* v = std::getenv("MOELORA_LORA_IN_GEMM");
  if (v == nullptr || v[0] == '\0') return -1;
  const std::string part = knob_part(v, '/', which);
  TORCH_CHECK(part.empty() || part == "0" || part == "1",
              "MOELORA_LORA_IN_GEMM must be 0, 1 or <fc1>/<fc2> of those, got '", v, "'");
  return part.empty() ? -1 : part == "1";
}
bool use_lora_in_gemm(mc::ExpertGemmParams g, int knob, const LoraSide& side, const FusedMoeDims& d) {
  g.lora_k = lora_k_operands(side, nullptr, nullptr, d, g.N);
  // The adapters' B is read by TMA: a view that does not start on 16 bytes keeps the expand kernels.
  if (!mc::expert_gemm_sm90_lora_k_supported(g) || reinterpret_cast<uintptr_t>(g.lora_k.b) % 16 != 0) return false;
  if (knob >= 0) return knob == 1;
  return g.lora_k.t_cols <= g.K && (d.R < 64 || d.T * d.k <= int64_t{512} * d.E);
}

// fc1's LoRA shrink reads each sorted row's token from the hidden states (T rows, k times fewer bytes, which the
// L2 keeps) instead of its gathered copy, when that copy is more than half the L2 (so it is read from HBM; 67-134
// MB at T=4096). Measured (benchmarks/NOTES.md v13): fc1's shrink 4-9 µs faster at T=4096, but 2-5 µs slower
// where the copy fits the L2 anyway (mixtral / gpt-oss T=1024, 17-24 MB) and the row index is one more load.
// MOELORA_LORA_TOKEN_ROWS=0 / =1 turns it off / on whatever the size. Same values in the same order: same bits.
// `beside_permute` (use_shrink_beside_permute): the shrink would run beside the permute's copy, which it can only on
// token rows.
bool use_token_rows_shrink(int64_t gathered_bytes, int device, bool beside_permute) {
  return env_switch("MOELORA_LORA_TOKEN_ROWS",
                    beside_permute || gathered_bytes > device_attribute(cudaDevAttrL2CacheSize, device) / 2);
}

// fc1's LoRA shrink beside the permute's copy. The shrink of the LoRA after or inside the base GEMMs (`serial_lora`:
// into t for the LoRA inside fc1's GEMM, or into ws.buf for the expand) needs the row maps (row_token, row_slot) and
// the routing's tables, not the gathered rows. So where the permute is a kernel of its own (not folded into the
// routing: `gather_in_routing`), it runs in two launches, the row maps (a thread per pair) and the copy, and the
// shrink runs on a second stream beside the copy, joined before fc1's GEMM. Measured on the H100 (rank 16, graph
// replays, NOTES.md v27): qwen3 T=4096 / 16384 -5..-10 / -20..-60 µs, gpt-oss and mixtral within the spread. Both
// kernels stream HBM and slow each other (qwen3 T=4096: the shrink 62 -> 91 µs, the copy 58 -> 68), so what is won is
// about the shrink's idle last wave. MOELORA_LORA_SHRINK_BESIDE_PERMUTE=0 keeps them on one stream, one after the
// other. The same kernels either way: the same bits.
bool use_shrink_beside_permute(bool serial_lora, bool gather_in_routing) {
  return serial_lora && !gather_in_routing && !env_zero("MOELORA_LORA_SHRINK_BESIDE_PERMUTE");
}

// LoRA overlapped with the base GEMMs (benchmarks/NOTES.md v16). With few rows per expert the base GEMMs stream
// the expert weights for hundreds of µs and keep enough bytes in flight on fewer SMs, while the LoRA kernels are
// short and latency-bound. So each LoRA pair runs on a second stream beside its base GEMM, which gets
// the SMs overlap_gemm_sms leaves it and is queued first so that it takes them; the expand adds into a zeroed
// delta buffer instead of onto the GEMM's output, and the activation (fc1) and the finalize (fc2) add the
// deltas. Measured on the H100 (R16, 8 adapters, graph replays, serial -> overlapped): qwen3 T=16 / 64 339 / 500
// -> 318 / 483 µs, gpt-oss T=16 / 64 550 / 637 -> 530 / 623, mixtral T=16 957 -> 946; at 16 rows per expert
// and more it loses (mixtral T=64 +2..+5%, every shape at T=256 and 1024). MOELORA_LORA_OVERLAP=0 / 1 forces it.
// sm90_gemms: the base GEMMs run on the sm90 CUTLASS kernels (so not at decode, whose GEMVs hold the LoRA).
bool use_lora_overlap(const FusedMoeDims& d, bool lora_kernels, bool sm90_gemms) {
  if (!d.has_lora || !lora_kernels || !sm90_gemms) return false;
  return env_switch("MOELORA_LORA_OVERLAP", d.T * d.k <= int64_t{8} * d.E);
}

// The LoRA's expected share of the bytes that base GEMM `which` (0: fc1, 1: fc2) and its LoRA pair read: the
// adapter bytes of the touched (expert, slot) segments over the weight bytes of the touched experts, both
// expected values from the shapes (balls into bins; a shared side is read once per slot).
double lora_byte_share(const FusedMoeDims& d, const LoraSide& side, int which) {
  const double pairs = static_cast<double>(d.T * d.k), E = static_cast<double>(d.E), S = static_cast<double>(d.S);
  const double experts = E * -std::expm1(-pairs / E);            // expected distinct experts
  const double touched = E * S * -std::expm1(-pairs / (E * S));  // expected distinct (expert, slot) segments
  const double N = static_cast<double>(which == 0 ? 2 * d.I : d.H), K = static_cast<double>(which == 0 ? d.H : d.I);
  const double lora = static_cast<double>(d.R) * ((side.shared_a ? S : touched) * K + (side.shared_b ? S : touched) * N);
  return lora / (experts * N * K);
}

// The SMs each base GEMM (0: fc1, 1: fc2) runs on beside its overlapped LoRA pair: sm_count minus the SMs left to
// the LoRA kernels, NOTES.md v16-v17, which are the larger of
// - a latency floor, more when there are more (expert, slot) segments: 8 + 8 of 132 suited mixtral T=16 (~30
//   segments), 16 + 16 qwen3 T=16 / 64 (128 / 512 segments) at rank 16, split between fc1 and fc2 in proportion
//   to their byte shares (v17: qwen3 T=64 12 + 20 SMs 479.5 µs against 16 + 16 482.3, gpt-oss T=64 621.0 against
//   626.9; rank 16);
// - the LoRA's byte share of the SMs, which grows with the rank: rank 64 at qwen3 T=64 wanted 32 SMs (16: 580 µs,
//   24: 563, 32: 559), at gpt-oss T=64 24-32 (704 -> 696).
// Capped at 32, a quarter of the GPU. MOELORA_LORA_OVERLAP_SMS=N sets both GEMMs' count, =N1:N2 fc1's and fc2's.
std::array<int, 2> overlap_gemm_sms(const FusedMoeDims& d, const LoraSide& fc1, const LoraSide& fc2, int sm_count) {
  const double segments = std::min(static_cast<double>(d.T * d.k), static_cast<double>(d.E * d.S));
  const double latency_floor = std::clamp(segments / 8, 8.0, 16.0);
  const double share[2] = {lora_byte_share(d, fc1, 0), lora_byte_share(d, fc2, 1)};
  const char* knob = std::getenv("MOELORA_LORA_OVERLAP_SMS");
  std::array<int, 2> gemm_sms{};
  for (int which : {0, 1}) {
    const double floor_here = 2 * latency_floor * share[which] / (share[0] + share[1]);
    int lora_sms = static_cast<int>(std::lround(std::clamp(std::max(floor_here, sm_count * share[which]), 8.0, 32.0)));
    if (knob != nullptr && knob[0] != '\0') {
      const std::string part = knob_part(knob, ':', which);
      MOELORA_CHECK(!part.empty(), "MOELORA_LORA_OVERLAP_SMS: expected N or N1:N2, got '", std::string(knob), "'");
      lora_sms = knob_int("MOELORA_LORA_OVERLAP_SMS", part, lora_sms);
    }
    gemm_sms[which] = std::max(1, sm_count - lora_sms);
  }
  return gemm_sms;
}

// One fork or join between the op's stream and the second stream: an event without timing, recorded on one
// stream and waited for on the other (graph capture turns the pair into a dependency edge).
class StreamEvent {
 public:
  StreamEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~StreamEvent() { cudaEventDestroy(event_); }
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;
  void record(cudaStream_t s) { C10_CUDA_CHECK(cudaEventRecord(event_, s)); }
  void block(cudaStream_t s) { C10_CUDA_CHECK(cudaStreamWaitEvent(s, event_, 0)); }

 private:
  cudaEvent_t event_ = nullptr;
};

// Where fc1's expand puts its result when the activation is fused into it (LoraExpandParams::h).
struct GatedExpandOut {
  at::Tensor* h;  // [rows, I]
  mc::ActivationKind kind;
};

// Decode: the GEMV launch runs this side's LoRA itself (expert_gemv.cu: shrink CTAs, expand in the epilogue);
// fill its fields. `t`: this side's part of ws.buf, which the routing marks pending; `k_splits`: the shrink's K
// ranges (ws.k_splits_fc1 / _fc2).
void lora_in_gemv(const LoraSide& side, float* t, int k_splits, const at::Tensor& lora_tile_prefix,
                  const at::Tensor& lora_tile_segment, int lora_tile_capacity, const at::Tensor& row_slot,
                  const float* scalings,
                  const FusedMoeDims& d, int N, int K, mc::ExpertGemvParams& g) {
  const int64_t R = d.R;
  const AdapterStrides sa = adapter_strides(side.shared_a, R * K, d.E), sb = adapter_strides(side.shared_b, N * R, d.E);
  g.lora_A = side.a.data_ptr();
  g.a_expert_stride = sa.expert; g.a_slot_stride = sa.slot;
  g.lora_B = side.b.data_ptr();
  g.b_expert_stride = sb.expert; g.b_slot_stride = sb.slot;
  g.R = static_cast<int>(R);
  g.slot_scale = scalings;
  g.lora_t = t;  // [k_splits, pairs, R]
  g.lora_k_splits = k_splits;
  g.lora_tile_prefix = lora_tile_prefix.data_ptr<int>();
  g.lora_tile_segment = lora_tile_segment.data_ptr<int>();
  g.lora_tile_capacity = lora_tile_capacity;
  g.row_slot = row_slot.data_ptr<int>();
}

// Where the lora_gemm.cu shrink reads its rows (LoraShrinkParams::X / x_rows): by default the sorted input
// itself; fc1 reads each row's token from the hidden states instead (token_rows_shrink).
struct ShrinkRows {
  const void* x = nullptr;  // nullptr: the sorted input
  int64_t ldx = 0;
  const int* rows = nullptr;
};

// The shrink writing the GEMM's t itself (LoraShrinkParams::t; t nullptr: its partial sums).
struct ShrinkIntoT {
  void* t = nullptr;
  int t_cols = 0;
  const float* scale = nullptr;
};

// The LoRA shrink kernel (lora_gemm.cu): ws.buf[ks, r, :R] = input[r, K-chunk ks] @ A[slot, e][:, chunk]^T, or
// with `into` (one K split) t.
void run_lora_shrink(const LoraSide& side, const at::Tensor& input, const ShrinkRows& shrink_rows, LoraWorkspace& ws,
                     int k_splits, const at::Tensor& bucket_offsets, const at::Tensor& lora_tile_prefix,
                     const at::Tensor& lora_tile_segment, const FusedMoeDims& d, int K, int sm_count,
                     cudaStream_t stream, const ShrinkIntoT& into = {}) {
  const int64_t R = d.R;
  const AdapterStrides sa = adapter_strides(side.shared_a, R * K, d.E);
  mc::LoraShrinkParams s{};
  s.X = input.data_ptr(); s.ldx = K;
  if (shrink_rows.x != nullptr) {
    s.X = shrink_rows.x; s.ldx = shrink_rows.ldx; s.x_rows = shrink_rows.rows;
  }
  s.A = side.a.data_ptr();
  s.a_expert_stride = sa.expert; s.a_slot_stride = sa.slot;
  s.partial = ws.buf.data_ptr<float>();
  s.row_offsets = bucket_offsets.data_ptr<int>(); s.tile_prefix = lora_tile_prefix.data_ptr<int>();
  s.tile_segment = lora_tile_segment.data_ptr<int>();
  s.nseg = static_cast<int>(d.E * (d.S + 1)); s.seg_per_expert = static_cast<int>(d.S + 1); s.slot_base = -1;
  s.R = static_cast<int>(R); s.K = K; s.k_splits = k_splits; s.k_chunk = mc::lora_k_chunk(K, k_splits);
  s.max_rows = static_cast<int>(d.T * d.k); s.max_active_segments = static_cast<int>(d.E * d.S);
  s.few_rows_max = ws.few_rows_max;
  s.tiles_kernel = ws.tiles_kernel;
  s.t = into.t; s.t_cols = into.t_cols; s.slot_scale = into.scale;
  s.dtype = to_dtype(input.scalar_type());
  C10_CUDA_CHECK(mc::launch_lora_shrink(s, sm_count, stream));
}

// The LoRA inside the next base GEMM: t from the shrink, itself where shrink_writes_t, otherwise from its split-K
// partials summed by lora_k_operand.cu.
void run_lora_shrink_to_t(const LoraSide& side, const at::Tensor& input, const ShrinkRows& shrink_rows,
                          LoraWorkspace& ws, int k_splits, const at::Tensor& bucket_offsets,
                          const at::Tensor& lora_tile_prefix, const at::Tensor& lora_tile_segment,
                          const at::Tensor& row_slot, const at::Tensor& expert_offsets, const float* scalings,
                          at::Tensor& t, const FusedMoeDims& d, int K, int sm_count, cudaStream_t stream) {
  if (shrink_writes_t(k_splits)) {
    run_lora_shrink(side, input, shrink_rows, ws, k_splits, bucket_offsets, lora_tile_prefix, lora_tile_segment, d,
                    K, sm_count, stream, ShrinkIntoT{t.data_ptr(), static_cast<int>(t.size(1)), scalings});
    return;
  }
  run_lora_shrink(side, input, shrink_rows, ws, k_splits, bucket_offsets, lora_tile_prefix, lora_tile_segment, d, K,
                  sm_count, stream);
  mc::LoraKOperandParams o{};
  o.partial = ws.buf.data_ptr<float>(); o.k_splits = k_splits;
  o.row_slot = row_slot.data_ptr<int>(); o.slot_scale = scalings;
  o.num_rows = expert_offsets.data_ptr<int>() + d.E;
  o.t = t.data_ptr(); o.max_rows = static_cast<int>(d.T * d.k);
  o.R = static_cast<int>(d.R); o.t_cols = static_cast<int>(t.size(1));
  o.dtype = to_dtype(input.scalar_type());
  C10_CUDA_CHECK(mc::launch_lora_k_operand(o, stream));
}

// out += scale[slot] * B @ (A @ input) per (expert, slot) segment, on the base GEMM's output (`scalings`
// nullptr: 1). With `gated` (fc1, lora_gemm.cu kernels) out is gu, left as the base GEMM wrote it, and the
// expand writes h of the rows with an adapter. `shrunk`: the lora_gemm.cu shrink has already run (into ws.buf,
// beside the permute's copy), only the expand runs.
void run_lora(const LoraSide& side, const at::Tensor& input, const ShrinkRows& shrink_rows, LoraWorkspace& ws,
              int k_splits, const GatedExpandOut* gated, at::Tensor& out,
              const at::Tensor& bucket_offsets, const at::Tensor& lora_tile_prefix,
              const at::Tensor& lora_tile_segment, const float* scalings,
              const FusedMoeDims& d, int N, int K, int sm_count, cudaStream_t stream, bool shrunk = false) {
  const int64_t R = d.R;
  const int pairs = static_cast<int>(d.T * d.k);
  const int nseg = static_cast<int>(d.E * (d.S + 1));
  const int active = static_cast<int>(d.E * d.S);
  const AdapterStrides sa = adapter_strides(side.shared_a, R * K, d.E), sb = adapter_strides(side.shared_b, N * R, d.E);
  if (ws.lora_kernels) {
    if (!shrunk)
      run_lora_shrink(side, input, shrink_rows, ws, k_splits, bucket_offsets, lora_tile_prefix, lora_tile_segment, d,
                      K, sm_count, stream);

    mc::LoraExpandParams e{};
    e.partial = ws.buf.data_ptr<float>(); e.k_splits = k_splits;
    e.B = side.b.data_ptr();
    e.b_expert_stride = sb.expert; e.b_slot_stride = sb.slot;
    e.D = out.data_ptr(); e.ldd = N;
    e.slot_scale = scalings;
    e.row_offsets = bucket_offsets.data_ptr<int>(); e.tile_prefix = lora_tile_prefix.data_ptr<int>();
    e.tile_segment = lora_tile_segment.data_ptr<int>();
    e.nseg = nseg; e.seg_per_expert = static_cast<int>(d.S + 1); e.slot_base = -1;
    e.R = static_cast<int>(R); e.N = N;
    if (gated != nullptr) {  // N = 2I columns of gu become I columns of h, each with its gate and up B rows
      e.h = gated->h->data_ptr(); e.ldh = N / 2; e.up_col = N / 2; e.activation = gated->kind;
      e.N = N / 2;
    }
    e.max_rows = pairs; e.max_active_segments = active; e.few_rows_max = ws.expand_few_rows_max;
    e.tiles_kernel = ws.tiles_kernel;
    e.dtype = to_dtype(input.scalar_type());
    C10_CUDA_CHECK(mc::launch_lora_expand(e, sm_count, stream));
    return;
  }

  mc::SegmentGemmParams p{};
  p.row_offsets = bucket_offsets.data_ptr<int>();
  p.tile_prefix = lora_tile_prefix.data_ptr<int>();
  p.nseg = nseg;
  p.seg_per_expert = static_cast<int>(d.S + 1);
  p.slot_base = -1;
  p.max_rows = pairs;
  p.max_active_segments = active;
  p.dtype = to_dtype(input.scalar_type());

  // Shrink: t[r, :R] = A[slot, e] @ input[r]  (scaling applied once, at the expand).
  p.A = input.data_ptr(); p.lda = K;
  p.W = side.a.data_ptr(); p.ldw = K;
  p.w_expert_stride = sa.expert; p.w_slot_stride = sa.slot;
  p.D = ws.buf.data_ptr(); p.ldd = R;
  p.slot_scale = nullptr; p.accumulate = false;
  p.N = static_cast<int>(R); p.K = K;
  C10_CUDA_CHECK(mc::launch_segment_gemm(p, mc::SegmentGemmShape::Narrow, sm_count, stream));

  // Expand: out[r, :N] += scaling[slot] * B[slot, e] @ t[r].
  p.A = ws.buf.data_ptr(); p.lda = R;
  p.W = side.b.data_ptr(); p.ldw = R;
  p.w_expert_stride = sb.expert; p.w_slot_stride = sb.slot;
  p.D = out.data_ptr(); p.ldd = N;
  p.slot_scale = scalings; p.accumulate = true;
  p.N = N; p.K = static_cast<int>(R);
  C10_CUDA_CHECK(mc::launch_segment_gemm(p, mc::SegmentGemmShape::Wide, sm_count, stream));
}

// MOELORA_GEMM_TILE=<fc1>[/<fc2>] (small, large, large_pp, swap32; one name for both) forces the sm90 GEMMs' tile
// configuration, to measure them against the size rule of expert_gemm_sm90.cu (NOTES.md v15).
mc::ExpertGemmConfig env_gemm_config(int which) {
  const char* v = std::getenv("MOELORA_GEMM_TILE");
  if (v == nullptr || v[0] == '\0') return mc::ExpertGemmConfig::Auto;
  const std::string name = knob_part(v, '/', which);
  if (name == "small") return mc::ExpertGemmConfig::SmallM;
  if (name == "large") return mc::ExpertGemmConfig::LargeM;
  if (name == "large_pp") return mc::ExpertGemmConfig::LargeMPingpong;
  if (name == "swap32") return mc::ExpertGemmConfig::SwapAB32;
  TORCH_CHECK(false, "MOELORA_GEMM_TILE: unknown tile configuration '", name,
              "' (expected small, large, large_pp or swap32, or <fc1>/<fc2>)");
}

// Base expert GEMM `which` (0: fc1, 1: fc2): out[rows of e] = input[rows of e] @ W[e]^T, W [E, N, K].
mc::ExpertGemmParams expert_gemm_params(const at::Tensor& input, const at::Tensor& weight, at::Tensor& out,
                                        const at::Tensor& expert_offsets, const FusedMoeDims& d, int N, int K,
                                        int which) {
  mc::ExpertGemmParams g{};
  g.A = input.data_ptr(); g.W = weight.data_ptr(); g.D = out.data_ptr();
  g.expert_offsets = expert_offsets.data_ptr<int>();
  g.num_experts = static_cast<int>(d.E); g.N = N; g.K = K;
  g.rows_hint = static_cast<int>(d.T * d.k);
  g.config = env_gemm_config(which);
  g.dtype = to_dtype(input.scalar_type());
  return g;
}

// The two base GEMMs (fc1, fc2). On sm90 the routing kernel writes their CUTLASS group tables (no launch of its
// own); the portable path runs the segment GEMM and needs no tables.
struct BaseGemms {
  bool sm90 = false;
  mc::ExpertGemmParams fc1{}, fc2{};
  at::Tensor workspace;  // sm90: two per-GEMM workspaces of `bytes` each
  size_t bytes = 0;
  void* ws(int i) const { return static_cast<char*>(workspace.data_ptr()) + i * bytes; }
};

// The workspaces, and where their group tables go: the routing kernel writes them (RoutingParams::gemm_tables).
void prepare_base_gemms(BaseGemms& g, const at::TensorOptions& options, int sm_count, mc::RoutingParams& routing) {
  if (!g.sm90) return;
  g.bytes = mc::expert_gemm_sm90_workspace_bytes(g.fc1.num_experts, sm_count);
  g.bytes = (g.bytes + 255) / 256 * 256;
  g.workspace = at::empty({static_cast<int64_t>(2 * g.bytes)}, options.dtype(at::kByte));
  C10_CUDA_CHECK(mc::expert_gemm_sm90_tables(g.fc1, g.ws(0), g.bytes, sm_count, &routing.gemm_tables[0]));
  C10_CUDA_CHECK(mc::expert_gemm_sm90_tables(g.fc2, g.ws(1), g.bytes, sm_count, &routing.gemm_tables[1]));
  routing.gemm_table_count = 2;
}

void run_base_gemm(const BaseGemms& g, int which, const at::Tensor& expert_tile_prefix, const FusedMoeDims& d,
                   int sm_count, cudaStream_t stream) {
  const mc::ExpertGemmParams& e = which == 0 ? g.fc1 : g.fc2;
  if (g.sm90) {
    C10_CUDA_CHECK(mc::expert_gemm_sm90_run(e, g.ws(which), g.bytes, sm_count, stream));
    return;
  }
  mc::SegmentGemmParams p{};
  p.A = e.A; p.lda = e.K;
  p.W = e.W; p.ldw = e.K;
  p.w_expert_stride = static_cast<int64_t>(e.N) * e.K; p.w_slot_stride = 0;
  p.D = e.D; p.ldd = e.N;
  p.row_offsets = e.expert_offsets;
  p.tile_prefix = expert_tile_prefix.data_ptr<int>();
  p.nseg = e.num_experts; p.seg_per_expert = 1; p.slot_base = 0;
  p.slot_scale = nullptr; p.accumulate = false;
  p.N = e.N; p.K = e.K;
  p.max_rows = static_cast<int>(d.T * d.k); p.max_active_segments = e.num_experts;
  p.dtype = e.dtype;
  C10_CUDA_CHECK(mc::launch_segment_gemm(p, mc::SegmentGemmShape::Wide, sm_count, stream));
}

at::Tensor fused_moe_cuda(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids, const OptTensor& token_lora_ids,
                          const OptTensor& w13_lora_a, const OptTensor& w13_lora_b, const OptTensor& w2_lora_a,
                          const OptTensor& w2_lora_b, const OptTensor& lora_scalings, bool w13_shared_a,
                          bool w13_shared_b, bool w2_shared_a, bool w2_shared_b, c10::string_view activation) {
  const FusedMoeDims d = check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids,
                                              w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b, lora_scalings,
                                              w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b, activation);
  const auto dtype = hidden_states.scalar_type();
  MOELORA_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "moelora::fused_moe on CUDA: hidden_states must be bfloat16 or float16, got ", dtype);
  MOELORA_CHECK(d.H % 8 == 0 && d.I % 8 == 0, "moelora::fused_moe on CUDA: the hidden size H (", d.H,
              ") and the expert intermediate size I (", d.I, ") must be multiples of 8");
  MOELORA_CHECK(d.T * d.k <= (int64_t{1} << 30), "moelora::fused_moe on CUDA: T * k = ", d.T * d.k,
              " rows is above the supported 2^30");

  c10::cuda::CUDAGuard guard(hidden_states.device());
  at::Tensor out = at::empty({d.T, d.H}, hidden_states.options());
  if (d.T == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = hidden_states.get_device();
  const int sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const bool decode = use_decode_gemv(d);
  const bool pdl_tail = use_pdl_tail(device);  // the activation's and the finalize's launches (below)
  const bool pdl = use_pdl(pdl_tail, d, decode);
  const mc::ScopedLaunchPolicy launch_policy(pdl);
  const mc::ActivationKind act = d.activation == Activation::Silu ? mc::ActivationKind::Silu : mc::ActivationKind::Gelu;

  const at::Tensor x = aligned_contiguous(hidden_states);
  // A copied expert weight is the whole tensor on every call: the Python wrapper warns (ops.py).
  const at::Tensor w13c = aligned_contiguous(w13), w2c = aligned_contiguous(w2);
  // Read as given (int32 / int64 ids, fp32 / activation-dtype weights): no conversion kernels.
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  const int pairs = static_cast<int>(d.T * d.k);
  const int E = static_cast<int>(d.E), S = d.has_lora ? static_cast<int>(d.S) : 0;
  const int H = static_cast<int>(d.H), I = static_cast<int>(d.I);
  const int64_t nbuckets = static_cast<int64_t>(E) * (S + 1);

  // ---- workspace ----------------------------------------------------------------------------------
  const auto iopt = x.options().dtype(at::kInt);
  at::Tensor bucket_counts = at::empty({nbuckets + 1}, iopt);  // + 1: the plan may scan it in place
  at::Tensor pair_rank = at::empty({pairs}, iopt);
  at::Tensor pair_row = at::empty({pairs}, iopt);
  at::Tensor bucket_offsets = at::empty({nbuckets + 1}, iopt);
  at::Tensor expert_offsets = at::empty({E + 1}, iopt);
  at::Tensor expert_tile_prefix = at::empty({E + 1}, iopt);
  at::Tensor lora_tile_prefix = at::empty({S > 0 ? nbuckets + 1 : 0}, iopt);
  const int64_t lora_tile_capacity = S > 0 ? mc::segment_tiles_upper_bound(pairs, E * S) : 0;
  at::Tensor lora_tile_segment = at::empty({lora_tile_capacity}, iopt);
  at::Tensor permuted = at::empty({pairs, H}, x.options());  // fc1 input; reused as the fc2 output
  at::Tensor h = at::empty({pairs, I}, x.options());
  const bool sm90_gemms = !decode && use_sm90(device);  // the base GEMMs on CUTLASS (BaseGemms::sm90)
  at::Tensor token_slots;
  LoraWorkspace lora_ws;
  at::Tensor scalings;  // undefined: every slot scales by 1
  if (d.has_lora) {
    token_slots = token_lora_ids->contiguous();  // int32 (checked)
    lora_ws = make_lora_workspace(d, x.options(), sm_count, decode);  // fc2 reuses fc1's part but at decode
    if (lora_scalings.has_value()) scalings = lora_scalings->contiguous();  // float32 (checked)
  }
  const float* scale_ptr = scalings.defined() ? scalings.data_ptr<float>() : nullptr;
  // The adapters of fc1 (w13) and fc2 (w2).
  at::Tensor a13, b13, a2, b2;
  if (d.has_lora) {
    a13 = w13_lora_a->contiguous(); b13 = w13_lora_b->contiguous();
    a2 = w2_lora_a->contiguous(); b2 = w2_lora_b->contiguous();
  }
  const LoraSide lora13{a13, b13, w13_shared_a, w13_shared_b}, lora2{a2, b2, w2_shared_a, w2_shared_b};
  const bool overlap = use_lora_overlap(d, lora_ws.lora_kernels, sm90_gemms);
  // The LoRA inside each base GEMM, or its expand kernels after it.
  const bool serial_lora = d.has_lora && sm90_gemms && lora_ws.lora_kernels && !overlap;
  const bool lora_knobs = d.has_lora && !decode;
  const int lora_in_knob[2] = {lora_knobs ? lora_in_gemm_knob(0) : -1, lora_knobs ? lora_in_gemm_knob(1) : -1};
  // The base GEMMs' parameters, but at decode (the GEMVs): fc1's output (gu or h) and variants are set below.
  mc::ExpertGemmParams fc1_params{}, fc2_params{};
  if (!decode) {
    fc1_params = expert_gemm_params(permuted, w13c, h, expert_offsets, d, 2 * I, H, 0);
    fc2_params = expert_gemm_params(h, w2c, permuted, expert_offsets, d, H, I, 1);
  }
  const bool lora_in_fc1 = serial_lora && use_lora_in_gemm(fc1_params, lora_in_knob[0], lora13, d);
  const bool lora_in_fc2 = serial_lora && use_lora_in_gemm(fc2_params, lora_in_knob[1], lora2, d);
  const bool into_t[2] = {lora_in_fc1, lora_in_fc2};
  allocate_partials(lora_ws, d, x.options(), into_t);
  // fc1's GEMM with the activation in its epilogue (writes h; no gu, no activation stage): without LoRA, or with
  // fc1's LoRA inside it.
  const bool gated_fc1 = sm90_gemms && (!d.has_lora || lora_in_fc1) && use_gated_fc1(fc1_params);
  // The GEMV path and the gated GEMM write h directly.
  at::Tensor gu = at::empty({decode || gated_fc1 ? 0 : pairs, 2 * I}, x.options());
  // t of the LoRA inside the GEMMs, fc1's then fc2's (each dead once its GEMM has run).
  at::Tensor lora_t = at::empty({lora_in_fc1 || lora_in_fc2 ? pairs : 0, mc::expert_gemm_lora_k_cols(S, d.R)},
                                x.options());
  // fc1's LoRA expand with the activation fused (not at decode: the GEMV fuses both itself); the activation
  // stage then does only the rows without an adapter (each expert's first bucket).
  const bool fused_act = serial_lora && !lora_in_fc1 && use_fused_lora_activation();
  // Each sorted row's slot, recorded by the routing's gather (or the permute): the decode GEMVs' LoRA epilogue
  // and the LoRA-in-GEMM operand read a row's slot there.
  const bool need_row_slot = (decode && d.has_lora) || lora_in_fc1 || lora_in_fc2;
  at::Tensor row_slot = at::empty({need_row_slot ? pairs : 0}, iopt);
  // A one-kernel routing also does the permute stage (one launch less; its other blocks copy the rows while the
  // first one plans). MOELORA_ROUTING_GATHER=0 keeps the permute kernel above decode sizes, to compare.
  // MOELORA_ROUTING_FEW_PAIRS=0: the one-block kernel also for the fewest pairs (kept to compare, NOTES.md v12).
  const int few_pairs_max = env_zero("MOELORA_ROUTING_FEW_PAIRS") ? 0 : mc::kFewPairsMax;
  const bool gather_in_routing = mc::routing_can_gather(pairs, nbuckets, few_pairs_max) &&
                                 (decode || !env_zero("MOELORA_ROUTING_GATHER"));
  // Decode with at most few_pairs_max pairs, launched with PDL (T <= 4 by default), at T = 1 or without LoRA: the
  // routing runs beside fc1's GEMV, which finds its rows from the ids itself and reads the tokens' rows
  // (expert_gemv.cu), so the routing writes the row maps but copies no rows. Measured on the H100 (NOTES.md v29,
  // graph, 100 interleaved replays, T = 1, base / R16): qwen3 -1.1 / -2.4 µs, gpt-oss +0.5 / -0.8, mixtral -0.7 /
  // -1.3. Without PDL fc1 cannot start before the routing ends, and routing its own rows cost it 1-4 µs (T = 2 /
  // 4). At T = 2-4 (PDL since v30) it gains the base call 0-4 µs on qwen3 / gpt-oss (v30, interleaved replays), but
  // the call with LoRA lost 2-24 µs (v30 runs 1-2, mixtral T=4 most; not broken down), so with LoRA it runs at
  // T = 1 only.
  // MOELORA_DECODE_ROUTING_BESIDE=0 keeps fc1 after the routing, on its gathered rows (to compare).
  const bool routing_beside_fc1 = decode && pdl && gather_in_routing && pairs <= few_pairs_max &&
                                  (d.T == 1 || !d.has_lora) && !env_zero("MOELORA_DECODE_ROUTING_BESIDE");
  // fc1's LoRA shrink on the second stream beside the permute's copy; it reads token rows.
  const bool beside_permute = use_shrink_beside_permute(serial_lora, gather_in_routing);
  // Each sorted row's token, recorded by the permute, for fc1's LoRA shrink (ShrinkRows).
  const bool token_rows_shrink =
      d.has_lora && !decode && lora_ws.lora_kernels &&
      use_token_rows_shrink(static_cast<int64_t>(pairs) * H * x.element_size(), device, beside_permute);
  const bool shrink_beside_permute = beside_permute && token_rows_shrink;
  at::Tensor row_token = at::empty({token_rows_shrink ? pairs : 0}, iopt);
  // Overlapped LoRA: the deltas and the second stream.
  at::Tensor gu_delta = at::empty({overlap ? pairs : 0, 2 * I}, x.options());
  at::Tensor y_delta = at::empty({overlap ? pairs : 0, H}, x.options());
  // The second stream: the overlapped LoRA's, or fc1's shrink beside the permute's copy.
  const cudaStream_t lora_stream =
      overlap || shrink_beside_permute ? c10::cuda::getStreamFromPool(false, device).stream() : stream;
  // The SMs each base GEMM runs on, sm_count but beside an overlapped LoRA (decided, and MOELORA_LORA_OVERLAP_SMS
  // checked, before anything is queued).
  const std::array<int, 2> gemm_sms =
      overlap ? overlap_gemm_sms(d, lora13, lora2, sm_count) : std::array<int, 2>{sm_count, sm_count};

  // ---- 1. routing ---------------------------------------------------------------------------------
  mc::RoutingParams rp{};
  rp.topk_ids = {ids.data_ptr(), ids.scalar_type() == at::kLong};
  rp.token_slots = d.has_lora ? token_slots.data_ptr<int>() : nullptr;
  rp.T = static_cast<int>(d.T); rp.k = static_cast<int>(d.k); rp.E = E; rp.S = S;
  rp.bucket_counts = bucket_counts.data_ptr<int>();
  rp.pair_rank = pair_rank.data_ptr<int>();
  rp.bucket_offsets = bucket_offsets.data_ptr<int>();
  rp.expert_offsets = expert_offsets.data_ptr<int>();
  rp.expert_tile_prefix = expert_tile_prefix.data_ptr<int>();
  rp.lora_tile_prefix = S > 0 ? lora_tile_prefix.data_ptr<int>() : nullptr;
  rp.lora_tile_segment = S > 0 ? lora_tile_segment.data_ptr<int>() : nullptr;
  rp.lora_tile_capacity = static_cast<int>(lora_tile_capacity);
  if (decode && d.has_lora) {  // the GEMVs' shrink partial sums: pending until written (expert_gemv.cu)
    MOELORA_CHECK(lora_ws.buf.numel() < (int64_t{1} << 31), "moelora::fused_moe on CUDA: the decode LoRA workspace (",
                  lora_ws.buf.numel(), " floats) is above 2^31");
    rp.fill_words = reinterpret_cast<unsigned*>(lora_ws.buf.data_ptr<float>());
    rp.fill_count = static_cast<int>(lora_ws.buf.numel());
    rp.fill_value = mc::kLoraTPending;
  }
  rp.few_pairs_max = few_pairs_max;
  if (gather_in_routing) {
    rp.gather_hidden = x.data_ptr(); rp.gather_permuted = routing_beside_fc1 ? nullptr : permuted.data_ptr();
    rp.gather_pair_row = pair_row.data_ptr<int>(); rp.H = H;
    rp.gather_row_slot = need_row_slot ? row_slot.data_ptr<int>() : nullptr;
    rp.gather_row_token = token_rows_shrink ? row_token.data_ptr<int>() : nullptr;
    // MOELORA_ROUTING_GATHER_PAIRS=8 sets 8 pairs per gather block instead of 16, to compare (NOTES.md v20).
    const int64_t block_pairs = env_int("MOELORA_ROUTING_GATHER_PAIRS", 0);
    MOELORA_CHECK(block_pairs == 0 || block_pairs == 8 || block_pairs == 16,
                  "MOELORA_ROUTING_GATHER_PAIRS must be 0, 8 or 16, got ", block_pairs);
    rp.gather_block_pairs = static_cast<int>(block_pairs);
  }
  // Both base GEMMs, their group tables written by the routing (not at decode sizes: expert_gemv.cu needs
  // none). fc2 writes into the gathered input's buffer (permuted), which is dead once fc1 and its LoRA shrink
  // have run.
  at::Tensor& y = permuted;
  BaseGemms base;
  if (!decode) {
    base.sm90 = sm90_gemms;
    base.fc1 = fc1_params;
    if (!gated_fc1) base.fc1.D = gu.data_ptr();
    if (gated_fc1) base.fc1.gated = act == mc::ActivationKind::Silu ? mc::GatedOutput::Silu : mc::GatedOutput::Gelu;
    if (lora_in_fc1) base.fc1.lora_k = lora_k_operands(lora13, lora_t.data_ptr(), row_slot.data_ptr<int>(), d, 2 * I);
    base.fc2 = fc2_params;
    if (lora_in_fc2) base.fc2.lora_k = lora_k_operands(lora2, lora_t.data_ptr(), row_slot.data_ptr<int>(), d, H);
    prepare_base_gemms(base, x.options(), sm_count, rp);
  }
  C10_CUDA_CHECK(mc::launch_routing(rp, stream));

  // Decode: the GEMVs (their LoRA fields are set by lora_in_gemv).
  mc::ExpertGemvParams gemv{};
  gemv.expert_offsets = expert_offsets.data_ptr<int>();
  gemv.expert_tile_prefix = expert_tile_prefix.data_ptr<int>();
  gemv.bucket_offsets = bucket_offsets.data_ptr<int>();
  gemv.seg_per_expert = S + 1;
  gemv.E = E; gemv.max_rows = pairs;
  gemv.activation = act;
  gemv.dtype = to_dtype(dtype);
  gemv.weight_load_hints = !env_zero("MOELORA_GEMV_LOAD_HINTS");

  // ---- 2. permute (gather rows into expert-major order) -------------------------------------------
  mc::PermuteParams pp{};
  pp.hidden = x.data_ptr(); pp.topk_ids = rp.topk_ids; pp.token_slots = rp.token_slots;
  pp.pair_rank = rp.pair_rank; pp.bucket_offsets = rp.bucket_offsets;
  pp.T = rp.T; pp.k = rp.k; pp.E = E; pp.S = S; pp.H = H;
  pp.pair_row = pair_row.data_ptr<int>(); pp.permuted = permuted.data_ptr(); pp.dtype = to_dtype(dtype);
  pp.row_slot = need_row_slot ? row_slot.data_ptr<int>() : nullptr;
  pp.row_token = token_rows_shrink ? row_token.data_ptr<int>() : nullptr;

  // fc1's LoRA shrink of the serial LoRA: into t for the LoRA inside fc1's GEMM, or into ws.buf for the expand.
  ShrinkRows fc1_rows;
  if (token_rows_shrink) fc1_rows = {x.data_ptr(), H, row_token.data_ptr<int>()};
  auto fc1_shrink = [&](cudaStream_t s) {
    if (lora_in_fc1)
      run_lora_shrink_to_t(lora13, permuted, fc1_rows, lora_ws, lora_ws.k_splits_fc1, bucket_offsets,
                           lora_tile_prefix, lora_tile_segment, row_slot, expert_offsets, scale_ptr, lora_t, d, H,
                           sm_count, s);
    else
      run_lora_shrink(lora13, permuted, fc1_rows, lora_ws, lora_ws.k_splits_fc1, bucket_offsets, lora_tile_prefix,
                      lora_tile_segment, d, H, sm_count, s);
  };
  // main_work() on this stream and lora_work() beside it on the LoRA stream: forked after what this stream has
  // queued, joined before what follows. `main_first` queues main_work's launches before the LoRA's (a base GEMM
  // takes its SMs first), else after them (the shrink starts before the permute's copy). The LoRA stream's
  // launches are plain: its first kernel follows the fork's event wait, not a kernel.
  auto run_beside = [&](auto&& main_work, auto&& lora_work, bool main_first) {
    StreamEvent forked, joined;
    forked.record(stream);
    if (main_first) main_work();
    forked.block(lora_stream);
    {
      const mc::ScopedLaunchPolicy plain(false);
      lora_work();
    }
    joined.record(lora_stream);
    if (!main_first) main_work();
    joined.block(stream);
  };

  if (shrink_beside_permute) {
    // The row maps, then the shrink on the second stream beside the copy; joined before fc1's GEMM.
    pp.stage = mc::PermuteParams::Stage::Rows;
    C10_CUDA_CHECK(mc::launch_permute(pp, stream));
    pp.stage = mc::PermuteParams::Stage::Copy;
    run_beside([&] { C10_CUDA_CHECK(mc::launch_permute(pp, stream)); }, [&] { fc1_shrink(lora_stream); }, false);
  } else if (!gather_in_routing) {
    C10_CUDA_CHECK(mc::launch_permute(pp, stream));
  }

  // The base GEMM `which` on its SMs, and lora_work() beside it on the LoRA stream (the GEMM queued first).
  auto gemm_beside = [&](int which, auto&& lora_work) {
    run_beside([&] { run_base_gemm(base, which, expert_tile_prefix, d, gemm_sms[which], stream); }, lora_work, true);
  };

  // ---- 3-5. fc1 + LoRA, activation -----------------------------------------------------------------
  if (decode) {
    if (d.has_lora)
      lora_in_gemv(lora13, lora_ws.buf.data_ptr<float>(), lora_ws.k_splits_fc1, lora_tile_prefix, lora_tile_segment,
                   static_cast<int>(lora_tile_capacity), row_slot, scale_ptr, d, 2 * I, H, gemv);
    gemv.X = permuted.data_ptr(); gemv.W = w13c.data_ptr(); gemv.D = h.data_ptr();
    gemv.N = 2 * I; gemv.K = H; gemv.gated = true;
    if (routing_beside_fc1) {
      gemv.X = x.data_ptr();  // the tokens' rows
      gemv.topk_ids = rp.topk_ids; gemv.token_slots = rp.token_slots;
      gemv.T = rp.T; gemv.k = rp.k; gemv.S = S;
    }
    C10_CUDA_CHECK(mc::launch_expert_gemv(gemv, stream));
    gemv.topk_ids = {};  // fc2 reads the routing's tables
  } else {
    const GatedExpandOut gated{&h, act};
    if (overlap) {
      gemm_beside(0, [&] {
        C10_CUDA_CHECK(cudaMemsetAsync(gu_delta.data_ptr(), 0, gu_delta.nbytes(), lora_stream));
        run_lora(lora13, permuted, fc1_rows, lora_ws, lora_ws.k_splits_fc1, nullptr, gu_delta,
                 bucket_offsets, lora_tile_prefix, lora_tile_segment, scale_ptr, d, 2 * I, H, sm_count, lora_stream);
      });
    } else if (lora_in_fc1) {
      if (!shrink_beside_permute) fc1_shrink(stream);
      run_base_gemm(base, 0, expert_tile_prefix, d, sm_count, stream);
    } else {
      run_base_gemm(base, 0, expert_tile_prefix, d, sm_count, stream);
      if (d.has_lora)
        run_lora(lora13, permuted, fc1_rows, lora_ws, lora_ws.k_splits_fc1, fused_act ? &gated : nullptr, gu,
                 bucket_offsets, lora_tile_prefix, lora_tile_segment, scale_ptr, d, 2 * I, H, sm_count, stream,
                 shrink_beside_permute);
    }
    if (!gated_fc1) {  // the gated GEMM wrote h itself
      mc::ActivationParams ap{};
      ap.gu = gu.data_ptr(); ap.h = h.data_ptr(); ap.num_rows = expert_offsets.data_ptr<int>() + E;
      if (overlap) ap.gu_delta = gu_delta.data_ptr();
      if (fused_act) {  // the rows without an adapter only: each expert's first bucket
        ap.bucket_offsets = bucket_offsets.data_ptr<int>(); ap.num_experts = E; ap.per_expert = S + 1;
        ap.sm_count = sm_count;
      }
      ap.max_rows = pairs; ap.I = I;
      ap.kind = act;
      ap.dtype = to_dtype(dtype);
      const mc::ScopedLaunchPolicy act_policy(pdl_tail);
      C10_CUDA_CHECK(mc::launch_activation(ap, stream));
    }
  }

  // ---- 6-7. fc2 + LoRA, then finalize -------------------------------------------------------------
  if (decode) {
    if (d.has_lora)
      lora_in_gemv(lora2, lora_ws.buf.data_ptr<float>() + int64_t{lora_ws.k_splits_fc1} * pairs * d.R,
                   lora_ws.k_splits_fc2, lora_tile_prefix, lora_tile_segment, static_cast<int>(lora_tile_capacity),
                   row_slot, scale_ptr, d, H, I, gemv);
    gemv.X = h.data_ptr(); gemv.W = w2c.data_ptr(); gemv.D = y.data_ptr();
    gemv.N = H; gemv.K = I; gemv.gated = false;
    // With LoRA too under the call's policy: v20 launched it plainly (PDL made qwen3 T=1 1.4 µs slower while
    // kernels triggered their dependents before their own wait); since every kernel waits first (pdl.cuh) PDL
    // is 0.5-1.3 µs faster here (NOTES.md v21).
    C10_CUDA_CHECK(mc::launch_expert_gemv(gemv, stream));
  } else if (overlap) {
    gemm_beside(1, [&] {
      C10_CUDA_CHECK(cudaMemsetAsync(y_delta.data_ptr(), 0, y_delta.nbytes(), lora_stream));
      run_lora(lora2, h, ShrinkRows{}, lora_ws, lora_ws.k_splits_fc2, nullptr, y_delta, bucket_offsets,
               lora_tile_prefix, lora_tile_segment, scale_ptr, d, H, I, sm_count, lora_stream);
    });
  } else if (lora_in_fc2) {
    run_lora_shrink_to_t(lora2, h, ShrinkRows{}, lora_ws, lora_ws.k_splits_fc2, bucket_offsets, lora_tile_prefix,
                         lora_tile_segment, row_slot, expert_offsets, scale_ptr, lora_t, d, I, sm_count, stream);
    run_base_gemm(base, 1, expert_tile_prefix, d, sm_count, stream);
  } else {
    run_base_gemm(base, 1, expert_tile_prefix, d, sm_count, stream);
    if (d.has_lora)
      run_lora(lora2, h, ShrinkRows{}, lora_ws, lora_ws.k_splits_fc2, nullptr, y, bucket_offsets, lora_tile_prefix,
               lora_tile_segment, scale_ptr, d, H, I, sm_count, stream);
  }
  mc::FinalizeParams fp{};
  fp.y = y.data_ptr(); fp.pair_row = pp.pair_row;
  fp.y_delta = overlap ? y_delta.data_ptr() : nullptr;
  fp.topk_weights = weights.data_ptr(); fp.topk_weights_fp32 = weights.scalar_type() == at::kFloat;
  fp.out = out.data_ptr(); fp.T = rp.T; fp.k = rp.k; fp.H = H; fp.dtype = to_dtype(dtype);
  const mc::ScopedLaunchPolicy finalize_policy(pdl_tail);
  C10_CUDA_CHECK(mc::launch_finalize(fp, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moelora, CUDA, m) { m.impl("fused_moe", &fused_moe_cuda); }

}  // namespace moelora
