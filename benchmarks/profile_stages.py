#!/usr/bin/env python3
"""Where the time of one fused_moe call goes: per-kernel GPU time and the graph-replay total.

    python benchmarks/profile_stages.py --shapes qwen3-30b-a3b --tokens 1,256,4096 --rank 16 --adapters 8
    python benchmarks/profile_stages.py --variant base= --variant v3=MOELORA_LORA_SIMT_ROWS=0
    python benchmarks/profile_stages.py --shapes qwen3-30b-a3b --tokens 1 --layers 8 --no-kernels

Each --variant is NAME=ENV1=V1,ENV2=V2 (environment set while that variant's graphs are captured and its
kernels profiled; the op reads its MOELORA_* knobs per call). For every (shape, T, variant) it prints the
graph-replay median (CUDA events, L2 flushed before each replay, as bench_moe.py) without and with LoRA,
and the per-kernel breakdown of the LoRA call from torch.profiler (median per kernel over the iterations). The
breakdown uses plain launches (MOELORA_PDL=0 unless the variant sets it): launched with PDL, as one-token
calls are by default, a kernel's span also holds its wait for the kernel before it (NOTES.md v19: the base
call's finalize read 13 µs at qwen3 T=1). The graph totals keep the op's default.
This is the tool behind benchmarks/NOTES.md's "count first" analysis; the side-by-side numbers live in
bench_moe.py.

With --layers N a call is a stack of N layers, each with its own expert weights, adapters and routing, the
output of one the input of the next, and the times are per layer (the replay over N). One layer's weights
exceed the L2 anyway; the stack also shows what one layer leaves in the L2 for the next (the decode GEMV's L2
prefetch, NOTES.md v12), which a single flushed call cannot.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers as P  # noqa: E402
from bench_moe import SHAPES  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    env = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        env[k] = v
    return name, env


class Env:
    """Sets environment variables for a block, restoring the previous values after."""

    def __init__(self, env: dict):
        self.env, self.saved = env, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def flushed_replay(graph, flush):
    """Flush the L2, then replay `graph` between two timing events (returned, not waited for)."""
    flush.add_(1)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    return a, b


def replay_us(graphs, flush, iters: int, back_to_back: bool = False) -> float:
    """Median µs of one replay. Each replay is synchronized before the next is queued unless back_to_back
    (then the GPU runs them one after another, as bench_moe.py times them)."""
    evs = []
    for i in range(iters):
        evs.append(flushed_replay(graphs[i % len(graphs)], flush))
        if not back_to_back:
            evs[-1][1].synchronize()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in evs)


def kernel_breakdown(fns, flush, iters: int) -> list[tuple[str, int, float]]:
    """(kernel name, launches per call, median µs per call) for the eager calls, in first-seen order."""
    from torch.profiler import ProfilerActivity, profile
    per_iter = []
    for i in range(iters):
        flush.add_(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fns[i % len(fns)]()
            torch.cuda.synchronize()
        acc = collections.OrderedDict()
        for ev in prof.events():
            if ev.device_type.name != "CUDA" or ev.name.startswith("Memcpy"):
                continue
            n, t = acc.get(ev.name, (0, 0.0))
            acc[ev.name] = (n + 1, t + ev.time_range.elapsed_us())
        per_iter.append(acc)
    names = list(per_iter[-1].keys())
    rows = []
    for name in names:
        vals = [it[name][1] for it in per_iter if name in it]
        rows.append((name, per_iter[-1][name][0], statistics.median(vals)))
    return rows


def kernel_timeline(fn, flush) -> list[tuple[str, float, float]]:
    """(kernel name, start µs after the first kernel's start, µs) of one eager call, in start order: what runs on
    the op's second stream shows up as kernels that start before the previous one ends."""
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm (allocator, tensor maps)
    flush.add_(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                 if ev.device_type.name == "CUDA" and not ev.name.startswith("Memcpy"))
    t0 = evs[0][0] if evs else 0
    return [(name, start - t0, end - start) for start, end, name in evs]


def interleaved(variants, batches, call, flush, iters: int, nl: int, sname: str, T: int) -> list[dict]:
    """--interleave: every variant's base and LoRA graphs captured under its environment, then replayed in turn (base,
    LoRA, next variant, ...) `iters` times, each replay synchronized after an L2 flush; medians per variant."""
    graphs = {}
    for vname, env in variants:
        with Env(env):
            graphs[vname] = tuple([graph_of(call(b, lora)) for b in batches] for lora in (False, True))
    times = {vname: ([], []) for vname in graphs}
    for i in range(iters):
        for vname, pair in graphs.items():
            for which, gs in enumerate(pair):
                a, b = flushed_replay(gs[i % len(gs)], flush)
                b.synchronize()
                times[vname][which].append(a.elapsed_time(b) * 1e3)
    rows = []
    for vname, env in variants:
        base, lora = (statistics.median(t) / nl for t in times[vname])
        print(f"\n## {sname} T={T} [{vname}] interleaved graph: base {base:.1f} µs, lora {lora:.1f} µs "
              f"(+{100.0 * (lora / base - 1.0):.0f}%)", flush=True)
        rows.append(dict(shape=sname, T=T, variant=vname, env=env, layers=nl, base_us=base, lora_us=lora,
                         interleaved=True))
    return rows


def short(name: str, width: int = 70) -> str:
    name = name.replace("moelora::cuda::", "").replace("(anonymous namespace)::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b")
    ap.add_argument("--tokens", default="1,64,256,4096")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--variant", action="append", default=[], help="NAME=ENV=VAL,... (repeatable)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-kernels", action="store_true", help="graph totals only")
    ap.add_argument("--base-kernels", action="store_true", help="also the per-kernel breakdown of the call without LoRA")
    ap.add_argument("--back-to-back", action="store_true",
                    help="queue the timed replays without synchronizing between them (as bench_moe.py)")
    ap.add_argument("--layers", type=int, default=1,
                    help="time a stack of this many layers with their own weights (times per layer)")
    ap.add_argument("--timeline", action="store_true",
                    help="also one eager LoRA call's kernels with their start times (overlap across streams)")
    ap.add_argument("--interleave", action="store_true",
                    help="capture every variant's graphs first, then alternate their replays (each iteration replays "
                         "every variant once, so clock and power drift hit them alike); graph totals only")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--ncu", action="store_true",
                    help="for Nsight Compute: one eager LoRA call per (shape, T, variant) between "
                         "cudaProfilerStart/Stop (run under ncu --profile-from-start off), nothing timed")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]

    ours = P.import_ours()
    dev, dtype = "cuda", torch.bfloat16
    flush = torch.empty(int(torch.cuda.get_device_properties(0).L2_cache_size) // 2, dtype=torch.float32,
                        device=dev)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; rank {args.rank}, "
          f"{args.adapters} adapters; graph replay medians over {args.iters}, L2 flushed", flush=True)
    out = []
    for sname in args.shapes.split(","):
        shape = SHAPES[sname]
        nl = max(1, args.layers)
        Ws = [P.make_expert_weights(shape.H, shape.I, shape.E, dtype, dev, seed=3 * layer) for layer in range(nl)]
        WLs = [W.with_lora(P.make_lora_weights(shape.H, shape.I, shape.E, args.adapters, args.rank, dtype, dev,
                                               seed=3 * layer + 1)) for layer, W in enumerate(Ws)]
        for T in [int(t) for t in args.tokens.split(",")]:
            batches = []  # per copy: x, then each layer's (topk weights, topk ids), the lora ids
            for c in range(2):
                x = None
                routes = []
                for layer in range(nl):
                    xl, tw, ti = P.make_batch(T, shape.H, shape.E, shape.k, dtype, dev, seed=100 + c + 7 * layer)
                    x = xl if x is None else x
                    routes.append((tw, ti))
                batches.append((x, routes, P.make_lora_ids(T, args.adapters, dev, seed=200 + c)))

            def call(b, lora):
                x, routes, ids = b

                def run():
                    y = x
                    for W, (tw, ti) in zip(WLs, routes):
                        kw = dict(token_lora_ids=ids, **W.lora_kwargs()) if lora else {}
                        y = ours.fused_moe(y, W.w13, W.w2, tw, ti, **kw)
                    return y
                return run

            if args.interleave and not args.ncu:
                out += interleaved(variants, batches, call, flush, args.iters, nl, sname, T)
                torch.cuda.empty_cache()
                continue
            for vname, env in variants:
                if args.ncu:
                    with Env(env):
                        fn = call(batches[0], True)
                        fn(), fn()
                        torch.cuda.synchronize()
                        torch.cuda.profiler.start()
                        fn()
                        torch.cuda.synchronize()
                        torch.cuda.profiler.stop()
                    print(f"ncu: {sname} T={T} [{vname}] profiled", flush=True)
                    continue
                with Env(env):
                    base = replay_us([graph_of(call(b, False)) for b in batches], flush, args.iters,
                                     args.back_to_back) / nl
                    lora = replay_us([graph_of(call(b, True)) for b in batches], flush, args.iters,
                                     args.back_to_back) / nl
                with Env(dict(env, MOELORA_PDL=env.get("MOELORA_PDL", "0"))):  # plain launches (see the top)
                    rows = [] if args.no_kernels else kernel_breakdown([call(b, True) for b in batches], flush,
                                                                      max(5, args.iters // 2))
                    base_rows = kernel_breakdown([call(b, False) for b in batches], flush,
                                                 max(5, args.iters // 2)) if args.base_kernels else []
                    timeline = kernel_timeline(call(batches[0], True), flush) if args.timeline else []
                ovh = 100.0 * (lora / base - 1.0)
                per = f" per layer of {nl}" if nl > 1 else ""
                print(f"\n## {sname} T={T} [{vname}] graph{per}: base {base:.1f} µs, lora {lora:.1f} µs "
                      f"(+{ovh:.0f}%)", flush=True)
                total = sum(r[2] for r in rows)
                for name, n, us in rows:
                    print(f"  {us:8.1f} µs  x{n}  {short(name)}")
                if rows:
                    print(f"  {total:8.1f} µs  sum of kernel times (eager LoRA call)")
                for name, n, us in base_rows:
                    print(f"  {us:8.1f} µs  x{n}  {short(name)}  [base]")
                if base_rows:
                    print(f"  {sum(r[2] for r in base_rows):8.1f} µs  sum of kernel times (eager base call)")
                for name, start, us in timeline:
                    print(f"  at {start:8.1f} µs for {us:8.1f} µs  {short(name)}  [timeline]")
                out.append(dict(shape=sname, T=T, variant=vname, env=env, layers=nl, base_us=base, lora_us=lora,
                                kernels=[dict(name=n_, launches=c_, us=u_) for n_, c_, u_ in rows],
                                base_kernels=[dict(name=n_, launches=c_, us=u_) for n_, c_, u_ in base_rows]))
            torch.cuda.empty_cache()
        del Ws, WLs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rank=args.rank, adapters=args.adapters,
                           results=out), f, indent=1)


if __name__ == "__main__":
    main()
