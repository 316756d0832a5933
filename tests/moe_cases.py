"""Random moelora::fused_moe problems shared by the tests and the benchmarks.

    args = make_case(T=300, E=16, k=2, S=4, R=16, dtype=torch.bfloat16, device="cpu")
    out = moelora_ext.fused_moe(**args)

``make_case`` returns the keyword arguments of the op. Weights are scaled so that activations stay O(1)
and the LoRA terms are about as large as the base terms (so a wrong LoRA path cannot hide below the
tolerance).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16], "cuda": [torch.bfloat16, torch.float16]}
DEVICE_DTYPES = [(d, t) for d in DEVICES for t in DTYPES[d]]
LORA_TENSORS = ("w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b")
FLAGS = ("w13_shared_a", "w13_shared_b", "w2_shared_a", "w2_shared_b")

# Relative-norm error |out - ref| / |ref| allowed against the fp32 reference.
# - fp32: the op computes in fp32 like the reference; only the summation order differs (GEMM blocking,
#   top-k order), which costs a few ulps of 2^-24 = 6e-8 times sqrt(K) at most: 1e-5 is ample.
# - bf16: 8 mantissa bits, unit roundoff 2^-9 = 2e-3. The output rounding alone costs ~1e-3; a device
#   kernel that also rounds the gathered input, fc1 output, LoRA intermediate and h to bf16 adds a few
#   such roundings (~5e-3 measured): 2e-2 leaves headroom without hiding real bugs (a dropped LoRA term
#   or expert is an O(1) error).
# - fp16: 11 bits, unit roundoff 2^-12 = 2.4e-4; the same chain of roundings stays near 1e-3: 5e-3.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative-norm error; fails on NaN/Inf in the output (which would mean unwritten or broken rows)."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_routing(T: int, E: int, k: int, pattern: str, g: torch.Generator) -> torch.Tensor:
    """[T, k] int64 expert ids in [0, E).

    uniform: k distinct experts per token, uniformly. skewed: expert popularity ~ exp(2 N(0,1)), so a few
    experts take most rows and others none. one_expert: every pair goes to expert E // 2 (repeated ids).
    first_half: only experts [0, E/2) are used."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.long)
    if pattern == "one_expert":
        return torch.full((T, k), E // 2, dtype=torch.long)
    if pattern == "uniform":
        popularity = torch.ones(E)
    elif pattern == "skewed":
        popularity = torch.exp(2 * torch.randn(E, generator=g))
    elif pattern == "first_half":
        popularity = torch.cat([torch.ones(max(E // 2, 1)), torch.zeros(E - max(E // 2, 1))])
    else:
        raise ValueError(f"unknown routing pattern {pattern!r}")
    replacement = k > int((popularity > 0).sum())
    return torch.multinomial(popularity.expand(T, E), k, replacement=replacement, generator=g)


def make_slots(T: int, S: int, mix: str, g: torch.Generator) -> torch.Tensor:
    """[T] int32 slot ids. mixed: uniform over [-1, S). none: all -1 (no token has an adapter).
    all: every token has one of the S adapters. single: every token uses slot 0."""
    if mix == "mixed":
        return torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    if mix == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    if mix == "all":
        return torch.randint(0, S, (T,), generator=g, dtype=torch.int32)
    if mix == "single":
        return torch.zeros(T, dtype=torch.int32)
    raise ValueError(f"unknown slot mix {mix!r}")


def make_case(T: int = 64, H: int = 64, I: int = 128, E: int = 8, k: int = 2, S: int = 0, R: int = 0, *,
              dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, routing: str = "skewed",
              invalid_ids: float = 0.05, slot_mix: str = "mixed", ranks: Optional[Sequence[int]] = None,
              shared: Tuple[bool, bool, bool, bool] = (False, False, False, False), lora_on: str = "both",
              weights_dtype: Optional[torch.dtype] = torch.float32, ids_dtype: torch.dtype = torch.int32,
              scalings: bool = True, activation: Optional[str] = None) -> Dict[str, object]:
    """Keyword arguments of moelora_ext.fused_moe for a random problem.

    S = 0 means no LoRA at all. ``invalid_ids``: fraction of pairs whose expert id is replaced by -1 or E
    (an expert elsewhere). ``ranks``: true rank of each slot (<= R); rows/columns above it are zero
    (padding). ``shared``: the four *_shared_* flags. ``lora_on``: "both", "fc1" or "fc2" (the other
    pair of LoRA tensors is all zeros). ``weights_dtype=None``: topk_weights in the hidden dtype."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    ids = make_routing(T, E, k, routing, g)
    if invalid_ids and T:
        drop = torch.rand(T, k, generator=g) < invalid_ids
        ids[drop] = torch.where(torch.rand(int(drop.sum()), generator=g) < 0.5, -1, E)
    args = dict(
        hidden_states=rnd(T, H),                 # [T, H]
        w13=rnd(E, 2 * I, H, scale=H ** -0.5),   # [E, 2I, H]
        w2=rnd(E, H, I, scale=I ** -0.5),        # [E, H, I]
        topk_weights=torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(weights_dtype or dtype),  # [T, k]
        topk_ids=ids.to(ids_dtype),              # [T, k]
    )
    if S:
        sa13, sb13, sa2, sb2 = shared
        lead = lambda flag: (S,) if flag else (S, E)  # noqa: E731
        lora = dict(
            w13_lora_a=rnd(*lead(sa13), R, H, scale=H ** -0.5),       # [S, E, R, H]
            w13_lora_b=rnd(*lead(sb13), 2 * I, R, scale=R ** -0.5),   # [S, E, 2I, R]
            w2_lora_a=rnd(*lead(sa2), R, I, scale=I ** -0.5),         # [S, E, R, I]
            w2_lora_b=rnd(*lead(sb2), H, R, scale=R ** -0.5),         # [S, E, H, R]
        )
        if ranks is not None:
            assert len(ranks) == S and all(1 <= r <= R for r in ranks)
            for s, r in enumerate(ranks):  # zero padding above the slot's true rank
                lora["w13_lora_a"][s, ..., r:, :] = 0
                lora["w13_lora_b"][s, ..., r:] = 0
                lora["w2_lora_a"][s, ..., r:, :] = 0
                lora["w2_lora_b"][s, ..., r:] = 0
        if lora_on == "fc1":
            lora["w2_lora_a"].zero_()
            lora["w2_lora_b"].zero_()
        elif lora_on == "fc2":
            lora["w13_lora_a"].zero_()
            lora["w13_lora_b"].zero_()
        else:
            assert lora_on == "both"
        args.update(lora, token_lora_ids=make_slots(T, S, slot_mix, g),
                    w13_shared_a=sa13, w13_shared_b=sb13, w2_shared_a=sa2, w2_shared_b=sb2)
        if scalings:
            args["lora_scalings"] = 0.5 + torch.rand(S, generator=g)  # [S] fp32
    if activation is not None:
        args["activation"] = activation
    return {n: (v.to(device) if torch.is_tensor(v) else v) for n, v in args.items()}


def replicate_shared(args: Dict[str, object]) -> Dict[str, object]:
    """The same adapters with every shared tensor stored once per expert (flags cleared)."""
    E = args["w13"].shape[0]
    out = dict(args)
    for name, flag in zip(LORA_TENSORS, FLAGS):
        if args.get(flag):
            out[name] = args[name].unsqueeze(1).expand(-1, E, -1, -1).contiguous()
            out[flag] = False
    return out


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a twice-as-wide buffer)."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert (t.shape[-1] < 2 or not view.is_contiguous()) and torch.equal(view, t)
    return view


def op_positional(args: Dict[str, object]) -> Tuple[list, dict]:
    """(positional, keyword) arguments for a direct torch.ops.moelora.fused_moe call."""
    pos = [args[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")]
    kw = {n: v for n, v in args.items() if n not in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")}
    return pos, kw
