"""Slot pool and adapter formats: per-expert linears (Qwen and Mixtral naming), TRT-LLM names, shared-outer
layouts, rank padding, LRU eviction, and every validation error (each leaves the pool exactly as before).

Oracle: the eager transformers model with the LoRA deltas merged into its expert weights (W13[e] += c*B@A
per gate / up block, W2[e] += c*B@A), an independent route to the same math. fp32; tolerance as in
test_integrations.py (RTOL = 1e-5 relative norm on the logits; adapter effects are >= 1e-2).
"""
import copy
import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
pytest.importorskip("peft", reason="peft is not installed (pip install .[hf])")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install .[hf])")

import moelora_ext  # noqa: E402
from moelora_ext import PoolFullError  # noqa: E402
from test_integrations import RTOL, logits, make_models, rel, save_peft_adapter  # noqa: E402

SIDES = ("w13_a", "w13_b", "w2_a", "w2_b")
L0 = "model.layers.0.mlp.experts"


def dims(model):
    m = model.model.layers[0].mlp.experts
    E, two_i, H = m.gate_up_proj.shape
    return E, H, two_i // 2


def merged(base, deltas, scaling):
    """Copy of ``base`` with deltas merged: deltas[layer] = {"gate": (A[E,r,H], B[E,I,r]), "up": ..., "down": ...}
    (A/B may be 2D = shared by all experts)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for layer, parts in deltas.items():
            ex = m.get_submodule(layer)
            E, two_i, H = ex.gate_up_proj.shape
            I = two_i // 2
            for part, (a, b) in parts.items():
                a3 = a.expand(E, *a.shape) if a.dim() == 2 else a
                b3 = b.expand(E, *b.shape) if b.dim() == 2 else b
                d = scaling * torch.bmm(b3.float(), a3.float())
                if part == "gate":
                    ex.gate_up_proj[:, :I] += d
                elif part == "up":
                    ex.gate_up_proj[:, I:] += d
                elif part == "gate_up":
                    ex.gate_up_proj += d
                else:
                    ex.down_proj += d
    return m


def rand(*shape, scale=None):
    return torch.randn(*shape) * (scale if scale is not None else shape[-1] ** -0.5)


def snapshot(pool):
    bufs = {layer: {k: v.clone() for k, v in pool.buffers(layer).items()} for layer in pool.layer_names()}
    return bufs, copy.deepcopy(pool.adapters()), list(pool._slots)


def assert_unchanged(pool, snap):
    bufs, adapters, slots = snap
    for layer in pool.layer_names():
        for k, v in pool.buffers(layer).items():
            assert torch.equal(v, bufs[layer][k]), f"{layer}.{k} changed"
    assert pool.adapters() == adapters and pool._slots == slots


@pytest.fixture(scope="module")
def qwen():
    return make_models("qwen3_moe", layers=1, seed=3)


def fresh(qwen, **kw):
    base, model = qwen
    model = copy.deepcopy(model)
    kw.setdefault("max_adapters", 3)
    kw.setdefault("max_rank", 16)
    return base, model, moelora_ext.attach_lora_pool(model, **kw)


def check_rows(base, model, names, oracles, ids=None):
    ids = torch.randint(0, 96, (len(names), 6)) if ids is None else ids
    with moelora_ext.use_adapters(model, names):
        out = logits(model, ids)
    for b, n in enumerate(names):
        ref = logits(oracles.get(n, base), ids[b:b + 1])
        if n is not None:
            assert rel(ref, logits(base, ids[b:b + 1])) > 1e-2
        err = rel(out[b:b + 1], ref)
        assert err < RTOL, f"row {b} ({n}): {err:.2e}"
    return out


# ------------------------------------------------------------------------------------------------ formats

def per_expert_linear_sd(prefix, E, H, I, r, names=("gate_proj", "up_proj", "down_proj"), experts=None):
    sd, parts = {}, {"gate": ([], []), "up": ([], []), "down": ([], [])}
    for e in (range(E) if experts is None else experts):
        for proj, part in zip(names, ("gate", "up", "down")):
            fan_in, fan_out = (I, H) if part == "down" else (H, I)
            a, b = rand(r, fan_in), rand(fan_out, r, scale=0.5 / math.sqrt(r))
            sd[f"base_model.model.{prefix}.{e}.{proj}.lora_A.weight"] = a
            sd[f"base_model.model.{prefix}.{e}.{proj}.lora_B.weight"] = b
            parts[part][0].append(a)
            parts[part][1].append(b)
    return sd, {k: (torch.stack(v[0]), torch.stack(v[1])) for k, v in parts.items() if v[0]}


def test_peft_target_modules_per_expert_linears_qwen_naming(qwen):
    base, model, pool = fresh(qwen)
    E, H, I = dims(model)
    sd, parts = per_expert_linear_sd(L0, E, H, I, r=3)
    cfg = {"r": 3, "lora_alpha": 6, "target_modules": ["gate_proj", "up_proj", "down_proj"], "peft_type": "LORA"}
    info = pool.load("lin", sd, config=cfg)
    assert info["ranks"] == {"w13": 6, "w2": 3}  # gate + up combined: stacked A, block-diagonal B
    assert info["format"] == "peft_target_modules" and info["scaling"] == 2.0
    check_rows(base, model, ["lin", None], {"lin": merged(base, {L0: parts}, 2.0)})


def test_peft_target_modules_mixtral_w1_w3_w2_legacy_names():
    base, model = make_models("mixtral", layers=1, seed=4)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=8)
    E, H, I = dims(model)
    # transformers-4 Mixtral adapters name the MoE block "block_sparse_moe"
    sd, parts = per_expert_linear_sd("model.layers.0.block_sparse_moe.experts", E, H, I, r=2, names=("w1", "w3", "w2"))
    pool.load("mx", sd, config={"r": 2, "lora_alpha": 2, "target_modules": ["w1", "w3", "w2"], "use_rslora": True})
    assert pool.adapters()["mx"]["scaling"] == pytest.approx(2 / math.sqrt(2))
    check_rows(base, model, [None, "mx"], {"mx": merged(base, {L0: parts}, 2 / math.sqrt(2))})


def test_gate_only_and_rank_pattern_scaling_folded(qwen):
    """Only gate_proj on w13 (B's up rows zero); down_proj with its own alpha (alpha_pattern): folded into B."""
    base, model, pool = fresh(qwen)
    E, H, I = dims(model)
    sd, parts = per_expert_linear_sd(L0, E, H, I, r=2)
    sd = {k: v for k, v in sd.items() if ".up_proj." not in k}
    del parts["up"]
    cfg = {"r": 2, "lora_alpha": 4, "alpha_pattern": {"down_proj": 1}}
    info = pool.load("g", sd, config=cfg)
    assert info["scaling"] == 2.0 and info["ranks"] == {"w13": 2, "w2": 2}
    oracle = merged(base, {L0: {"gate": parts["gate"]}}, 2.0)
    oracle = merged(oracle, {L0: {"down": parts["down"]}}, 0.5)
    check_rows(base, model, ["g"], {"g": oracle})


def test_trtllm_module_names(qwen):
    base, model, pool = fresh(qwen)
    E, H, I = dims(model)
    r = 4
    parts = {"gate": (rand(E, r, H), rand(E, I, r, scale=0.25)), "up": (rand(E, r, H), rand(E, I, r, scale=0.25)),
             "down": (rand(E, r, I), rand(E, H, r, scale=0.25))}
    trt = {"gate": "moe_h_to_4h", "up": "moe_gate", "down": "moe_4h_to_h"}
    sd = {}
    for part, (a, b) in parts.items():
        sd[f"layers.0.{trt[part]}.lora_A"] = a
        sd[f"layers.0.{trt[part]}.lora_B"] = b
    info = pool.load("trt", sd, config={"r": r, "lora_alpha": 8})
    assert info["format"] == "trtllm" and info["ranks"] == {"w13": 8, "w2": 4}
    check_rows(base, model, ["trt", None], {"trt": merged(base, {L0: parts}, 2.0)})


# ------------------------------------------------------------------------------------------------ shared-outer

def _shared_fused_sd(E, H, I, r):
    """PEFT target_parameters layout, shared-outer: gate_up lora_A [r, H] (one A for all experts), per-expert
    lora_B [2I, r*E]; down lora_A per expert [E*r, I], lora_B [H, r] shared."""
    a13, b13 = rand(r, H), rand(E, 2 * I, r, scale=0.25)
    a2, b2 = rand(E, r, I), rand(H, r, scale=0.25)
    sd = {f"{L0}.base_layer.lora_A.weight": a13,
          f"{L0}.base_layer.lora_B.weight": b13.permute(1, 2, 0).reshape(2 * I, r * E),  # column j*E + e
          f"{L0}.lora_A.weight": a2.reshape(E * r, I), f"{L0}.lora_B.weight": b2}
    return sd, {"gate_up": (a13, b13), "down": (a2, b2)}


def test_shared_outer_stored_once_and_bit_identical_to_replicated(qwen):
    base, model, pool = fresh(qwen, shared={"w13_a", "w2_b"})
    E, H, I = dims(model)
    R, S = 16, 3
    bufs = pool.buffers(L0)
    assert bufs["w13_a"].shape == (S, R, H) and bufs["w2_b"].shape == (S, H, R)      # no expert dim
    assert bufs["w13_b"].shape == (S, E, 2 * I, R) and bufs["w2_a"].shape == (S, E, R, I)
    sd, parts = _shared_fused_sd(E, H, I, r=4)
    cfg = {"r": 4, "lora_alpha": 4, "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    info = pool.load("sh", sd, config=cfg)
    assert info["shared"] == {"w13_a": True, "w13_b": False, "w2_a": False, "w2_b": True}
    assert torch.equal(bufs["w13_a"][0, :4], parts["gate_up"][0]) and not bufs["w13_a"][0, 4:].any()

    # the same adapter in a default (per-expert) pool: replicated, same results bit for bit
    model2 = copy.deepcopy(qwen[1])
    pool2 = moelora_ext.attach_lora_pool(model2, max_adapters=3, max_rank=16)
    pool2.load("sh", sd, config=cfg)
    b2 = pool2.buffers(L0)
    assert b2["w13_a"].shape == (S, E, R, H)
    assert all(torch.equal(b2["w13_a"][0, e], bufs["w13_a"][0]) for e in range(E))
    ids = torch.randint(0, 96, (3, 6))
    names = ["sh", None, "sh"]
    with moelora_ext.use_adapters(model, names):
        out_shared = logits(model, ids)
    with moelora_ext.use_adapters(model2, names):
        out_repl = logits(model2, ids)
    assert torch.equal(out_shared, out_repl)
    check_rows(base, model, names, {"sh": merged(base, {L0: parts}, 1.0)}, ids=ids)


def test_shared_trt_2d_and_declared_shared(qwen):
    base, model, pool = fresh(qwen, shared={"w13_a", "w13_b", "w2_a", "w2_b"})
    E, H, I = dims(model)
    bufs = pool.buffers(L0)
    assert all(bufs[s].dim() == 3 for s in SIDES)
    # TRT 2D tensors = shared by all experts (detected from the layout)
    parts = {"gate": (rand(3, H), rand(I, 3, scale=0.3)), "up": (rand(3, H), rand(I, 3, scale=0.3)),
             "down": (rand(3, I), rand(H, 3, scale=0.3))}
    trt = {"gate": "moe_h_to_4h", "up": "moe_gate", "down": "moe_4h_to_h"}
    sd = {f"model.layers.0.{trt[p]}.lora_{ab}.weight": t for p, (a, b) in parts.items() for ab, t in (("A", a),
                                                                                                      ("B", b))}
    pool.load("trt2d", sd, config={"r": 3, "lora_alpha": 3})
    assert pool.adapters()["trt2d"]["shared"] == dict.fromkeys(SIDES, True)
    # declared shared: per-expert copies that are identical are stored once
    sd2, parts2 = per_expert_linear_sd(L0, 1, H, I, r=2)
    sd_rep = {}
    for k, v in sd2.items():
        for e in range(E):
            sd_rep[k.replace("experts.0.", f"experts.{e}.")] = v
    pool.load("decl", sd_rep, config={"r": 2, "lora_alpha": 2}, shared=SIDES)
    oracle_decl = merged(base, {L0: {p: (a[0], b[0]) for p, (a, b) in parts2.items()}}, 1.0)
    check_rows(base, model, ["trt2d", "decl", None], {"trt2d": merged(base, {L0: parts}, 1.0), "decl": oracle_decl})
    # declared shared but the experts differ: refused, pool unchanged
    snap = snapshot(pool)
    sd_bad = dict(sd_rep)
    sd_bad[f"base_model.model.{L0}.1.gate_proj.lora_A.weight"] = rand(2, H)
    with pytest.raises(ValueError, match="declared shared but differs between experts"):
        pool.load("bad", sd_bad, config={"r": 2, "lora_alpha": 2}, shared=["w13_a"])
    assert_unchanged(pool, snap)
    # a per-expert adapter cannot go into a pool that stores that side shared
    sd3, _ = per_expert_linear_sd(L0, E, H, I, r=2)
    with pytest.raises(ValueError, match=r"w13_a has one matrix per expert, but this pool stores w13_a shared"):
        pool.load("perexp", sd3, config={"r": 2, "lora_alpha": 2})
    assert_unchanged(pool, snap)


# ------------------------------------------------------------------------------------------------ ranks, LRU

def test_rank_padding_and_mixed_ranks(qwen, tmp_path):
    base, model, pool = fresh(qwen, max_rank=16)
    p3 = save_peft_adapter(base, str(tmp_path / "r3"), r=3, alpha=3, seed=1)
    p16 = save_peft_adapter(base, str(tmp_path / "r16"), r=16, alpha=32, seed=2)
    pool.load("r3", p3)
    pool.load("r16", p16)
    bufs = pool.buffers(L0)
    s3 = pool.adapters()["r3"]["slot"]
    assert bufs["w13_a"][s3, :, 3:].abs().sum() == 0 and bufs["w13_b"][s3, :, :, 3:].abs().sum() == 0
    assert bufs["w2_a"][s3, :, 3:].abs().sum() == 0 and bufs["w2_b"][s3, :, :, 3:].abs().sum() == 0
    assert bufs["w13_a"][s3, :, :3].abs().sum() > 0
    ids = torch.randint(0, 96, (3, 5))
    with moelora_ext.use_adapters(model, ["r3", "r16", None]):
        out = logits(model, ids)
    # the rank-3 adapter in a pool of exactly rank 3 gives the same rows
    model3 = copy.deepcopy(qwen[1])
    moelora_ext.attach_lora_pool(model3, max_adapters=1, max_rank=3).load("r3", p3)
    with moelora_ext.use_adapters(model3, ["r3"]):
        out3 = logits(model3, ids[:1])
    assert rel(out[:1], out3) < 1e-6
    from test_integrations import peft_logits
    assert rel(out[1:2], peft_logits(base, p16, ids[1:2])) < RTOL
    assert rel(out[2:], logits(base, ids[2:])) < RTOL


def _tiny_sd(r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({f"{L0}.lora_A.weight": torch.randn(4 * r, 64, generator=g) * 0.1,
             f"{L0}.lora_B.weight": torch.randn(64, r * 4, generator=g) * 0.1},
            {"r": r, "lora_alpha": r, "target_parameters": ["mlp.experts.gate_up_proj"]})


def test_lru_eviction_and_full_pool(qwen):
    base, model, pool = fresh(qwen, max_adapters=2, max_rank=4)
    pool.load("a", *_tiny_sd(seed=1))
    pool.load("b", *_tiny_sd(seed=2))
    with moelora_ext.use_adapters(model, ["a"]):   # "a" used most recently -> "b" is the LRU
        pass
    pool.load("c", *_tiny_sd(seed=3))
    assert set(pool.adapters()) == {"a", "c"} and pool.adapters()["c"]["slot"] == 1
    with moelora_ext.use_adapters(model, ["c"]):   # "c" held: "a" (LRU, not held) goes even though "c" is older
        pool.load("d", *_tiny_sd(seed=4))
        assert set(pool.adapters()) == {"c", "d"}
        with moelora_ext.use_adapters(model, ["d"]):
            snap = snapshot(pool)
            with pytest.raises(PoolFullError, match="all 2 slots hold adapters used by active use_adapters"):
                pool.load("e", *_tiny_sd(seed=5))
            assert_unchanged(pool, snap)
            with pytest.raises(RuntimeError, match="in use"):
                pool.evict("d")
            with pytest.raises(RuntimeError, match="in use"):
                pool.load("d", *_tiny_sd(seed=6))       # replacing a held adapter
    c_slot = pool.adapters()["c"]["slot"]
    pool.evict("c")
    assert set(pool.adapters()) == {"d"}
    assert not pool.buffers(L0)["w13_a"][c_slot].any() and pool.buffers(L0)["scalings"][c_slot] == 0
    with pytest.raises(KeyError):
        pool.evict("c")
    # reloading a name replaces it in its slot
    slot = pool.adapters()["d"]["slot"]
    pool.load("d", *_tiny_sd(r=3, seed=7))
    assert pool.adapters()["d"]["slot"] == slot and pool.adapters()["d"]["rank"] == 3


# ------------------------------------------------------------------------------------------------ validation

def _fused(E=4, H=64, I=32, r=2, prefix=L0):
    return {f"base_model.model.{prefix}.base_layer.lora_A.weight": rand(E * r, H),
            f"base_model.model.{prefix}.base_layer.lora_B.weight": rand(2 * I, r * E),
            f"base_model.model.{prefix}.lora_A.weight": rand(E * r, I),
            f"base_model.model.{prefix}.lora_B.weight": rand(H, r * E)}


CFG = {"r": 2, "lora_alpha": 4, "target_modules": [], "peft_type": "LORA",
       "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


def _bad_cases(E, H, I):
    def drop(sd, key_part):
        return {k: v for k, v in sd.items() if key_part not in k}

    def with_(sd, **extra):
        return {**sd, **extra}

    lin, _ = per_expert_linear_sd(L0, E, H, I, r=2)
    return [
        ("unknown module", with_(_fused(), **{"model.layers.0.mlp.expertz.lora_A.weight": rand(2, H)}), CFG,
         r"unknown target module 'model\.layers\.0\.mlp\.expertz'"),
        ("unknown module under experts", with_(_fused(), **{f"{L0}.0.fc9.lora_A.weight": rand(2, H)}), CFG,
         r"unknown target module .*experts\.0\.fc9"),
        ("missing lora_B", drop(_fused(), "base_layer.lora_B"), CFG, r"lora_B is missing for .*experts"),
        ("missing target parameter", drop(drop(_fused(), "experts.lora_A"), "experts.lora_B"), CFG,
         r"targets the parameter 'mlp\.experts\.down_proj' but the weights have no LoRA"),
        ("missing target module", lin, {"r": 2, "lora_alpha": 2, "target_modules": ["gate_proj", "up_proj",
                                                                                    "down_proj", "q_proj"]},
         r"targets the module 'q_proj' but the weights have no LoRA"),
        ("missing expert", {k: v for k, v in lin.items() if f"{L0}.3." not in k}, {"r": 2, "lora_alpha": 2},
         r"experts: LoRA on (gate|up|down) is missing for experts \[3\]"),
        ("rank above max_rank", _fused(r=8), {**CFG, "r": 8}, r"LoRA rank 8 on w13 is above the pool's max_rank=4"),
        ("combined rank above max_rank", per_expert_linear_sd(L0, E, H, I, r=3)[0], {"r": 3, "lora_alpha": 3},
         r"LoRA rank 6 on w13 \(separate gate and up adapters combined"),
        ("expert count (fused)", _fused(E=8), CFG, r"lora_A has 16 rows, expected E\*r = 4\*2 = 8"),
        ("expert index", with_(lin, **{f"{L0}.7.gate_proj.lora_A.weight": rand(2, H),
                                       f"{L0}.7.gate_proj.lora_B.weight": rand(I, 2)}), {"r": 2, "lora_alpha": 2},
         r"expert index 7 does not exist: .*experts has 4 experts"),
        ("expert count (trt)", {"layers.0.moe_gate.lora_A": rand(8, 2, H), "layers.0.moe_gate.lora_B": rand(8, I, 2)},
         None, r"8 experts in the first dimension, the model's .*experts has 4"),
        ("hidden size", with_(drop(lin, f"{L0}.2.up_proj.lora_A"), **{
            f"base_model.model.{L0}.2.up_proj.lora_A.weight": rand(2, H + 1)}), {"r": 2, "lora_alpha": 2},
         r"experts\.2\.up_proj\.lora_A\.weight: shape \(2, 65\) does not match the model: expected \(2, 64\)"),
        ("fused shapes", {f"{L0}.lora_A.weight": rand(8, 48), f"{L0}.lora_B.weight": rand(48, 8)}, None,
         r"fit neither .*gate_up_proj .*nor .*down_proj"),
        ("rank mismatch", {"layers.0.moe_gate.lora_A": rand(4, 3, H), "layers.0.moe_gate.lora_B": rand(4, I, 2)},
         None, r"rank of lora_A \(3\) != rank of lora_B \(2\)"),
        ("int dtype", with_(drop(_fused(), "experts.lora_A"), **{
            f"{L0}.lora_A.weight": torch.ones(8, I, dtype=torch.int32)}), CFG,
         r"experts\.lora_A\.weight: dtype torch\.int32 is not supported"),
        ("nan", with_(drop(_fused(), "experts.lora_A"), **{f"{L0}.lora_A.weight": torch.full((8, I), math.nan)}),
         CFG, r"experts\.lora_A\.weight: contains NaN or Inf"),
        ("non-expert target", with_(_fused(), **{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                                 rand(2, H)}), CFG,
         r"not routed MoE experts.*model\.layers\.0\.self_attn\.q_proj.*allow_partial=True"),
        ("router target", with_(_fused(), **{"model.layers.0.mlp.gate.lora_A.weight": rand(2, H)}), CFG,
         r"not routed MoE experts.*model\.layers\.0\.mlp\.gate\b"),
        ("dora", _fused(), {**CFG, "use_dora": True}, r"use_dora=True is not supported"),
        ("lora bias", with_(_fused(), **{f"{L0}.lora_B.bias": rand(H)}), CFG, r"LoRA biases .* not supported"),
        ("no tensors", {}, CFG, r"the adapter has no tensors"),
    ]


@pytest.mark.parametrize("case", range(21))
def test_validation_errors_leave_pool_unchanged(qwen, case):
    base, model, pool = fresh(qwen, max_adapters=2, max_rank=4)
    E, H, I = dims(model)
    pool.load("keep", *_tiny_sd(seed=1))
    cases = _bad_cases(E, H, I)
    assert len(cases) == 21
    label, sd, cfg, pattern = cases[case]
    snap = snapshot(pool)
    with pytest.raises(ValueError, match=pattern):
        pool.load("new", sd, config=cfg)
    assert_unchanged(pool, snap)
    # also when the name already exists (a failed reload keeps the old adapter)
    with pytest.raises(ValueError, match=pattern):
        pool.load("keep", sd, config=cfg)
    assert_unchanged(pool, snap)


def test_dtype_overflow_into_fp16_pool(qwen):
    base, model = qwen
    model = copy.deepcopy(model).to(torch.float16)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    sd = _fused()
    key = f"base_model.model.{L0}.lora_B.weight"
    sd[key] = sd[key] * 1e6
    snap = snapshot(pool)
    with pytest.raises(ValueError, match=r"experts\.lora_B\.weight: max \|value\| .* overflows the pool dtype "
                                         r"torch\.float16"):
        pool.load("x", sd, config=CFG)
    assert_unchanged(pool, snap)


def test_allow_partial_skips_non_expert_targets_with_warning(qwen):
    base, model, pool = fresh(qwen)
    sd = _fused()
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = rand(2, 64)
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = rand(64, 2)
    with pytest.warns(UserWarning, match=r"skipping 1 non-expert LoRA target.*self_attn\.q_proj"):
        info = pool.load("p", sd, config=CFG, allow_partial=True)
    assert info["skipped"] == ["model.layers.0.self_attn.q_proj"]


def test_qwen2_moe_shared_expert_is_a_non_expert_target():
    base, model = make_models("qwen2_moe", layers=1)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    sd = _fused(E=8, I=32)
    sd["base_model.model.model.layers.0.mlp.shared_expert.gate_proj.lora_A.weight"] = rand(2, 64)
    sd["base_model.model.model.layers.0.mlp.shared_expert.gate_proj.lora_B.weight"] = rand(48, 2)
    with pytest.raises(ValueError, match=r"not routed MoE experts.*mlp\.shared_expert\.gate_proj"):
        pool.load("s", sd, config=CFG)
    assert len(pool) == 0


def test_bad_pool_arguments_and_use_adapters_arguments(qwen):
    base, model = qwen
    model = copy.deepcopy(model)
    with pytest.raises(ValueError, match="max_rank"):
        moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=0)
    with pytest.raises(ValueError, match="shared: unknown side"):
        moelora_ext.attach_lora_pool(model, shared={"w13_c"})
    with pytest.raises(ValueError, match="no transformers-5 MoE experts module"):
        moelora_ext.attach_lora_pool(torch.nn.Linear(2, 2))
    moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    with pytest.raises(ValueError, match="one adapter name"):
        with moelora_ext.use_adapters(model, "abc"):
            pass
    with pytest.raises(ValueError, match=r"names_per_row\[1\]: expected an adapter name or None"):
        with moelora_ext.use_adapters(model, [None, 3]):
            pass
