#!/usr/bin/env python3
"""What streaming a decode step's expert weights costs with generic kernels, at the sizes our GEMV reads.

    python benchmarks/stream_floor.py

The roofline floor in RESULTS.md divides bytes by the bandwidth of a 1 GiB copy. A decode step reads much less
(qwen3 T=1: 50 MB for fc1, 25 MB for fc2), and a kernel of that size also pays launch, ramp-up and tail. This
times, per size, three generic kernels that read the same bytes: cuBLAS batched GEMV (torch.bmm of k expert
matrices [N, K] with one token column each: the same work as our fc1 / fc2 GEMV at T=1), a sum over the same
bytes (a read-only reduction), and a copy of half of them (read + write). CUDA-graph replay, L2 flushed before
each replay, median of --iters. Prints µs and TB/s; writes --json if given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from profile_stages import graph_of, replay_us  # noqa: E402

# (name, experts read, N rows, K): the weight matrices of one GEMV launch at T=1 in the benchmark shapes.
CASES = [
    ("qwen3 fc1", 8, 1536, 2048),
    ("qwen3 fc2", 8, 2048, 768),
    ("gpt-oss fc1", 4, 5760, 2880),
    ("gpt-oss fc2", 4, 2880, 2880),
    ("mixtral fc1", 2, 28672, 4096),
    ("mixtral fc2", 2, 4096, 14336),
]


def graph_us(fn, flush, iters: int) -> float:
    return replay_us([graph_of(fn)], flush, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(int(torch.cuda.get_device_properties(0).L2_cache_size) // 2, dtype=torch.float32, device=dev)
    print(f"## device {torch.cuda.get_device_name(0)}; graph replay medians over {args.iters}, L2 flushed")
    out = []
    for name, e, n, k in CASES:
        w = torch.randn(e, n, k, device=dev, dtype=dt)
        x = torch.randn(e, k, 1, device=dev, dtype=dt)
        y = torch.empty(e, n, 1, device=dev, dtype=dt)
        flat = w.view(-1)
        half = flat[: flat.numel() // 2]
        dst = torch.empty_like(half)
        nbytes = w.numel() * w.element_size()
        row = {"case": name, "MB": nbytes / 1e6}
        for kind, fn in [("bmm_gemv", lambda: torch.bmm(w, x, out=y)),
                         ("sum", lambda: torch.sum(flat, dtype=torch.float32)),
                         ("copy_half", lambda: dst.copy_(half))]:
            us = graph_us(fn, flush, args.iters)
            row[kind + "_us"] = us
            row[kind + "_TBps"] = nbytes / us / 1e6
        out.append(row)
        print(f"## {name:12s} {row['MB']:7.1f} MB  bmm {row['bmm_gemv_us']:7.1f} µs ({row['bmm_gemv_TBps']:.2f} TB/s)"
              f"  sum {row['sum_us']:7.1f} ({row['sum_TBps']:.2f})  copy {row['copy_half_us']:7.1f} "
              f"({row['copy_half_TBps']:.2f})", flush=True)
        del w, x, y, dst
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
