"""The implementations timed side by side with ours, all on the same inputs.

Each peer is built once per (shape, rank, adapters) from the shared weights (``Weights``) and then prepared
once per input copy (``Batch``) into a zero-argument closure that runs one MoE layer and returns [T, H].
Preparation (index lists, adapter switching tables) is not timed; the closure is.

Peers (name: what it is):
  hf_eager         transformers 5 experts, `eager` implementation (loop over hit experts), no LoRA
  hf_grouped_mm    transformers 5 experts, `grouped_mm` implementation (torch grouped GEMM), no LoRA
  peft1            PEFT LoRA on the 3D expert weights (target_parameters), one adapter for every token
  peft_split       the mixed S-adapter batch split per adapter through PEFT (one forward per adapter on its
                   tokens, plus one with adapters disabled for the -1 tokens), since PEFT refuses mixed
                   batches for experts
  torch_lora       plain PyTorch grouped-mm MoE with LoRA by per-(expert, slot) grouped mm: the best a
                   PyTorch user writes (torch._grouped_mm on CUDA, a loop over segments elsewhere)
  ours, ours_lora  moelora_ext.fused_moe without / with the mixed-adapter LoRA
  ours_graph, ours_lora_graph   the same, CUDA-graph captured once per input copy and replayed (CUDA only)

Layouts (shapes in comments): w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; LoRA
w13_a [S, E, R, H], w13_b [S, E, 2I, R], w2_a [S, E, R, I], w2_b [S, E, H, R]; lora_scalings [S] fp32.
transformers 5 stores experts as gate_up_proj [E, 2I, H], down_proj [E, H, I]: the same tensors, no copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Weights:
    """Expert and adapter weights of one (shape, rank, adapters) configuration."""
    w13: torch.Tensor                     # [E, 2I, H]
    w2: torch.Tensor                      # [E, H, I]
    w13_a: Optional[torch.Tensor] = None  # [S, E, R, H]
    w13_b: Optional[torch.Tensor] = None  # [S, E, 2I, R]
    w2_a: Optional[torch.Tensor] = None   # [S, E, R, I]
    w2_b: Optional[torch.Tensor] = None   # [S, E, H, R]
    scalings: Optional[torch.Tensor] = None  # [S] fp32

    @property
    def E(self): return self.w13.shape[0]

    @property
    def I(self): return self.w13.shape[1] // 2  # noqa: E743

    @property
    def H(self): return self.w13.shape[2]

    @property
    def S(self): return 0 if self.w13_a is None else self.w13_a.shape[0]

    @property
    def R(self): return 0 if self.w13_a is None else self.w13_a.shape[2]

    def with_lora(self, lora: "Weights") -> "Weights":
        return dataclasses.replace(self, w13_a=lora.w13_a, w13_b=lora.w13_b, w2_a=lora.w2_a, w2_b=lora.w2_b,
                                   scalings=lora.scalings)

    def lora_kwargs(self) -> dict:
        return dict(w13_lora_a=self.w13_a, w13_lora_b=self.w13_b, w2_lora_a=self.w2_a, w2_lora_b=self.w2_b,
                    lora_scalings=self.scalings)


@dataclasses.dataclass
class Batch:
    """One copy of the per-call inputs (rotated between calls so the L2 does not hold them)."""
    x: torch.Tensor           # [T, H]
    topk_w: torch.Tensor      # [T, k] (hidden dtype, as transformers' routers return it)
    topk_ids: torch.Tensor    # [T, k] int64 (what torch.topk returns)
    lora_ids: torch.Tensor    # [T] int32 in [-1, S)

    def subset(self, n: int) -> "Batch":
        return Batch(self.x[:n], self.topk_w[:n], self.topk_ids[:n],
                     None if self.lora_ids is None else self.lora_ids[:n])


def make_expert_weights(H, I, E, dtype, device, seed=0) -> Weights:  # noqa: E741
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Generated in chunks on the host in fp32 would be slow for mixtral (2.8 GB); use the device RNG.
    gd = torch.Generator(device=device).manual_seed(seed) if device != "cpu" else g
    w13 = torch.randn(E, 2 * I, H, generator=gd, device=device, dtype=dtype).mul_(H ** -0.5)
    w2 = torch.randn(E, H, I, generator=gd, device=device, dtype=dtype).mul_(I ** -0.5)
    return Weights(w13, w2)


def make_lora_weights(H, I, E, S, R, dtype, device, seed=1) -> Weights:  # noqa: E741
    gd = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape, std: torch.randn(*shape, generator=gd, device=device, dtype=dtype).mul_(std)  # noqa
    w13_a = rnd(S, E, R, H, std=H ** -0.5)
    w13_b = rnd(S, E, 2 * I, R, std=0.5 * R ** -0.5)
    w2_a = rnd(S, E, R, I, std=I ** -0.5)
    w2_b = rnd(S, E, H, R, std=0.5 * R ** -0.5)
    scalings = torch.linspace(0.5, 1.5, S, device=device, dtype=torch.float32) if S > 1 else \
        torch.ones(S, device=device, dtype=torch.float32)
    return Weights(None, None, w13_a, w13_b, w2_a, w2_b, scalings)


def make_batch(T, H, E, k, dtype, device, seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded hidden states and random top-k routing with softmax weights (renormalised over the top k)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    logits = torch.randn(T, E, generator=g, dtype=torch.float32)
    probs = torch.softmax(logits, dim=-1)
    topk_w, topk_ids = torch.topk(probs, k, dim=-1)
    topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
    return x, topk_w, topk_ids.to(device)


def make_lora_ids(T, S, device, seed) -> torch.Tensor:
    """Tokens uniform over the S slots, 1 in 8 tokens (in expectation) with no adapter (-1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, max(S, 1), (T,), generator=g, dtype=torch.int32)
    none = torch.rand(T, generator=g) < 0.125
    ids[none] = -1
    if S == 0:
        ids.fill_(-1)
    return ids.to(device)


