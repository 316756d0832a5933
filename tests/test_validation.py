"""Every kind of bad input raises a clear error, never a crash: ValueError from moelora_ext.fused_moe
(naming the argument, what it got and what was expected) and RuntimeError (TORCH_CHECK, or torch._check in
the fake kernel) from a direct torch.ops.moelora.fused_moe call."""
import os
import subprocess
import sys

import pytest
import torch

import moelora_ext
from moe_cases import DEVICES, make_case, op_positional


def good(device, **kw):
    base = dict(T=6, H=16, I=8, E=4, k=2, S=3, R=4, dtype=torch.bfloat16, device=device, seed=0)
    base.update(kw)
    return make_case(**base)


def _drop(*names):
    return lambda a: {n: v for n, v in a.items() if n not in names}


def _set(**changes):
    """Replace arguments; a callable value gets the current args and returns the new value."""
    return lambda a: {**a, **{n: (v(a) if callable(v) else v) for n, v in changes.items()}}


# (id, make-bad-args, regex the message must match). Every message names the argument at fault.
BAD_INPUTS = [
    ("hidden_1d", _set(hidden_states=lambda a: a["hidden_states"][0]), r"hidden_states must be 2-D.*\[T, H\].*got a 1-D"),
    ("hidden_3d", _set(hidden_states=lambda a: a["hidden_states"][None]), r"hidden_states must be 2-D"),
    ("hidden_int", _set(hidden_states=lambda a: a["hidden_states"].to(torch.int32)), r"hidden_states must have dtype"),
    ("hidden_fp64", _set(hidden_states=lambda a: a["hidden_states"].double()), r"hidden_states must have dtype.*(float64|Double)"),
    ("hidden_wrong_H", _set(hidden_states=lambda a: a["hidden_states"][:, :8]), r"w13 must have shape \[E, 2I, H\]"),
    ("w13_2d", _set(w13=lambda a: a["w13"][0]), r"w13 must be 3-D"),
    ("w13_odd", _set(w13=lambda a: a["w13"][:, :15]), r"w13 must have shape \[E, 2I, H\].*even"),
    ("w13_dtype", _set(w13=lambda a: a["w13"].half()), r"w13 must have dtype.*(bfloat16|BFloat16)"),
    ("w2_shape", _set(w2=lambda a: a["w2"][:, :, :4]), r"w2 must have shape \[E, H, I\] = \[4, 16, 8\], got \[4, 16, 4\]"),
    ("w2_experts", _set(w2=lambda a: a["w2"][:3]), r"w2 must have shape \[E, H, I\]"),
    ("w2_dtype", _set(w2=lambda a: a["w2"].float()), r"w2 must have dtype"),
    ("ids_wrong_T", _set(topk_ids=lambda a: a["topk_ids"][:5]), r"topk_ids must have shape \[T, k\] = \[6, 2\], got \[5, 2\]"),
    ("ids_1d", _set(topk_ids=lambda a: a["topk_ids"][:, 0]), r"topk_ids must be 2-D"),
    ("ids_float", _set(topk_ids=lambda a: a["topk_ids"].float()), r"topk_ids must have dtype.*int32.*int64"),
    ("ids_int16", _set(topk_ids=lambda a: a["topk_ids"].to(torch.int16)), r"topk_ids must have dtype"),
    ("weights_wrong_k", _set(topk_weights=lambda a: a["topk_weights"][:, :1]), r"topk_weights must have shape \[T, k\]"),
    ("weights_int", _set(topk_weights=lambda a: a["topk_weights"].to(torch.int32)), r"topk_weights must have dtype"),
    ("weights_other_half", _set(topk_weights=lambda a: a["topk_weights"].half()), r"topk_weights must have dtype"),
    ("k_zero", _set(topk_ids=lambda a: a["topk_ids"][:, :0], topk_weights=lambda a: a["topk_weights"][:, :0]), r"topk_ids must have k >= 1"),
    ("slots_int64", _set(token_lora_ids=lambda a: a["token_lora_ids"].long()), r"token_lora_ids must have dtype.*int32"),
    ("slots_wrong_T", _set(token_lora_ids=lambda a: a["token_lora_ids"][:4]), r"token_lora_ids must have shape \[T\] = \[6\], got \[4\]"),
    ("slots_2d", _set(token_lora_ids=lambda a: a["token_lora_ids"][:, None]), r"token_lora_ids must be 1-D"),
    ("partial_no_slots", _drop("token_lora_ids"), r"LoRA is all-or-none.*but not token_lora_ids"),
    ("partial_no_w13_a", _drop("w13_lora_a"), r"all-or-none.*but not w13_lora_a"),
    ("partial_no_w13_b", _drop("w13_lora_b"), r"all-or-none.*but not w13_lora_b"),
    ("partial_no_w2_a", _drop("w2_lora_a"), r"all-or-none.*but not w2_lora_a"),
    ("partial_no_w2_b", _drop("w2_lora_b"), r"all-or-none.*but not w2_lora_b"),
    ("partial_only_slots", _drop("w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b", "lora_scalings"),
     r"all-or-none.*got token_lora_ids but not w13_lora_a, w13_lora_b, w2_lora_a, w2_lora_b"),
    ("scalings_without_lora", _drop(*("token_lora_ids", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b")),
     r"lora_scalings was given without LoRA"),
    ("flag_without_lora", lambda a: {**_drop("token_lora_ids", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b",
                                             "lora_scalings")(a), "w2_shared_b": True}, r"shared.*flag is set but no LoRA"),
    ("flag_set_tensor_4d", _set(w13_shared_a=True), r"w13_lora_a must be 3-D with shape \[S, R, H\] because w13_shared_a=True"),
    ("flag_unset_tensor_3d", _set(w2_lora_b=lambda a: a["w2_lora_b"][:, 0]), r"w2_lora_b must be 4-D with shape \[S, E, H, R\] because w2_shared_b=False"),
    ("flag_set_wrong_tensor", _set(w13_shared_b=True, w13_lora_a=lambda a: a["w13_lora_a"][:, 0]), r"w13_lora_a must be 4-D"),
    ("inconsistent_S", _set(w13_lora_b=lambda a: a["w13_lora_b"][:2]), r"w13_lora_b must have shape \[S, E, 2I, R\] = \[3, 4, 16, 4\], got \[2, 4, 16, 4\]"),
    ("inconsistent_R", _set(w2_lora_a=lambda a: a["w2_lora_a"][:, :, :3]), r"w2_lora_a must have shape \[S, E, R, I\]"),
    ("inconsistent_R_b", _set(w2_lora_b=lambda a: a["w2_lora_b"][..., :2]), r"w2_lora_b must have shape \[S, E, H, R\]"),
    ("lora_wrong_E", _set(w13_lora_a=lambda a: a["w13_lora_a"][:, :2]), r"w13_lora_a must have shape \[S, E, R, H\]"),
    ("lora_wrong_H", _set(w13_lora_a=lambda a: a["w13_lora_a"][..., :8]), r"w13_lora_a must have shape"),
    ("lora_dtype", _set(w2_lora_a=lambda a: a["w2_lora_a"].half()), r"w2_lora_a must have dtype"),
    ("scalings_shape", _set(lora_scalings=lambda a: a["lora_scalings"][:2]), r"lora_scalings must have shape \[S\] = \[3\], got \[2\]"),
    ("scalings_dtype", _set(lora_scalings=lambda a: a["lora_scalings"].bfloat16()), r"lora_scalings must have dtype.*float32"),
    ("activation", _set(activation="relu"), r"activation must be \"silu\" or \"gelu\", got .relu."),
]

# Bad only on a GPU: a tensor left on the CPU, and fp32 (the CUDA kernels take bf16/fp16).
_FLOATS = ("hidden_states", "w13", "w2", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b")
CUDA_BAD_INPUTS = [
    ("w2_on_cpu", _set(w2=lambda a: a["w2"].cpu()), r"w2 must be on the device of hidden_states"),
    ("fp32_on_cuda", _set(**{n: (lambda a, n=n: a[n].float()) for n in _FLOATS}),
     r"hidden_states must be bfloat16 or float16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_wrapper_raises_value_error(name, mutate, match, device):
    args = mutate(good(device))
    with pytest.raises(ValueError, match=match):
        moelora_ext.fused_moe(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_direct_op_raises_runtime_error(name, mutate, match, device):
    args = mutate(good(device))
    pos, kw = op_positional(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moelora.fused_moe(*pos, **kw)


_CHILD = """
import re, sys
sys.path.insert(0, {tests!r})
import torch, moelora_ext
from test_validation import BAD_INPUTS, CUDA_BAD_INPUTS, good, op_positional
for name, mutate, match in BAD_INPUTS + CUDA_BAD_INPUTS:
    pos, kw = op_positional(mutate(good("cuda")))
    try:
        torch.ops.moelora.fused_moe(*pos, **kw)
        print("NO_ERROR", name)
    except RuntimeError as e:
        print("RAISED_AS_EXPECTED" if re.search(match, str(e)) else "WRONG_MESSAGE", name, str(e)[:300])
print("ALL_DONE")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_op_errors_leave_the_process_alive_cuda():
    """Regression guard: on the H100 build a bad-argument error once crashed the process (the extension's
    own ostream<<long, used while formatting the TORCH_CHECK message, segfaulted; messages are now built
    without iostreams, csrc/check_message.h). Every bad input goes through the direct op in a child
    process, which must survive all of them with the expected RuntimeError."""
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = child.stdout.splitlines()
    assert child.returncode == 0 and lines and lines[-1] == "ALL_DONE", (
        f"child exit code {child.returncode} (negative = killed by that signal)\n"
        f"stdout: {child.stdout[-3000:]}\nstderr: {child.stderr[-2000:]}")
    bad = [l for l in lines[:-1] if not l.startswith("RAISED_AS_EXPECTED")]
    assert not bad and len(lines) - 1 == len(BAD_INPUTS) + len(CUDA_BAD_INPUTS), bad


def _assert_direct_op_raises(name, device):
    name, mutate, match = next(b for b in BAD_INPUTS + CUDA_BAD_INPUTS if b[0] == name)
    pos, kw = op_positional(mutate(good(device)))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moelora.fused_moe(*pos, **kw)


@pytest.mark.parametrize("name,mutate,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_fake_kernel_raises(name, mutate, match):
    """The fake (meta) kernel applies the same rules (shapes/dtypes only) under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = mutate(good("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {n: (mode.from_tensor(v) if torch.is_tensor(v) else v) for n, v in args.items()}
        pos, kw = op_positional(fake)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.moelora.fused_moe(*pos, **kw)


@pytest.mark.parametrize("bad_slot", [3, 100, -2])
def test_slot_ids_out_of_range_cpu(bad_slot):
    """Slot ids outside [-1, S) are a value error on CPU (on CUDA they would need a sync; see
    test_fused_moe_cuda.py for the CUDA behaviour)."""
    args = good("cpu")
    args["token_lora_ids"][4] = bad_slot
    with pytest.raises(ValueError, match=rf"token_lora_ids\[4\] = {bad_slot} is outside \[-1, S\) = \[-1, 3\)"):
        moelora_ext.fused_moe(**args)
    pos, kw = op_positional(args)
    with pytest.raises(RuntimeError, match=rf"token_lora_ids\[4\] = {bad_slot} is outside \[-1, 3\)|"
                                           rf"token_lora_ids\[4\] = {bad_slot} is outside \[-1, S\) = \[-1, 3\)"):
        torch.ops.moelora.fused_moe(*pos, **kw)


def test_device_mismatch():
    """A tensor on another device: meta stands in for a second device on a CPU-only machine."""
    args = good("cpu")
    for name in ("w13", "topk_ids", "token_lora_ids", "w2_lora_b", "lora_scalings"):
        bad = dict(args, **{name: args[name].to("meta")})
        with pytest.raises(ValueError, match=rf"{name} must be on the device of hidden_states \(cpu\), got meta"):
            moelora_ext.fused_moe(**bad)
        pos, kw = op_positional(bad)
        with pytest.raises(RuntimeError, match=rf"{name} must be on the device of hidden_states"):
            torch.ops.moelora.fused_moe(*pos, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_cuda():
    args = good("cuda")
    bad = dict(args, w2=args["w2"].cpu())
    with pytest.raises(ValueError, match=r"w2 must be on the device of hidden_states"):
        moelora_ext.fused_moe(**bad)
    _assert_direct_op_raises("w2_on_cpu", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_rejects_fp32_directly():
    _assert_direct_op_raises("fp32_on_cuda", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rejects_fp32():
    args = good("cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"hidden_states must have dtype torch.bfloat16 or torch.float16 on cuda"):
        moelora_ext.fused_moe(**args)


def test_non_tensor_and_non_bool_arguments():
    args = good("cpu")
    with pytest.raises(ValueError, match=r"hidden_states must be a torch.Tensor, got list"):
        moelora_ext.fused_moe(**dict(args, hidden_states=args["hidden_states"].tolist()))
    with pytest.raises(ValueError, match=r"w13_lora_a must be a torch.Tensor or None, got tuple"):
        moelora_ext.fused_moe(**dict(args, w13_lora_a=tuple(args["w13_lora_a"].shape)))
    with pytest.raises(ValueError, match=r"w13_shared_a must be a bool, got int"):
        moelora_ext.fused_moe(**dict(args, w13_shared_a=1))


def test_valid_arguments_pass():
    args = good("cpu")
    assert moelora_ext.fused_moe(**args).shape == (6, 16)
