"""CUDA-only properties of moelora::fused_moe: both GEMM paths (CUTLASS sm90 and the portable one),
CUDA-graph capture and replay with rewritten inputs, torch.compile(mode="reduce-overhead"), streams,
determinism, large shapes, shared-outer bit-identity, and the opt-in slot-id check.

The shape/dtype/bad-input suite in test_fused_moe.py runs on CUDA as well; this file adds what only the
device path has. Tolerances: bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3); the op rounds the
gathered input, the fc1 output, the LoRA intermediate, h and the fc2 output to the input dtype, so a few
roundings of ~2e-3 each add up to a relative-norm error near 5e-3; we allow 2e-2. fp16 has 11 bits
(2^-12 = 2.4e-4): we allow 5e-3.
"""
import os
import re

import pytest
import torch

import moelora_ext
from moelora_ext.reference import fused_moe_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
PATHS = ["default", "portable"]  # default = CUTLASS sm90 on Hopper; portable = MOELORA_PORTABLE=1


@pytest.fixture(params=PATHS)
def gemm_path(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv("MOELORA_PORTABLE", "1")
    else:
        monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    return request.param


def make_case(T, H, I, E, k, S=0, R=0, dtype=torch.bfloat16, seed=0, shared=(False, False, False, False),
              invalid_ids=True, device="cuda"):
    """Random inputs with uneven routing (a skewed expert distribution leaves experts unused), some
    expert ids outside [0, E), tokens without adapter, and mixed adapters. Weights are scaled so
    activations stay O(1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rnd(T, H)
    w13 = rnd(E, 2 * I, H, scale=H ** -0.5)
    w2 = rnd(E, H, I, scale=I ** -0.5)
    # Skewed routing: expert popularity ~ exp(normal), so some experts get many rows and some none.
    popularity = torch.exp(2 * torch.randn(E, generator=g))
    ids = torch.stack([torch.multinomial(popularity, k, replacement=False, generator=g) for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if invalid_ids and T:
        drop = torch.rand(T, k, generator=g) < 0.05
        ids[drop] = torch.where(torch.rand(int(drop.sum()), generator=g) < 0.5, -1, E)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    args = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=weights.to(device), topk_ids=ids.to(torch.int32).to(device))
    if S:
        sa13, sb13, sa2, sb2 = shared
        slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
        args.update(
            token_lora_ids=slots.to(device),
            w13_lora_a=rnd(*((S,) if sa13 else (S, E)), R, H, scale=H ** -0.5),
            w13_lora_b=rnd(*((S,) if sb13 else (S, E)), 2 * I, R, scale=R ** -0.5),
            w2_lora_a=rnd(*((S,) if sa2 else (S, E)), R, I, scale=I ** -0.5),
            w2_lora_b=rnd(*((S,) if sb2 else (S, E)), H, R, scale=R ** -0.5),
            lora_scalings=(0.5 + torch.rand(S, generator=g)).to(device),
            w13_shared_a=sa13, w13_shared_b=sb13, w2_shared_a=sa2, w2_shared_b=sb2,
        )
    return args


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten rows?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes=1 << 28):
    """Fill blocks the caching allocator will hand out next with NaN, so unwritten output shows."""
    torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
    torch.empty(nbytes // 8, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))


def check(args, dtype, **kwargs):
    poison_allocator()
    out = moelora_ext.fused_moe(**args, **kwargs)
    ref = fused_moe_reference(**args, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} over {TOL[dtype]:.1e}"
    return out


def replicate_shared(shared, flags):
    """The same adapters with every shared-outer side copied to each expert (no sharing flags)."""
    replicated = dict(shared)
    E = shared["w13"].shape[0]
    for name, flag in zip(["w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b"], flags):
        if flag:
            replicated[name] = shared[name].unsqueeze(1).expand(-1, E, -1, -1).contiguous()
    replicated.update(w13_shared_a=False, w13_shared_b=False, w2_shared_a=False, w2_shared_b=False)
    return replicated


def capture_graph(args):
    """One call warmed up on a side stream, then captured: (graph, its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moelora_ext.fused_moe(**args)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moelora_ext.fused_moe(**args)
    return graph, static_out


SHAPES = [
    # T,    H,    I,    E,   k, S,  R
    (1, 256, 128, 8, 2, 4, 16),
    (7, 128, 64, 16, 8, 3, 1),
    (300, 256, 192, 32, 4, 8, 8),
    (64, 2880, 2880, 4, 2, 2, 16),
    (513, 512, 256, 256, 8, 64, 16),
    (200, 256, 128, 16, 2, 4, 64),
    (100, 256, 128, 8, 2, 3, 128),
    (0, 256, 128, 8, 2, 4, 16),
    (20, 128, 64, 4, 2, 2, 5),          # rank not a multiple of 8: element-wise adapter loads
    (33, 128, 64, 4, 2, 2, 40),         # rank padded to 64 inside the LoRA kernels
    (4, 4096, 1024, 8, 2, 2, 16),       # decode, long K: the shrink splits K over many CTAs
    (50, 256, 128, 8, 2, 3, 192),       # rank above 128: the segment-GEMM LoRA path
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}_S{}_R{}".format(*s))
def test_matches_reference(shape, dtype, gemm_path):
    T, H, I, E, k, S, R = shape
    check(make_case(T, H, I, E, k, S, R, dtype=dtype, seed=hash(shape) % 1000), dtype)


@pytest.mark.parametrize("shape", [(1, 256, 128, 8, 2, 4, 16), (300, 256, 192, 32, 4, 8, 8), (4, 4096, 1024, 8, 2, 2, 16),
                                   (100, 256, 128, 8, 2, 3, 128)], ids=lambda s: "T{}_H{}_R{}".format(s[0], s[1], s[6]))
def test_lora_kernels_agree_with_segment_gemm(shape, monkeypatch):
    """lora_gemm.cu (split-K shrink, N-range expand) against the older segment-GEMM LoRA path
    (MOELORA_LORA_SEGMENT_GEMM=1): both match the reference, and each other to bf16 rounding."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, seed=11)
    monkeypatch.delenv("MOELORA_LORA_SEGMENT_GEMM", raising=False)
    new = check(args, torch.bfloat16)
    monkeypatch.setenv("MOELORA_LORA_SEGMENT_GEMM", "1")
    old = check(args, torch.bfloat16)
    assert rel_err(new, old) < 1e-2


EVERY_SEGMENT = "1000000"  # MOELORA_LORA_FEW_ROWS that sends every segment to the few-rows path


def set_knob(monkeypatch, name, value):
    """Environment knob `name` = value, or unset (its default) for None."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def set_lora_few_rows(monkeypatch, rows):
    """MOELORA_LORA_FEW_ROWS = rows ("0": 64-row tiles only, EVERY_SEGMENT: few-rows only), or unset for None
    (the default mix)."""
    set_knob(monkeypatch, "MOELORA_LORA_FEW_ROWS", rows)


ROW_PATH_SHAPES = [
    (1, 256, 128, 8, 2, 4, 16),
    (300, 256, 192, 32, 4, 8, 8),
    (20, 128, 64, 4, 2, 2, 5),
    (33, 128, 64, 4, 2, 2, 40),
    (4, 4096, 1024, 8, 2, 2, 16),
    (200, 256, 128, 16, 2, 4, 64),
    (100, 256, 128, 8, 2, 3, 128),
    (700, 512, 256, 16, 4, 3, 32),
    (600, 200, 136, 8, 2, 2, 64),  # segments average 75 rows: rank 64's wide-K shrink tiles; K = 200: a partial K step
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ROW_PATH_SHAPES, ids=lambda s: "T{}_H{}_E{}_S{}_R{}".format(s[0], s[1], s[3], s[5], s[6]))
def test_lora_row_paths_agree(shape, dtype, monkeypatch):
    """The LoRA kernels' two m-tile paths: 64-row tensor-core tiles (MOELORA_LORA_FEW_ROWS=0) and the
    few-rows path on swapped-operand mma.sync (=EVERY_SEGMENT: every tile, so row groups of 8, ranks 5..128,
    split-K and long N all go through it), and the default mix of both (skewed routing gives segments of 1 to
    64+ rows; the path is chosen per segment). Each matches the reference; the three agree to the rounding of the LoRA intermediate."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=21)
    outs = {}
    for rows in ["0", EVERY_SEGMENT, None]:
        set_lora_few_rows(monkeypatch, rows)
        outs[rows] = check(args, dtype)
    assert rel_err(outs[EVERY_SEGMENT], outs["0"]) < TOL[dtype] / 2
    assert rel_err(outs[None], outs["0"]) < TOL[dtype] / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [s for s in ROW_PATH_SHAPES if s[6] <= 64] + [(2048, 512, 256, 8, 2, 3, 32)],
                         ids=lambda s: "T{}_H{}_E{}_S{}_R{}".format(s[0], s[1], s[3], s[5], s[6]))
def test_lora_tiles_kernel_bits(shape, dtype, monkeypatch):
    """With every segment on the 64-row tiles (MOELORA_LORA_FEW_ROWS=0) ranks up to 64 run the tiles-only LoRA
    kernels (6-8 shrink CTAs of 4 warps per SM; expand CTAs of 8 warps): the same products in the
    same order as the 4-warp kernels' 64-row path (MOELORA_LORA_TILES_KERNEL=0), so the same bits, and the
    reference's values (poisoned outputs, unaligned rank 5, partial K steps and h chunks included)."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=31)
    monkeypatch.setenv("MOELORA_LORA_FEW_ROWS", "0")
    monkeypatch.delenv("MOELORA_LORA_EXPAND_FEW_ROWS", raising=False)
    monkeypatch.setenv("MOELORA_LORA_TILES_KERNEL", "0")
    four_warps = check(args, dtype)
    monkeypatch.delenv("MOELORA_LORA_TILES_KERNEL")
    tiles = check(args, dtype)
    assert torch.equal(tiles, four_warps)


@pytest.mark.parametrize("R", [16, 64, 128])
@pytest.mark.parametrize("T", [100, 200, 512])
def test_lora_tiles_kernel_rule(T, R, monkeypatch):
    """The default rules (stages.h lora_tiles_only): when the (expert, adapter) segments average 16+ rows (T = 512:
    1024 rows over 8 experts x 4 adapters), ranks up to 64 run both LoRA kernels as the tiles-only kernels; from 8
    rows (T = 200: 12.5) the expands alone; below that (T = 100: 6.25) and at rank 128 the default kernels run.
    Either way the output matches the reference."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    for name in ["MOELORA_LORA_FEW_ROWS", "MOELORA_LORA_EXPAND_FEW_ROWS", "MOELORA_LORA_TILES_KERNEL",
                 "MOELORA_LORA_SEGMENT_GEMM", "MOELORA_LORA_OVERLAP", "MOELORA_DECODE_GEMV"]:
        monkeypatch.delenv(name, raising=False)
    dtype = torch.bfloat16
    args = make_case(T, 256, 128, 8, 2, 4, R, dtype=dtype, seed=37)
    check(args, dtype)
    names = launched_kernels(args)[1]
    tiles_only = [(m.group(1), m.group(2) == "true") for n in names
                  for m in [re.search(r"lora_(shrink|expand)_kernel<.*, (true|false)>", n)] if m]
    assert len(tiles_only) == 4, names  # fc1's and fc2's shrink and expand
    min_rows = {"shrink": 512, "expand": 200}
    assert all(tiles == (R <= 64 and T >= min_rows[kind]) for kind, tiles in tiles_only), names


@pytest.mark.parametrize("shape", [ROW_PATH_SHAPES[i] for i in (1, 3, 7)],
                         ids=lambda s: "T{}_H{}_E{}_S{}_R{}".format(s[0], s[1], s[3], s[5], s[6]))
def test_lora_shrink_and_expand_paths_chosen_apart(shape, monkeypatch):
    """The expand's own threshold (MOELORA_LORA_EXPAND_FEW_ROWS; by default 2 x 16 when segments average
    <= 16 rows): the shrink on one m-tile path and the expand on the other -- the expand reads the
    partials either shrink path writes -- matches the reference and the all-64-row-tiles result."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = shape
    dtype = torch.bfloat16
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=23)
    monkeypatch.setenv("MOELORA_LORA_FEW_ROWS", "0")
    monkeypatch.delenv("MOELORA_LORA_EXPAND_FEW_ROWS", raising=False)
    tiles = check(args, dtype)
    for shrink_rows, expand_rows in [("0", EVERY_SEGMENT), (EVERY_SEGMENT, "0"), ("16", "32")]:
        monkeypatch.setenv("MOELORA_LORA_FEW_ROWS", shrink_rows)
        monkeypatch.setenv("MOELORA_LORA_EXPAND_FEW_ROWS", expand_rows)
        out = check(args, dtype)
        assert rel_err(out, tiles) < TOL[dtype] / 2, (shrink_rows, expand_rows)


