"""End-to-end: transformers 5 models with experts_implementation="moelora", PEFT adapters saved to disk and
loaded into a pool, mixed batches through use_adapters checked row by row against PEFT.

Tolerance: everything runs in fp32. PEFT (target_parameters) runs each row with W + c*B@A folded into the
expert weights; the op computes W x + c*B(A x) in fp32 and sums the k routes in a different order. Both are
fp32 evaluations of the same expression, so they differ by a few ulps per layer (observed ~3e-7 relative on
the logits); RTOL = 1e-5 leaves ~30x room while an adapter's effect on the logits is >= 1e-2 (asserted, so a
dropped adapter cannot pass).
"""
import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install .[hf])")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install .[hf])")

import moelora_ext  # noqa: E402
from moelora_ext.adapters.pool import get_lora_pool  # noqa: E402
from moelora_ext.integrations import transformers as mtf  # noqa: E402

RTOL = 1e-5
DEVICE = "cpu"  # the transformers path is exercised on CPU here; the op's CUDA kernels have their own tests


# ------------------------------------------------------------------------------------------------ tiny models

def tiny_config(family: str, layers: int = 2):
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=64, moe_intermediate_size=32,
                                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, head_dim=16, intermediate_size=48, num_local_experts=4,
                                          num_experts_per_tok=2)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    if family == "gpt_oss":
        return transformers.GptOssConfig(**common, head_dim=16, intermediate_size=32, num_local_experts=4,
                                         num_experts_per_tok=2, layer_types=["full_attention"] * layers)
    raise ValueError(family)


def make_models(family: str, layers: int = 2, seed: int = 0):
    """(eager base model, moelora model with the same weights), both in eval mode."""
    cfg = tiny_config(family, layers)
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="eager")
    _randomize_experts(base)
    base.eval()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="moelora")
    model.load_state_dict(base.state_dict())
    model.eval()
    assert model.config._experts_implementation == "moelora"
    assert base.config._experts_implementation == "eager"
    return base, model


def _randomize_experts(model):
    """from_config leaves some expert tensors at N(0, 0.02); make them O(1/sqrt(fan_in)) so the MoE matters."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj") and isinstance(getattr(m, "gate_up_proj"), torch.Tensor):
                for p in (m.gate_up_proj, m.down_proj):
                    p.normal_(0, p.shape[-1] ** -0.5)


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "gate_up_proj")]


def save_peft_adapter(base, path, r, alpha, seed, rslora=False, params=("mlp.experts.gate_up_proj",
                                                                        "mlp.experts.down_proj")):
    """A PEFT target_parameters adapter with random A and B, saved with save_pretrained."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=list(params),
                          init_lora_weights=False, use_rslora=rslora)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # keep the adapter's effect moderate: A ~ N(0, 1/in), B ~ N(0, 1/r)
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "lora_B" in n:
                p.normal_(0, 0.5 * r ** -0.5)
    pm.save_pretrained(path)
    return path


def peft_logits(base, path, ids):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    pm.eval()
    with torch.no_grad():
        return pm(ids).logits


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------ registration

def test_moelora_registered_in_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    assert "moelora" in ALL_EXPERTS_FUNCTIONS
    assert ExpertsInterface()["moelora"] is mtf.moelora_experts_forward


