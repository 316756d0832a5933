"""Python face of the moelora ops: the documented ``fused_moe`` wrapper and the fake (meta) kernel."""
from typing import Optional

import os

import torch
from torch import Tensor

from ._validation import check_slot_ids, raise_value_error, torch_check, validate_fused_moe


def fused_moe(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    token_lora_ids: Optional[Tensor] = None,
    w13_lora_a: Optional[Tensor] = None,
    w13_lora_b: Optional[Tensor] = None,
    w2_lora_a: Optional[Tensor] = None,
    w2_lora_b: Optional[Tensor] = None,
    lora_scalings: Optional[Tensor] = None,
    w13_shared_a: bool = False,
    w13_shared_b: bool = False,
    w2_shared_a: bool = False,
    w2_shared_b: bool = False,
    activation: str = "silu",
) -> Tensor:
    """Mixture-of-experts MLP with an optional LoRA adapter per token (``torch.ops.moelora.fused_moe``).

    For every pair (t, j) with expert ``e = topk_ids[t, j]`` and slot ``s = token_lora_ids[t]``::

        gu = W13[e] x + (s >= 0 ? c[s] * B13[s,e] (A13[s,e] x) : 0)    # [2I]: gate rows, then up rows
        h  = act(gu[:I]) * gu[I:]                                       # SwiGLU ("silu") or GeGLU ("gelu")
        y  = W2[e] h + (s >= 0 ? c[s] * B2[s,e] (A2[s,e] h) : 0)        # [H]
        out[t] = sum_j topk_weights[t, j] * y

    Math is in fp32; the output has the dtype of ``hidden_states``.

    Args:
        hidden_states: [T, H] float32, bfloat16 or float16 (bfloat16 or float16 on CUDA).
        w13: [E, 2I, H] expert gate and up projections (gate rows first; transformers' ``gate_up_proj``).
        w2: [E, H, I] expert down projections.
        topk_weights: [T, k] routing weights, float32 or the dtype of ``hidden_states``.
        topk_ids: [T, k] int32 or int64 expert ids; an id outside [0, E) (e.g. -1 for an expert that lives
            on another GPU) contributes nothing.
        token_lora_ids: [T] int32 adapter slot of each token in [-1, S); -1 = base model only.
        w13_lora_a: [S, E, R, H] (or [S, R, H] with ``w13_shared_a``) LoRA A of the fc1 projection.
        w13_lora_b: [S, E, 2I, R] (or [S, 2I, R] with ``w13_shared_b``) LoRA B of the fc1 projection.
        w2_lora_a: [S, E, R, I] (or [S, R, I] with ``w2_shared_a``) LoRA A of the fc2 projection.
        w2_lora_b: [S, E, H, R] (or [S, H, R] with ``w2_shared_b``) LoRA B of the fc2 projection.
            The four LoRA tensors and ``token_lora_ids`` come together or not at all. A slot whose
            rank is below R is zero-padded.
        lora_scalings: [S] float32 per-slot scale c[s] (default 1); only with the LoRA tensors.
        w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b: the matching LoRA tensor has no expert
            dim: one matrix per slot, shared by all experts.
        activation: "silu" or "gelu" (exact erf GELU, no tanh approximation).

    Returns:
        [T, H] tensor in the dtype of ``hidden_states`` ([0, H] when T = 0).

    Raises:
        ValueError: naming the argument, the shape/dtype it got and the one expected. Slot ids are checked
        for range here on CPU; on CUDA only when ``MOELORA_CHECK_IDS=1`` asks for it, since it needs a
        device sync (otherwise the CUDA kernel treats an id outside [-1, S) as -1, never reading out of
        bounds).
    """
    validate_fused_moe(raise_value_error, hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids,
                       w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b, lora_scalings,
                       w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b, activation)
    if token_lora_ids is not None and _can_read_values(token_lora_ids):
        check_slot_ids(token_lora_ids, w13_lora_a.shape[0])
    _warn_if_copied_per_call(w13, "w13")
    _warn_if_copied_per_call(w2, "w2")
    return torch.ops.moelora.fused_moe.default(
        hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids, w13_lora_a, w13_lora_b, w2_lora_a,
        w2_lora_b, lora_scalings, w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b, activation)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _warn_if_copied_per_call(weight: Tensor, name: str) -> None:
    """The CUDA op reads the expert weights with 16-byte vectors (TMA), so a weight that is not contiguous or
    does not start on a 16-byte boundary is copied to aligned memory on every call -- the whole tensor, GBs
    at real sizes. Say so (Python shows a warning once per call site by default). Not while torch.compile
    traces (no real pointers then)."""
    # Plain tensors and parameters only (fake / functional / other subclasses have no pointer to look at),
    # the common case first: a fraction of a µs per call.
    if weight.__class__ not in _PLAIN_TENSORS or torch.compiler.is_compiling():
        return
    if (weight.is_contiguous() and weight.data_ptr() % 16 == 0) or weight.device.type != "cuda":
        return
    import warnings
    why = "is not contiguous" if not weight.is_contiguous() else "does not start on a 16-byte boundary"
    size = f"{weight.nbytes / 2**20:.1f} MiB" if weight.nbytes >= 2**20 else f"{weight.nbytes / 2**10:.1f} KiB"
    warnings.warn(f"moelora.fused_moe: {name} {why}, so its {size} are copied on every call; "
                  f"pass a contiguous, aligned tensor (e.g. {name}.clone()) to avoid the copy", stacklevel=3)


def _can_read_values(t: Tensor) -> bool:
    """True where reading the tensor's values is free (a real CPU tensor) or asked for on a device with
    MOELORA_CHECK_IDS=1 (a host sync); never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type != "cpu" and os.environ.get("MOELORA_CHECK_IDS", "0") in ("", "0"):
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)


@torch.library.register_fake("moelora::fused_moe")
def _fused_moe_fake(hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids=None, w13_lora_a=None,
                    w13_lora_b=None, w2_lora_a=None, w2_lora_b=None, lora_scalings=None, w13_shared_a=False,
                    w13_shared_b=False, w2_shared_a=False, w2_shared_b=False, activation="silu"):
    T, H = validate_fused_moe(torch_check, hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids,
                              w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b, lora_scalings,
                              w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b, activation)
    return hidden_states.new_empty((T, H))
