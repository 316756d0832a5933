"""Shape/dtype/device rules of moelora::fused_moe, shared by the Python wrapper (which raises ValueError)
and the fake kernel (which uses torch._check so that symbolic shapes work). The C++ mirror is
csrc/fused_moe_args.cpp; keep the two in step.

Every rule is written as ``check(cond, message_fn)``; ``cond`` is a single comparison (a bool or a SymBool)
and ``message_fn`` builds the message lazily: the argument's name, what it got and what was expected.
"""
from typing import Callable, Sequence

import torch

Check = Callable[[object, Callable[[], str]], None]

PREFIX = "moelora.fused_moe: "
FLOAT_DTYPES = {"cuda": (torch.bfloat16, torch.float16)}  # per device type; others below
DEFAULT_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LORA_NAMES = ("token_lora_ids", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b")


def raise_value_error(cond, message: Callable[[], str]) -> None:
    """The wrapper's check: a ValueError naming the argument, what it got and what it expected."""
    if not cond:
        raise ValueError(PREFIX + message())


def torch_check(cond, message: Callable[[], str]) -> None:
    """The fake kernel's check: works on SymBools (adds a runtime assertion instead of a guard)."""
    torch._check(cond, lambda: PREFIX + message())


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_shape(check: Check, t: torch.Tensor, name: str, symbolic: str, expected: Sequence) -> None:
    check(t.dim() == len(expected),
          lambda: f"{name} must be {len(expected)}-D with shape {symbolic} = {_fmt(expected)}, "
                  f"got a {t.dim()}-D tensor of shape {_fmt(t.shape)}")
    for got, want in zip(t.shape, expected):
        check(got == want, lambda: f"{name} must have shape {symbolic} = {_fmt(expected)}, got {_fmt(t.shape)}")


def _check_rank(check: Check, t: torch.Tensor, name: str, dim: int, symbolic: str, hint: str = "") -> None:
    check(t.dim() == dim, lambda: f"{name} must be {dim}-D with shape {symbolic}{hint}, "
                                  f"got a {t.dim()}-D tensor of shape {_fmt(t.shape)}")


def _check_dtype(check: Check, t: torch.Tensor, name: str, allowed: Sequence[torch.dtype], what: str) -> None:
    check(t.dtype in allowed, lambda: f"{name} must have dtype {what}, got {t.dtype}")


def _check_device(check: Check, t: torch.Tensor, name: str, device: torch.device) -> None:
    check(t.device == device, lambda: f"{name} must be on the device of hidden_states ({device}), got {t.device}")


def _check_tensor(check: Check, t, name: str, optional: bool = False) -> None:
    ok = isinstance(t, torch.Tensor) or (optional and t is None)
    check(ok, lambda: f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")


def validate_fused_moe(check: Check, hidden_states, w13, w2, topk_weights, topk_ids, token_lora_ids=None,
                       w13_lora_a=None, w13_lora_b=None, w2_lora_a=None, w2_lora_b=None, lora_scalings=None,
                       w13_shared_a=False, w13_shared_b=False, w2_shared_a=False, w2_shared_b=False,
                       activation="silu"):
    """Check every shape/dtype/device rule; returns (T, H), the shape of the output."""
    for name, t in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        _check_tensor(check, t, name)
    lora = (token_lora_ids, w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b)
    for name, t in zip(LORA_NAMES + ("lora_scalings",), lora + (lora_scalings,)):
        _check_tensor(check, t, name, optional=True)
    flags = {"w13_shared_a": w13_shared_a, "w13_shared_b": w13_shared_b, "w2_shared_a": w2_shared_a,
             "w2_shared_b": w2_shared_b}
    for name, flag in flags.items():
        check(isinstance(flag, bool), lambda: f"{name} must be a bool, got {type(flag).__name__}")
    check(activation in ("silu", "gelu"), lambda: f'activation must be "silu" or "gelu", got {activation!r}')

    # hidden_states [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_ids, topk_weights [T, k].
    _check_rank(check, hidden_states, "hidden_states", 2, "[T, H]")
    T, H = hidden_states.shape
    check(H >= 1, lambda: f"hidden_states must have H >= 1 columns, got shape {_fmt(hidden_states.shape)}")
    _check_rank(check, w13, "w13", 3, "[E, 2I, H]")
    E = w13.shape[0]
    check(E >= 1, lambda: f"w13 must hold at least one expert (E >= 1), got shape {_fmt(w13.shape)}")
    check(w13.shape[1] >= 2, lambda: f"w13 must have shape [E, 2I, H] with 2I >= 2, got {_fmt(w13.shape)}")
    check(w13.shape[1] % 2 == 0,
          lambda: f"w13 must have shape [E, 2I, H] (gate rows then up rows) with an even second dim, "
                  f"got {_fmt(w13.shape)}")
    I = w13.shape[1] // 2
    _check_shape(check, w13, "w13", "[E, 2I, H]", (E, 2 * I, H))
    _check_shape(check, w2, "w2", "[E, H, I]", (E, H, I))
    _check_rank(check, topk_ids, "topk_ids", 2, "[T, k]")
    k = topk_ids.shape[1]
    check(k >= 1, lambda: f"topk_ids must have k >= 1 columns, got shape {_fmt(topk_ids.shape)}")
    _check_shape(check, topk_ids, "topk_ids", "[T, k]", (T, k))
    _check_shape(check, topk_weights, "topk_weights", "[T, k]", (T, k))

    device = hidden_states.device
    dtype = hidden_states.dtype
    floats = FLOAT_DTYPES.get(device.type, DEFAULT_FLOAT_DTYPES)
    _check_dtype(check, hidden_states, "hidden_states", floats,
                 " or ".join(str(d) for d in floats) + f" on {device.type}")
    for name, t in (("w13", w13), ("w2", w2)):
        _check_dtype(check, t, name, (dtype,), f"{dtype} (the dtype of hidden_states)")
    _check_dtype(check, topk_weights, "topk_weights", (torch.float32, dtype),
                 f"torch.float32 or {dtype} (the dtype of hidden_states)")
    _check_dtype(check, topk_ids, "topk_ids", (torch.int32, torch.int64), "torch.int32 or torch.int64")
    for name, t in (("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        _check_device(check, t, name, device)

    # LoRA: all-or-none.
    given = [t is not None for t in lora]
    check(all(given) or not any(given),
          lambda: "LoRA is all-or-none: token_lora_ids, w13_lora_a, w13_lora_b, w2_lora_a and w2_lora_b must be "
                  "given together; got " + ", ".join(n for n, g in zip(LORA_NAMES, given) if g)
                  + " but not " + ", ".join(n for n, g in zip(LORA_NAMES, given) if not g))
    if not any(given):
        check(lora_scalings is None,
              lambda: "lora_scalings was given without LoRA tensors (token_lora_ids, w13_lora_a, ...); "
                      "pass both or neither")
        check(not any(flags.values()),
              lambda: "a *_shared_* flag is set but no LoRA tensors were given ("
                      + ", ".join(f"{n}={v}" for n, v in flags.items()) + ")")
        return T, H

    # w13_lora_a [S, E, R, H]; w13_lora_b [S, E, 2I, R]; w2_lora_a [S, E, R, I]; w2_lora_b [S, E, H, R];
    # a *_shared_* flag drops the E dim. S and R come from w13_lora_a.
    specs = (  # name, tensor, flag name, rows, cols (symbolic and actual)
        ("w13_lora_a", w13_lora_a, "w13_shared_a", "R", "H"),
        ("w13_lora_b", w13_lora_b, "w13_shared_b", "2I", "R"),
        ("w2_lora_a", w2_lora_a, "w2_shared_a", "R", "I"),
        ("w2_lora_b", w2_lora_b, "w2_shared_b", "H", "R"),
    )
    for name, t, flag, rows, cols in specs:
        shared = flags[flag]
        symbolic = f"[S, {rows}, {cols}]" if shared else f"[S, E, {rows}, {cols}]"
        hint = (f" because {flag}={shared}"
                + (" (clear the flag for a per-expert tensor)" if shared
                   else " (set the flag for a tensor shared by all experts)"))
        _check_rank(check, t, name, 3 if shared else 4, symbolic, hint)
    S, R = w13_lora_a.shape[0], w13_lora_a.shape[-2]
    check(S >= 1, lambda: f"w13_lora_a must hold at least one adapter slot (S >= 1), got {_fmt(w13_lora_a.shape)}")
    check(R >= 1, lambda: f"w13_lora_a must have rank R >= 1, got shape {_fmt(w13_lora_a.shape)}")
    sizes = {"R": R, "H": H, "I": I, "2I": 2 * I}
    for name, t, flag, rows, cols in specs:
        shared = flags[flag]
        symbolic = f"[S, {rows}, {cols}]" if shared else f"[S, E, {rows}, {cols}]"
        expected = (S, sizes[rows], sizes[cols]) if shared else (S, E, sizes[rows], sizes[cols])
        _check_shape(check, t, name, symbolic, expected)
    _check_shape(check, token_lora_ids, "token_lora_ids", "[T]", (T,))
    for name, t, _, _, _ in specs:
        _check_dtype(check, t, name, (dtype,), f"{dtype} (the dtype of hidden_states)")
    _check_dtype(check, token_lora_ids, "token_lora_ids", (torch.int32,), "torch.int32 (adapter slot ids)")
    for name, t in zip(LORA_NAMES, lora):
        _check_device(check, t, name, device)
    if lora_scalings is not None:
        _check_shape(check, lora_scalings, "lora_scalings", "[S]", (S,))
        _check_dtype(check, lora_scalings, "lora_scalings", (torch.float32,), "torch.float32")
        _check_device(check, lora_scalings, "lora_scalings", device)
    return T, H


def check_slot_ids(token_lora_ids: torch.Tensor, num_slots: int) -> None:
    """Value check (reads the tensor, so the wrapper only runs it where that costs no device sync):
    every slot id must be in [-1, S)."""
    bad = (token_lora_ids < -1) | (token_lora_ids >= num_slots)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{PREFIX}token_lora_ids[{t}] = {int(token_lora_ids[t])} is outside [-1, S) = "
                         f"[-1, {num_slots}) (S = number of adapter slots, from w13_lora_a.shape[0])")
