"""How a transformers-5 experts module stores its weights, and how that maps to the op's w13 / w2.

No transformers import at module level: the pool uses this on any model.

transformers 5 marks experts classes with ``@use_experts_implementation(is_concatenated=True, is_transposed=False,
has_bias=False, has_gate=True)``; the decorator's ``__init__`` stores those four flags on every instance. The
op needs ``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]``, which is exactly the default layout
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, ...), so
those weights are passed as they are, without a copy. ``is_transposed=True`` stores ``gate_up_proj [E, H, 2I]``
and ``down_proj [E, I, H]``: converted once and cached (re-converted when the parameter changes). Biases,
interleaved gate/up, ungated experts, a custom ``_apply_gate`` (gpt-oss's clamped GLU) or an activation other
than SiLU / exact GELU cannot be expressed by the op: such modules are "unsupported" (they run the
transformers ``grouped_mm`` path without adapters; loading adapters for them is refused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ExpertsLayout", "is_experts_module", "experts_layout", "expert_weights"]


@dataclass(frozen=True)
class ExpertsLayout:
    supported: bool
    reason: str          # why not supported ("" when supported)
    num_experts: int
    hidden: int
    inter: int
    transposed: bool
    activation: str      # "silu" / "gelu" ("" when unsupported)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers-5 fused experts module (decorated with ``use_experts_implementation``)."""
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and isinstance(getattr(module, "down_proj", None), Tensor)
            and (isinstance(getattr(module, "gate_up_proj", None), Tensor)
                 or isinstance(getattr(module, "up_proj", None), Tensor)))


def _activation_name(act) -> Optional[str]:
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    cls = type(act).__name__
    if cls == "SiLUActivation":
        return "silu"
    if cls == "GELUActivation":  # nn.functional.gelu or the erf python form: both exact GELU
        return "gelu"
    return None


def experts_layout(module: nn.Module) -> ExpertsLayout:
    cached = module.__dict__.get("_moelora_layout")
    if cached is not None:
        return cached
    layout = _compute_layout(module)
    module.__dict__["_moelora_layout"] = layout
    return layout


def _compute_layout(module: nn.Module) -> ExpertsLayout:
    def unsupported(reason, E=0, H=0, I=0):
        return ExpertsLayout(False, reason, E, H, I, bool(getattr(module, "is_transposed", False)), "")

    if not getattr(module, "has_gate", True) or getattr(module, "gate_up_proj", None) is None:
        return unsupported("ungated experts (has_gate=False)")
    gu, down = module.gate_up_proj, module.down_proj
    if gu.dim() != 3 or down.dim() != 3:
        return unsupported(f"expert weights are not 3D (gate_up_proj {tuple(gu.shape)}, down_proj "
                           f"{tuple(down.shape)})")
    transposed = bool(getattr(module, "is_transposed", False))
    if transposed:
        E, H, two_i = gu.shape
        down_expected = (E, two_i // 2, H)
    else:
        E, two_i, H = gu.shape
        down_expected = (E, H, two_i // 2)
    I = two_i // 2
    if two_i % 2 or tuple(down.shape) != down_expected:
        return unsupported(f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} do not form a gated "
                           f"MLP (transposed={transposed})", E, H, I)
    if getattr(module, "has_bias", False):
        return unsupported("expert biases (has_bias=True) are not supported by the op", E, H, I)
    if not getattr(module, "is_concatenated", True):
        return unsupported("interleaved gate/up rows (is_concatenated=False) are not supported", E, H, I)
    try:
        from transformers.integrations.moe import _default_apply_gate
        if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
            return unsupported(f"{type(module).__name__} has a custom _apply_gate (not act(gate) * up)", E, H, I)
    except ImportError:  # pragma: no cover
        pass
    act = _activation_name(getattr(module, "act_fn", None))
    if act is None:
        return unsupported(f"activation {type(getattr(module, 'act_fn', None)).__name__} is not SiLU or exact "
                           f"GELU", E, H, I)
    return ExpertsLayout(True, "", E, H, I, transposed, act)


def expert_weights(module: nn.Module, layout: ExpertsLayout) -> Tuple[Tensor, Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) for the op; no copy for the default layout."""
    if not layout.transposed:
        return module.gate_up_proj, module.down_proj
    gu, down = module.gate_up_proj, module.down_proj
    if torch.compiler.is_compiling():
        cache = module.__dict__.get("_moelora_wcache")
        if cache is not None:
            return cache[1], cache[2]
        return gu.transpose(1, 2), down.transpose(1, 2)
    key = (gu.data_ptr(), gu._version, down.data_ptr(), down._version, gu.dtype, gu.device)
    cache = module.__dict__.get("_moelora_wcache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, gu.detach().transpose(1, 2).contiguous(), down.detach().transpose(1, 2).contiguous())
        module.__dict__["_moelora_wcache"] = cache
    return cache[1], cache[2]
