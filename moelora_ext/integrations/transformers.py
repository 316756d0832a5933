"""The "moelora" experts implementation for transformers 5.

``import moelora_ext`` calls ``register()``, which adds ``"moelora"`` to transformers' ``ExpertsInterface``
(``ExpertsInterface.register("moelora", moelora_experts_forward)``, a class-level mapping shared by every
interface instance). Models whose experts class is decorated with ``@use_experts_implementation`` then accept

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="moelora")   # or from_config(...)
    model.set_experts_implementation("moelora")

and every experts forward ``(self, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` runs
``moelora_ext.fused_moe``. Without a pool, or outside ``use_adapters``, the op runs without LoRA (the base
model). Inside ``use_adapters`` the per-row slot ids [B] are expanded to per-token ids [T = B*L] (tokens of batch
row b get row b's slot) and the pool's slot buffers are passed with the pool's shared flags.

Experts modules the op cannot express (biases, interleaved gate/up, custom gate as gpt-oss, ungated, other
activations; see layout.py) run transformers' own ``grouped_mm`` forward instead, and refuse adapters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import fused_moe
from .layout import expert_weights, experts_layout

__all__ = ["register", "moelora_experts_forward", "IMPLEMENTATION_NAME"]

IMPLEMENTATION_NAME = "moelora"


def moelora_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    layout = experts_layout(self)
    rows = self.__dict__.get("_moelora_rows")
    if not layout.supported:
        if rows is not None:
            raise NotImplementedError(f"{type(self).__name__}: LoRA through moelora is not supported: {layout.reason}")
        from transformers.integrations.moe import grouped_mm_experts_forward
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    w13, w2 = expert_weights(self, layout)
    if hidden_states.dtype != w13.dtype:  # e.g. fp32 activations with bf16 experts: compute in the weights' dtype
        out_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(w13.dtype)
    else:
        out_dtype = None
    if top_k_weights.dtype not in (torch.float32, hidden_states.dtype):
        top_k_weights = top_k_weights.float()
    if rows is None:
        out = fused_moe(hidden_states, w13, w2, top_k_weights, top_k_index, activation=layout.activation)
    else:
        T, B = hidden_states.shape[0], rows.shape[0]
        if not torch.compiler.is_compiling() and T % B != 0:
            raise ValueError(f"use_adapters: {T} tokens reached {type(self).__name__}, not a multiple of the "
                             f"{B} rows given to use_adapters (the batch size must equal len(names_per_row))")
        token_ids = rows[:, None].expand(B, T // B).reshape(T)
        f13a, f13b, f2a, f2b = self.__dict__["_moelora_flags"]
        scalings = self.moelora_scalings
        if scalings.dtype != torch.float32:
            scalings = scalings.float()
        out = fused_moe(hidden_states, w13, w2, top_k_weights, top_k_index, token_ids,
                        self.moelora_w13_a, self.moelora_w13_b, self.moelora_w2_a, self.moelora_w2_b, scalings,
                        f13a, f13b, f2a, f2b, layout.activation)
    return out if out_dtype is None else out.to(out_dtype)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(IMPLEMENTATION_NAME, moelora_experts_forward)
