"""`python -m moelora_ext.demo`: one mixed-adapter batch through moelora::fused_moe, checked against the
fp32 reference, with a short table per adapter slot.

The batch mixes tokens of several LoRA adapters (different true ranks, zero-padded to the slot buffer's
max rank) with base-model tokens, routed top-k over the experts; some pairs point at experts that live
elsewhere (id -1) and contribute nothing."""
import argparse
import time

import torch

from . import fused_moe, fused_moe_reference

# Relative-norm error allowed against the fp32 reference (see tests/moe_cases.py for the reasoning).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_batch(T, H, I, E, k, ranks, dtype, device, seed=0):
    """Inputs and adapters for one batch; slot s has true rank ranks[s] (zero-padded to max(ranks))."""
    g = torch.Generator().manual_seed(seed)
    S, R = len(ranks), max(ranks)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < 0.05] = -1
    a13, b13 = rnd(S, E, R, H, scale=H ** -0.5), rnd(S, E, 2 * I, R, scale=R ** -0.5)
    a2, b2 = rnd(S, E, R, I, scale=I ** -0.5), rnd(S, E, H, R, scale=R ** -0.5)
    for s, r in enumerate(ranks):
        a13[s, :, r:], b13[s, ..., r:], a2[s, :, r:], b2[s, ..., r:] = 0, 0, 0, 0
    args = dict(
        hidden_states=rnd(T, H), w13=rnd(E, 2 * I, H, scale=H ** -0.5), w2=rnd(E, H, I, scale=I ** -0.5),
        topk_weights=torch.softmax(rnd(T, k), -1), topk_ids=ids.to(torch.int32),
        token_lora_ids=torch.randint(-1, S, (T,), generator=g, dtype=torch.int32),
        w13_lora_a=a13, w13_lora_b=b13, w2_lora_a=a2, w2_lora_b=b2,
        lora_scalings=torch.tensor([16.0 / r for r in ranks]) * 0.25,  # alpha / r, like PEFT
    )
    return {n: (v.to(device, dtype) if v.is_floating_point() and n != "topk_weights" and n != "lora_scalings"
                else v.to(device)) for n, v in args.items()}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--no-model", action="store_true", help="skip the transformers + PEFT model demo")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    T, H, I, E, k, ranks = args.tokens, 128, 256, 16, 2, [4, 8, 16, 32]

    batch = make_batch(T, H, I, E, k, ranks, dtype, args.device)
    fused_moe(**batch)  # warm-up (first-call initialisation is not the op's time)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fused_moe(**batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    ref = fused_moe_reference(**batch, out_dtype=torch.float32)
    base = {n: batch[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")}
    base_out = fused_moe(**base)

    print(f"moelora_ext demo: T={T} tokens, H={H}, I={I}, E={E} experts, top-{k}, {len(ranks)} adapters "
          f"(ranks {ranks}, padded to {max(ranks)}), {dtype}, {args.device}, op {ms:.1f} ms")
    print(f"{'slot':>6} {'rank':>5} {'tokens':>7} {'rel.err vs ref':>15} {'LoRA effect':>12}")
    slots = batch["token_lora_ids"]
    ok = True
    for s in [-1] + list(range(len(ranks))):
        rows = slots == s
        err = rel(out[rows], ref[rows])
        effect = rel(out[rows], base_out[rows]) if s >= 0 else 0.0  # |out - base| / |base| on these rows
        ok &= err < TOL[dtype]
        print(f"{'base' if s < 0 else s:>6} {'-' if s < 0 else ranks[s]:>5} {int(rows.sum()):>7} {err:>15.2e} "
              f"{effect:>12.3f}")
    total = rel(out, ref)
    ok &= total < TOL[dtype]
    print(f"{'all':>6} {'':>5} {T:>7} {total:>15.2e}")
    print(f"{'OK' if ok else 'FAILED'}: relative error within {TOL[dtype]:.0e} of the fp32 reference")
    if not args.no_model:
        ok &= model_demo()
    return 0 if ok else 1


def model_demo(num_rows=6, seq_len=8):
    """A tiny random Qwen3-MoE model run with experts_implementation="moelora", three PEFT adapters (different
    ranks, saved with save_pretrained and loaded with pool.load(dir)), one mixed batch through use_adapters,
    checked row by row against PEFT running that row with its own adapter alone. Returns True when it matches."""
    try:
        import copy
        import tempfile

        import peft
        import transformers
    except ImportError as e:  # the op demo above does not need them
        print(f"\n(model demo skipped: {e}; pip install .[hf])")
        return True
    from . import attach_lora_pool, use_adapters

    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="eager").eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor):
                for w in (m.gate_up_proj, m.down_proj):
                    w.normal_(0, w.shape[-1] ** -0.5)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="moelora")
    model.load_state_dict(base.state_dict())
    model.eval()
    specs = {"sql": (4, 8), "chat": (8, 16), "math": (16, 16)}  # name -> (r, lora_alpha)
    pool = attach_lora_pool(model, max_adapters=4, max_rank=16)
    names = ["sql", None, "chat", "math", "sql", "chat"][:num_rows]
    ids = torch.randint(0, cfg.vocab_size, (len(names), seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, (r, alpha)) in enumerate(specs.items()):
            lc = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], init_lora_weights=False,
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
            torch.manual_seed(100 + i)
            pm = peft.get_peft_model(copy.deepcopy(base), lc)
            with torch.no_grad():
                for n, w in pm.named_parameters():
                    if "lora_" in n:
                        w.normal_(0, (w.shape[-1] if "lora_A" in n else r) ** -0.5 * (1 if "lora_A" in n else 0.2))
            paths[name] = f"{tmp}/{name}"
            pm.save_pretrained(paths[name])
            pool.load(name, paths[name])
        start = time.perf_counter()
        with torch.no_grad(), use_adapters(model, names):
            out = model(ids).logits
        ms = (time.perf_counter() - start) * 1e3
        refs = []
        for b, name in enumerate(names):
            row_model = base if name is None else peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[name])
            with torch.no_grad():
                refs.append((row_model.eval()(ids[b:b + 1]).logits, base(ids[b:b + 1]).logits))
    info = pool.adapters()
    print(f"\nmodel demo: tiny random Qwen3-MoE (2 layers, hidden 64, 8 experts, top-2), experts_implementation="
          f"'moelora', pool of {len(info)} PEFT adapters; one batch of {len(names)} rows x {seq_len} tokens "
          f"through use_adapters ({ms:.0f} ms) vs PEFT running each row alone")
    print(f"{'row':>4} {'adapter':>8} {'slot':>5} {'rank':>5} {'rel.err vs PEFT':>16} {'adapter effect':>15}")
    ok = True
    for b, (name, (ref, base_row)) in enumerate(zip(names, refs)):
        err = rel(out[b:b + 1], ref)
        ok &= err < 1e-5
        effect = rel(ref, base_row)
        slot = "-" if name is None else info[name]["slot"]
        rank = "-" if name is None else info[name]["rank"]
        print(f"{b:>4} {name or 'base':>8} {slot:>5} {rank:>5} {err:>16.2e} {effect:>15.3f}")
    print(f"{'OK' if ok else 'FAILED'}: every row within 1e-05 (fp32) of PEFT with that row's adapter alone")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
