"""Plain-PyTorch fp32 oracle for moelora::fused_moe, written to be obviously right rather than fast:
one loop iteration per (token, expert) pair, the math of the op spelled out line by line."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_moe_reference(
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
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Same arguments as ``moelora_ext.fused_moe`` (no validation), plus ``out_dtype`` (default: the dtype
    of ``hidden_states``; pass torch.float32 to keep the fp32 result unrounded)."""
    T, H = hidden_states.shape
    E, two_I, _ = w13.shape
    I = two_I // 2
    act = {"silu": F.silu, "gelu": F.gelu}[activation]
    has_lora = token_lora_ids is not None

    x = hidden_states.float()
    weights = topk_weights.float()
    ids = topk_ids.tolist()  # plain Python ints: no device sync per pair
    slots = token_lora_ids.tolist() if has_lora else [-1] * T
    if has_lora and lora_scalings is None:
        lora_scalings = torch.ones(w13_lora_a.shape[0])
    scale = lora_scalings.tolist() if has_lora else []

    def lora_matrix(tensor, shared, s, e):
        """[rows, cols] of slot s for expert e; a shared tensor has no expert dim."""
        return (tensor[s] if shared else tensor[s, e]).float()

    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    for t in range(T):
        s = slots[t]
        for j, e in enumerate(ids[t]):
            if not 0 <= e < E:
                continue  # expert lives elsewhere: contributes nothing
            gu = w13[e].float() @ x[t]  # [2I]
            if s >= 0:
                a = lora_matrix(w13_lora_a, w13_shared_a, s, e)  # [R, H]
                b = lora_matrix(w13_lora_b, w13_shared_b, s, e)  # [2I, R]
                gu = gu + scale[s] * (b @ (a @ x[t]))
            h = act(gu[:I]) * gu[I:]  # [I]
            y = w2[e].float() @ h  # [H]
            if s >= 0:
                a = lora_matrix(w2_lora_a, w2_shared_a, s, e)  # [R, I]
                b = lora_matrix(w2_lora_b, w2_shared_b, s, e)  # [H, R]
                y = y + scale[s] * (b @ (a @ h))
            out[t] += weights[t, j] * y
    return out.to(out_dtype or hidden_states.dtype)
