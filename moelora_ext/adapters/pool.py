"""Slot pool: LoRA slot buffers for every MoE layer of a model, adapter names -> slots, LRU eviction.

    pool = moelora_ext.attach_lora_pool(model, max_adapters=8, max_rank=64)
    pool.load("sql", "adapters/sql")                       # PEFT directory (adapter_config.json + weights)
    pool.load("chat", state_dict, config=peft_config_dict)
    with moelora_ext.use_adapters(model, ["sql", None, "chat", "sql"]):   # one entry per batch row
        logits = model(input_ids).logits
    pool.evict("sql"); pool.adapters()

Buffers (per experts module, registered as non-persistent buffers, so ``model.to(...)`` moves them and
``state_dict`` / ``save_pretrained`` do not see them): ``moelora_w13_a`` [S, E, R, H], ``moelora_w13_b``
[S, E, 2I, R], ``moelora_w2_a`` [S, E, R, I], ``moelora_w2_b`` [S, E, H, R], ``moelora_scalings`` [S] (fp32);
S = max_adapters, R = max_rank, dtype/device of the expert weights. A side listed in ``shared`` is allocated
without the expert dim ([S, R, H], ...) and passed to the op with its ``*_shared_*`` flag.

Shared-outer adapters and the pool's layout (design):
* The shared flags are per pool (the op takes one flag per side for all slots), fixed at ``attach_lora_pool``.
* A default pool (``shared=()``) stores every adapter per expert. A shared-outer adapter loaded into it is
  replicated across experts: correct (bit-identical results) but not compact.
* A pool created with ``shared={"w13_a", "w2_b"}`` (say) stores those sides once per slot. Every adapter loaded
  into it must have those sides shared (from its file layout, or declared with ``load(..., shared=...)``,
  in which case the per-expert copies must be identical); an adapter with per-expert matrices on a shared side
  is refused with a ValueError naming the layer and the side (it cannot be stored there without losing
  information). Use one pool per layout family; a model holds one pool.

Ranks: every slot has room for R = max_rank; an adapter of rank r < R is zero-padded (the padding contributes
exactly zero). w13 and w2 may have different ranks; separate gate/up adapters of rank r become rank 2r on w13.

Failed loads: ``load`` reads, converts and validates the whole adapter (and chooses a slot) before writing
anything, so any error leaves the pool and every slot exactly as before.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..integrations.layout import experts_layout, is_experts_module
from .formats import ParsedAdapter, parse_adapter, read_adapter_source
from .validation import SIDES, ExpertsInfo, check_rank, fail

__all__ = ["LoraPool", "PoolFullError", "attach_lora_pool", "use_adapters", "get_lora_pool"]

_BUF = {side: "moelora_" + side for side in SIDES}
_SCALINGS = "moelora_scalings"
_POOL_ATTR = "_moelora_pool"
_ROWS_ATTR = "_moelora_rows"      # per experts module: int32 [B] slot per batch row, set only inside use_adapters
_FLAGS_ATTR = "_moelora_flags"    # per experts module: (w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b)


class PoolFullError(RuntimeError):
    """Every slot holds an adapter that an active ``use_adapters`` block is using: nothing can be evicted."""


@dataclass
class _Entry:
    slot: int
    ranks: Dict[str, int]
    file_shared: Dict[str, bool]
    scaling: float
    format: str
    layers: List[str]
    skipped: List[str]
    last_used: int = 0


def _experts_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_experts_module(m)}


class LoraPool:
    """LoRA slot buffers for every MoE experts module of ``model``. Create with ``attach_lora_pool``."""

    def __init__(self, model: nn.Module, max_adapters: int = 8, max_rank: int = 64, shared: Iterable[str] = ()):
        if not isinstance(max_adapters, int) or max_adapters < 1:
            raise ValueError(f"max_adapters must be a positive int, got {max_adapters!r}")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        shared = frozenset(shared or ())
        if shared - set(SIDES):
            raise ValueError(f"shared: unknown side(s) {sorted(shared - set(SIDES))}, expected a subset of "
                             f"{list(SIDES)}")
        modules = _experts_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no transformers-5 MoE experts module (a module decorated "
                             f"with @use_experts_implementation holding gate_up_proj / down_proj)")
        bad = {n: experts_layout(m).reason for n, m in modules.items() if not experts_layout(m).supported}
        if bad:
            n, why = next(iter(bad.items()))
            raise ValueError(f"{type(model).__name__}: the experts module {n} cannot run LoRA through moelora: {why} "
                             f"({len(bad)} module(s) affected)")
        self._model_ref = weakref.ref(model)
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.shared = shared
        self._modules: Dict[str, nn.Module] = modules
        self._slots: List[Optional[str]] = [None] * max_adapters
        self._entries: Dict[str, _Entry] = {}
        self._holds: Dict[str, int] = {}
        self._tick = 0
        S, R = max_adapters, max_rank
        flags = tuple(side in shared for side in SIDES)
        for name, m in modules.items():
            lay = experts_layout(m)
            E, H, I = lay.num_experts, lay.hidden, lay.inter
            w = m.gate_up_proj
            shapes = {"w13_a": (E, R, H), "w13_b": (E, 2 * I, R), "w2_a": (E, R, I), "w2_b": (E, H, R)}
            for side in SIDES:
                shape = shapes[side][1:] if side in shared else shapes[side]
                m.register_buffer(_BUF[side], torch.zeros((S,) + shape, dtype=w.dtype, device=w.device),
                                  persistent=False)
            m.register_buffer(_SCALINGS, torch.zeros(S, dtype=torch.float32, device=w.device), persistent=False)
            m.__dict__[_FLAGS_ATTR] = flags
            m.__dict__[_ROWS_ATTR] = None

    # ---------------------------------------------------------------------------------------- info
    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of this pool was garbage-collected")
        return model

    def layer_names(self) -> List[str]:
        return list(self._modules)

    def buffers(self, layer: str) -> Dict[str, Tensor]:
        """The slot buffers of one experts module (live tensors; for inspection)."""
        m = self._modules[layer]
        out = {side: getattr(m, _BUF[side]) for side in SIDES}
        out["scalings"] = getattr(m, _SCALINGS)
        return out

    def adapters(self) -> Dict[str, dict]:
        """name -> {slot, rank, ranks {w13, w2}, scaling, format, shared (file layout), stored_shared (pool),
        layers (experts modules it adapts), skipped (non-expert targets skipped), held (active blocks)}."""
        out = {}
        for name, e in sorted(self._entries.items(), key=lambda kv: kv[1].slot):
            out[name] = {"slot": e.slot, "rank": max(e.ranks.values()), "ranks": dict(e.ranks),
                         "scaling": e.scaling, "format": e.format, "shared": dict(e.file_shared),
                         "stored_shared": {s: s in self.shared for s in SIDES}, "layers": list(e.layers),
                         "skipped": list(e.skipped), "held": self._holds.get(name, 0)}
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"LoraPool(max_adapters={self.max_adapters}, max_rank={self.max_rank}, shared={sorted(self.shared)}, "
                f"layers={len(self._modules)}, adapters={list(self._entries)})")

    # ---------------------------------------------------------------------------------------- load / evict
    def load(self, name: str, path_or_state_dict, config=None, *, allow_partial: bool = False,
             shared: Optional[Iterable[str]] = None) -> dict:
        """Load an adapter into a slot (replacing an adapter of the same name; evicting the least recently
        used adapter not held by an active ``use_adapters`` block when the pool is full).

        Args:
            name: the adapter's name (used in ``use_adapters``).
            path_or_state_dict: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors/.bin),
                a weights file, or a state dict (PEFT, per-expert linear or TRT-LLM key names; see formats.py).
            config: PEFT config (dict or LoraConfig); read from the directory when not given. Without any
                config the scaling is 1 and ranks come from the tensor shapes.
            allow_partial: skip (with a warning) non-expert targets instead of refusing the adapter.
            shared: sides ("w13_a", "w13_b", "w2_a", "w2_b") declared shared by all experts; per-expert copies
                in the file must then be identical and are stored once (when the pool stores that side shared).

        Returns: the adapter's entry of ``adapters()``.
        Raises: ValueError (AdapterValidationError) naming the module and the mismatch; PoolFullError when
            every slot is held. Either way the pool is left exactly as before.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        sd, cfg, where = read_adapter_source(path_or_state_dict, config)
        where = f"adapter {name!r} ({where})"
        infos = self._infos()
        parsed = parse_adapter(sd, cfg, where, infos, (n for n, _ in self.model.named_modules()),
                               next(iter(infos.values())).dtype, allow_partial=allow_partial, shared=shared or ())
        staged = self._stage(parsed, where)
        slot = self._choose_slot(name)            # may raise PoolFullError; nothing written yet
        # ---- commit (no failure possible past this point) ----
        old = self._slots[slot]
        if old is not None and old != name:
            self._drop(old)
        with torch.no_grad():
            for lname, m in self._modules.items():
                bufs = staged.get(lname)
                for side in SIDES:
                    buf = getattr(m, _BUF[side])
                    if bufs is None:
                        buf[slot].zero_()
                    else:
                        buf[slot].copy_(bufs[side])
                getattr(m, _SCALINGS)[slot] = parsed.scaling
        ranks = {"w13": max((d.rank("w13") for d in parsed.layers.values()), default=0),
                 "w2": max((d.rank("w2") for d in parsed.layers.values()), default=0)}
        file_shared = {s: any(d.shared()[s] for d in parsed.layers.values()) for s in SIDES}
        self._slots[slot] = name
        self._entries[name] = _Entry(slot, ranks, file_shared, parsed.scaling, parsed.format,
                                     sorted(parsed.layers), parsed.skipped, self._touch())
        return self.adapters()[name]

    def evict(self, name: str) -> None:
        """Remove an adapter and zero its slot. Raises if an active ``use_adapters`` block holds it."""
        if name not in self._entries:
            raise KeyError(f"no adapter named {name!r} in the pool (loaded: {sorted(self._entries)})")
        if self._holds.get(name):
            raise RuntimeError(f"adapter {name!r} is in use by an active use_adapters block; it cannot be evicted")
        self._drop(name)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        self._slots[entry.slot] = None
        with torch.no_grad():
            for m in self._modules.values():
                for side in SIDES:
                    getattr(m, _BUF[side])[entry.slot].zero_()
                getattr(m, _SCALINGS)[entry.slot] = 0.0

    def _touch(self) -> int:
        self._tick += 1
        return self._tick

    def _choose_slot(self, name: str) -> int:
        if name in self._entries:
            if self._holds.get(name):
                raise RuntimeError(f"adapter {name!r} is in use by an active use_adapters block; it cannot be "
                                   f"replaced now")
            return self._entries[name].slot
        for s, occupant in enumerate(self._slots):
            if occupant is None:
                return s
        free = [e for n, e in self._entries.items() if not self._holds.get(n)]
        if not free:
            raise PoolFullError(f"cannot load {name!r}: all {self.max_adapters} slots hold adapters used by active "
                                f"use_adapters blocks ({sorted(self._entries)})")
        return min(free, key=lambda e: e.last_used).slot

    def _infos(self) -> Dict[str, ExpertsInfo]:
        out = {}
        for name, m in self._modules.items():
            lay = experts_layout(m)
            buf = getattr(m, _BUF["w13_a"])
            out[name] = ExpertsInfo(name, lay.num_experts, lay.hidden, lay.inter, buf.dtype, buf.device)
        return out

    def _stage(self, parsed: ParsedAdapter, where: str) -> Dict[str, Dict[str, Tensor]]:
        """Per layer, one slot's worth of tensors in the buffers' dtype/device, zero-padded to max_rank."""
        R = self.max_rank
        staged = {}
        for lname, delta in parsed.layers.items():
            m = self._modules[lname]
            for proj in ("w13", "w2"):
                r = delta.rank(proj)
                if r:
                    combined = proj == "w13" and ("peft_target_modules" in parsed.format
                                                  or "trtllm" in parsed.format)
                    note = " (separate gate and up adapters combined: their ranks add up)" if combined else ""
                    check_rank(f"{where}: {lname}", proj, r, R, note)
                for ab in ("a", "b"):
                    side = f"{proj}_{ab}"
                    pair = getattr(delta, proj)
                    if side in self.shared and pair is not None and (pair[0] if ab == "a" else pair[1]).dim() == 3:
                        fail(f"{where}: {lname}: {side} has one matrix per expert, but this pool stores {side} "
                             f"shared by all experts (attach_lora_pool(shared={sorted(self.shared)})); load it "
                             f"into a pool without that shared side, or declare it shared if the experts' "
                             f"matrices are identical")
            bufs = {}
            for side in SIDES:
                buf = getattr(m, _BUF[side])
                t = torch.zeros(buf.shape[1:], dtype=buf.dtype, device=buf.device)
                proj, ab = side[:-2], side[-1]
                pair = getattr(delta, proj)
                if pair is not None:
                    src = pair[0] if ab == "a" else pair[1]
                    r = pair[0].shape[-2]
                    if side not in self.shared and src.dim() == 2:
                        src = src.unsqueeze(0).expand(t.shape[0], *src.shape)  # replicate a shared matrix
                    src = src.to(buf.dtype)
                    if ab == "a":
                        t[..., :r, :].copy_(src)
                    else:
                        t[..., :r].copy_(src)
                bufs[side] = t
            staged[lname] = bufs
        return staged

    # ---------------------------------------------------------------------------------------- use
    def _slot_ids(self, names: Sequence[Optional[str]]) -> List[int]:
        out = []
        for i, n in enumerate(names):
            if n is None:
                out.append(-1)
            elif not isinstance(n, str):
                raise ValueError(f"names_per_row[{i}]: expected an adapter name or None, got {type(n).__name__}")
            elif n not in self._entries:
                raise ValueError(f"names_per_row[{i}]: no adapter named {n!r} in the pool "
                                 f"(loaded: {sorted(self._entries)})")
            else:
                out.append(self._entries[n].slot)
        return out

    def detach(self) -> None:
        """Remove the buffers and state from the model (the pool becomes unusable)."""
        if any(self._holds.values()):
            raise RuntimeError("cannot detach a pool while a use_adapters block is active")
        for m in self._modules.values():
            for side in SIDES:
                m._buffers.pop(_BUF[side], None)
            m._buffers.pop(_SCALINGS, None)
            m.__dict__.pop(_FLAGS_ATTR, None)
            m.__dict__.pop(_ROWS_ATTR, None)
        model = self._model_ref()
        if model is not None and model.__dict__.get(_POOL_ATTR) is self:
            del model.__dict__[_POOL_ATTR]
        self._entries.clear()
        self._modules = {}