@pytest.mark.parametrize("waves", ["1", "6"])
def test_lora_shrink_split_count(waves, monkeypatch):
    """The shrink's split-K count (MOELORA_LORA_SHRINK_WAVES: fewer or more K-chunks than the default) changes
    only the summation order of the partials: the result matches the reference and the default's."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = 2048, 2048, 512, 8, 2, 4, 16  # fc1 on an H100: 6 / 11 / 16 K-chunks for 1 / 2 / 6 waves
    dtype = torch.bfloat16
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=29)
    monkeypatch.delenv("MOELORA_LORA_SHRINK_WAVES", raising=False)
    default = check(args, dtype)
    monkeypatch.setenv("MOELORA_LORA_SHRINK_WAVES", waves)
    assert rel_err(check(args, dtype), default) < TOL[dtype] / 2


FUSED_ACT_SHAPES = [
    # T,   H,   I,   E,  k, S, R
    (300, 256, 192, 32, 4, 8, 8),
    (200, 256, 136, 16, 2, 4, 64),    # I = 136: the last chunk of h columns is partial
    (100, 256, 128, 8, 2, 3, 128),
    (20, 128, 64, 4, 2, 2, 5),        # rank 5: element-wise B loads
    (700, 512, 256, 16, 4, 3, 32),
    (5, 128, 64, 8, 2, 2, 16),        # smallest T above the decode GEMV
]


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", FUSED_ACT_SHAPES, ids=lambda s: "T{}_I{}_E{}_S{}_R{}".format(s[0], s[2], s[3], s[5], s[6]))
def test_lora_expand_with_fused_activation_bit_identical(shape, dtype, activation, monkeypatch):
    """fc1's LoRA expand writing h itself (the default) gives the same bits as the expand updating gu
    followed by the activation stage (MOELORA_LORA_FUSED_ACT=0), on both m-tile paths (few rows:
    =EVERY_SEGMENT, 64-row tiles: =0, and the default mix), and matches the reference."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=41)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "0")  # the overlapped LoRA has no gated expand (its own test)
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # nor has the LoRA inside the GEMM (rank 32 at T=700 takes it)
    for rows in ["0", EVERY_SEGMENT, None]:
        set_lora_few_rows(monkeypatch, rows)
        monkeypatch.delenv("MOELORA_LORA_FUSED_ACT", raising=False)
        fused = check(args, dtype, activation=activation)
        monkeypatch.setenv("MOELORA_LORA_FUSED_ACT", "0")
        poison_allocator()
        unfused = moelora_ext.fused_moe(**args, activation=activation)
        assert torch.equal(fused, unfused), f"MOELORA_LORA_FEW_ROWS={rows}: fused activation changed the bits"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ROW_PATH_SHAPES + [(4096, 512, 256, 16, 8, 4, 16)],
                         ids=lambda s: "T{}_H{}_E{}_S{}_R{}".format(s[0], s[1], s[3], s[5], s[6]))
def test_lora_token_rows_shrink_bit_identical(shape, dtype, monkeypatch):
    """fc1's LoRA shrink reading each row's token from the hidden states (MOELORA_LORA_TOKEN_ROWS=1; by default
    only when the gathered copy exceeds half the L2) gives the same bits as reading the gathered copy (=0), on
    both m-tile paths (few rows: =EVERY_SEGMENT, 64-row tiles: =0, and the default mix), and matches the
    reference."""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")  # the LoRA kernels' own paths, not the LoRA in the GEMM
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=43)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "0")  # the serial LoRA path (the overlapped one: its own test)
    for rows in ["0", EVERY_SEGMENT, None]:
        set_lora_few_rows(monkeypatch, rows)
        monkeypatch.setenv("MOELORA_LORA_TOKEN_ROWS", "1")
        by_token = check(args, dtype)
        monkeypatch.setenv("MOELORA_LORA_TOKEN_ROWS", "0")
        poison_allocator()
        gathered = moelora_ext.fused_moe(**args)
        assert torch.equal(by_token, gathered), f"MOELORA_LORA_FEW_ROWS={rows}: token rows changed the bits"
        monkeypatch.delenv("MOELORA_LORA_TOKEN_ROWS", raising=False)  # the size rule picks either
        assert torch.equal(moelora_ext.fused_moe(**args), gathered)


OVERLAP_SHAPES = [
    # T,   H,    I,    E,  k, S, R
    (5, 128, 64, 8, 2, 2, 16),           # smallest T above the decode GEMV
    (24, 256, 128, 32, 4, 8, 8),         # skewed routing: unused experts, tokens without adapter
    (12, 2880, 2880, 4, 2, 2, 16),       # gpt-oss sizes: split-K shrinks over K = 2880
    (40, 512, 256, 64, 8, 8, 64),        # rank 64
    (20, 128, 64, 4, 2, 2, 5),           # rank 5: element-wise adapter loads
    (300, 256, 192, 32, 4, 8, 8),        # above the default's rows: segments on the 64-row LoRA tiles too
    (100, 256, 136, 8, 2, 3, 128),       # rank 128, I = 136
]


def _overlap_kernels(names):
    """(activation with the fc1 delta added, gated LoRA expand) launched, from the kernel names."""
    return (any(re.search(r"gated_activation_kernel<.*, true>", n) for n in names),
            any(re.search(r"lora_expand_kernel<.*, true>", n) for n in names))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", OVERLAP_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_S{}_R{}".format(*s[:4], *s[5:]))
def test_lora_overlap_matches_reference(shape, dtype, activation, monkeypatch):
    """The LoRA overlapped with the base GEMMs (MOELORA_LORA_OVERLAP=1; by default when T * k <= 8 E): each LoRA
    pair on a second stream beside its GEMM, the expands adding into zeroed delta buffers that the activation
    (fc1) and the finalize (fc2) add. Matches the reference and the serial path (=0) to the rounding of the delta,
    and the profiler shows the delta-adding activation ran and the gated expand did not."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the overlap runs beside the sm90 CUTLASS GEMMs only")
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=47)
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "1")
    overlapped = check(args, dtype, activation=activation)
    assert _overlap_kernels(launched_kernels(dict(args, activation=activation))[1]) == (True, False)
    for _ in range(3):  # the same bits on every run (no atomics, fixed summation orders)
        assert torch.equal(moelora_ext.fused_moe(**args, activation=activation), overlapped)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "0")
    serial = check(args, dtype, activation=activation)
    assert rel_err(overlapped, serial) < TOL[dtype] / 2
    assert _overlap_kernels(launched_kernels(dict(args, activation=activation))[1])[0] is False
    monkeypatch.delenv("MOELORA_LORA_OVERLAP")
    default = moelora_ext.fused_moe(**args, activation=activation)
    assert torch.equal(default, overlapped if T * k <= 8 * E else serial)


@pytest.mark.parametrize("sms", ["8:24", "24:8", "30", "1:131", ""])
@pytest.mark.parametrize("shape", [OVERLAP_SHAPES[i] for i in (1, 3, 5)],
                         ids=lambda s: "T{}_H{}_I{}_E{}_S{}_R{}".format(*s[:4], *s[5:]))
def test_lora_overlap_sms_change_no_bits(shape, sms, monkeypatch):
    """How many SMs the base GEMMs leave to the overlapped LoRA (MOELORA_LORA_OVERLAP_SMS=N, or N1:N2 for fc1 and
    fc2; empty: the default) moves work between SMs but never changes a sum's order: the same bits as the default
    split, which matches the reference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the overlap runs beside the sm90 CUTLASS GEMMs only")
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, seed=48)
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "1")
    monkeypatch.delenv("MOELORA_LORA_OVERLAP_SMS", raising=False)
    default = check(args, torch.bfloat16)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP_SMS", sms)
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), default)


