"""The op is a well-behaved custom op: torch.library.opcheck passes (schema, fake kernel, autograd
registration, AOT dispatch with dynamic shapes) and torch.compile(fullgraph=True) matches eager."""
import pytest
import torch

import moelora_ext
from moe_cases import DEVICES, make_case, op_positional

SAMPLES = {
    # name: make_case keyword arguments
    "base": dict(T=9, E=4, k=2),
    "lora": dict(T=9, E=4, k=2, S=3, R=4),
    "lora_shared_gelu": dict(T=5, E=4, k=3, S=2, R=2, shared=(True, False, True, True), activation="gelu",
                             weights_dtype=None, ids_dtype=torch.int64, scalings=False),
    "empty": dict(T=0, E=4, k=2, S=2, R=4),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck(sample, device):
    args = make_case(H=16, I=8, dtype=torch.bfloat16, device=device, seed=0, **SAMPLES[sample])
    pos, kw = op_positional(args)
    torch.library.opcheck(torch.ops.moelora.fused_moe.default, pos, kw)


class MoeLayer(torch.nn.Module):
    """A layer that owns the expert weights and adapters and calls the op; routing comes in per call."""

    def __init__(self, args):
        super().__init__()
        self.static = {n: v for n, v in args.items()
                       if n not in ("hidden_states", "topk_weights", "topk_ids", "token_lora_ids")}

    def forward(self, x, topk_weights, topk_ids, token_lora_ids):
        return moelora_ext.fused_moe(x, topk_weights=topk_weights, topk_ids=topk_ids,
                                     token_lora_ids=token_lora_ids, **self.static) * 2 + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_matches_eager(dynamic, device):
    torch._dynamo.reset()
    args = make_case(T=24, H=32, I=16, E=8, k=2, S=3, R=4, dtype=torch.bfloat16, device=device, seed=1)
    layer = MoeLayer(args)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for T, seed in ((24, 2), (24, 3), (13, 4)):  # new values, then (dynamic) a new T
        a = make_case(T=T, H=32, I=16, E=8, k=2, S=3, R=4, dtype=torch.bfloat16, device=device, seed=seed)
        inputs = (a["hidden_states"], a["topk_weights"], a["topk_ids"], a["token_lora_ids"])
        assert torch.equal(compiled(*inputs), layer(*inputs))


def test_compile_rejects_bad_input_while_tracing():
    """Under torch.compile the wrapper's checks still fire (at trace time) with the same message."""
    torch._dynamo.reset()
    args = make_case(T=8, H=32, I=16, E=8, k=2, S=3, R=4, dtype=torch.bfloat16, seed=5)
    layer = MoeLayer(args)
    compiled = torch.compile(layer, fullgraph=True)
    with pytest.raises(Exception, match=r"topk_ids must have shape \[T, k\]"):
        compiled(args["hidden_states"], args["topk_weights"], args["topk_ids"][:4], args["token_lora_ids"])