def get_lora_pool(model: nn.Module) -> Optional[LoraPool]:
    return model.__dict__.get(_POOL_ATTR)


def attach_lora_pool(model: nn.Module, max_adapters: int = 8, max_rank: int = 64, *,
                     shared: Iterable[str] = ()) -> LoraPool:
    """Allocate LoRA slot buffers for every MoE experts module of ``model`` and return the pool.

    The model's experts implementation is switched to "moelora" (the only one that reads the pool) when it is
    not already. An existing pool on the model is detached first. Attach after moving the model to its device
    and dtype (later ``model.to()`` calls move the buffers too).

    Args:
        max_adapters: number of slots S. max_rank: R, the largest rank a slot can hold.
        shared: sides stored once for all experts ({"w13_a", "w13_b", "w2_a", "w2_b"}); see the module doc.
    """
    from ..integrations import register_transformers_experts
    register_transformers_experts()
    old = get_lora_pool(model)
    if old is not None:
        old.detach()
    pool = LoraPool(model, max_adapters=max_adapters, max_rank=max_rank, shared=shared)
    model.__dict__[_POOL_ATTR] = pool
    _ensure_moelora_impl(model)
    return pool


def _ensure_moelora_impl(model: nn.Module) -> None:
    impls = {getattr(getattr(m, "config", None), "_experts_implementation", None)
             for m in _experts_modules(model).values()}
    if impls != {"moelora"}:
        setter = getattr(model, "set_experts_implementation", None)
        if setter is None:
            for m in _experts_modules(model).values():
                m.config._experts_implementation = "moelora"
        else:
            setter("moelora")
        impls = {getattr(getattr(m, "config", None), "_experts_implementation", None)
                 for m in _experts_modules(model).values()}
        if impls != {"moelora"}:
            raise ValueError(f"could not switch the model's experts implementation to 'moelora' (got {impls})")