GEMM_TILES = ["small", "large", "large_pp", "swap32", "swap32/large", "large_pp/swap32"]
# What each configuration's kernel name shows: its wgmma atom (rows on M in 64- / 128-row tiles with N 128 /
# 256, or swapped with the rows on N = 32) and its schedule.
GEMM_TILE_KERNELS = {
    "small": ("MMA_64x128x16", "Pingpong"), "large": ("MMA_64x256x16", "Cooperative"),
    "large_pp": ("MMA_64x256x16", "Pingpong"), "swap32": ("MMA_64x32x16", "Cooperative"),
}
GEMM_TILE_SHAPES = [
    # T,    H,    I,    E,   k, S,  R
    (1, 256, 128, 8, 2, 4, 16),          # one row in two experts (the GEMV turned off)
    (0, 256, 128, 8, 2, 4, 16),          # no rows
    (96, 512, 320, 16, 4, 4, 16),        # 2I = 640, H = 512: partial 128-row weight tiles when swapped
    (300, 256, 192, 32, 4, 8, 8),        # skewed: experts from 0 to > 64 rows (several row tiles each)
    (2000, 2880, 2880, 4, 2, 2, 16),     # gpt-oss sizes (N = 5760 / 2880), ~1000 rows per expert
]


def launched_kernels(args):
    """One call of the op under the profiler: its output and the names of the CUDA kernels it launched, in
    launch order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = moelora_ext.fused_moe(**args)
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _gemm_kernels(args):
    """(wgmma atom, schedule) of each CUTLASS kernel one call launches, in launch order, from its name."""
    found = []
    for n in launched_kernels(args)[1]:
        if "cutlass" in n:
            atom = re.search(r"MMA_64x\d+x16", n).group(0)
            found.append((atom, "Pingpong" if "Pingpong" in n else "Cooperative"))
    return found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles", GEMM_TILES)
@pytest.mark.parametrize("shape", GEMM_TILE_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s[:5]))
def test_gemm_tile_configs(shape, tiles, dtype, monkeypatch):
    """Every tile configuration of the sm90 grouped GEMM (MOELORA_GEMM_TILE=<fc1>[/<fc2>], forced past the size
    rule), the swapped-operand ones (D^T = W[e] @ rows^T, column-major D) included, matches the reference with
    and without adapters: one-row and empty experts, rows spread over several tiles, weight rows that do not
    fill the last tile. The grouped-GEMM path at T = 1 is reached with the decode GEMV off; the profiler shows
    that the forced configurations ran."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the tile configurations are the sm90 CUTLASS GEMM's")
    monkeypatch.setenv("MOELORA_GEMM_TILE", tiles)
    monkeypatch.setenv("MOELORA_DECODE_GEMV", "0")
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=T + E)
    check(args, dtype)
    base = _base_args(args)
    check(base, dtype)
    if T > 0:
        fc1, fc2 = (tiles.split("/") * 2)[:2]
        assert _gemm_kernels(base) == [GEMM_TILE_KERNELS[fc1], GEMM_TILE_KERNELS[fc2]]


def test_gemm_tile_unknown_name_rejected(monkeypatch):
    """A misspelt MOELORA_GEMM_TILE is an error naming the variable and the choices, not a silent fallback to
    the size rule (a measurement would report the wrong configuration)."""
    monkeypatch.setenv("MOELORA_GEMM_TILE", "swap16")
    args = make_case(100, 256, 128, 8, 2, seed=5)
    with pytest.raises(RuntimeError, match="MOELORA_GEMM_TILE: unknown tile configuration 'swap16'"):
        moelora_ext.fused_moe(**args)
    monkeypatch.setenv("MOELORA_GEMM_TILE", "large/")
    with pytest.raises(RuntimeError, match="unknown tile configuration ''"):
        moelora_ext.fused_moe(**args)
    monkeypatch.setenv("MOELORA_GEMM_TILE", "")  # empty: the size rule, as for the integer knobs
    check(args, torch.bfloat16)


# fc1 with the activation in its CUTLASS epilogue (calls without LoRA, row-side tiles).
GATED_SHAPES = [
    # T,    H,    I,   E,  k
    (300, 256, 192, 32, 4),     # skewed: empty experts, several row tiles; the last 128-output tile half past I
    (96, 512, 200, 16, 4),      # I = 200: the last tile runs past I at 64 and 128 outputs per tile
    (2000, 2880, 2880, 4, 2),   # gpt-oss sizes, ~1000 rows per expert
]


def _base_args(args):
    return {n: v for n, v in args.items() if "lora" not in n and "shared" not in n}


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", ["small", "large", "large_pp"])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
def test_gated_fc1_epilogue(shape, tile, dtype, activation, monkeypatch):
    """fc1's GEMM with act(gate) * up in its epilogue (no gu, no activation stage) matches the reference on every
    row-side tile, and the unfused path (MOELORA_GATED_FC1=0) to within the rounding of gate and up, which only
    the unfused path does; the profiler shows which of the two ran. Poisoned allocator: an h column the epilogue
    missed would read as NaN."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the gated epilogue is the sm90 CUTLASS GEMM's")
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.delenv("MOELORA_GATED_FC1", raising=False)
    monkeypatch.setenv("MOELORA_GEMM_TILE", tile)
    T, H, I, E, k = shape
    base = dict(_base_args(make_case(T, H, I, E, k, dtype=dtype, seed=T + I)), activation=activation)
    fused = check(base, dtype)
    names = launched_kernels(base)[1]
    assert sum("GatedActivationEpilogue" in n for n in names) == 1, names
    assert not any("gated_activation" in n for n in names), names
    monkeypatch.setenv("MOELORA_GATED_FC1", "0")
    poison_allocator()
    unfused, names = launched_kernels(base)
    assert not any("GatedActivationEpilogue" in n for n in names) and any("gated_activation" in n for n in names), names
    err = rel_err(fused, unfused)
    assert 0 <= err < TOL[dtype] / 2, f"fused vs unfused activation: {err:.3e}"


def test_gated_fc1_rule(monkeypatch):
    """By default the gated fc1 runs on the row-side tiles only, in calls without LoRA (with adapters only when fc1's
    LoRA is inside the GEMM: the delta must reach gate and up before the activation), not on the swapped tile (few
    rows per expert)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the gated epilogue is the sm90 CUTLASS GEMM's")
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.delenv("MOELORA_GATED_FC1", raising=False)
    monkeypatch.delenv("MOELORA_GEMM_TILE", raising=False)
    monkeypatch.delenv("MOELORA_LORA_IN_GEMM", raising=False)
    many = make_case(512, 256, 128, 8, 2, 4, 16, seed=3)    # 128 rows per expert: a row-side tile
    few = make_case(24, 256, 128, 8, 2, seed=3)             # 6 rows per expert: the swapped tile
    # With adapters: gated where fc1's LoRA is in the GEMM (by default here: t's 128 columns <= K = 256), not with
    # the expand kernels (MOELORA_LORA_IN_GEMM=0).
    for args, in_gemm, gated in [(_base_args(many), "", True), (many, "", True), (many, "0", False), (few, "", False)]:
        monkeypatch.setenv("MOELORA_LORA_IN_GEMM", in_gemm)
        out, names = launched_kernels(args)
        assert any("GatedActivationEpilogue" in n for n in names) == gated, names
        assert any("gated_activation" in n for n in names) != gated, names
        assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


def test_gated_fc1_graph_replay(monkeypatch):
    """The gated fc1 under CUDA-graph capture: replays with new tokens and routing written in place equal eager
    calls bit for bit."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the gated epilogue is the sm90 CUTLASS GEMM's")
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.delenv("MOELORA_GATED_FC1", raising=False)
    monkeypatch.delenv("MOELORA_GEMM_TILE", raising=False)
    args = _base_args(make_case(1000, 256, 192, 8, 2, seed=21))
    graph, static_out = capture_graph(args)
    assert any("GatedActivationEpilogue" in n for n in launched_kernels(args)[1])
    for seed in range(22, 25):
        fresh = make_case(1000, 256, 192, 8, 2, seed=seed)
        for name in ["hidden_states", "topk_weights", "topk_ids"]:
            args[name].copy_(fresh[name])
        static_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static_out, moelora_ext.fused_moe(**args)), f"replay differs from eager (seed {seed})"
        assert rel_err(static_out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


# The LoRA inside the base GEMMs (ranks 16, 32, 64, 128): more k tiles over t (each row's scaled shrink output in its
# slot's columns) and the adapters' B, no expand kernel. MOELORA_LORA_IN_GEMM=1 takes it past the default rule (t's
# columns at most the weight's K), MOELORA_LORA_OVERLAP=0 keeps the LoRA after the GEMMs at every size.
LORA_K_SHAPES = [
    # T,    H,    I,   E,  k, S,  R
    (300, 256, 192, 32, 4, 8, 64),   # skewed routing: empty experts, several row tiles, I past the last tile
    (200, 512, 200, 16, 2, 3, 64),   # S R = 192 of t's 256 columns: the adapters' slots past S read as zeros
    (160, 256, 128, 8, 4, 2, 128),   # rank 128: two 64-column panels per slot
    (300, 256, 192, 32, 4, 8, 16),   # rank 16: 32-byte swizzled boxes, 4 (k tile 64) or 8 (128) slots per k tile
    (250, 256, 128, 8, 4, 5, 16),    # rank 16, S R = 80 of t's 128 columns
    (200, 512, 200, 16, 2, 3, 32),   # rank 32: 64-byte swizzled boxes; slot 3 past S reads as zeros
]


def _lora_k_kernels(args):
    """(the call's output, how many t operands and LoRA-in-GEMM GEMMs it launched, whether an expand ran). In a call
    with adapters every GEMM on our own main loop has the LoRA inside (the gated fc1 without it is for calls
    without adapters)."""
    out, names = launched_kernels(args)
    return (out, sum("lora_k_operand" in n for n in names), sum("ExpertMainloop" in n for n in names),
            any("lora_expand" in n for n in names))


def _lora_k_env(monkeypatch, tile=None):
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.delenv("MOELORA_GATED_FC1", raising=False)
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "1")
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "0")
    # t from lora_k_operand.cu, counted by name, at the rule's split counts; the one-split shrink writing t itself
    # (the default where the rule gives one split) has its own tests (_shrink_t_env).
    monkeypatch.setenv("MOELORA_LORA_SHRINK_T", "0")
    monkeypatch.delenv("MOELORA_LORA_SHRINK_SPLITS", raising=False)
    if tile is None:
        monkeypatch.delenv("MOELORA_GEMM_TILE", raising=False)
    else:
        monkeypatch.setenv("MOELORA_GEMM_TILE", tile)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", ["small", "large", "large_pp"])
@pytest.mark.parametrize("shape", LORA_K_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}_S{}_R{}".format(*s))
def test_lora_in_gemm(shape, tile, dtype, monkeypatch):
    """fc1 (gated epilogue) and fc2 with the LoRA as more k tiles match the reference on every row-side tile and
    the expand kernels (MOELORA_LORA_IN_GEMM=0) to within their rounding (t rounds scale * t, the expands round t);
    the profiler shows two t operands, two LoRA GEMMs and no expand. Rows without an adapter equal the call
    without LoRA bit for bit (their t is zero: the extra k tiles add exact zeros)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _lora_k_env(monkeypatch, tile)
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=T + R)
    got = check(args, dtype)
    assert _lora_k_kernels(args)[1:] == (2, 2, False)
    plain = args["token_lora_ids"] == -1
    assert 0 < int(plain.sum()) < T
    assert torch.equal(got[plain], moelora_ext.fused_moe(**_base_args(args))[plain])
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")
    poison_allocator()
    expand, operands, gemms, expanded = _lora_k_kernels(args)
    assert (operands, gemms, expanded) == (0, 0, True)
    err = rel_err(got, expand)
    assert err < TOL[dtype] / 2, f"LoRA in the GEMM vs the expand kernels: {err:.3e}"


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, True, False, True), (True, False, True, False)],
                         ids=lambda f: "".join("S" if x else "-" for x in f))
