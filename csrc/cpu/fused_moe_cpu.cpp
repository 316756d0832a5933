// CPU implementation of moelora::fused_moe. Pairs (t, j) are bucketed by (expert, slot); each expert then
// runs dense fp32 GEMMs over its rows, with each slot's LoRA added on its contiguous sub-block. Experts are
// spread over ATen threads (at::parallel_for); the top-k sum runs afterwards in a fixed order, so results
// are deterministic. Math in fp32 whatever the input dtype; the output has the dtype of hidden_states.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

#include "../check_message.h"
#include "../fused_moe_args.h"

namespace moelora {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The [rows, cols] matrix of a LoRA tensor for (slot s, expert e): [S, E, rows, cols], or [S, rows, cols]
// when shared by all experts. Returned in fp32 (a view when the input already is fp32).
at::Tensor lora_matrix(const at::Tensor& t, bool shared, int64_t s, int64_t e) {
  at::Tensor m = shared ? t.select(0, s) : t.select(0, s).select(0, e);
  return m.to(at::kFloat);
}

struct LoraArgs {
  const at::Tensor* a13;  // [S, E, R, H] | [S, R, H]
  const at::Tensor* b13;  // [S, E, 2I, R] | [S, 2I, R]
  const at::Tensor* a2;   // [S, E, R, I] | [S, R, I]
  const at::Tensor* b2;   // [S, E, H, R] | [S, H, R]
  bool shared_a13, shared_b13, shared_a2, shared_b2;
  std::vector<float> scale;  // [S]
};

// Rows of one expert, grouped by slot: bucket (e, s) holds rows [offsets[e*(S+1)+s+1], offsets[e*(S+1)+s+2])
// of the row order, bucket (e, -1) (no adapter) comes first.
void run_expert(int64_t e, const FusedMoeDims& d, const std::vector<int64_t>& offsets, const at::Tensor& x_all,
                const at::Tensor& token_of_row, const at::Tensor& pair_of_row, const at::Tensor& w13,
                const at::Tensor& w2, const LoraArgs* lora, at::Tensor& y_all) {
  const int64_t S1 = d.S + 1;
  const int64_t begin = offsets[e * S1], end = offsets[(e + 1) * S1];
  const int64_t n = end - begin;
  if (n == 0) return;

  const at::Tensor x = x_all.index_select(0, token_of_row.narrow(0, begin, n));  // [n, H]
  at::Tensor gu = at::mm(x, w13.select(0, e).to(at::kFloat).t());                // [n, 2I]
  if (lora != nullptr) {
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t rb = offsets[e * S1 + s + 1], re = offsets[e * S1 + s + 2];
      if (rb == re) continue;
      const at::Tensor xs = x.narrow(0, rb - begin, re - rb);                                   // [ns, H]
      const at::Tensor shrink = at::mm(xs, lora_matrix(*lora->a13, lora->shared_a13, s, e).t());  // [ns, R]
      const at::Tensor expand = at::mm(shrink, lora_matrix(*lora->b13, lora->shared_b13, s, e).t());  // [ns, 2I]
      gu.narrow(0, rb - begin, re - rb).add_(expand, lora->scale[s]);
    }
  }

  const at::Tensor gate = gu.narrow(1, 0, d.I), up = gu.narrow(1, d.I, d.I);
  const at::Tensor h = (d.activation == Activation::Silu ? at::silu(gate) : at::gelu(gate)) * up;  // [n, I]

  at::Tensor y = at::mm(h, w2.select(0, e).to(at::kFloat).t());  // [n, H]
  if (lora != nullptr) {
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t rb = offsets[e * S1 + s + 1], re = offsets[e * S1 + s + 2];
      if (rb == re) continue;
      const at::Tensor hs = h.narrow(0, rb - begin, re - rb);                                   // [ns, I]
      const at::Tensor shrink = at::mm(hs, lora_matrix(*lora->a2, lora->shared_a2, s, e).t());  // [ns, R]
      const at::Tensor expand = at::mm(shrink, lora_matrix(*lora->b2, lora->shared_b2, s, e).t());  // [ns, H]
      y.narrow(0, rb - begin, re - rb).add_(expand, lora->scale[s]);
    }
  }
  y_all.index_copy_(0, pair_of_row.narrow(0, begin, n), y);  // rows of distinct experts never overlap
}