# ----------------------------------------------------------------------------------------------- peers
class Peer:
    """A peer: build() once per weights, prepare() once per input copy -> closure timed by the driver."""
    name = "peer"
    lora = False          # computes the LoRA workload
    slow = False          # skipped at large T / when the budget runs low
    max_T: Optional[int] = None
    cuda_only = False
    repeats = "fast"      # "ours" | "fast" | "slow": how many repeats the driver spends on it
    # the LoRA ids the reference must use for this peer's output: "batch" (the mixed ids), "slot0" (every
    # token adapter 0), or None (no LoRA)
    ref_lora: Optional[str] = None

    def build(self, W: Weights) -> None:
        self.W = W

    def prepare(self, b: Batch) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        self.__dict__.clear()


# -------- transformers 5 experts
def _hf_experts(W: Weights, k: int, implementation: str) -> nn.Module:
    """A transformers 5 Qwen3-MoE experts module on our weights (no copy), dispatching to `implementation`."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=W.H, moe_intermediate_size=W.I, num_experts=W.E, num_experts_per_tok=k,
                         hidden_act="silu")
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        experts = Qwen3MoeExperts(cfg)
    experts.gate_up_proj = nn.Parameter(W.w13, requires_grad=False)   # [E, 2I, H]
    experts.down_proj = nn.Parameter(W.w2, requires_grad=False)       # [E, H, I]
    return experts.eval()


class HFExperts(Peer):
    def __init__(self, implementation: str):
        self.implementation = implementation
        self.name = f"hf_{implementation}"
        if implementation == "eager":
            self.slow, self.max_T, self.repeats = True, 4096, "slow"

    def build(self, W):
        self.W = W
        self.k = None
        self.mod = None

    def prepare(self, b):
        if self.mod is None:
            self.mod = _hf_experts(self.W, b.topk_ids.shape[1], self.implementation)
        mod = self.mod
        return lambda: mod(b.x, b.topk_ids, b.topk_w)


# -------- PEFT
class _Block(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, topk_ids, topk_w):
        return self.experts(x, topk_ids, topk_w)


def _peft_model(W: Weights, k: int, n_adapters: int, implementation: str = "grouped_mm"):
    """PEFT LoRA (target_parameters on the 3D expert weights) with adapters s0..s{n-1} = our slots 0..n-1."""
    from peft import LoraConfig, get_peft_model

    block = _Block(_hf_experts(W, k, implementation))
    cfg = LoraConfig(r=W.R, lora_alpha=W.R, target_modules=[], init_lora_weights=False,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(block, cfg, adapter_name="s0")
    for s in range(1, n_adapters):
        model.add_adapter(f"s{s}", cfg)
    # PEFT's layout per 3D parameter [E, out, in]: lora_A.weight [R*E, in] (= A[e] rows expert-major),
    # lora_B.weight [out, R*E] with column r*E + e (see ParamWrapper.get_delta_weight).
    wrappers = {}
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            wrappers[m.parameter_name] = m
    E, R = W.E, W.R
    with torch.no_grad():
        for s in range(n_adapters):
            name = f"s{s}"
            for pname, (a, b) in {"gate_up_proj": (W.w13_a, W.w13_b), "down_proj": (W.w2_a, W.w2_b)}.items():
                m = wrappers[pname]
                m.lora_A[name].weight.copy_(a[s].reshape(E * R, -1))                   # [E,R,in] -> [E*R, in]
                m.lora_B[name].weight.copy_(b[s].permute(1, 2, 0).reshape(-1, R * E))  # [E,out,R] -> [out, R*E]
                m.scaling[name] = float(W.scalings[s])
    return model.eval()


class Peft1(Peer):
    name, lora, slow, repeats, ref_lora = "peft1", True, True, "slow", "slot0"

    def build(self, W):
        self.W, self.model = W, None

    def prepare(self, b):
        if self.model is None:
            self.model = _peft_model(self.W, b.topk_ids.shape[1], 1)
            self.model.set_adapter("s0")
        model = self.model
        return lambda: model(b.x, b.topk_ids, b.topk_w)


class PeftSplit(Peer):
    name, lora, slow, repeats, ref_lora = "peft_split", True, True, "slow", "batch"

    def build(self, W):
        self.W, self.model = W, None

    def prepare(self, b):
        if self.model is None:
            self.model = _peft_model(self.W, b.topk_ids.shape[1], self.W.S)
        model = self.model
        # The per-adapter token lists: a server's scheduler knows them, so they are built outside the timing.
        ids = b.lora_ids.cpu()
        groups = []
        for s in range(-1, self.W.S):
            idx = torch.nonzero(ids == s).flatten()
            if idx.numel():
                idx = idx.to(b.x.device)
                groups.append((s, idx, b.x[idx], b.topk_ids[idx], b.topk_w[idx]))

        def run():
            out = torch.empty_like(b.x)
            for s, idx, x, ti, tw in groups:
                if s < 0:
                    with model.disable_adapter():
                        out[idx] = model(x, ti, tw)
                else:
                    model.set_adapter(f"s{s}")
                    out[idx] = model(x, ti, tw)
            return out
        return run


# -------- plain PyTorch grouped-mm MoE with LoRA per (expert, slot) segment
def _grouped(x, w, offs):
    """x [rows, K] @ w [G, K, N] per group (rows sorted by group, offs = cumulative ends, int32)."""
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


# torch._grouped_mm refuses large group counts ("Can't process more than 1024 groups"); chunks of exactly
# 1024 groups (1023 + the zero group) still failed on the H100 with torch 2.11 (2026-11-23), so stay well below.
MAX_GROUPS = 512


class _ChunkedGroups:
    """A grouped mm over G groups as ceil(G / 1023) grouped mms of <= 1024 groups, without a host sync: chunk
    [g0, g1) gets a zero-weight group in front covering rows [0, start) (start = end of group g0-1, a device
    value), so its rows stay in place; rows past the chunk's last group are left unwritten by the kernel and
    are masked out when the chunks are combined. One chunk (G <= 1024) is a plain grouped mm."""

    def __init__(self, w: torch.Tensor, max_groups: int = MAX_GROUPS):
        self.w, self.G = w, w.shape[0]
        self.chunks = []
        if w.is_cuda and self.G > max_groups:
            step = max_groups - 1
            for g0 in range(0, self.G, step):
                g1 = min(self.G, g0 + step)
                self.chunks.append((g0, g1, torch.cat([torch.zeros_like(w[:1]), w[g0:g1]]).contiguous()))

    def __call__(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not self.chunks:
            return _grouped(x, self.w, offs)
        rows = torch.arange(x.shape[0], device=x.device)
        zero = offs.new_zeros(1)
        out = None
        for g0, g1, w in self.chunks:
            start = offs[g0 - 1:g0] if g0 > 0 else zero
            y = torch._grouped_mm(x, w, offs=torch.cat([start, offs[g0:g1]]))
            inside = ((rows >= start) & (rows < offs[g1 - 1])).unsqueeze(1)
            out = torch.where(inside, y, 0 if out is None else out)
        return out


class TorchGroupedLora(Peer):
    """Rows (t, j) sorted by key = e*(S+1) + (slot+1): contiguous per expert (base grouped mm over E groups)
    and per (expert, slot) (LoRA grouped mm over E*(S+1) groups; the slot -1 group has zero adapters)."""
    name, lora, ref_lora = "torch_lora", True, "batch"

    def build(self, W):
        self.W = W
        E, S = W.E, W.S

        def groups(t):  # [S, E, N, K] -> [E*(S+1), K, N] with a zero slot in front, expert-major
            z = torch.zeros_like(t[:1])
            return torch.cat([z, t]).transpose(0, 1).reshape(E * (S + 1), t.shape[2], t.shape[3]) \
                .transpose(1, 2).contiguous()
        sc = torch.cat([torch.zeros(1, device=W.w13.device), W.scalings]).to(W.w13.dtype)  # [S+1]
        # The slot's scaling is folded into B (a user would do the same once at load time).
        self.a13 = _ChunkedGroups(groups(W.w13_a))                             # [G, H, R]
        self.b13 = _ChunkedGroups(groups(W.w13_b * sc[1:, None, None, None]))  # [G, R, 2I]
        self.a2 = _ChunkedGroups(groups(W.w2_a))                               # [G, I, R]
        self.b2 = _ChunkedGroups(groups(W.w2_b * sc[1:, None, None, None]))    # [G, R, H]
        self.w13t = W.w13.transpose(1, 2)                                      # [E, H, 2I] view
        self.w2t = W.w2.transpose(1, 2)                                        # [E, I, H] view

    def prepare(self, b):
        E, S, I = self.W.E, self.W.S, self.W.I  # noqa: E741
        a13, b13, a2, b2, w13t, w2t = self.a13, self.b13, self.a2, self.b2, self.w13t, self.w2t
        x, topk_ids, topk_w, lora_ids = b.x, b.topk_ids, b.topk_w, b.lora_ids
        T, k = topk_ids.shape
        hist = (lambda v, n: torch.histc(v.float(), bins=n, min=0, max=n - 1)) if not x.is_cuda else \
            (lambda v, n: torch.histc(v.int(), bins=n, min=0, max=n - 1))

        def run():
            key = topk_ids.reshape(-1) * (S + 1) + (lora_ids.long() + 1).repeat_interleave(k)   # [T*k]
            key_s, perm = torch.sort(key)
            xs = x[perm // k]                                                                  # [rows, H]
            offs_e = torch.cumsum(hist(key_s // (S + 1), E), 0, dtype=torch.int32)             # [E]
            offs_g = torch.cumsum(hist(key_s, E * (S + 1)), 0, dtype=torch.int32)              # [G]
            gu = _grouped(xs, w13t, offs_e)                                                    # [rows, 2I]
            gu = gu + b13(a13(xs, offs_g), offs_g)
            h = F.silu(gu[:, :I]) * gu[:, I:]                                                  # [rows, I]
            y = _grouped(h, w2t, offs_e)                                                       # [rows, H]
            y = y + b2(a2(h, offs_g), offs_g)
            y = y * topk_w.reshape(-1)[perm].unsqueeze(1)
            out = torch.zeros(T * k, y.shape[1], device=y.device, dtype=y.dtype)
            out[perm] = y
            return out.view(T, k, -1).float().sum(1).to(x.dtype)
        return run


# -------- ours
def import_ours():
    """moelora_ext (torch must be imported first: the extension links libc10)."""
    try:
        import moelora_ext
    except ImportError:
        # not installed: the in-tree package (needs its extension built in place, e.g. `pip install -e .`)
        import os
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.append(root)
        import moelora_ext
    return moelora_ext


class Ours(Peer):
    repeats = "ours"

    def __init__(self, lora: bool, graph: bool):
        self.lora, self.graph = lora, graph
        self.cuda_only = graph
        self.name = "ours" + ("_lora" if lora else "") + ("_graph" if graph else "")
        self.ref_lora = "batch" if lora else None

    def build(self, W):
        self.W = W
        self.op = import_ours().fused_moe
        self.pool = None
        self.graphs = []

    def _call(self, b):
        kw = dict(token_lora_ids=b.lora_ids, **self.W.lora_kwargs()) if self.lora else {}
        return self.op(b.x, self.W.w13, self.W.w2, b.topk_w, b.topk_ids, **kw)

    def prepare(self, b):
        if not self.graph:
            return lambda: self._call(b)
        # warm up on a side stream, then capture one graph per input copy (all in one memory pool)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._call(b)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self._call(b)
        if self.pool is None:
            self.pool = g.pool()
        self.graphs.append(g)

        def replay():
            g.replay()
            return out
        return replay


def all_peers(device: str, graph: bool = True) -> list[Peer]:
    peers = [HFExperts("eager"), HFExperts("grouped_mm"), Peft1(), PeftSplit(), TorchGroupedLora(),
             Ours(False, False), Ours(True, False)]
    if graph and device == "cuda":
        peers += [Ours(False, True), Ours(True, True)]
    return peers


@contextlib.contextmanager
def quiet_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