@pytest.mark.parametrize("rank", [16, 64])
def test_lora_in_gemm_shared_outer(flags, activation, rank, monkeypatch):
    """Shared-outer adapters (stored once for every expert: the adapters' descriptor skips the expert offset) give
    the same bits as the same adapters replicated per expert, and both match the reference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _lora_k_env(monkeypatch)
    args = dict(make_case(257, 256, 128, 8, 4, 4, rank, seed=44, shared=flags), activation=activation)
    out = check(args, torch.bfloat16)
    assert _lora_k_kernels(args)[1:] == (2, 2, False)
    assert torch.equal(out, moelora_ext.fused_moe(**replicate_shared(args, flags)))


def test_lora_in_gemm_rule(monkeypatch):
    """By default the LoRA goes inside a GEMM whose K is at least t's columns, per GEMM, for the LoRA after the
    GEMMs (not beside them: few rows per expert), at ranks 16 / 32 and, where the experts average at most 512 rows,
    64 / 128; not at other ranks."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    for name in ("MOELORA_PORTABLE", "MOELORA_LORA_IN_GEMM", "MOELORA_LORA_OVERLAP", "MOELORA_GEMM_TILE",
                 "MOELORA_LORA_SHRINK_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOELORA_LORA_SHRINK_T", "0")  # t's kernel counted by name
    cases = [
        (make_case(512, 2048, 256, 8, 2, 4, 64, seed=6), (2, 2, False)),   # t_cols 256: fc1 K 2048, fc2 K 256
        (make_case(512, 1024, 256, 8, 2, 8, 64, seed=6), (1, 1, True)),    # t_cols 512: fc2 K 256, its expand
        (make_case(512, 256, 128, 8, 2, 8, 64, seed=6), (0, 0, True)),     # K too short for both
        (make_case(24, 2048, 1024, 8, 2, 4, 64, seed=6), (0, 0, True)),    # the LoRA beside the GEMMs
        (make_case(512, 2048, 1024, 8, 2, 4, 16, seed=6), (2, 2, False)),  # rank 16: t_cols 128
        (make_case(512, 2048, 1024, 8, 2, 4, 8, seed=6), (0, 0, True)),    # rank 8: no TMA box layout for it
        (make_case(1100, 2048, 1024, 2, 1, 4, 64, seed=6), (0, 0, True)),  # 550 rows per expert: MMA-bound GEMMs
        (make_case(1100, 2048, 1024, 2, 1, 4, 16, seed=6), (2, 2, False)), # ... but rank 16 (t_cols 128)
    ]
    for args, expected in cases:
        out, *kernels = _lora_k_kernels(args)
        assert tuple(kernels) == expected, (args["hidden_states"].shape, args["w13_lora_a"].shape)
        assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