@contextmanager
def use_adapters(model: nn.Module, names_per_row: Sequence[Optional[str]]):
    """Run ``model`` with one adapter per batch row: ``names_per_row[b]`` (a loaded name, or None for the base
    model) applies to every token of row b in every MoE layer. The batch size of the inputs must equal
    ``len(names_per_row)`` (tokens are [B, L] flattened row-major, as transformers' MoE blocks do). Leaves no
    state behind on exit, also on exceptions; blocks nest (the inner one wins)."""
    if isinstance(names_per_row, (str, bytes)) or not isinstance(names_per_row, Sequence):
        raise ValueError(f"names_per_row must be a list with one adapter name (or None) per batch row, got "
                         f"{type(names_per_row).__name__}")
    names = list(names_per_row)
    if not names:
        raise ValueError("names_per_row is empty: give one entry per batch row")
    pool = get_lora_pool(model)
    if pool is None:
        if any(n is not None for n in names):
            raise ValueError(f"use_adapters: the model has no LoRA pool; call moelora_ext.attach_lora_pool(model) "
                             f"and load {sorted({n for n in names if n is not None})} first")
        yield model
        return
    slots = pool._slot_ids(names)
    impls = {n: getattr(getattr(m, "config", None), "_experts_implementation", None)
             for n, m in pool._modules.items()}
    wrong = {n: i for n, i in impls.items() if i != "moelora"}
    if wrong:
        n, i = next(iter(wrong.items()))
        raise ValueError(f"use_adapters: the experts module {n} runs experts_implementation={i!r}, not 'moelora' "
                         f"(call model.set_experts_implementation('moelora'))")
    held = sorted({n for n in names if n is not None})
    by_device: Dict[torch.device, Tensor] = {}
    previous = []
    for n in held:
        pool._holds[n] = pool._holds.get(n, 0) + 1
        pool._entries[n].last_used = pool._touch()
    try:
        for m in pool._modules.values():
            dev = getattr(m, _BUF["w13_a"]).device
            if dev not in by_device:
                by_device[dev] = torch.tensor(slots, dtype=torch.int32, device=dev)
            previous.append((m, m.__dict__.get(_ROWS_ATTR)))
            m.__dict__[_ROWS_ATTR] = by_device[dev]
        yield model
    finally:
        for m, prev in reversed(previous):
            m.__dict__[_ROWS_ATTR] = prev
        for n in held:
            pool._holds[n] -= 1
            if not pool._holds[n]:
                del pool._holds[n]
