// Argument checks for moelora::fused_moe, shared by the CPU and CUDA implementations.
// Shapes and dtypes only: value checks (slot ids in range) need a host sync on CUDA, so they live in
// the backends. Every failure is a TORCH_CHECK naming the argument, what it got and what was expected.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace moelora {

enum class Activation { Silu, Gelu };

// T tokens, hidden size H, E experts, expert intermediate size I (w13 has 2I rows), k experts per token,
// S adapter slots and max rank R (both 0 when has_lora is false).
struct FusedMoeDims {
  int64_t T, H, E, I, k, S, R;
  bool has_lora;
  Activation activation;
};

// hidden_states [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k] (fp32 or hidden dtype);
// topk_ids [T, k] int32/int64; token_lora_ids [T] int32; w13_lora_a [S, E, R, H]; w13_lora_b [S, E, 2I, R];
// w2_lora_a [S, E, R, I]; w2_lora_b [S, E, H, R] (a *_shared_* flag drops the E dim); lora_scalings [S] fp32.
FusedMoeDims check_fused_moe_args(
    const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& topk_weights,
    const at::Tensor& topk_ids, const std::optional<at::Tensor>& token_lora_ids,
    const std::optional<at::Tensor>& w13_lora_a, const std::optional<at::Tensor>& w13_lora_b,
    const std::optional<at::Tensor>& w2_lora_a, const std::optional<at::Tensor>& w2_lora_b,
    const std::optional<at::Tensor>& lora_scalings, bool w13_shared_a, bool w13_shared_b, bool w2_shared_a,
    bool w2_shared_b, std::string_view activation);

}  // namespace moelora