def _slot_pattern_ids(slots, T, S, seed, sparse):
    """token_lora_ids [T] of a slot pattern: every token in slot S - 2 ("one"); none with an adapter ("none"); 9 in 10
    in slots 0-1, the rest in slot S - 1, then 1 in 10 set to none ("clustered"); otherwise a fraction `sparse` of
    the tokens in slot 3 and the rest without (the last bucket of each expert, or none of some experts' rows)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if slots == "one":
        return torch.full((T,), S - 2, dtype=torch.int32)
    if slots == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    if slots == "clustered":
        ids = torch.where(torch.rand(T, generator=g) < 0.9, torch.randint(0, 2, (T,), generator=g),
                          torch.full((T,), S - 1)).to(torch.int32)
        ids[torch.rand(T, generator=g) < 0.1] = -1
        return ids
    return torch.where(torch.rand(T, generator=g) < sparse, torch.full((T,), 3), torch.full((T,), -1)).to(torch.int32)


@pytest.mark.parametrize("tile", ["small", "large"])
@pytest.mark.parametrize("rank", [16, 32, 64])
@pytest.mark.parametrize("slots", ["one", "none", "clustered", "last_rows"])
def test_lora_in_gemm_skipped_tiles(slots, rank, tile, monkeypatch):
    """A tile of rows holds a range of slots (rows are sorted by slot within an expert): the GEMM reads the
    adapters of only those slots and multiplies only the LoRA k tiles that hold one of them. Many rows per expert
    and slots in blocks, so that tiles differ in their slots: every token in one slot; no token with an adapter
    (every LoRA k tile skipped: the base call's bits); most tokens in slots 0-1 and a few in the last; the tokens
    with an adapter all at the end of each expert's rows. Matches the reference and the expand kernels; rows
    without an adapter equal the call without LoRA bit for bit."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _lora_k_env(monkeypatch, tile)
    T, S = 700, 8
    args = make_case(T, 256, 192, 4, 2, S, rank, seed=rank + len(slots))
    args["token_lora_ids"] = _slot_pattern_ids(slots, T, S, seed=7, sparse=1 / 16).cuda()
    got = check(args, torch.bfloat16)
    assert _lora_k_kernels(args)[1:] == (2, 2, False)
    plain = args["token_lora_ids"] == -1
    assert torch.equal(got[plain], moelora_ext.fused_moe(**_base_args(args))[plain])
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")
    poison_allocator()
    err = rel_err(got, moelora_ext.fused_moe(**args))
    assert err < TOL[torch.bfloat16] / 2, f"LoRA in the GEMM vs the expand kernels: {err:.3e}"


def test_lora_in_gemm_misaligned_adapters(monkeypatch):
    """Adapters' B given as a view that does not start on 16 bytes (the GEMM reads it by TMA) keep the expand
    kernels for that GEMM, with the same result as aligned copies to the dtype's rounding."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _lora_k_env(monkeypatch)
    args = make_case(257, 256, 128, 8, 4, 4, 64, seed=45)
    b = args["w2_lora_b"]
    shifted = torch.empty(b.numel() + 1, dtype=b.dtype, device=b.device)[1:].view(b.shape)
    shifted.copy_(b)
    assert shifted.data_ptr() % 16 != 0
    out, operands, gemms, expanded = _lora_k_kernels(dict(args, w2_lora_b=shifted))
    assert (operands, gemms, expanded) == (1, 1, True)  # fc1 in its GEMM, fc2 on the expand kernels
    assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]
    assert rel_err(out, moelora_ext.fused_moe(**args)) < TOL[torch.bfloat16] / 2


def _shrink_t_env(monkeypatch, tile=None):
    """_lora_k_env with one K split and the shrink writing t itself (the default wherever the rule gives one split)."""
    _lora_k_env(monkeypatch, tile)
    monkeypatch.delenv("MOELORA_LORA_SHRINK_T")
    monkeypatch.setenv("MOELORA_LORA_SHRINK_SPLITS", "1")


def _check_shrink_t(args, monkeypatch):
    """The call with the shrink writing t (no t kernel, two LoRA GEMMs, no expand) on a poisoned allocator: matches
    the reference, equals bit for bit the same call with t from lora_k_operand.cu (MOELORA_LORA_SHRINK_T=0, the
    same one split), and its rows without an adapter equal the call without LoRA."""
    dtype = args["hidden_states"].dtype
    poison_allocator()
    got, operands, gemms, expanded = _lora_k_kernels(args)
    assert (operands, gemms, expanded) == (0, 2, False)
    assert rel_err(got, fused_moe_reference(**args)) < TOL[dtype]
    monkeypatch.setenv("MOELORA_LORA_SHRINK_T", "0")
    poison_allocator()
    kernel, operands, gemms, expanded = _lora_k_kernels(args)
    assert (operands, gemms, expanded) == (2, 2, False)
    assert torch.equal(got, kernel)
    monkeypatch.delenv("MOELORA_LORA_SHRINK_T")
    plain = args["token_lora_ids"] == -1
    assert torch.equal(got[plain], moelora_ext.fused_moe(**_base_args(args))[plain])
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", ["small", "large", "large_pp"])
@pytest.mark.parametrize("shape", LORA_K_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}_S{}_R{}".format(*s))
def test_lora_in_gemm_shrink_writes_t(shape, tile, dtype, monkeypatch):
    """With one K split the shrink writes t itself (each row's scaled sums in its slot's columns, zeros in the
    others and in each expert's rows without an adapter): the same bits as t from its own kernel, on both shrink
    paths (few rows per segment: the default here; 64-row tiles: MOELORA_LORA_FEW_ROWS=0), every ranks' layout and
    S R short of t's columns."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _shrink_t_env(monkeypatch, tile)
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=T + R + 1)
    _check_shrink_t(args, monkeypatch)
    monkeypatch.setenv("MOELORA_LORA_FEW_ROWS", "0")
    _check_shrink_t(args, monkeypatch)


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("slots", ["one", "none", "clustered", "some_experts"])
def test_lora_in_gemm_shrink_writes_t_slots(slots, rank, monkeypatch):
    """The shrink writing t with the slots of test_lora_in_gemm_skipped_tiles, and experts whose rows all lack an
    adapter (some_experts: 1 in 32 tokens with one; their rows of t are never written, and their tiles hold no
    slot): the same bits as t from its own kernel."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    _shrink_t_env(monkeypatch)
    T, S, E, k = 700, 8, 16, 2
    args = make_case(T, 256, 192, E, k, S, rank, seed=rank + len(slots))
    ids = _slot_pattern_ids(slots, T, S, seed=9, sparse=1 / 32)
    if slots == "some_experts":
        topk = args["topk_ids"].long().cpu()
        routed = topk[(topk >= 0) & (topk < E)]
        with_adapter = topk[(ids >= 0)[:, None].expand_as(topk) & (topk >= 0) & (topk < E)]
        assert len(set(routed.tolist()) - set(with_adapter.tolist())) > 0, "every routed expert has adapter rows"
    args["token_lora_ids"] = ids.cuda()
    _check_shrink_t(args, monkeypatch)
    monkeypatch.setenv("MOELORA_LORA_FEW_ROWS", "0")
    _check_shrink_t(args, monkeypatch)


def test_lora_in_gemm_shrink_t_rule(monkeypatch):
    """By default the shrink writes t where the split rule gives one K split (enough m-tiles to fill the GPU: here
    up to 1088, against 1056 items wanted on an H100's 132 SMs), and t's kernel runs for more splits
    (MOELORA_LORA_SHRINK_SPLITS=2)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    for name in ("MOELORA_PORTABLE", "MOELORA_LORA_IN_GEMM", "MOELORA_LORA_OVERLAP", "MOELORA_GEMM_TILE",
                 "MOELORA_LORA_SHRINK_T", "MOELORA_LORA_SHRINK_SPLITS", "MOELORA_LORA_SHRINK_WAVES"):
        monkeypatch.delenv(name, raising=False)
    # 4096 rows, 64 per expert on average (a row-side tile), 1024 (expert, slot) segments; t's 256 columns <= K.
    args = make_case(512, 256, 256, 64, 8, 16, 16, seed=12)
    for splits, expected in [(None, (0, 2, False)), ("2", (2, 2, False))]:
        if splits is not None:
            monkeypatch.setenv("MOELORA_LORA_SHRINK_SPLITS", splits)
        poison_allocator()
        out, *kernels = _lora_k_kernels(args)
        assert tuple(kernels) == expected, splits
        assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


def _permute_launches(args):
    """(the call's output, how many row-map launches and how many copy launches of the permute it made)."""
    out, names = launched_kernels(args)
    return out, sum("permute_rows_kernel" in n for n in names), sum("permute_kernel" in n for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["t_kernel", "shrink_t", "expand"])
@pytest.mark.parametrize("shape", LORA_K_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}_S{}_R{}".format(*s))
def test_lora_shrink_beside_permute(shape, path, dtype, monkeypatch):
    """fc1's LoRA shrink runs on a second stream beside the permute's copy, after the permute's row maps (two
    permute launches): it matches the reference and equals bit for bit the call with both on one stream
    (MOELORA_LORA_SHRINK_BESIDE_PERMUTE=0: one permute launch), on a poisoned allocator. For the LoRA inside fc1's
    GEMM with t from the shrink itself or from t's kernel (both on the second stream), and for the expand kernels
    after the GEMM (the shrink's partial sums in the workspace; split K where the rule gives it).
    MOELORA_ROUTING_GATHER=0 keeps the permute a kernel of its own at these sizes."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the serial LoRA runs beside the sm90 CUTLASS GEMMs")
    (_shrink_t_env if path == "shrink_t" else _lora_k_env)(monkeypatch)
    if path == "expand":
        monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")
    monkeypatch.setenv("MOELORA_ROUTING_GATHER", "0")
    monkeypatch.delenv("MOELORA_LORA_SHRINK_BESIDE_PERMUTE", raising=False)
    monkeypatch.delenv("MOELORA_LORA_TOKEN_ROWS", raising=False)
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=T + R + 2)
    poison_allocator()
    beside, rows, copies = _permute_launches(args)
    assert (rows, copies) == (1, 1)
    assert rel_err(beside, fused_moe_reference(**args)) < TOL[dtype]
    expected = {"t_kernel": (2, 2, False), "shrink_t": (0, 2, False), "expand": (0, 0, True)}[path]
    assert _lora_k_kernels(args)[1:] == expected
    monkeypatch.setenv("MOELORA_LORA_SHRINK_BESIDE_PERMUTE", "0")
    poison_allocator()
    serial, rows, copies = _permute_launches(args)
    assert (rows, copies) == (0, 1)
    assert torch.equal(beside, serial)


def test_lora_shrink_beside_permute_rule(monkeypatch):
    """By default fc1's shrink runs beside the permute's copy wherever the LoRA runs after the base GEMMs or inside
    them (not beside them) and the permute is a kernel of its own (more than 2048 pairs); not where the routing
    gathers the rows (up to 2048 pairs), with the LoRA beside the GEMMs (MOELORA_LORA_OVERLAP=1), or with the
    shrink on the gathered rows (MOELORA_LORA_TOKEN_ROWS=0). Every case matches the reference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    for name in ("MOELORA_PORTABLE", "MOELORA_LORA_IN_GEMM", "MOELORA_LORA_OVERLAP", "MOELORA_GEMM_TILE",
                 "MOELORA_LORA_SHRINK_T", "MOELORA_LORA_SHRINK_SPLITS", "MOELORA_ROUTING_GATHER",
                 "MOELORA_LORA_TOKEN_ROWS", "MOELORA_LORA_SHRINK_BESIDE_PERMUTE"):
        monkeypatch.delenv(name, raising=False)
    large = make_case(600, 256, 256, 32, 4, 8, 16, seed=13)  # 2400 pairs, 75 per expert
    small = make_case(500, 256, 256, 32, 4, 8, 16, seed=13)  # 2000 pairs: the routing gathers
    cases = [(large, {}, (1, 1)), (small, {}, (0, 0)), (large, {"MOELORA_LORA_IN_GEMM": "0"}, (1, 1)),
             (large, {"MOELORA_LORA_IN_GEMM": "0/1"}, (1, 1)), (large, {"MOELORA_LORA_OVERLAP": "1"}, (0, 1)),
             (large, {"MOELORA_LORA_TOKEN_ROWS": "0"}, (0, 1))]
    for args, env, expected in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        poison_allocator()
        out, *launches = _permute_launches(args)
        assert tuple(launches) == expected, env
        assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]
        for name in env:
            monkeypatch.delenv(name)


@pytest.mark.parametrize("variant", ["t_kernel", "shrink_t", "beside_permute", "beside_permute_pdl"])
@pytest.mark.parametrize("rank", [16, 64])
def test_lora_in_gemm_graph_replay(rank, variant, monkeypatch):
    """The LoRA inside the GEMMs under CUDA-graph capture: replays with new tokens, routing, slots and adapter
    weights written in place equal eager calls bit for bit and match the reference. With the shrink writing t
    (shrink_t) each replay finds the last one's t in the graph's memory, which rows now in other slots or without an
    adapter must not read. beside_permute: the shrink on the second stream beside the permute's copy (the fork and
    join captured as graph edges), also with every launch on PDL (MOELORA_PDL=1)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the LoRA inside the GEMM is the sm90 CUTLASS GEMM's")
    shrink_t = variant != "t_kernel"
    (_shrink_t_env if shrink_t else _lora_k_env)(monkeypatch)
    beside = variant.startswith("beside_permute")
    monkeypatch.delenv("MOELORA_LORA_SHRINK_BESIDE_PERMUTE", raising=False)
    if beside:
        monkeypatch.setenv("MOELORA_ROUTING_GATHER", "0")
    if variant.endswith("pdl"):
        monkeypatch.setenv("MOELORA_PDL", "1")
    args = make_case(333, 256, 128, 16, 4, 8, rank, seed=8)
    graph, static_out = capture_graph(args)
    assert _lora_k_kernels(args)[1:] == ((0 if shrink_t else 2), 2, False)
    assert _permute_launches(args)[1:] == ((1, 1) if beside else (0, 0))
    for seed in range(9, 13):
        _rewrite_inputs(args, seed)
        static_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static_out, moelora_ext.fused_moe(**args)), f"replay differs from eager (seed {seed})"
        assert rel_err(static_out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name,value", [
    ("MOELORA_LORA_FEW_ROWS", "abc"), ("MOELORA_LORA_EXPAND_FEW_ROWS", "16 rows"), ("MOELORA_LORA_SHRINK_WAVES", "-1"),
    ("MOELORA_GEMV_AVG_ROWS", "1e3"), ("MOELORA_LORA_OVERLAP_SMS", "x:16"), ("MOELORA_LORA_OVERLAP_SMS", "12:"),
    ("MOELORA_LORA_OVERLAP_SMS", "2000000"), ("MOELORA_ROUTING_GATHER_PAIRS", "32"),
    ("MOELORA_ROUTING_GATHER_PAIRS", "x"), ("MOELORA_LORA_IN_GEMM", "2"), ("MOELORA_LORA_IN_GEMM", "1/on"),
    ("MOELORA_LORA_SHRINK_SPLITS", "one"),
])
def test_malformed_integer_knob_rejected(name, value, monkeypatch):
    """An integer knob that is set but not an integer in [0, 2^20] (or not one it takes: the gather block's 0, 8
    or 16 pairs) is an error naming the variable, not a silent fallback to the default (a measurement would report
    a setting that never ran); set to the empty string it means the default."""
    if torch.cuda.get_device_capability() != (9, 0) and name == "MOELORA_LORA_OVERLAP_SMS":
        pytest.skip("the overlap (which reads MOELORA_LORA_OVERLAP_SMS) runs beside the sm90 GEMMs only")
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.setenv("MOELORA_LORA_OVERLAP", "1")
    args = make_case(24, 256, 128, 32, 4, 8, 8, seed=49)
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        moelora_ext.fused_moe(**args)
    monkeypatch.setenv(name, "")
    check(args, torch.bfloat16)


@pytest.mark.parametrize("T", [2, 100])  # decode (routing gathers the rows) / grouped GEMM
def test_ids_and_weights_read_as_given(T, gemm_path):
    """topk_ids in int64 (ids beyond int32 dropped, not wrapped), topk_weights in the activation dtype and
    omitted lora_scalings are read in place: the same bits as int32 ids with those pairs set to -1, fp32
    weights of the same values, and scalings of ones."""
    args = make_case(T, 256, 128, 8, 2, 4, 16, seed=90)
    ids64 = args["topk_ids"].to(torch.int64)
    ids64[0, 0] = (1 << 32) + 1  # would read as expert 1 if narrowed first
    ids64[-1, -1] = -(1 << 40)
    ids32 = args["topk_ids"].clone()
    ids32[0, 0] = -1
    ids32[-1, -1] = -1
    w16 = args["topk_weights"].to(torch.bfloat16)
    baseline = dict(args, topk_ids=ids32, topk_weights=w16.float(), lora_scalings=torch.ones(4, device="cuda"))
    expected = check(baseline, torch.bfloat16)
    given = dict(args, topk_ids=ids64, topk_weights=w16)
    del given["lora_scalings"]
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**given), expected)


DECODE_SHAPES = [
    # T, H,    I,    E,  k, S, R
    (1, 256, 128, 8, 2, 4, 16),
    (4, 200, 72, 16, 4, 3, 8),      # T = kDecodeMaxTokens; 200 / 72 are not multiples of a CTA's 32 / 16 columns
    (3, 2880, 2880, 4, 2, 2, 16),   # gpt-oss sizes
    (2, 512, 256, 64, 8, 0, 0),     # no LoRA
    (2, 4096, 1024, 8, 2, 2, 128),  # long K, rank 128
    (1, 128, 64, 4, 2, 2, 5),       # rank not a multiple of 8
    (2, 256, 128, 256, 8, 40, 16),  # 10496 buckets: routing in three kernels and its own permute at decode
]


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_S{}_R{}".format(*s[:4], *s[5:]))
def test_decode_gemv_matches_gemm_path(shape, dtype, activation, gemm_path, monkeypatch):
    """T <= 4 runs the base GEMMs as expert_gemv.cu (fc1 with the gated activation fused, the LoRA expand in
    the GEMV's epilogue); MOELORA_DECODE_GEMV=0 runs the grouped-GEMM path. Both match the reference and
    each other to the dtype's rounding."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=40 + T)
    monkeypatch.delenv("MOELORA_DECODE_GEMV", raising=False)
    decode = check(args, dtype, activation=activation)
    monkeypatch.setenv("MOELORA_DECODE_GEMV", "0")
    gemm = check(args, dtype, activation=activation)
    assert rel_err(decode, gemm) < TOL[dtype] / 2


@pytest.mark.parametrize("lora", [False, True])
def test_decode_gemv_repeated_expert_ids(lora, gemm_path):
    """A token may name an expert more than once, so at T <= 4 an expert can still hold many rows: all 128
    pairs of 4 tokens x k = 32 in one expert (two 64-row tiles, eight 8-row groups each)."""
    args = make_case(4, 256, 128, 32, 32, 4 if lora else 0, 16 if lora else 0, seed=45, invalid_ids=False)
    args["topk_ids"].fill_(3)
    check(args, torch.bfloat16)


GEMV_ROWS_SHAPES = [
    # T,  H,   I,   E,  k, S, R        rows per expert (skewed routing): what the GEMV's passes see
    (40, 256, 128, 8, 2, 4, 16),     # ~10: 16-row passes (two 8-row groups per weight load)
    (300, 256, 192, 32, 4, 8, 8),    # up to > 64: several tiles per expert, 16 + 16 + 8-row passes
    (200, 200, 72, 16, 2, 4, 64),    # columns not a multiple of a CTA's, rank 64
    (33, 128, 64, 4, 2, 2, 40),      # rank padded inside the shrink, 5-30 rows
    (100, 256, 128, 8, 2, 3, 128),   # rank 128
    (64, 512, 256, 16, 4, 0, 0),     # no LoRA
    (1000, 128, 64, 8, 8, 64, 128),  # ~2500 LoRA shrink CTAs in each GEMV launch, more than fit on the GPU at once
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GEMV_ROWS_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_S{}_R{}".format(*s[:4], *s[5:]))
def test_gemv_many_rows_per_expert(shape, dtype, gemm_path, monkeypatch):
    """MOELORA_GEMV_AVG_ROWS extends the GEMV above decode (T * k <= avg * E), and repeated expert ids give
    decode experts many rows too: every row count must be right there: experts with 9-16 rows (one pass of
    two row groups), more than 16 (several passes) and more than 64 (several tiles).
    MOELORA_GEMV_AVG_ROWS=100000 forces the GEMV, MOELORA_DECODE_GEMV=0 the grouped-GEMM path; both match the
    reference and each other."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=50 + T)
    monkeypatch.setenv("MOELORA_GEMV_AVG_ROWS", "100000")
    gemv = check(args, dtype)
    monkeypatch.setenv("MOELORA_DECODE_GEMV", "0")
    gemm = check(args, dtype)
    assert rel_err(gemv, gemm) < TOL[dtype] / 2


def test_gemv_lora_partial_sums_marked_pending_every_call(monkeypatch):
    """The GEMV CTAs take t as ready once its elements leave the routing's pending mark (stages.h kLoraTPending).
    With ~2500 shrink CTAs per launch, more than fit on the GPU at once, many GEMV CTAs reach their epilogue
    before their t is written: a call whose workspace still held the previous call's t would read it. Two
    calls on other inputs, each from the cached blocks the one before used, each against the reference."""
    monkeypatch.setenv("MOELORA_GEMV_AVG_ROWS", "100000")
    for seed in (52, 53, 54):
        args = make_case(1000, 128, 64, 8, 8, 64, 128, seed=seed)
        out = moelora_ext.fused_moe(**args)
        assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


def test_decode_lora_runs_inside_the_gemv_launches():
    """At decode the LoRA shrink runs in the GEMV launches (their first CTAs), not as kernels of its own: a
    call is routing, two GEMVs and the finalize."""
    args = make_case(1, 2048, 768, 128, 8, 8, 16, seed=47)
    moelora_ext.fused_moe(**args)
    out, names = launched_kernels(args)
    assert sum("expert_gemv_kernel" in n for n in names) == 2, names
    assert not any("lora_shrink" in n or "lora_expand" in n for n in names), names
    assert rel_err(out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


FEW_PAIRS_SHAPES = [
    # T,  H,    I,   E,  k, S,  R     at most 32 (token, expert) pairs: the barrier-free routing kernel
    (1, 2048, 768, 128, 8, 8, 16),   # qwen3 decode
    (4, 256, 128, 16, 8, 4, 16),     # 32 pairs
    (4, 256, 128, 4, 4, 2, 16),      # 16 pairs in 4 experts: several pairs per bucket
    (8, 256, 128, 4, 4, 2, 16),      # 32 pairs in 4 experts, grouped-GEMM path
    (16, 256, 128, 8, 2, 4, 16),     # 32 pairs on the grouped-GEMM path (T > 4): the CUTLASS group tables
    (2, 256, 128, 256, 8, 40, 16),   # 10496 buckets, beyond the one-block kernel: it still gathers
    (4, 512, 256, 64, 8, 0, 0),      # no LoRA
]


@pytest.mark.parametrize("int64_ids", [False, True])
@pytest.mark.parametrize("shape", FEW_PAIRS_SHAPES, ids=lambda s: "T{}_E{}_k{}_S{}".format(s[0], s[3], s[4], s[5]))
def test_few_pairs_routing_bit_identical(shape, int64_ids, gemm_path, monkeypatch):
    """Up to 32 pairs the routing runs as one barrier-free kernel (one pair per lane, each table entry a count
    over the pairs); MOELORA_ROUTING_FEW_PAIRS=0 runs the one-block / multi-kernel routing instead. A pair's
    place inside its bucket differs (pair order vs atomic order), which never changes a row's math: the same
    bits, with dropped expert ids (-1 and E) and tokens without adapter."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, seed=60 + T)
    if int64_ids:
        args["topk_ids"] = args["topk_ids"].long()
    monkeypatch.delenv("MOELORA_ROUTING_FEW_PAIRS", raising=False)
    few = check(args, torch.bfloat16)
    monkeypatch.setenv("MOELORA_ROUTING_FEW_PAIRS", "0")
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), few)


ROUTING_BESIDE_SHAPES = [
    # T,  H,    I,   E,  k, S,  R     decode (T <= 4) with at most 32 pairs: fc1's GEMV routes its own rows
    (1, 2048, 768, 128, 8, 8, 16),   # qwen3
    (1, 2880, 2880, 32, 4, 4, 64),   # gpt-oss sizes, rank 64 (two shrink rank blocks)
    (4, 256, 128, 16, 8, 4, 16),     # 32 pairs
    (3, 200, 72, 4, 4, 3, 8),        # several pairs per expert and bucket; columns not a CTA's multiple
    (2, 4096, 1024, 8, 2, 2, 128),   # long K: the shrink over two K ranges
    (2, 256, 128, 256, 8, 40, 16),   # 10496 buckets
    (4, 512, 256, 64, 8, 0, 0),      # no LoRA
]


@pytest.mark.parametrize("pdl", [None, "1"])
@pytest.mark.parametrize("int64_ids", [False, True])
@pytest.mark.parametrize("shape", ROUTING_BESIDE_SHAPES,
                         ids=lambda s: "T{}_H{}_E{}_k{}_S{}_R{}".format(s[0], s[1], s[3], s[4], s[5], s[6]))
def test_decode_routing_beside_fc1_bit_identical(shape, int64_ids, pdl, monkeypatch):
    """At decode with at most 32 pairs fc1's GEMV finds its tile's rows from the ids itself and reads the tokens'
    rows, beside the routing kernel (expert_gemv.cu route_locally; the routing writes the maps but no rows); its
    LoRA shrink CTAs likewise. MOELORA_DECODE_ROUTING_BESIDE=0 runs fc1 after the routing on its gathered rows:
    the same rows in the same order, so the same bits, with dropped ids, tokens without adapter and int64 ids.
    The rule takes it where the call is launched with PDL, so that fc1 really runs while the routing does (T <= 4
    by default, pdl None; every T with MOELORA_PDL=1), at T = 1 or without LoRA; at T = 2-4 with LoRA both calls
    run fc1 after the routing."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, seed=90 + T + R)
    if int64_ids:
        args["topk_ids"] = args["topk_ids"].long()
    set_knob(monkeypatch, "MOELORA_PDL", pdl)
    monkeypatch.delenv("MOELORA_DECODE_ROUTING_BESIDE", raising=False)
    monkeypatch.delenv("MOELORA_ROUTING_FEW_PAIRS", raising=False)
    beside = check(args, torch.bfloat16)
    monkeypatch.setenv("MOELORA_DECODE_ROUTING_BESIDE", "0")
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), beside)


@pytest.mark.parametrize("lora", [False, True])
def test_decode_routing_beside_fc1_edge_routing(lora, monkeypatch):
    """fc1 routing its own rows at decode, at the edges: every pair in one expert (32 rows: two passes of the
    GEMV's 16 rows), every expert id dropped (no tile at all: each CTA still waits for the routing before it
    exits, the output is zeros), and one token of one pair. Each against the reference, with PDL on every launch,
    and equal to the call after the routing."""
    monkeypatch.setenv("MOELORA_PDL", "1")
    S, R = (4, 16) if lora else (0, 0)
    one_expert = make_case(4, 256, 128, 8, 8, S, R, seed=95, invalid_ids=False)
    one_expert["topk_ids"].fill_(5)
    dropped = make_case(2, 256, 128, 8, 4, S, R, seed=96)
    dropped["topk_ids"].fill_(-1)
    single = make_case(1, 256, 128, 8, 1, S, R, seed=97, invalid_ids=False)
    for args in (one_expert, dropped, single):
        monkeypatch.delenv("MOELORA_DECODE_ROUTING_BESIDE", raising=False)
        poison_allocator()
        beside = moelora_ext.fused_moe(**args)
        if args is dropped:
            assert torch.count_nonzero(beside) == 0
        else:
            assert rel_err(beside, fused_moe_reference(**args)) < TOL[torch.bfloat16]
        monkeypatch.setenv("MOELORA_DECODE_ROUTING_BESIDE", "0")
        poison_allocator()
        assert torch.equal(moelora_ext.fused_moe(**args), beside)


@pytest.mark.parametrize("lora", [False, True])
def test_decode_routing_beside_fc1_graph_replay(lora, monkeypatch):
    """fc1 routing its own rows under CUDA-graph capture with PDL (T = 1's default): replays with new ids, slots,
    tokens and weights written in place equal eager calls bit for bit and match the reference."""
    monkeypatch.delenv("MOELORA_DECODE_ROUTING_BESIDE", raising=False)
    monkeypatch.delenv("MOELORA_PDL", raising=False)
    S, R = (8, 16) if lora else (0, 0)
    args = make_case(1, 2048, 768, 128, 8, S, R, seed=98)
    graph, static_out = capture_graph(args)
    for seed in range(99, 103):
        fresh = make_case(1, 2048, 768, 128, 8, S, R, seed=seed)
        for name, value in fresh.items():
            if isinstance(value, torch.Tensor):
                args[name].copy_(value)
        static_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static_out, moelora_ext.fused_moe(**args)), f"replay differs from eager (seed {seed})"
        assert rel_err(static_out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, True, False, True)])
def test_decode_gemv_shared_outer_bit_identical(flags, gemm_path):
    """The GEMV's fused expand skips the expert offset of a shared B exactly as the expand kernel does."""
    shared = make_case(3, 256, 128, 8, 4, 4, 16, seed=46, shared=flags)
    assert torch.equal(check(shared, torch.bfloat16), moelora_ext.fused_moe(**replicate_shared(shared, flags)))


@pytest.mark.parametrize("split_k", [None, "1024", "512", "0"])
@pytest.mark.parametrize("shape", [(1, 4096, 1024, 8, 2, 4, 16), (2, 1000, 520, 8, 2, 3, 64), (3, 2880, 2880, 4, 2, 2, 16),
                                   (4, 14336, 512, 4, 2, 2, 128)],
                         ids=lambda s: "T{}_H{}_I{}_R{}".format(s[0], s[1], s[2], s[6]))
def test_decode_gemv_lora_shrink_k_ranges(shape, split_k, monkeypatch):
    """The GEMV launches' LoRA shrink over K ranges of at most kGemvShrinkSplitK (default 2048;
    MOELORA_GEMV_SHRINK_SPLIT_K=512 more ranges, =0 one), summed in range order by the expand: each matches the
    reference, K not a multiple of 8 or of the range included (element loads), and a call repeats its bits."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=torch.bfloat16, seed=80 + T)
    set_knob(monkeypatch, "MOELORA_GEMV_SHRINK_SPLIT_K", split_k)
    out = check(args, torch.bfloat16)
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), out)


def test_decode_gemv_shrink_split_knob_rejected(monkeypatch):
    """MOELORA_GEMV_SHRINK_SPLIT_K is an integer knob like the others: anything else is an error naming it."""
    args = make_case(1, 256, 128, 8, 2, 4, 16, seed=81)
    monkeypatch.setenv("MOELORA_GEMV_SHRINK_SPLIT_K", "1k")
    with pytest.raises(RuntimeError, match="MOELORA_GEMV_SHRINK_SPLIT_K"):
        moelora_ext.fused_moe(**args)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_activation_and_no_lora(activation, gemm_path):
    args = make_case(96, 256, 128, 8, 2, dtype=torch.bfloat16, seed=3)
    poison_allocator()
    out = moelora_ext.fused_moe(**args, activation=activation)
    assert rel_err(out, fused_moe_reference(**args, activation=activation)) < TOL[torch.bfloat16]


def test_all_rows_in_one_expert_and_all_dropped(gemm_path):
    args = make_case(130, 256, 128, 8, 1, 4, 16, seed=4)
    args["topk_ids"].fill_(5)
    check(args, torch.bfloat16)
    args["topk_ids"].fill_(-1)  # every expert elsewhere: output is exactly zero
    out = moelora_ext.fused_moe(**args)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("flags", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (True, True, True, True)])
def test_shared_outer_bit_identical(flags, gemm_path):
    shared = make_case(77, 256, 128, 8, 4, 4, 16, seed=5, shared=flags)
    out_shared = check(shared, torch.bfloat16)
    assert torch.equal(out_shared, moelora_ext.fused_moe(**replicate_shared(shared, flags)))


@pytest.mark.parametrize("T", [2, 100])  # decode (routing gathers the rows) / grouped GEMM
def test_misaligned_views(T, gemm_path, monkeypatch):
    """Inputs that are contiguous views starting one element into their storage (not 16-byte aligned) give
    the same bits as aligned copies of them: the op copies what its 16-byte paths cannot read in place. (The
    LoRA in the GEMM reads the adapters' B by TMA and leaves misaligned ones to the expand kernels, a path of
    other bits: test_lora_in_gemm_misaligned_adapters; here the expand kernels run for both.)"""
    monkeypatch.setenv("MOELORA_LORA_IN_GEMM", "0")
    args = make_case(T, 256, 128, 8, 2, 4, 16, seed=80)
    shifted = dict(args)
    for name in ["hidden_states", "w13", "w2", "w13_lora_a", "w13_lora_b", "w2_lora_a", "w2_lora_b"]:
        t = args[name]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        shifted[name] = view
    expected = check(args, torch.bfloat16)
    with pytest.warns(UserWarning) as caught:
        got = moelora_ext.fused_moe(**shifted)
    messages = [str(w.message) for w in caught]
    for name in ["w13", "w2"]:  # the expert weights are copied whole on every call: the wrapper says so
        assert any(f"{name} does not start on a 16-byte boundary" in m and "copied on every call" in m
                   for m in messages), messages
    assert torch.equal(got, expected)


def test_non_contiguous_weight_warns_and_matches():
    """A non-contiguous expert weight is copied on every call (the whole tensor): the wrapper says so, naming
    it, and the result is the contiguous one's."""
    args = make_case(40, 256, 128, 8, 2, 4, 16, seed=81)
    expected = moelora_ext.fused_moe(**args)
    strided = dict(args, w2=args["w2"].transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided["w2"].is_contiguous()
    with pytest.warns(UserWarning, match=r"w2 is not contiguous.*copied on every call"):
        got = moelora_ext.fused_moe(**strided)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", [(1000, 256, 128, 16, 4, 8, 16, torch.bfloat16),
                                  (700, 512, 256, 16, 4, 3, 32, torch.float16)], ids=["bf16_R16", "fp16_R32"])
def test_repeated_runs_identical(case, gemm_path):
    """Same inputs, same bits, although routing places rows inside a segment in atomic order: every row of a
    segment takes the same LoRA tile path (segments of 65+ rows have a partial last tile; fp16 shows a
    different summation order within a few runs)."""
    *shape, dtype = case
    args = make_case(*shape, dtype=dtype, seed=6)
    first = moelora_ext.fused_moe(**args)
    for _ in range(5):
        assert torch.equal(first, moelora_ext.fused_moe(**args))


def test_paths_agree():
    """The CUTLASS and portable GEMMs accumulate in fp32 over the same K: results agree to rounding."""
    args = make_case(300, 512, 256, 16, 4, 4, 16, seed=7)
    a = moelora_ext.fused_moe(**args)
    os.environ["MOELORA_PORTABLE"] = "1"
    try:
        b = moelora_ext.fused_moe(**args)
    finally:
        del os.environ["MOELORA_PORTABLE"]
    assert rel_err(a, b) < 1e-2


GATHER_SHAPES = [
    # T,  H,    I,   E,  k, S,  R     one-kernel routing that gathers the rows (33..2048 pairs, <= 8192 buckets)
    (9, 256, 128, 8, 4, 4, 16),      # 36 pairs: one gather block, several pairs per bucket
    (300, 512, 256, 16, 4, 4, 16),   # 1200 pairs
    (500, 2880, 256, 32, 4, 0, 0),   # 2000 pairs, no LoRA (gpt-oss H)
    (512, 8200, 128, 16, 4, 4, 16),  # 2048 pairs (the most it gathers); rows past the first piece; fc1's shrink
                                     # reads the token rows (34 MB gathered)
    (64, 256, 128, 128, 8, 63, 16),  # 8192 buckets, the most the plan block counts
]


@pytest.mark.parametrize("block_pairs", [None, "8"])
@pytest.mark.parametrize("shape", GATHER_SHAPES,
                         ids=lambda s: "T{}_H{}_E{}_k{}_S{}".format(s[0], s[1], s[3], s[4], s[5]))
def test_routing_gather_bit_identical(shape, block_pairs, monkeypatch):
    """Above decode sizes a one-kernel routing gathers the rows too: its first block plans, the others count
    their pairs' rows over all pairs and copy (pair order inside a bucket). MOELORA_ROUTING_GATHER=0 runs the
    permute kernel instead (atomic order). A row's place never changes its math: the same bits, against the
    reference, with dropped expert ids, tokens without adapter, int64 ids, and both gather block sizes."""
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, seed=90 + T)
    args["topk_ids"] = args["topk_ids"].long() if T % 2 == 0 else args["topk_ids"]
    monkeypatch.delenv("MOELORA_ROUTING_GATHER", raising=False)
    set_knob(monkeypatch, "MOELORA_ROUTING_GATHER_PAIRS", block_pairs)
    gathered = check(args, torch.bfloat16)
    monkeypatch.setenv("MOELORA_ROUTING_GATHER", "0")
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), gathered)


