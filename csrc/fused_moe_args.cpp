// Shape/dtype/device checks for moelora::fused_moe (see fused_moe_args.h). The Python mirror of these
// rules is moelora_ext/_validation.py; keep the two in step.
#include "fused_moe_args.h"
#include "check_message.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace moelora {
namespace {

constexpr const char* kOp = "moelora::fused_moe: ";


// `name` must have exactly `expected` (written symbolically as `symbolic`, e.g. "[E, 2I, H]").
void check_shape(const at::Tensor& t, const char* name, const char* symbolic, const std::vector<int64_t>& expected) {
  MOELORA_CHECK(t.dim() == static_cast<int64_t>(expected.size()), kOp, name, " must be ", expected.size(),
              "-D with shape ", symbolic, " = ", c10::IntArrayRef(expected), ", got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
  MOELORA_CHECK(t.sizes() == c10::IntArrayRef(expected), kOp, name, " must have shape ", symbolic, " = ",
              c10::IntArrayRef(expected), ", got ", t.sizes());
}

void check_rank(const at::Tensor& t, const char* name, int64_t dim, const char* symbolic) {
  MOELORA_CHECK(t.dim() == dim, kOp, name, " must be ", dim, "-D with shape ", symbolic, ", got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected, const char* why) {
  MOELORA_CHECK(t.scalar_type() == expected, kOp, name, " must have dtype ", expected, " (", why,
              "), got ", t.scalar_type());
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  MOELORA_CHECK(t.device() == device, kOp, name, " must be on the device of hidden_states (", device, "), got ",
              t.device());
}

// A LoRA tensor whose expert dim is dropped when `shared` is set: its rank must agree with the flag.
void check_lora_rank(const at::Tensor& t, const char* name, const char* flag, bool shared, const char* sym_shared,
                     const char* sym_full) {
  const int64_t want_dim = shared ? 3 : 4;
  MOELORA_CHECK(t.dim() == want_dim, kOp, name, " must be ", want_dim, "-D with shape ", shared ? sym_shared : sym_full,
              " because ", flag, "=", shared ? "True" : "False", ", got a ", t.dim(), "-D tensor of shape ", t.sizes(),
              shared ? " (clear the flag for a per-expert tensor)" : " (set the flag for a tensor shared by all experts)");
}

void check_lora_tensor(const at::Tensor& t, const char* name, const char* flag, bool shared, int64_t S, int64_t E,
                       int64_t rows, int64_t cols, const char* sym_shared, const char* sym_full) {
  check_lora_rank(t, name, flag, shared, sym_shared, sym_full);
  if (shared) {
    check_shape(t, name, sym_shared, {S, rows, cols});
  } else {
    check_shape(t, name, sym_full, {S, E, rows, cols});
  }
}

}  // namespace

FusedMoeDims check_fused_moe_args(
    const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& topk_weights,
    const at::Tensor& topk_ids, const std::optional<at::Tensor>& token_lora_ids,
    const std::optional<at::Tensor>& w13_lora_a, const std::optional<at::Tensor>& w13_lora_b,
    const std::optional<at::Tensor>& w2_lora_a, const std::optional<at::Tensor>& w2_lora_b,
    const std::optional<at::Tensor>& lora_scalings, bool w13_shared_a, bool w13_shared_b, bool w2_shared_a,
    bool w2_shared_b, std::string_view activation) {
  FusedMoeDims d{};

  // Activation.
  if (activation == "silu") {
    d.activation = Activation::Silu;
  } else if (activation == "gelu") {
    d.activation = Activation::Gelu;
  } else {
    MOELORA_CHECK(false, kOp, "activation must be \"silu\" or \"gelu\", got \"", std::string(activation), "\"");
  }

  // Base shapes: hidden_states [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k].
  check_rank(hidden_states, "hidden_states", 2, "[T, H]");
  d.T = hidden_states.size(0);
  d.H = hidden_states.size(1);
  MOELORA_CHECK(d.H >= 1, kOp, "hidden_states must have H >= 1 columns, got shape ", hidden_states.sizes());
  check_rank(w13, "w13", 3, "[E, 2I, H]");
  d.E = w13.size(0);
  MOELORA_CHECK(d.E >= 1, kOp, "w13 must hold at least one expert (E >= 1), got shape ", w13.sizes());
  MOELORA_CHECK(w13.size(1) >= 2 && w13.size(1) % 2 == 0, kOp,
              "w13 must have shape [E, 2I, H] (gate rows then up rows) with an even, non-zero second dim, got ",
              w13.sizes());
  d.I = w13.size(1) / 2;
  check_shape(w13, "w13", "[E, 2I, H]", {d.E, 2 * d.I, d.H});
  check_shape(w2, "w2", "[E, H, I]", {d.E, d.H, d.I});
  check_rank(topk_ids, "topk_ids", 2, "[T, k]");
  d.k = topk_ids.size(1);
  MOELORA_CHECK(d.k >= 1, kOp, "topk_ids must have k >= 1 columns, got shape ", topk_ids.sizes());
  check_shape(topk_ids, "topk_ids", "[T, k]", {d.T, d.k});
  check_shape(topk_weights, "topk_weights", "[T, k]", {d.T, d.k});

  // Base dtypes.
  const auto dtype = hidden_states.scalar_type();
  MOELORA_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              "hidden_states must have dtype torch.float32, torch.bfloat16 or torch.float16, got ", dtype);
  check_dtype(w13, "w13", dtype, "the dtype of hidden_states");
  check_dtype(w2, "w2", dtype, "the dtype of hidden_states");
  MOELORA_CHECK(topk_weights.scalar_type() == at::kFloat || topk_weights.scalar_type() == dtype, kOp,
              "topk_weights must have dtype torch.float32 or ", dtype, " (the dtype of hidden_states), got ",
              topk_weights.scalar_type());
  MOELORA_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong, kOp,
              "topk_ids must have dtype torch.int32 or torch.int64, got ", topk_ids.scalar_type());