def test_from_pretrained_routes_experts_through_op(tmp_path, monkeypatch):
    base, _ = make_models("qwen3_moe", layers=1)
    base.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", experts_implementation="moelora")
    model.eval()
    assert model.config._experts_implementation == "moelora"
    calls = []
    real = mtf.fused_moe
    monkeypatch.setattr(mtf, "fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 96, (2, 5))
    assert rel(logits(model, ids), logits(base, ids)) < RTOL
    assert len(calls) == 1  # one MoE layer, one op call


# ------------------------------------------------------------------------------------------------ families

FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_base_equality_without_adapters(family):
    base, model = make_models(family)
    ids = torch.randint(0, 96, (3, 6))
    ref = logits(base, ids)
    assert rel(logits(model, ids), ref) < RTOL                  # no pool
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    assert rel(logits(model, ids), ref) < RTOL                  # pool, outside use_adapters
    with moelora_ext.use_adapters(model, [None, None, None]):   # inside, every row without adapter
        assert rel(logits(model, ids), ref) < RTOL
    del pool


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft_row_by_row(family, tmp_path):
    base, model = make_models(family)
    specs = {"a": dict(r=2, alpha=4, seed=1), "b": dict(r=8, alpha=8, seed=2, rslora=True),
             "c": dict(r=5, alpha=10, seed=3)}
    paths = {n: save_peft_adapter(base, str(tmp_path / n), **s) for n, s in specs.items()}
    pool = moelora_ext.attach_lora_pool(model, max_adapters=4, max_rank=8)
    for n, p in paths.items():
        info = pool.load(n, p)
        s = specs[n]
        expected_scaling = s["alpha"] / (s["r"] ** 0.5 if s.get("rslora") else s["r"])
        assert info["scaling"] == pytest.approx(expected_scaling)
        assert info["ranks"] == {"w13": s["r"], "w2": s["r"]}
        assert info["format"] == "peft_target_parameters"
    names = ["a", None, "b", "c", "a", "b"]
    ids = torch.randint(0, 96, (len(names), 7))
    with moelora_ext.use_adapters(model, names):
        out = logits(model, ids)
    base_rows = logits(base, ids)
    for b, n in enumerate(names):
        if n is None:
            ref = base_rows[b:b + 1]
        else:
            ref = peft_logits(base, paths[n], ids[b:b + 1])
            assert rel(ref, base_rows[b:b + 1]) > 1e-2, "adapter has no visible effect: the test would be vacuous"
        err = rel(out[b:b + 1], ref)
        assert err < RTOL, f"row {b} ({n}): relative error {err:.2e}"


def test_peft_adapter_on_down_proj_only(tmp_path):
    base, model = make_models("qwen3_moe", layers=1)
    path = save_peft_adapter(base, str(tmp_path / "d"), r=3, alpha=6, seed=5, params=("mlp.experts.down_proj",))
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    info = pool.load("d", path)
    assert info["ranks"] == {"w13": 0, "w2": 3}
    ids = torch.randint(0, 96, (2, 5))
    with moelora_ext.use_adapters(model, ["d", None]):
        out = logits(model, ids)
    assert rel(out[:1], peft_logits(base, path, ids[:1])) < RTOL
    assert rel(out[1:], logits(base, ids[1:])) < RTOL


# ------------------------------------------------------------------------------------------------ use_adapters

def _state_is_clean(model):
    pool = get_lora_pool(model)
    return (all(m.__dict__.get("_moelora_rows") is None for m in experts_modules(model))
            and (pool is None or not pool._holds))


def test_use_adapters_leaves_no_state_also_on_exception(tmp_path):
    base, model = make_models("qwen3_moe", layers=1)
    path = save_peft_adapter(base, str(tmp_path / "a"), r=4, alpha=8, seed=1)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    pool.load("a", path)
    ids = torch.randint(0, 96, (2, 5))
    ref = logits(base, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with moelora_ext.use_adapters(model, ["a", "a"]):
            assert pool.adapters()["a"]["held"] == 1
            logits(model, ids)
            raise RuntimeError("boom")
    assert _state_is_clean(model)
    assert rel(logits(model, ids), ref) < RTOL
    # a forward that fails inside the block (batch size != len(names)) also cleans up
    with pytest.raises(ValueError, match="not a multiple"):
        with moelora_ext.use_adapters(model, ["a", None, "a"]):
            logits(model, ids[:, :4].reshape(2, 4))  # 8 tokens for 3 rows
    assert _state_is_clean(model)
    # unknown names are refused before any state is set
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        with moelora_ext.use_adapters(model, ["a", "zzz"]):
            pass
    assert _state_is_clean(model)
    pool.evict("a")  # nothing holds it any more


def test_use_adapters_nested_and_without_pool():
    base, model = make_models("qwen3_moe", layers=1)
    ids = torch.randint(0, 96, (2, 5))
    with moelora_ext.use_adapters(model, [None, None]):  # no pool: fine when every row is None
        assert rel(logits(model, ids), logits(base, ids)) < RTOL
    with pytest.raises(ValueError, match="no LoRA pool"):
        with moelora_ext.use_adapters(model, ["x", None]):
            pass
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    sd = {"model.layers.0.mlp.experts.lora_A.weight": torch.randn(4 * 2, 64) * 0.1,
          "model.layers.0.mlp.experts.lora_B.weight": torch.randn(64, 2 * 4) * 0.1}
    pool.load("x", sd, config={"r": 2, "lora_alpha": 2})
    with moelora_ext.use_adapters(model, ["x", None]):
        outer = logits(model, ids)
        with moelora_ext.use_adapters(model, [None, "x"]):
            inner = logits(model, ids)
        assert torch.equal(logits(model, ids), outer)
    assert rel(inner[:1], logits(base, ids[:1])) < RTOL and rel(outer[1:], logits(base, ids[1:])) < RTOL
    assert _state_is_clean(model)


def test_use_adapters_requires_moelora_implementation(tmp_path):
    base, model = make_models("qwen3_moe", layers=1)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    model.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="not 'moelora'"):
        with moelora_ext.use_adapters(model, [None]):
            pass
    # attach_lora_pool switches the implementation back
    moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    assert model.config._experts_implementation == "moelora"
    del pool


# ------------------------------------------------------------------------------------------------ torch.compile

def test_torch_compile_of_the_model(tmp_path):
    torch._dynamo.reset()
    base, model = make_models("qwen3_moe", layers=1)
    pa = save_peft_adapter(base, str(tmp_path / "a"), r=4, alpha=8, seed=1)
    pb = save_peft_adapter(base, str(tmp_path / "b"), r=2, alpha=2, seed=2)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    pool.load("a", pa)
    pool.load("b", pb)
    ids = torch.randint(0, 96, (3, 6))
    with moelora_ext.use_adapters(model, ["a", None, "b"]):
        eager_mixed = logits(model, ids)
    eager_base = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)  # no graph break: the op and the pool state trace
    with torch.no_grad():
        with moelora_ext.use_adapters(model, ["a", None, "b"]):
            out = compiled(ids).logits
        assert rel(out, eager_mixed) < RTOL
        with moelora_ext.use_adapters(model, ["b", "a", "a"]):  # other names, same shapes: no new state left
            out2 = compiled(ids).logits
        out_base = compiled(ids).logits
    assert rel(out_base, eager_base) < RTOL
    assert rel(out2[1:2], peft_logits(base, pa, ids[1:2])) < RTOL
    assert rel(out2[0:1], peft_logits(base, pb, ids[0:1])) < RTOL
    assert _state_is_clean(model)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ layouts