@pytest.mark.parametrize("pairs_side", ["one_block", "multi_kernel"])
def test_routing_paths_match_reference(pairs_side, gemm_path):
    """Routing runs as one kernel up to 4096 (token, expert) pairs and 8192 buckets, else as memset + count +
    plan: both sides of the pair threshold, with LoRA, against the reference."""
    T = 1024 if pairs_side == "one_block" else 1025  # k = 4: 4096 / 4100 pairs
    check(make_case(T, 128, 64, 16, 4, 6, 16, seed=30), torch.bfloat16)


# decode GEMV path (PDL by default, T <= 4) / grouped-GEMM path (PDL by default for the activation and the
# finalize only; T=300: the activation of the rows without an adapter after fc1's fused expand, several waves)
@pytest.mark.parametrize("T", [1, 2, 4, 40, 300])
@pytest.mark.parametrize("lora", [False, True])
def test_pdl_on_and_off_identical(lora, T, gemm_path, monkeypatch):
    """Programmatic dependent launch changes when kernels start, never what they compute: MOELORA_PDL=0
    (plain launches), MOELORA_PDL=1, the default (PDL for the decode calls, T <= 4, and for the activation and
    the finalize, which reads its rows and weights before its wait) and the default with MOELORA_DECODE_T2_PDL=0
    give the same bits, eagerly and from a captured graph, with dropped ids."""
    args = make_case(T, 256, 128, 16, 4, 4 if lora else 0, 16 if lora else 0, seed=31)
    monkeypatch.setenv("MOELORA_PDL", "0")
    plain = moelora_ext.fused_moe(**args)
    monkeypatch.delenv("MOELORA_PDL")
    monkeypatch.delenv("MOELORA_DECODE_T2_PDL", raising=False)
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), plain)
    monkeypatch.setenv("MOELORA_DECODE_T2_PDL", "0")
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), plain)
    monkeypatch.delenv("MOELORA_DECODE_T2_PDL")
    monkeypatch.setenv("MOELORA_PDL", "1")
    poison_allocator()
    assert torch.equal(moelora_ext.fused_moe(**args), plain)
    assert rel_err(plain, fused_moe_reference(**args)) < TOL[torch.bfloat16]
    graph, static_out = capture_graph(args)
    for _ in range(3):
        static_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static_out, plain)


