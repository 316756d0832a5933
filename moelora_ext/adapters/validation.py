"""Checks run on an adapter before anything is written to a pool.

Every check raises ``AdapterValidationError`` (a ``ValueError``) whose message names the module (the
state-dict key or the model's experts module) and the mismatch: what was found and what was expected.
Nothing in this file touches a pool: ``LoraPool.load`` parses and validates the whole adapter first and only
then writes, so a failed load leaves the pool and every slot exactly as before.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["AdapterValidationError", "ExpertsInfo", "SIDES"]

# The four LoRA tensors of the op, in the order of its arguments.
SIDES = ("w13_a", "w13_b", "w2_a", "w2_b")

# Floating dtypes an adapter file may hold; each is cast to the pool's dtype (fp32 math first).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# PEFT options the fused op cannot reproduce: refused with a message naming the option.
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora=True) rescales the merged weight per column; the op adds B(Ax) only",
    "lora_bias": "lora_bias=True adds a bias to lora_B; the op has no LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out=True (Conv1D-style transposed weights) is not an experts layout",
}


class AdapterValidationError(ValueError):
    """An adapter does not fit the model or the pool. The message names the module and the mismatch."""


@dataclass(frozen=True)
class ExpertsInfo:
    """What the pool knows about one MoE experts module of the model."""
    name: str            # module path in the model, e.g. "model.layers.0.mlp.experts"
    num_experts: int     # E
    hidden: int          # H
    inter: int           # I (w13 has 2I rows)
    dtype: torch.dtype
    device: torch.device


def fail(msg: str):
    raise AdapterValidationError(msg)


def check_config(config: dict, source: str) -> None:
    """Refuse PEFT options the op cannot run, and non-LoRA PEFT types."""
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() not in ("LORA", "PEFTTYPE.LORA"):
        fail(f"{source}: peft_type={peft_type!r} is not supported, expected 'LORA'")
    for key, why in _UNSUPPORTED_CONFIG.items():
        if config.get(key):
            fail(f"{source}: {key}={config[key]!r} is not supported ({why})")


def check_tensor_dtype(key: str, t: Tensor, pool_dtype: torch.dtype) -> None:
    """A LoRA tensor must be floating point; after the cast to the pool dtype it must stay finite."""
    if not isinstance(t, Tensor):
        fail(f"{key}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        fail(f"{key}: dtype {t.dtype} is not supported, expected one of "
             f"{', '.join(str(d) for d in _FLOAT_DTYPES)} (cast to the pool dtype {pool_dtype})")
    if t.numel() and not bool(torch.isfinite(t).all()):
        fail(f"{key}: contains NaN or Inf values")
    if pool_dtype != t.dtype and t.numel():
        finfo = torch.finfo(pool_dtype)
        amax = float(t.detach().abs().max())
        if amax > finfo.max:
            fail(f"{key}: max |value| {amax:.4g} overflows the pool dtype {pool_dtype} (max {finfo.max:.4g})")


def check_shape(key: str, t: Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(f"{key}: shape {tuple(t.shape)} does not match the model: expected {tuple(expected)} ({what})")


def check_rank(module: str, side: str, rank: int, max_rank: int, note: str = "") -> None:
    if rank > max_rank:
        fail(f"{module}: LoRA rank {rank} on {side}{note} is above the pool's max_rank={max_rank}")
    if rank <= 0:
        fail(f"{module}: LoRA rank {rank} on {side} must be positive")


def check_expert_index(key: str, e: int, info: ExpertsInfo) -> None:
    if not 0 <= e < info.num_experts:
        fail(f"{key}: expert index {e} does not exist: {info.name} has {info.num_experts} experts "
             f"(indices 0..{info.num_experts - 1})")


def refuse_or_skip(non_expert: Iterable[str], allow_partial: bool, source: str) -> list:
    """Non-expert targets (attention, dense MLP, shared experts, router): the op adapts only the routed
    experts, so they are refused unless ``allow_partial=True``, in which case they are skipped with a
    warning (the adapter then runs without them, which changes its outputs)."""
    names = sorted(set(non_expert))
    if not names:
        return []
    shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    if not allow_partial:
        fail(f"{source}: targets modules that are not routed MoE experts, which moelora cannot adapt: {shown}. "
             f"Pass allow_partial=True to load only the expert weights and skip these (with a warning).")
    warnings.warn(f"{source}: skipping {len(names)} non-expert LoRA target(s) (allow_partial=True): {shown}",
                  stacklevel=4)
    return names


def pattern_value(patterns: Optional[dict], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module) or module.endswith(key):
            return value
    return default