at::Tensor fused_moe_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids, const OptTensor& token_lora_ids,
                         const OptTensor& w13_lora_a, const OptTensor& w13_lora_b, const OptTensor& w2_lora_a,
                         const OptTensor& w2_lora_b, const OptTensor& lora_scalings, bool w13_shared_a,
                         bool w13_shared_b, bool w2_shared_a, bool w2_shared_b, std::string_view activation) {
  const FusedMoeDims d = check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids,
                                              w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b, lora_scalings,
                                              w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b, activation);
  // The kernel's own ATen calls must not record autograd history (weights are often nn.Parameters),
  // here or on the worker threads (which inherit this through ThreadLocalState below).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor out = at::empty({d.T, d.H}, hidden_states.options());
  if (d.T == 0) return out;

  // Slot of every token ([T], -1 = no adapter); ids outside [-1, S) are an error on CPU.
  std::vector<int64_t> slot_of_token(d.T, -1);
  if (d.has_lora) {
    const at::Tensor slots = token_lora_ids->contiguous();
    const int32_t* p = slots.data_ptr<int32_t>();
    for (int64_t t = 0; t < d.T; ++t) {
      MOELORA_CHECK(p[t] >= -1 && p[t] < d.S, "moelora::fused_moe: token_lora_ids[", t, "] = ", p[t],
                  " is outside [-1, S) = [-1, ", d.S, ")");
      slot_of_token[t] = p[t];
    }
  }

  // Bucket the pairs p = t*k + j with a valid expert by (expert, slot) with a counting sort; pairs whose
  // expert id is outside [0, E) are dropped (they contribute nothing).
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();  // [T, k]
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t S1 = d.S + 1, pairs = d.T * d.k;
  auto bucket_of = [&](int64_t p) { return id[p] * S1 + slot_of_token[p / d.k] + 1; };
  std::vector<int64_t> offsets(d.E * S1 + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    if (id[p] >= 0 && id[p] < d.E) ++offsets[bucket_of(p) + 1];
  }
  for (size_t b = 1; b < offsets.size(); ++b) offsets[b] += offsets[b - 1];
  const int64_t rows = offsets.back();
  at::Tensor pair_of_row = at::empty({rows}, at::kLong), token_of_row = at::empty({rows}, at::kLong);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    int64_t* pr = pair_of_row.data_ptr<int64_t>();
    int64_t* tr = token_of_row.data_ptr<int64_t>();
    for (int64_t p = 0; p < pairs; ++p) {
      if (id[p] < 0 || id[p] >= d.E) continue;
      const int64_t r = cursor[bucket_of(p)]++;
      pr[r] = p;
      tr[r] = p / d.k;
    }
  }

  std::optional<LoraArgs> lora;
  if (d.has_lora) {
    lora = LoraArgs{&*w13_lora_a, &*w13_lora_b, &*w2_lora_a, &*w2_lora_b, w13_shared_a, w13_shared_b,
                    w2_shared_a, w2_shared_b, std::vector<float>(d.S, 1.0f)};
    if (lora_scalings.has_value()) {
      const at::Tensor c = lora_scalings->contiguous();
      std::copy(c.data_ptr<float>(), c.data_ptr<float>() + d.S, lora->scale.begin());
    }
  }

  const at::Tensor x_all = hidden_states.to(at::kFloat);  // [T, H]
  at::Tensor y_all = at::zeros({pairs, d.H}, x_all.options());  // [T*k, H], row p = output of pair p
  std::vector<int64_t> active;
  for (int64_t e = 0; e < d.E; ++e) {
    if (offsets[(e + 1) * S1] > offsets[e * S1]) active.push_back(e);
  }
  const LoraArgs* lp = lora ? &*lora : nullptr;
  const int64_t n_active = static_cast<int64_t>(active.size());
  if (n_active >= at::get_num_threads()) {
    // Enough experts to keep every thread busy: one expert per task, the GEMMs inside run single-threaded.
    const at::ThreadLocalState tls;  // grad mode, dispatch keys etc. of the calling thread
    at::parallel_for(0, n_active, 1, [&](int64_t i0, int64_t i1) {
      at::ThreadLocalStateGuard guard(tls);
      for (int64_t i = i0; i < i1; ++i) {
        run_expert(active[i], d, offsets, x_all, token_of_row, pair_of_row, w13, w2, lp, y_all);
      }
    });
  } else {
    // Few busy experts: let each GEMM use all threads instead.
    for (int64_t e : active) run_expert(e, d, offsets, x_all, token_of_row, pair_of_row, w13, w2, lp, y_all);
  }

  // out[t] = sum_j topk_weights[t, j] * y[t*k + j], dropped pairs weighted 0 (their y rows are zero).
  const at::Tensor valid = (ids >= 0).logical_and_(ids < d.E);
  const at::Tensor w = at::where(valid, topk_weights.to(at::kFloat), 0.0f);  // [T, k]
  out.copy_((y_all.view({d.T, d.k, d.H}) * w.unsqueeze(-1)).sum(1));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moelora, CPU, m) { m.impl("fused_moe", &fused_moe_cpu); }

}  // namespace moelora
