"""moelora::fused_moe against the fp32 reference, on every device (cpu; cuda when present).

Tolerances (relative-norm error against the fp32 reference) are justified in moe_cases.TOL. Outputs of a
functional op cannot be poisoned before the run; instead every test checks that no NaN/Inf appears
(rel_err does) and some check that repeated runs give bit-identical results."""
import pytest
import torch

import moelora_ext
from moelora_ext import fused_moe_reference
from moe_cases import (DEVICE_DTYPES, DEVICES, FLAGS, TOL, make_case, non_contiguous,
                       rel_err, replicate_shared)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def check(args, tol=None):
    """Run the op and the reference on `args`; assert dtype, shape and relative-norm error. Returns out."""
    out = moelora_ext.fused_moe(**args)
    ref = fused_moe_reference(**args, out_dtype=torch.float32)
    x = args["hidden_states"]
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    err = rel_err(out, ref) if out.numel() else 0.0
    tol = tol if tol is not None else TOL[x.dtype]
    assert err < tol, f"relative error {err:.3e} over {tol:.1e}"
    return out


SHAPES = [
    # T,  E,   k, S,  R
    (0, 8, 2, 4, 16),
    (1, 8, 1, 4, 16),
    (1, 8, 8, 2, 4),
    (7, 16, 8, 3, 1),
    (7, 4, 2, 0, 0),
    (300, 8, 2, 4, 16),
    (300, 128, 8, 8, 8),
    (300, 16, 1, 0, 0),
    (64, 128, 2, 2, 64),
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_E{}_k{}_S{}_R{}".format(*s))
def test_matches_reference(shape, device, dtype):
    T, E, k, S, R = shape
    check(make_case(T, E=E, k=k, S=S, R=R, dtype=dtype, device=device, seed=sum(shape)))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
def test_bigger_hidden_sizes(device, dtype):
    check(make_case(64, H=256, I=384, E=32, k=4, S=4, R=32, dtype=dtype, device=device, seed=1))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    dtype = torch.bfloat16
    args = make_case(0, H=64, E=8, k=2, S=2, R=4, dtype=dtype, device=device)
    out = moelora_ext.fused_moe(**args)
    assert out.shape == (0, 64) and out.dtype == dtype and out.device.type == device


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("routing", ["uniform", "skewed", "one_expert", "first_half"])
def test_routing_patterns(routing, device, dtype):
    """Uneven routing, unused experts, and every pair on one expert (repeated ids within a token)."""
    check(make_case(150, E=16, k=4, S=3, R=8, routing=routing, dtype=dtype, device=device, seed=2))


@pytest.mark.parametrize("device", DEVICES)
def test_expert_ids_outside_range_contribute_nothing(device):
    dtype = torch.bfloat16
    args = make_case(100, E=8, k=4, S=2, R=8, invalid_ids=0.0, dtype=dtype, device=device, seed=3)
    drop = torch.rand(100, 4, generator=torch.Generator().manual_seed(3)) < 0.3
    outs = []
    for bad_id in (-1, 8, 1000, -7):
        a = dict(args, topk_ids=args["topk_ids"].clone())
        a["topk_ids"][drop.to(device)] = bad_id
        outs.append(check(a))
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "every out-of-range id must mean the same thing: nothing"
    # Same as giving those pairs weight 0 with a valid id.
    zeroed = dict(args, topk_weights=args["topk_weights"].masked_fill(drop.to(device), 0))
    assert rel_err(outs[0], fused_moe_reference(**zeroed, out_dtype=torch.float32)) < TOL[dtype]
    # Every expert elsewhere: exactly zero.
    none = dict(args, topk_ids=torch.full_like(args["topk_ids"], -1))
    out = moelora_ext.fused_moe(**none)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("slot_mix", ["mixed", "none", "all", "single"])
def test_slot_mixes(slot_mix, device, dtype):
    """Mixed adapters, tokens with no adapter, every token adapted, one adapter for all."""
    check(make_case(120, E=8, k=2, S=5, R=8, slot_mix=slot_mix, dtype=dtype, device=device, seed=4))


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_without_adapter_get_base_output(device):
    """Rows of tokens with slot -1 equal the base model (no-LoRA call); adapted rows differ from it."""
    args = make_case(90, E=8, k=2, S=3, R=8, slot_mix="mixed", dtype=torch.bfloat16, device=device, seed=5)
    base_args = {n: args[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")}
    out, base = moelora_ext.fused_moe(**args), moelora_ext.fused_moe(**base_args)
    plain = args["token_lora_ids"] == -1
    assert 0 < int(plain.sum()) < 90
    assert rel_err(out[plain], base[plain]) < TOL[torch.bfloat16]
    if device == "cpu":
        assert torch.equal(out[plain], base[plain])
    assert rel_err(out[~plain], base[~plain]) > 0.05, "the adapters should change the adapted rows"


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
def test_mixed_ranks_zero_padded(device, dtype):
    """Slots of rank 1..64 zero-padded to R = 64: each slot's rows equal the unpadded math (the same
    adapter at its true rank, run alone)."""
    ranks = [1, 2, 7, 16, 33, 64]
    S, R = len(ranks), 64
    args = make_case(180, E=8, k=2, S=S, R=R, ranks=ranks, slot_mix="all", dtype=dtype, device=device, seed=6)
    out = check(args)
    for s, r in enumerate(ranks):
        rows = args["token_lora_ids"] == s
        sub = {n: args[n][rows] for n in ("hidden_states", "topk_weights", "topk_ids")}
        sub.update(w13=args["w13"], w2=args["w2"], token_lora_ids=torch.zeros_like(args["token_lora_ids"][rows]),
                   w13_lora_a=args["w13_lora_a"][s:s + 1, :, :r].contiguous(),
                   w13_lora_b=args["w13_lora_b"][s:s + 1, ..., :r].contiguous(),
                   w2_lora_a=args["w2_lora_a"][s:s + 1, :, :r].contiguous(),
                   w2_lora_b=args["w2_lora_b"][s:s + 1, ..., :r].contiguous(),
                   lora_scalings=args["lora_scalings"][s:s + 1])
        unpadded = moelora_ext.fused_moe(**sub)
        assert rel_err(out[rows], unpadded) < TOL[dtype], f"slot {s} (rank {r})"
        assert rel_err(out[rows], fused_moe_reference(**sub, out_dtype=torch.float32)) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (True, True, True, True)], ids=lambda f: "".join("S" if x else "-" for x in f))
def test_shared_flags_bit_identical_to_replicated(flags, device, dtype):
    shared = make_case(77, E=8, k=4, S=4, R=16, shared=flags, dtype=dtype, device=device, seed=7)
    replicated = replicate_shared(shared)
    assert all(replicated[f] is False for f in FLAGS)
    out = check(shared)
    assert torch.equal(out, moelora_ext.fused_moe(**replicated))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("lora_on", ["fc1", "fc2"])
def test_lora_on_one_projection_only(lora_on, device, dtype):
    args = make_case(100, E=8, k=2, S=3, R=8, lora_on=lora_on, dtype=dtype, device=device, seed=8)
    out = check(args)
    base_args = {n: args[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")}
    adapted = args["token_lora_ids"] >= 0
    assert rel_err(out[adapted], moelora_ext.fused_moe(**base_args)[adapted]) > 0.05


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_activations(activation, lora, device, dtype):
    args = make_case(64, E=8, k=2, S=3 if lora else 0, R=8, activation=activation, dtype=dtype, device=device,
                     seed=9)
    out = check(args)
    other = dict(args, activation="gelu" if activation == "silu" else "silu")
    assert rel_err(out, moelora_ext.fused_moe(**other)) > 1e-2, "activation argument must matter"


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
def test_non_contiguous_inputs(device, dtype):
    args = make_case(70, E=8, k=2, S=3, R=8, dtype=dtype, device=device, seed=10)
    strided = {n: (non_contiguous(v) if torch.is_tensor(v) else v) for n, v in args.items()}
    strided["w13"] = args["w13"].transpose(1, 2).contiguous().transpose(1, 2)  # column-major experts
    assert not strided["hidden_states"].is_contiguous() and not strided["w13"].is_contiguous()
    out = check(strided)
    assert rel_err(out, moelora_ext.fused_moe(**args)) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("weights_in_hidden_dtype", [False, True], ids=["w_fp32", "w_hidden"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["ids_i32", "ids_i64"])
def test_weight_and_id_dtypes(weights_in_hidden_dtype, ids_dtype, device, dtype):
    args = make_case(50, E=8, k=2, S=2, R=4, weights_dtype=None if weights_in_hidden_dtype else torch.float32,
                     ids_dtype=ids_dtype, dtype=dtype, device=device, seed=11)
    out = check(args)
    other = dict(args, topk_ids=args["topk_ids"].to(torch.int64 if ids_dtype == torch.int32 else torch.int32))
    assert torch.equal(out, moelora_ext.fused_moe(**other)), "int32 and int64 ids must give the same result"


@pytest.mark.parametrize("device", DEVICES)
def test_default_scalings_are_one(device):
    args = make_case(40, E=8, k=2, S=3, R=8, dtype=torch.bfloat16, device=device, seed=12, scalings=False)
    out = check(args)
    ones = dict(args, lora_scalings=torch.ones(3, device=device))
    assert torch.equal(out, moelora_ext.fused_moe(**ones))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
def test_repeated_runs_identical_and_finite(device, dtype):
    args = make_case(300, E=16, k=4, S=4, R=16, dtype=dtype, device=device, seed=13)
    first = moelora_ext.fused_moe(**args)
    assert torch.isfinite(first.float()).all()
    for _ in range(3):
        assert torch.equal(first, moelora_ext.fused_moe(**args))


@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_matches_wrapper(device):
    args = make_case(33, E=8, k=2, S=2, R=4, dtype=torch.bfloat16, device=device, seed=14)
    pos = [args[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")]
    kw = {n: v for n, v in args.items() if n not in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")}
    assert torch.equal(torch.ops.moelora.fused_moe(*pos, **kw), moelora_ext.fused_moe(**args))


def test_cpu_threads_do_not_change_results():
    """The CPU kernel spreads experts over threads; the result must not depend on the thread count."""
    args = make_case(200, E=32, k=4, S=4, R=8, dtype=torch.float32, seed=15)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moelora_ext.fused_moe(**args)
    finally:
        torch.set_num_threads(n)
    assert rel_err(moelora_ext.fused_moe(**args), one) < 1e-6



@pytest.mark.parametrize("device", DEVICES)
def test_weights_that_require_grad(device):
    """Weights are usually nn.Parameters: the forward works and matches (the op has no backward)."""
    args = make_case(60, E=8, k=2, S=2, R=4, dtype=torch.bfloat16, device=device, seed=16)
    expected = moelora_ext.fused_moe(**args)
    params = {n: (torch.nn.Parameter(v) if torch.is_tensor(v) and v.is_floating_point() else v)
              for n, v in args.items()}
    with torch.no_grad():
        assert torch.equal(moelora_ext.fused_moe(**params), expected)
    assert torch.equal(moelora_ext.fused_moe(**params).detach(), expected)