# The decode GEMVs' weight loads (mma_operands.cuh load_stream_pack): 256-byte L2 fills without an L1 line where K <=
# 2048 (fc1 at H = 256, fc2), with one where K > 2048 (fc1 at H = 2304), or plain ld.global
# (MOELORA_GEMV_LOAD_HINTS=0): the same bytes, so the same bits.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [256, 2304])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("lora", [False, True])
def test_gemv_load_hints_identical(lora, T, H, dtype, monkeypatch):
    args = make_case(T, H, 128, 16, 4, 4 if lora else 0, 16 if lora else 0, dtype=dtype, seed=33)
    monkeypatch.delenv("MOELORA_PORTABLE", raising=False)
    monkeypatch.setenv("MOELORA_GEMV_LOAD_HINTS", "0")
    plain = moelora_ext.fused_moe(**args)
    monkeypatch.delenv("MOELORA_GEMV_LOAD_HINTS")
    poison_allocator()
    hinted = moelora_ext.fused_moe(**args)
    assert torch.equal(hinted, plain)
    assert rel_err(hinted, fused_moe_reference(**args)) < TOL[dtype]
    graph, static_out = capture_graph(args)
    static_out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(static_out, plain)


def _rewrite_inputs(args, seed):
    """New routing, new slot ids and new adapter weights, written in place (same storage)."""
    fresh = make_case(args["hidden_states"].shape[0], args["hidden_states"].shape[1], args["w2"].shape[2],
                      args["w13"].shape[0], args["topk_ids"].shape[1], args["lora_scalings"].shape[0],
                      args["w13_lora_a"].shape[-2], seed=seed)
    for name in ["hidden_states", "topk_weights", "topk_ids", "token_lora_ids", "w13_lora_a", "w13_lora_b",
                 "w2_lora_a", "w2_lora_b", "lora_scalings"]:
        args[name].copy_(fresh[name])


