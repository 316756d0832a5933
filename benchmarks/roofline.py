"""Roofline of one MoE layer: bytes and FLOPs a call must move/do, and the machine's measured limits.

Bytes = touched expert weights (distinct routed experts, w13 + w2) + touched adapter weights (distinct
(expert, slot >= 0) pairs; a shared-outer LoRA side (no expert dim) counts once per distinct slot).
Activations are not counted (they are small next to the weights except at large T, where FLOPs bound).
FLOPs = 2 * rows * (2I*H + H*I) + LoRA FLOPs, rows = routed (token, expert) pairs with a valid expert;
LoRA FLOPs = 2 * lora_rows * R * (H + 2I + I + H), lora_rows = those rows whose token has a slot >= 0.
floor = max(bytes / BW, FLOPs / rate), BW and rate measured in the same run (``measure_machine``).
"""
from __future__ import annotations

import time

import torch


def workload(H, I, E, topk_ids, lora_ids=None, R=0, elem_bytes=2, shared=(False, False, False, False)):  # noqa: E741
    """Bytes and FLOPs of one call. shared = (w13_shared_a, w13_shared_b, w2_shared_a, w2_shared_b)."""
    ids = topk_ids.reshape(topk_ids.shape[0], -1).long()
    valid = (ids >= 0) & (ids < E)
    rows = int(valid.sum())
    experts = torch.unique(ids[valid])
    n_experts = int(experts.numel())
    bytes_ = n_experts * (2 * I * H + H * I) * elem_bytes
    flops = 2 * rows * (2 * I * H + H * I)
    n_pairs = n_slots = lora_rows = 0
    if lora_ids is not None and R > 0:
        slot = lora_ids.long().unsqueeze(1).expand_as(ids)
        m = valid & (slot >= 0)
        lora_rows = int(m.sum())
        pairs = torch.unique(ids[m] * 1_000_003 + slot[m])
        n_pairs = int(pairs.numel())
        n_slots = int(torch.unique(lora_ids[lora_ids >= 0]).numel())
        sizes = (R * H, 2 * I * R, R * I, H * R)  # w13_a, w13_b, w2_a, w2_b per (expert, slot)
        for size, sh in zip(sizes, shared):
            bytes_ += size * (n_slots if sh else n_pairs) * elem_bytes
        flops += 2 * lora_rows * R * (H + 2 * I + I + H)
    return dict(bytes=bytes_, flops=flops, experts=n_experts, rows=rows, lora_rows=lora_rows,
                lora_pairs=n_pairs)


def floor_us(bytes_, flops, bw_Bps, flops_rate):
    return max(bytes_ / bw_Bps, flops / flops_rate) * 1e6


def _time(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        ts = sorted(a.elapsed_time(b) * 1e-3 for a, b in evs)
    else:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
    return ts[len(ts) // 2]


def measure_machine(device: str, dtype=torch.bfloat16, quick: bool = False) -> dict:
    """HBM bandwidth (large device-to-device copy: read + write bytes) and dense matmul rate of `dtype`.

    On the CPU the rate is the faster of `dtype`'s and float32's: a CPU kernel may upcast (ours does,
    csrc/cpu/fused_moe_cpu.cpp), and without native bf16 instructions torch's bf16 matmul runs ~100x slower
    than float32 (1.2 against 139 GFLOP/s on an AVX2 host), which made that "floor" slower than our own op."""
    if device == "cuda":
        n_bytes, n, reps = 1 << 30, 8192, 10
    else:
        n_bytes, n, reps = (32 << 20, 512, 3) if quick else (256 << 20, 1024, 3)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, reps)
    bw = 2 * n_bytes / t
    del src, dst
    rate, mm_dtype = 0.0, dtype
    for dt in [dtype] if device == "cuda" or dtype == torch.float32 else [dtype, torch.float32]:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        dt_rate = 2 * n ** 3 / _time(lambda: torch.mm(a, b), device, reps)
        if dt_rate > rate:
            rate, mm_dtype = dt_rate, dt
        del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(hbm_Bps=bw, mm_flops=rate, copy_bytes=n_bytes, mm_n=n, dtype=str(mm_dtype).replace("torch.", ""))
