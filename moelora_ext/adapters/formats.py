"""Adapter formats -> one canonical form per MoE layer, ready to be copied into a pool's slot buffers.

Canonical form (``LayerDelta``), in fp32 on the CPU, per experts module of the model:

    w13 = (A, B): A [E, r13, H] or [r13, H] (shared by all experts), B [E, 2I, r13] or [2I, r13]
    w2  = (A, B): A [E, r2, I]  or [r2, I],                          B [E, H, r2]   or [H, r2]

so that, with the adapter's slot scaling c, ``delta_W13[e] = c * B[e] @ A[e]`` (gate rows then up rows, the
transformers 5 ``gate_up_proj`` row order) and ``delta_W2[e] = c * B[e] @ A[e]``. Either pair may be None (the
adapter does not touch that projection of that layer).

Formats read (all from one state dict; key prefixes ``base_model.model.`` and adapter-name segments such as
``lora_A.default.weight`` are accepted; transformers-4 ``block_sparse_moe`` paths are renamed to ``mlp``):

1. PEFT ``target_parameters`` on the fused 3D expert weights (``mlp.experts.gate_up_proj``,
   ``mlp.experts.down_proj``): key ``<experts>(.base_layer)*.lora_A.weight``. PEFT's ``ParamWrapper`` stores
   ``lora_A`` as [E*r, in] (expert-major: rows e*r..e*r+r-1 are expert e) and ``lora_B`` as [out, r*E]
   (rank-major: column j*E + e is rank j of expert e). Nested wrappers (one per targeted parameter) add
   ``.base_layer`` segments; which pair is gate_up and which is down is read from the shapes (unambiguous:
   gate_up is A [.., H] / B [2I, ..], down is A [.., I] / B [H, ..]). A shared-outer variant (our extension)
   stores lora_A as [r, in] or lora_B as [out, r]: one matrix for all experts.
2. PEFT ``target_modules`` on per-expert linears: ``<experts>.<e>.<proj>.lora_A.weight`` [r, in] and
   ``lora_B.weight`` [out, r], proj in gate_proj/up_proj/down_proj (Qwen/DeepSeek/OLMoE naming), w1/w3/w2
   (Mixtral: w1 = gate, w3 = up, w2 = down) or gate_up_proj. Without the expert index,
   ``<experts>.<proj>.lora_A.weight`` is one matrix shared by all experts (shared-outer layout).
   Separate gate and up adapters are combined exactly: A13 = [A_gate; A_up] (rank r_g + r_u), B13 =
   block-diag(B_gate, B_up), so B13 A13 x = [B_g A_g x; B_u A_u x].
3. TRT-LLM module names: ``<layer>.moe_h_to_4h`` (gate side, = HF w1), ``<layer>.moe_gate`` (up side, = HF w3),
   ``<layer>.moe_4h_to_h`` (down, = HF w2) -- TensorRT-LLM's ``trtllm_modules_to_hf_modules`` mapping -- with
   ``.lora_A(.weight)`` [E, r, in] and ``.lora_B(.weight)`` [E, out, r] per-expert tensors, or 2D [r, in] /
   [out, r] for a matrix shared by all experts. ``<layer>`` is any path holding the layer index, e.g.
   ``model.layers.3`` or ``layers.3``.

Scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with PEFT's ``rank_pattern`` /
``alpha_pattern``. The slot gets the config's scaling; a module whose own scaling differs (patterns) has the
ratio folded into its B (exact in fp32, before the cast to the pool dtype).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .validation import (ExpertsInfo, SIDES, check_config, check_expert_index, check_shape, check_tensor_dtype,
                         fail, pattern_value, refuse_or_skip)

__all__ = ["LayerDelta", "ParsedAdapter", "parse_adapter", "read_adapter_source"]

# projection name -> canonical part
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
         "gate_up_proj": "gate_up"}
# TRT-LLM MoE LoRA module names -> canonical part (TensorRT-LLM: moe_h_to_4h = w1, moe_gate = w3, moe_4h_to_h = w2)
_TRT = {"moe_h_to_4h": "gate", "moe_gate": "up", "moe_4h_to_h": "down"}
# TRT-LLM module names of non-expert layers (refused / skipped like any non-expert target)
_TRT_NON_EXPERT = {"attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate",
                   "moe_router", "mlp_router", "mlp_gate_up", "shared_expert_h_to_4h", "shared_expert_4h_to_h",
                   "shared_expert_gate", "cross_attn_qkv", "cross_attn_q", "cross_attn_k", "cross_attn_v",
                   "cross_attn_dense"}

FORMAT_FUSED = "peft_target_parameters"
FORMAT_LINEAR = "peft_target_modules"
FORMAT_TRT = "trtllm"


@dataclass
class LayerDelta:
    """One adapter on one experts module (fp32, CPU). A tensor with ndim 2 is shared by all experts."""
    w13: Optional[Tuple[Tensor, Tensor]] = None
    w2: Optional[Tuple[Tensor, Tensor]] = None

    def rank(self, proj: str) -> int:
        pair = getattr(self, proj)
        return 0 if pair is None else pair[0].shape[-2]

    def shared(self) -> Dict[str, bool]:
        out = {}
        for proj in ("w13", "w2"):
            pair = getattr(self, proj)
            out[proj + "_a"] = pair is not None and pair[0].dim() == 2
            out[proj + "_b"] = pair is not None and pair[1].dim() == 2
        return out


@dataclass
class ParsedAdapter:
    layers: Dict[str, LayerDelta]
    scaling: float
    format: str
    skipped: List[str] = field(default_factory=list)


@dataclass
class _Part:
    """One projection (gate / up / gate_up / down) of one layer, as read from the file."""
    a: Tensor            # [E, r, in] or [r, in] (shared)
    b: Tensor            # [E, out, r] or [out, r] (shared)
    ratio: float         # module scaling / slot scaling, folded into b
    key: str             # a state-dict key, for messages


# ------------------------------------------------------------------------------------------------ reading

def read_adapter_source(src, config) -> Tuple[Dict[str, Tensor], Optional[dict], str]:
    """(state_dict, config dict or None, description) from a directory, a weights file or a state dict."""
    if isinstance(src, Mapping):
        sd, where = dict(src), "state_dict"
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        where = path
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "adapter_config.json")
            if config is None and os.path.exists(cfg_path):
                with open(cfg_path) as f:
                    config = json.load(f)
            for fname in ("adapter_model.safetensors", "adapter_model.bin"):
                if os.path.exists(os.path.join(path, fname)):
                    path = os.path.join(path, fname)
                    break
            else:
                fail(f"{where}: no adapter_model.safetensors or adapter_model.bin in the directory")
        elif not os.path.exists(path):
            fail(f"{where}: no such file or directory")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        fail(f"expected a directory, a weights file or a state dict, got {type(src).__name__}")
    if config is not None and not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            fail(f"{where}: config must be a dict or a PEFT config, got {type(config).__name__}")
        config = to_dict()
    return sd, (dict(config) if config is not None else None), where


def _normalize_key(key: str) -> str:
    while key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    # lora_A.<adapter_name>.weight -> lora_A.weight ; bare lora_A (TRT) -> lora_A.weight
    key = re.sub(r"\.lora_([AB])\.(?!weight$)[^.]+\.weight$", r".lora_\1.weight", key)
    key = re.sub(r"\.lora_([AB])$", r".lora_\1.weight", key)
    return key


# ------------------------------------------------------------------------------------------------ parsing

class _Parser:
    def __init__(self, experts: Dict[str, ExpertsInfo], module_names: Iterable[str], config: Optional[dict],
                 where: str, pool_dtype: torch.dtype):
        self.experts = experts
        self.module_names = set(module_names)
        self.cfg = config or {}
        self.where = where
        self.pool_dtype = pool_dtype
        self.has_cfg = config is not None
        self.r = self.cfg.get("r")
        self.alpha = self.cfg.get("lora_alpha", self.r)
        self.rslora = bool(self.cfg.get("use_rslora", False))
        self.slot_scaling = self._scaling(self.r, self.alpha) if self.has_cfg and self.r else 1.0
        self.legacy = not any("block_sparse_moe" in n for n in experts)
        # layer index -> experts module (TRT names)
        self.by_layer: Dict[int, List[str]] = {}
        for n in experts:
            m = re.search(r"(?:^|\.)(\d+)\.", n)
            if m:
                self.by_layer.setdefault(int(m.group(1)), []).append(n)

    def _scaling(self, r, alpha) -> float:
        if not r:
            return 1.0
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def module_ratio(self, module: str) -> Tuple[Optional[int], float]:
        """(configured rank or None, module scaling / slot scaling) for a module name."""
        if not self.has_cfg or not self.r:
            return None, 1.0
        r = pattern_value(self.cfg.get("rank_pattern"), module, self.r)
        alpha = pattern_value(self.cfg.get("alpha_pattern"), module, self.alpha)
        s = self._scaling(r, alpha)
        return r, (1.0 if s == self.slot_scaling else s / self.slot_scaling)

    # -- key classification
    def classify(self, key: str):
        """-> ("fused", experts, depth) | ("linear", experts, e or None, part) | ("trt", experts, part)
        | ("non_expert", module) ; fails on unknown modules."""
        m = re.fullmatch(r"(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight", key)
        if m is None:
            if key.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
                fail(f"{self.where}: {key}: DoRA magnitude vectors are not supported")
            if re.search(r"\.lora_[AB]\.bias$", key):
                fail(f"{self.where}: {key}: LoRA biases (lora_bias=True) are not supported")
            if "lora_embedding" in key:
                return ("non_expert", key.rsplit(".lora_embedding", 1)[0])
            # modules_to_save / trainable tokens: full copies of non-expert modules
            return ("non_expert", key.rsplit(".", 1)[0])
        mod = m.group("mod")
        if self.legacy:
            mod = mod.replace(".block_sparse_moe.", ".mlp.")
        plain = mod.replace(".base_layer", "")
        if plain in self.experts:
            return ("fused", plain, mod.count(".base_layer"))
        head, _, last = plain.rpartition(".")
        if last in _PROJ:
            if head in self.experts:
                return ("linear", head, None, _PROJ[last])
            h2, _, idx = head.rpartition(".")
            if h2 in self.experts and idx.isdigit():
                return ("linear", h2, int(idx), _PROJ[last])
        if last in _TRT:
            cands = [n for n in self.experts if n.startswith(head + ".")]
            if not cands:
                nums = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", head)
                cands = self.by_layer.get(int(nums[-1]), []) if nums else []
            if len(cands) == 1:
                return ("trt", cands[0], _TRT[last])
            fail(f"{self.where}: {key}: TRT-LLM module {last!r} under {head!r} matches no MoE experts module of "
                 f"the model (found {len(cands)}; experts modules: {sorted(self.experts)[:4]}...)")
        if last in _TRT_NON_EXPERT or plain in self.module_names:
            return ("non_expert", plain)
        for name in self.experts:
            if plain.startswith(name + "."):
                fail(f"{self.where}: {key}: unknown target module {plain!r} under the experts module {name!r} "
                     f"(expected {name}.<expert>.<gate_proj|up_proj|down_proj|w1|w3|w2> or fused parameters)")
        fail(f"{self.where}: {key}: unknown target module {plain!r}: the model has no such module")

    # -- per-format tensor handling (all return _Part in canonical [E, r, in] / [E, out, r] or 2D shared)
    def fused_pair(self, name: str, ka: str, a: Tensor, kb: str, b: Tensor) -> Tuple[str, _Part]:
        info = self.experts[name]
        E, H, I = info.num_experts, info.hidden, info.inter
        if a.dim() != 2 or b.dim() != 2:
            fail(f"{self.where}: {ka}: PEFT target_parameters LoRA weights must be 2D (lora_A [E*r, in], "
                 f"lora_B [out, r*E]), got lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
        if a.shape[1] == H and b.shape[0] == 2 * I:
            part, param = "gate_up", "gate_up_proj"
        elif a.shape[1] == I and b.shape[0] == H:
            part, param = "down", "down_proj"
        else:
            fail(f"{self.where}: {ka}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} fit neither "
                 f"{name}.gate_up_proj (lora_A [E*r, {H}], lora_B [{2 * I}, r*E]) nor {name}.down_proj "
                 f"(lora_A [E*r, {I}], lora_B [{H}, r*E]) of the model (E={E}, hidden={H}, intermediate={I})")
        r_cfg, ratio = self.module_ratio(f"{name}.{param}")
        if r_cfg is None:  # no config: infer
            ra, rb = a.shape[0], b.shape[1]
            if ra == rb:
                r_cfg = ra // E if ra % E == 0 else ra
            elif ra == E * rb:
                r_cfg = rb
            elif rb == E * ra:
                r_cfg = ra
            else:
                fail(f"{self.where}: {ka}: lora_A has {ra} rows and lora_B {rb} columns: cannot be E*r or r "
                     f"for E={E} experts")
        r = r_cfg
        if a.shape[0] == E * r:
            a3 = a.reshape(E, r, a.shape[1])
        elif a.shape[0] == r:
            a3 = a
        else:
            fail(f"{self.where}: {ka}: lora_A has {a.shape[0]} rows, expected E*r = {E}*{r} = {E * r} "
                 f"(per expert) or r = {r} (shared by all experts); the expert count or rank does not match")
        if b.shape[1] == E * r:
            b3 = b.reshape(b.shape[0], r, E).permute(2, 0, 1)  # column j*E + e -> [e, out, j]
        elif b.shape[1] == r:
            b3 = b
        else:
            fail(f"{self.where}: {kb}: lora_B has {b.shape[1]} columns, expected r*E = {r}*{E} = {E * r} "
                 f"(per expert) or r = {r} (shared by all experts); the expert count or rank does not match")
        return part, _Part(a3, b3, ratio, ka)

    def linear_part(self, name: str, part: str, per_expert: Dict[Optional[int], Tuple[str, Tensor, str, Tensor]]
                    ) -> _Part:
        info = self.experts[name]
        E = info.num_experts
        in_dim, out_dim = self._dims(info, part)
        proj_label = {"gate": "gate", "up": "up", "down": "down", "gate_up": "gate_up"}[part]
        if None in per_expert:
            if len(per_expert) > 1:
                fail(f"{self.where}: {name}.{proj_label}: both a shared (no expert index) and per-expert LoRA "
                     f"weights were given")
            ka, a, kb, b = per_expert[None]
            self._check_linear(ka, a, kb, b, in_dim, out_dim)
            r_cfg, ratio = self.module_ratio(ka.rsplit(".lora_", 1)[0])
            return _Part(a, b, ratio, ka)
        missing = sorted(set(range(E)) - set(per_expert))
        if missing:
            fail(f"{self.where}: {name}: LoRA on {proj_label} is missing for experts {missing[:8]}"
                 f"{'...' if len(missing) > 8 else ''} (the model has {E} experts; every expert needs lora_A and "
                 f"lora_B, or give one shared matrix without the expert index)")
        ranks = set()
        ratios = set()
        for e in range(E):
            ka, a, kb, b = per_expert[e]
            self._check_linear(ka, a, kb, b, in_dim, out_dim)
            ranks.add(a.shape[0])
            ratios.add(self.module_ratio(ka.rsplit(".lora_", 1)[0])[1])
        if len(ranks) > 1:
            fail(f"{self.where}: {name}: LoRA on {proj_label} has different ranks across experts {sorted(ranks)}; "
                 f"expected one rank per projection")
        if len(ratios) > 1:
            fail(f"{self.where}: {name}: LoRA on {proj_label} has different scalings across experts")
        a = torch.stack([per_expert[e][1] for e in range(E)])
        b = torch.stack([per_expert[e][3] for e in range(E)])
        return _Part(a, b, ratios.pop(), per_expert[0][0])

    def trt_part(self, name: str, part: str, ka: str, a: Tensor, kb: str, b: Tensor) -> _Part:
        info = self.experts[name]
        E = info.num_experts
        in_dim, out_dim = self._dims(info, part)
        for k, t, what in ((ka, a, "lora_A [E, r, in] or [r, in]"), (kb, b, "lora_B [E, out, r] or [out, r]")):
            if t.dim() not in (2, 3):
                fail(f"{self.where}: {k}: expected {what}, got shape {tuple(t.shape)}")
            if t.dim() == 3 and t.shape[0] != E:
                fail(f"{self.where}: {k}: {t.shape[0]} experts in the first dimension, the model's {name} has {E}")
        if a.shape[-1] != in_dim:
            fail(f"{self.where}: {ka}: input size {a.shape[-1]} does not match the model ({in_dim} for {part} of "
                 f"{name})")
        if b.shape[-2] != out_dim:
            fail(f"{self.where}: {kb}: output size {b.shape[-2]} does not match the model ({out_dim} for {part} "
                 f"of {name})")
        if a.shape[-2] != b.shape[-1]:
            fail(f"{self.where}: {ka}: rank of lora_A ({a.shape[-2]}) != rank of lora_B ({b.shape[-1]})")
        _, ratio = self.module_ratio(ka.rsplit(".lora_", 1)[0])
        return _Part(a, b, ratio, ka)

    def _dims(self, info: ExpertsInfo, part: str) -> Tuple[int, int]:
        return {"gate": (info.hidden, info.inter), "up": (info.hidden, info.inter),
                "gate_up": (info.hidden, 2 * info.inter), "down": (info.inter, info.hidden)}[part]

    def _check_linear(self, ka, a, kb, b, in_dim, out_dim):
        if a.dim() != 2:
            fail(f"{self.where}: {ka}: lora_A must be 2D [r, in], got shape {tuple(a.shape)}")
        if b.dim() != 2:
            fail(f"{self.where}: {kb}: lora_B must be 2D [out, r], got shape {tuple(b.shape)}")
        check_shape(f"{self.where}: {ka}", a, (a.shape[0], in_dim), f"lora_A [r, {in_dim}]: the input size")
        check_shape(f"{self.where}: {kb}", b, (out_dim, a.shape[0]),
                    f"lora_B [{out_dim}, r={a.shape[0]}]: the output size and the rank of lora_A")


def _combine_fc1(parts: Dict[str, _Part], info: ExpertsInfo) -> Tuple[Tensor, Tensor]:
    """gate_up directly; separate gate/up -> stacked A, block-diagonal B (exact)."""
    if "gate_up" in parts:
        p = parts["gate_up"]
        return p.a, (p.b * p.ratio if p.ratio != 1.0 else p.b)
    E, I = info.num_experts, info.inter
    present = [(k, parts[k]) for k in ("gate", "up") if k in parts]
    a_shared = all(p.a.dim() == 2 for _, p in present)
    b_shared = all(p.b.dim() == 2 for _, p in present)
    r_total = sum(p.a.shape[-2] for _, p in present)

    def expand(t, shared):
        return t if shared else (t.expand(E, *t.shape) if t.dim() == 2 else t)

    a = torch.cat([expand(p.a, a_shared) for _, p in present], dim=-2)
    b = torch.zeros(*(() if b_shared else (E,)), 2 * I, r_total, dtype=torch.float32)
    col = 0
    for k, p in present:
        r = p.a.shape[-2]
        rows = slice(0, I) if k == "gate" else slice(I, 2 * I)
        pb = p.b * p.ratio if p.ratio != 1.0 else p.b
        b[..., rows, col:col + r] = pb
        col += r
    return a, b


def parse_adapter(sd: Dict[str, Tensor], config: Optional[dict], where: str, experts: Dict[str, ExpertsInfo],
                  module_names: Iterable[str], pool_dtype: torch.dtype, allow_partial: bool = False,
                  shared: Iterable[str] = ()) -> ParsedAdapter:
    """Validate and convert a whole adapter; raises AdapterValidationError (ValueError) on any problem."""
    shared = set(shared or ())
    bad = shared - set(SIDES)
    if bad:
        fail(f"{where}: unknown shared side(s) {sorted(bad)}, expected a subset of {list(SIDES)}")
    if config is not None:
        check_config(config, where)
    if not sd:
        fail(f"{where}: the adapter has no tensors")
    p = _Parser(experts, module_names, config, where, pool_dtype)

    fused: Dict[Tuple[str, int], Dict[str, Tuple[str, Tensor]]] = {}
    linear: Dict[Tuple[str, str], Dict[Optional[int], Dict[str, Tuple[str, Tensor]]]] = {}
    trt: Dict[Tuple[str, str], Dict[str, Tuple[str, Tensor]]] = {}
    non_expert: List[str] = []
    formats = set()
    for raw_key, t in sd.items():
        key = _normalize_key(raw_key)
        kind = p.classify(key)
        if kind[0] == "non_expert":
            non_expert.append(kind[1])
            continue
        check_tensor_dtype(f"{where}: {raw_key}", t, pool_dtype)
        ab = key[-len("A.weight"):][0]  # "A" or "B"
        entry = (raw_key, t.detach().to("cpu", torch.float32))
        if kind[0] == "fused":
            formats.add(FORMAT_FUSED)
            fused.setdefault((kind[1], kind[2]), {})[ab] = entry
        elif kind[0] == "linear":
            formats.add(FORMAT_LINEAR)
            linear.setdefault((kind[1], kind[3]), {}).setdefault(kind[2], {})[ab] = entry
        else:
            formats.add(FORMAT_TRT)
            trt.setdefault((kind[1], kind[2]), {})[ab] = entry

    skipped = refuse_or_skip(non_expert, allow_partial, where)

    def pair(d: Dict[str, Tuple[str, Tensor]], label: str):
        if "A" not in d or "B" not in d:
            have, miss = ("A", "B") if "A" in d else ("B", "A")
            fail(f"{where}: {d[have][0]}: lora_{miss} is missing for {label} (found only lora_{have})")
        return d["A"][0], d["A"][1], d["B"][0], d["B"][1]

    parts: Dict[str, Dict[str, _Part]] = {}

    def put(name, part, value: _Part):
        layer = parts.setdefault(name, {})
        if part in layer or (part == "gate_up" and ("gate" in layer or "up" in layer)) or (
                part in ("gate", "up") and "gate_up" in layer):
            fail(f"{where}: {value.key}: {name} has more than one LoRA for its {part} projection")
        layer[part] = value

    fused_parts = set()
    for (name, depth), d in sorted(fused.items()):
        ka, a, kb, b = pair(d, f"{name} (fused parameter, nesting depth {depth})")
        part, value = p.fused_pair(name, ka, a, kb, b)
        fused_parts.add(part)
        put(name, part, value)
    for (name, part), per in sorted(linear.items(), key=lambda kv: kv[0]):
        tensors = {}
        for e, d in per.items():
            if e is not None:
                check_expert_index(f"{where}: {d.get('A', d.get('B'))[0]}", e, experts[name])
            tensors[e] = pair(d, f"{name}.{'' if e is None else str(e) + '.'}{part}")
        put(name, part, p.linear_part(name, part, tensors))
    for (name, part), d in sorted(trt.items()):
        ka, a, kb, b = pair(d, f"{name} ({part})")
        put(name, part, p.trt_part(name, part, ka, a, kb, b))

    if not parts:
        fail(f"{where}: the adapter has no LoRA weights on MoE experts (targets found: "
             f"{sorted(set(non_expert))[:6]}); nothing to load")
    _check_config_targets(config, where, sd, fused_parts)

    layers: Dict[str, LayerDelta] = {}
    for name, lp in parts.items():
        info = experts[name]
        delta = LayerDelta()
        if any(k in lp for k in ("gate_up", "gate", "up")):
            delta.w13 = _combine_fc1(lp, info)
        if "down" in lp:
            d = lp["down"]
            delta.w2 = (d.a, d.b * d.ratio if d.ratio != 1.0 else d.b)
        layers[name] = _declare_shared(delta, shared, name, where)
    return ParsedAdapter(layers=layers, scaling=float(p.slot_scaling), format="+".join(sorted(formats)),
                         skipped=skipped)


def _declare_shared(delta: LayerDelta, shared: set, name: str, where: str) -> LayerDelta:
    """Sides declared shared: per-expert copies must be identical; keep one."""
    for side in shared:
        proj, ab = side[:-2], side[-1]
        pair = getattr(delta, proj)
        if pair is None:
            continue
        t = pair[0] if ab == "a" else pair[1]
        if t.dim() == 3:
            if not bool((t == t[:1]).all()):
                fail(f"{where}: {name}: {side} was declared shared but differs between experts")
            t = t[0].clone()
            pair = (t, pair[1]) if ab == "a" else (pair[0], t)
            setattr(delta, proj, pair)
    return delta


def _check_config_targets(config, where, sd, fused_parts):
    """Targets named in the config (target_parameters, list-valued target_modules) must have weights."""
    if not config:
        return
    keys = [_normalize_key(k) for k in sd]
    mods = {k.rsplit(".lora_", 1)[0].replace(".base_layer", "") for k in keys if ".lora_" in k}
    for tp in config.get("target_parameters") or []:
        param = tp.rpartition(".")[2]
        if param not in ("gate_up_proj", "down_proj"):
            fail(f"{where}: target_parameters entry {tp!r} is not a fused expert weight (gate_up_proj or "
                 f"down_proj); moelora adapts only the routed experts")
        want = "gate_up" if param == "gate_up_proj" else "down"
        if want not in fused_parts:
            fail(f"{where}: the config targets the parameter {tp!r} but the weights have no LoRA tensors for it "
                 f"(missing target)")
    tm = config.get("target_modules")
    if isinstance(tm, (list, tuple, set)):
        for t in tm:
            if not any(m == t or m.endswith("." + t) for m in mods):
                fail(f"{where}: the config targets the module {t!r} but the weights have no LoRA tensors for it "
                     f"(missing target module)")