  // Devices.
  const at::Device device = hidden_states.device();
  check_device(w13, "w13", device);
  check_device(w2, "w2", device);
  check_device(topk_weights, "topk_weights", device);
  check_device(topk_ids, "topk_ids", device);

  // LoRA: token_lora_ids and the four LoRA tensors come together or not at all.
  const bool given[5] = {token_lora_ids.has_value(), w13_lora_a.has_value(), w13_lora_b.has_value(),
                         w2_lora_a.has_value(), w2_lora_b.has_value()};
  const char* names[5] = {"token_lora_ids", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b"};
  int n_given = 0;
  for (bool g : given) n_given += g ? 1 : 0;
  if (n_given != 0 && n_given != 5) {
    std::string have, missing;
    for (int i = 0; i < 5; ++i) {
      std::string& dst = given[i] ? have : missing;
      dst += (dst.empty() ? "" : ", ") + std::string(names[i]);
    }
    MOELORA_CHECK(false, kOp, "LoRA is all-or-none: token_lora_ids, w13_lora_a, w13_lora_b, w2_lora_a and w2_lora_b "
                "must be given together; got ", have, " but not ", missing);
  }
  d.has_lora = n_given == 5;
  if (!d.has_lora) {
    MOELORA_CHECK(!lora_scalings.has_value(), kOp,
                "lora_scalings was given without LoRA tensors (token_lora_ids, w13_lora_a, ...); pass both or neither");
    MOELORA_CHECK(!(w13_shared_a || w13_shared_b || w2_shared_a || w2_shared_b), kOp,
                "a *_shared_* flag is set but no LoRA tensors were given (w13_shared_a=", w13_shared_a,
                ", w13_shared_b=", w13_shared_b, ", w2_shared_a=", w2_shared_a, ", w2_shared_b=", w2_shared_b, ")");
    d.S = 0;
    d.R = 0;
    return d;
  }

  const at::Tensor& a13 = *w13_lora_a;
  const at::Tensor& b13 = *w13_lora_b;
  const at::Tensor& a2 = *w2_lora_a;
  const at::Tensor& b2 = *w2_lora_b;
  // S and R come from w13_lora_a: [S, E, R, H] or [S, R, H].
  check_lora_rank(a13, "w13_lora_a", "w13_shared_a", w13_shared_a, "[S, R, H]", "[S, E, R, H]");
  d.S = a13.size(0);
  d.R = a13.size(-2);
  MOELORA_CHECK(d.S >= 1, kOp, "w13_lora_a must hold at least one adapter slot (S >= 1), got shape ", a13.sizes());
  MOELORA_CHECK(d.R >= 1, kOp, "w13_lora_a must have rank R >= 1, got shape ", a13.sizes());
  check_lora_tensor(a13, "w13_lora_a", "w13_shared_a", w13_shared_a, d.S, d.E, d.R, d.H, "[S, R, H]", "[S, E, R, H]");
  check_lora_tensor(b13, "w13_lora_b", "w13_shared_b", w13_shared_b, d.S, d.E, 2 * d.I, d.R, "[S, 2I, R]",
                    "[S, E, 2I, R]");
  check_lora_tensor(a2, "w2_lora_a", "w2_shared_a", w2_shared_a, d.S, d.E, d.R, d.I, "[S, R, I]", "[S, E, R, I]");
  check_lora_tensor(b2, "w2_lora_b", "w2_shared_b", w2_shared_b, d.S, d.E, d.H, d.R, "[S, H, R]", "[S, E, H, R]");
  check_shape(*token_lora_ids, "token_lora_ids", "[T]", {d.T});

  check_dtype(a13, "w13_lora_a", dtype, "the dtype of hidden_states");
  check_dtype(b13, "w13_lora_b", dtype, "the dtype of hidden_states");
  check_dtype(a2, "w2_lora_a", dtype, "the dtype of hidden_states");
  check_dtype(b2, "w2_lora_b", dtype, "the dtype of hidden_states");
  check_dtype(*token_lora_ids, "token_lora_ids", at::kInt, "adapter slot ids");

  check_device(a13, "w13_lora_a", device);
  check_device(b13, "w13_lora_b", device);
  check_device(a2, "w2_lora_a", device);
  check_device(b2, "w2_lora_b", device);
  check_device(*token_lora_ids, "token_lora_ids", device);

  if (lora_scalings.has_value()) {
    check_shape(*lora_scalings, "lora_scalings", "[S]", {d.S});
    check_dtype(*lora_scalings, "lora_scalings", at::kFloat, "per-slot scale factors");
    check_device(*lora_scalings, "lora_scalings", device);
  }
  return d;
}

}  // namespace moelora