# decode GEMV (its LoRA partial sums marked pending by the routing) / grouped GEMM with the LoRA overlapped
# (default at T * k <= 8 E) / grouped GEMM with the LoRA after it
@pytest.mark.parametrize("T", [3, 20, 333])
def test_cuda_graph_replay_with_new_inputs(T, gemm_path):
    args = make_case(T, 256, 128, 16, 4, 8, 16, seed=8)
    graph, static_out = capture_graph(args)
    for seed in range(9, 13):
        _rewrite_inputs(args, seed)
        static_out.fill_(float("nan"))
        graph.replay()
        eager = moelora_ext.fused_moe(**args)
        assert torch.equal(static_out, eager), f"replay differs from eager (seed {seed})"
        assert rel_err(static_out, fused_moe_reference(**args)) < TOL[torch.bfloat16]


class _MoE(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = {k: v for k, v in args.items() if k not in ("hidden_states", "topk_ids", "topk_weights", "token_lora_ids")}

    def forward(self, x, ids, weights, slots):
        return moelora_ext.fused_moe(x, topk_ids=ids, topk_weights=weights, token_lora_ids=slots, **self.args)


@pytest.mark.parametrize("T", [16, 64])  # the LoRA overlapped (T * k <= 8 E) / after the base GEMMs
def test_compile_reduce_overhead_matches_eager(T, gemm_path):
    # A fresh compile: the MOELORA_* paths are read when the op runs, so a CUDA graph recorded by cudagraph trees
    # for another parametrization (same shapes, other GEMM or LoRA path) must not be the one replayed here.
    torch._dynamo.reset()
    args = make_case(T, 256, 128, 8, 2, 4, 16, seed=14)
    module = _MoE(args)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for seed in range(15, 19):
        _rewrite_inputs(args, seed)
        inputs = (args["hidden_states"], args["topk_ids"], args["topk_weights"], args["token_lora_ids"])
        got = compiled(*inputs).clone()
        assert torch.equal(got, module(*inputs))


@pytest.mark.parametrize("T", [20, 257])  # the LoRA overlapped on a second stream (T * k <= 8 E) / not
def test_non_default_stream(T, gemm_path):
    args = make_case(T, 256, 128, 8, 2, 4, 16, seed=20)
    expected = moelora_ext.fused_moe(**args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = moelora_ext.fused_moe(**args)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


def test_large_T_checked_on_token_subset(gemm_path):
    """T = 65536, k = 8 (524288 rows): the op is per-token, so the reference runs on a token subset."""
    args = make_case(65536, 512, 256, 64, 8, 8, 16, seed=21)
    poison_allocator(1 << 30)
    out = moelora_ext.fused_moe(**args)
    assert torch.isfinite(out.float()).all()
    pick = torch.randperm(65536, device="cuda")[:512]
    sub = dict(args)
    for name in ["hidden_states", "topk_ids", "topk_weights", "token_lora_ids"]:
        sub[name] = args[name][pick]
    assert rel_err(out[pick], fused_moe_reference(**sub)) < TOL[torch.bfloat16]


def test_slot_ids_out_of_range(monkeypatch):
    """Without the check, slot ids outside [-1, S) act as -1 (never an out-of-bounds read); with
    MOELORA_CHECK_IDS=1 the wrapper reads them (one host sync) and raises."""
    args = make_case(50, 256, 128, 8, 2, 4, 16, seed=22)
    bad, as_none = dict(args), dict(args)
    bad["token_lora_ids"] = args["token_lora_ids"].clone()
    bad["token_lora_ids"][::3] = 1000
    bad["token_lora_ids"][1::7] = -5
    as_none["token_lora_ids"] = torch.where((bad["token_lora_ids"] < -1) | (bad["token_lora_ids"] >= 4), -1,
                                            bad["token_lora_ids"])
    monkeypatch.delenv("MOELORA_CHECK_IDS", raising=False)
    assert torch.equal(moelora_ext.fused_moe(**bad), moelora_ext.fused_moe(**as_none))
    monkeypatch.setenv("MOELORA_CHECK_IDS", "1")
    with pytest.raises(ValueError, match="token_lora_ids"):
        moelora_ext.fused_moe(**bad)