def test_unsupported_experts_fall_back_and_refuse_adapters():
    """gpt-oss: transposed, interleaved gate/up, biases and a clamped GLU: not expressible by the op."""
    base, model = make_models("gpt_oss", layers=1)
    ids = torch.randint(0, 96, (2, 5))
    assert rel(logits(model, ids), logits(base, ids)) < 1e-5  # runs transformers' grouped_mm path
    with pytest.raises(ValueError, match="cannot run LoRA through moelora.*bias"):
        moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)


def test_transposed_experts_layout():
    """An experts class stored transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]): converted once."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(is_transposed=True)
    class TransposedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.hidden_dim, self.intermediate_dim = 4, 32, 16
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 32) / 32 ** 0.5)
            self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 32) / 4)
            self.act_fn = ACT2FN["silu"]

        def forward(self, hidden_states, top_k_index, top_k_weights):  # eager reference, transposed weights
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for j in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, j])
                    gu = hidden_states[t] @ self.gate_up_proj[e]
                    h = self.act_fn(gu[:16]) * gu[16:]
                    out[t] += top_k_weights[t, j] * (h @ self.down_proj[e])
            return out

    cfg = transformers.PretrainedConfig()
    cfg._experts_implementation = "eager"
    mod = TransposedExperts(cfg)
    x = torch.randn(10, 32)
    ids = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    ref = mod(x, ids, w)
    cfg._experts_implementation = "moelora"
    out = mod(x, ids, w)
    assert rel(out, ref) < 1e-5
    cache = mod.__dict__["_moelora_wcache"]
    assert cache[1].shape == (4, 32, 32) and cache[1].is_contiguous()
    mod(x, ids, w)
    assert mod.__dict__["_moelora_wcache"] is cache  # converted once, reused
    with torch.no_grad():
        mod.gate_up_proj.mul_(2)  # the parameter changed: the cache follows
    ref2 = (cfg.__setattr__("_experts_implementation", "eager"), mod(x, ids, w))[1]
    cfg._experts_implementation = "moelora"
    assert rel(mod(x, ids, w), ref2) < 1e-5


def test_bf16_model_with_adapters(tmp_path):
    base, model = make_models("mixtral", layers=1)
    path = save_peft_adapter(base, str(tmp_path / "a"), r=4, alpha=8, seed=1)
    ids = torch.randint(0, 96, (2, 5))
    ref = peft_logits(base, path, ids[:1])
    model.to(torch.bfloat16)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=8)
    assert pool.buffers(pool.layer_names()[0])["w13_a"].dtype == torch.bfloat16
    pool.load("a", path)
    with moelora_ext.use_adapters(model, ["a", None]):
        out = logits(model, ids)
    assert out.dtype == torch.bfloat16
    assert rel(out[:1], ref) < 3e-2  # bf16 weights and activations throughout the model vs an fp32 PEFT run


def test_adapter_config_json_round_trip(tmp_path):
    """pool.load(dir) reads adapter_config.json; pool.load(state_dict, config=dict) gives the same buffers."""
    base, model = make_models("qwen3_moe", layers=1)
    path = save_peft_adapter(base, str(tmp_path / "a"), r=4, alpha=3, seed=9)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=2, max_rank=4)
    pool.load("dir", path)
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    pool.load("sd", sd, config=cfg)
    bufs = pool.buffers(pool.layer_names()[0])
    for side in ("w13_a", "w13_b", "w2_a", "w2_b"):
        assert torch.equal(bufs[side][0], bufs[side][1])
    assert pool.adapters()["dir"]["scaling"] == pool.adapters()["sd"]["scaling"] == pytest.approx(0.75)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_mixed_batch_on_cuda_bf16(family, tmp_path):
    """The same path on the GPU (the CUDA op runs bf16/fp16): bf16 model vs fp32 PEFT on the CPU."""
    base, model = make_models(family)
    paths = {n: save_peft_adapter(base, str(tmp_path / n), r=r, alpha=2 * r, seed=s)
             for n, r, s in (("a", 4, 1), ("b", 16, 2))}
    model.to("cuda", torch.bfloat16)
    pool = moelora_ext.attach_lora_pool(model, max_adapters=4, max_rank=16)
    assert pool.buffers(pool.layer_names()[0])["w13_a"].device.type == "cuda"
    for n, p in paths.items():
        pool.load(n, p)
    names = ["a", None, "b", "a"]
    ids = torch.randint(0, 96, (len(names), 7))
    with moelora_ext.use_adapters(model, names):
        out = logits(model, ids.cuda()).cpu()
    assert _state_is_clean(model)
    for b, n in enumerate(names):
        ref = logits(base, ids[b:b + 1]) if n is None else peft_logits(base, paths[n], ids[b:b + 1])
        assert rel(out[b:b + 1], ref) < 3e-2, f"row {b} ({n})"  # bf16 model end to end vs fp32
