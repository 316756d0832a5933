#!/usr/bin/env python3
"""One MoE layer timed side by side with its peers, in one run, on the same inputs; writes the evidence.

    python benchmarks/bench_moe.py --device cuda --out /tmp/bench              # standard grid on a GPU
    python benchmarks/bench_moe.py --device cpu --quick --out /tmp/bench       # CPU smoke (tiny shapes, < 60 s)

Standard grid: the 3 shapes of ../shared/README.md x 7 token counts, rank 16, 8 adapter slots, every peer.
Add ranks / adapter counts with --ranks 16,64 --adapters 1,8,32 (the no-LoRA peers are timed once per
(shape, T) and shared by every (rank, adapters) table). Outputs in --out: results.json, results.md (the
tables, with the device / torch / CUDA header; ready to copy to benchmarks/RESULTS.md), plots/*.png
(matplotlib only), all rewritten after every configuration so a run killed by a time limit still leaves them.

Timing: every peer gets closures over --copies copies of the per-call inputs (hidden states, routing, adapter
ids: different tokens and experts per copy), rotated between calls; on CUDA the L2 is also flushed (a
write of 2x its size, outside the timed region) before every call, and each call is timed with its own
pair of CUDA events; on CPU with perf_counter. Median over the repeats, after one warm-up call per copy.
The expert weights are one set per shape (rotating several 1-3 GB sets is not possible); with the L2
flush they are read from HBM on every call, as in a real model where each layer has its own weights.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers as P  # noqa: E402
import report  # noqa: E402
import roofline  # noqa: E402


# ----------------------------------------------------------------------------------------------- grid
@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    H: int
    I: int  # noqa: E741
    E: int
    k: int


SHAPES = {s.name: s for s in [
    Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    Shape("gpt-oss-20b", 2880, 2880, 32, 4),
]}
QUICK_SHAPES = {s.name: s for s in [
    Shape("tiny-a", 128, 64, 8, 2),
    Shape("tiny-b", 64, 96, 16, 4),
]}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
QUICK_TOKENS = [1, 16, 64]
SLOW_LARGE_T = 1024       # with --budget-s, slow peers are skipped from this T on when time runs short

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_list(s: str, cast=int) -> list:
    return [cast(v) for v in s.split(",") if v.strip()]


def build_argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)} (default all; --quick: {', '.join(QUICK_SHAPES)})")
    ap.add_argument("--tokens", default=None, help=f"comma list of token counts (default {TOKENS}; "
                                                   f"--quick: {QUICK_TOKENS})")
    ap.add_argument("--ranks", default="16", help="comma list of LoRA ranks (default 16; the full grid is 16,64)")
    ap.add_argument("--adapters", default="8", help="comma list of adapter slot counts S (default 8; full 1,8,32)")
    ap.add_argument("--peers", default=None, help="comma list of peers to run (default all): "
                    "hf_eager,hf_grouped_mm,peft1,peft_split,torch_lora,ours,ours_lora,ours_graph,ours_lora_graph")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes and token counts, few repeats")
    ap.add_argument("--out", default="bench_out", help="output directory (created)")
    ap.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ours CUDA-graph captured once and replayed (CUDA only; default on)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget: when the projected time exceeds what is left, slow peers (hf_eager, "
                         "peft1, peft_split) are skipped at T >= %d; past the budget only ours runs" % SLOW_LARGE_T)
    ap.add_argument("--eager-max-t", type=int, default=4096, help="skip hf_eager above this T (default 4096)")
    ap.add_argument("--peft-max-t", type=int, default=16384, help="skip peft1 / peft_split above this T")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--copies", type=int, default=None, help="input copies rotated between calls (default 4)")
    ap.add_argument("--reps", type=int, default=None, help="max timed calls for ours (default 30 cuda, 5 cpu); "
                                                           "other peers get fewer")
    ap.add_argument("--row-s", type=float, default=None,
                    help="target seconds of timed calls per row (caps repeats of slow peers; default 1.0)")
    ap.add_argument("--err-tokens", type=int, default=128,
                    help="tokens compared against the fp32 reference (a prefix of the batch; default 128)")
    ap.add_argument("--flush-l2", action=argparse.BooleanOptionalAction, default=True,
                    help="flush the L2 before each timed call (CUDA; default on)")
    ap.add_argument("--mem-frac", type=float, default=0.85, help="skip configs whose estimated memory exceeds "
                                                                 "this fraction of free device memory")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; --quick: 1, which keeps a smoke run stable on a "
                         "busy machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchors", default=os.path.join(HERE, "..", "..", "shared", "anchors"),
                    help="directory of anchor JSON files (earlier peer runs) shown next to ours in the report")
    return ap


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """A text progress bar (tqdm if importable and stderr is a terminal; plain lines otherwise, for logs)."""

    def __init__(self, total: int, budget_s: Optional[float]):
        self.total, self.n, self.t0, self.budget_s = total, 0, time.perf_counter(), budget_s
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="row", dynamic_ncols=True)
            except ImportError:
                pass

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, desc: str, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_description_str(desc[:60], refresh=False)
            self.bar.update(n)
            return
        frac = self.n / max(self.total, 1)
        width = 30
        filled = int(round(width * frac))
        el = self.elapsed()
        eta = el / frac - el if frac > 0 else float("nan")
        budget = f" budget {self.budget_s - el:6.0f}s left" if self.budget_s else ""
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.n:4d}/{self.total} {100 * frac:5.1f}% "
                f"{el:6.1f}s eta {eta:6.0f}s{budget} | {desc}")
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


def log(msg: str) -> None:
    sys.stderr.write(("\n" if sys.stderr.isatty() else "") + msg + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------- timing
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: str, flush_l2: bool, l2_bytes: int):
        self.device = device
        self.flush_buf = None
        if device == "cuda" and flush_l2:
            self.flush_buf = torch.empty(max(2 * l2_bytes, 64 << 20) // 4, dtype=torch.float32, device="cuda")

    def time(self, fns, max_reps: int, row_s: float, min_reps: int = 3) -> tuple[float, int]:
        """Median seconds of one call, rotating over the closures `fns`; returns (median, repeats)."""
        t0 = time.perf_counter()
        for f in fns:                                   # warm-up: one call per copy (lazy init, autotune)
            f()
        sync(self.device)
        per_call = (time.perf_counter() - t0) / len(fns)
        reps = int(max(min_reps, min(max_reps, row_s / max(per_call, 1e-9))))
        ts = []
        if self.device == "cuda":
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for i, (a, b) in enumerate(evs):
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                a.record()
                fns[i % len(fns)]()
                b.record()
            torch.cuda.synchronize()
            ts = [a.elapsed_time(b) * 1e-3 for a, b in evs]
        else:
            for i in range(reps):
                f = fns[i % len(fns)]
                s = time.perf_counter()
                f()
                ts.append(time.perf_counter() - s)
        return statistics.median(ts), reps


# ----------------------------------------------------------------------------------------------- memory
def estimate_bytes(shape: Shape, T: int, R: int, S: int, copies: int, elem: int = 2) -> dict:
    """Rough peak device bytes of one (shape, T, R, S) configuration, per part (for skipping what can't fit)."""
    H, I, E, k = shape.H, shape.I, shape.E, shape.k  # noqa: E741
    experts = E * 3 * H * I * elem
    lora_one = S * E * R * (H + 2 * I + I + H) * elem if R and S else 0
    # ours + torch_lora (slot-padded copy) + PEFT (peft_split: S adapters; peft1: 1) hold adapter copies
    lora = lora_one * 3 + (lora_one // max(S, 1))
    acts = copies * T * (H * elem + k * 12)
    rows = T * k
    # the widest transient: a gate/up activation per routed row (fp32 worst case) x ~3 live temporaries,
    # or PEFT's materialised full delta weight (2 experts-weight sized temporaries)
    work = max(3 * rows * (2 * I + H) * 4, 2 * experts if lora_one else 0)
    return dict(experts=experts, lora=lora, activations=acts, workspace=work,
                total=experts + lora + acts + work)


# ----------------------------------------------------------------------------------------------- run
def device_meta(device: str, argv) -> dict:
    """meta["env"]: what the report's header shows (device, date, versions, command)."""
    env = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               argv=" ".join(argv))
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, sm_count=p.multi_processor_count, mem_bytes=p.total_memory,
                   l2_bytes=getattr(p, "L2_cache_size", 50 << 20), capability=f"{p.major}.{p.minor}")
    else:
        env.update(device_name=(platform.processor() or platform.machine())
                   + f" ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)")
    for mod in ("transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        P.import_ours()
        env["moelora_ext"] = "ok"
    except Exception as e:  # noqa: BLE001
        env["moelora_ext"] = f"unavailable ({type(e).__name__}: {e})"
    # MOELORA_GIT_REV names the code when the checkout's .git does not (a copied working tree, e.g. the
    # device machine's); otherwise "-dirty" marks a run of uncommitted changes.
    env["git"] = os.environ.get("MOELORA_GIT_REV", "")
    if not env["git"]:
        try:
            import subprocess
            env["git"] = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty", "--abbrev=7"],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or "none"
        except Exception:  # noqa: BLE001
            env["git"] = "unknown"
    return env


def main(argv=None) -> dict:
    args = build_argparser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    quick = args.quick
    shapes_all = {**SHAPES, **QUICK_SHAPES}
    shape_names = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if quick else SHAPES)
    shapes = [shapes_all[n] for n in shape_names]
    tokens = parse_list(args.tokens) if args.tokens else (QUICK_TOKENS if quick else TOKENS)
    combos = [(r, s) for r in parse_list(args.ranks) for s in parse_list(args.adapters)]
    dtype = DTYPES[args.dtype]
    copies = args.copies or (2 if quick else 4)
    max_reps = args.reps or (3 if quick else (30 if device == "cuda" else 10))
    row_s = args.row_s or (0.1 if quick else 1.0)
    reps_of = {"ours": max_reps, "fast": max(3, max_reps * 2 // 3), "slow": max(3, max_reps // 5)}
    os.makedirs(args.out, exist_ok=True)
    threads, old_threads = args.threads or (1 if quick and device == "cpu" else None), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    # a time limit (timeout's SIGTERM) still leaves the outputs: rows so far, then stop
    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _term)
    except ValueError:
        pass  # not the main thread (in-process test)

    t_start = time.perf_counter()
    env = device_meta(device, sys.argv[1:] if argv is None else list(argv))
    meta = dict(env=env)
    log(f"bench_moe: {env['device_name']}  torch {env['torch']}  cuda {env['cuda']}  "
        f"transformers {env['transformers']}  peft {env['peft']}  moelora_ext {env['moelora_ext']}")
    machine = roofline.measure_machine(device, dtype if dtype != torch.float32 else torch.float32, quick=quick)
    log(f"machine: {machine['hbm_Bps'] / 1e12:.3f} TB/s copy bandwidth, {machine['mm_flops'] / 1e12:.1f} "
        f"TFLOP/s {machine['dtype']} matmul (measured now)")
    notes = [
        f"hf_eager is skipped above T={args.eager_max_t} (a Python loop over experts; minutes per call there)",
        "peft1 = PEFT LoRA (target_parameters on the 3D expert weights), one adapter for every token; "
        "peft_split = the mixed batch split per adapter (one PEFT forward per adapter on its tokens, plus the "
        "no-adapter tokens with adapters disabled)",
        "no-LoRA peers (hf_eager, hf_grouped_mm, ours, ours_graph) are timed once per (shape, T) and shown in "
        "every (rank, adapters) table",
        f"inputs rotated over {copies} copies (tokens, routing, adapter ids); "
        + ("L2 flushed before every timed call; " if device == "cuda" and args.flush_l2 else "")
        + "expert weights are one set per shape (too large to rotate): they exceed the L2 and are streamed "
        "from memory" + (" (L2 flushed)" if device == "cuda" and args.flush_l2 else " at large shapes"),
        "floor = max(bytes / measured copy bandwidth, FLOPs / measured matmul rate); bytes = touched expert "
        "weights (distinct routed experts) + touched adapter weights (distinct (expert, slot) pairs); "
        "activations not counted",
        f"err = max |out - ref| / max |ref| on the first {args.err_tokens} tokens, ref = "
        "moelora_ext.reference.fused_moe_reference in fp32",
    ]
    if args.budget_s:
        notes.append(f"--budget-s {args.budget_s:g}: slow peers (hf_eager, peft1, peft_split) skipped at "
                     f"T >= {SLOW_LARGE_T} when the projected time exceeded the budget left")
    meta.update(machine=machine, dtype=args.dtype, copies=copies, max_reps=max_reps, flush_l2=bool(
        device == "cuda" and args.flush_l2), quick=quick, combos=combos, budget_s=args.budget_s,
        shapes=[dataclasses.asdict(s) for s in shapes], tokens=tokens, notes=notes)
    l2 = env.get("l2_bytes", 50 << 20)
    timer = Timer(device, args.flush_l2, l2)

    peer_filter = set(args.peers.split(",")) if args.peers else None
    graph = args.graph and device == "cuda"

    def peers_for() -> list:
        ps = P.all_peers(device, graph=graph)
        for p in ps:
            if p.name == "hf_eager":
                p.max_T = args.eager_max_t
            if p.name in ("peft1", "peft_split"):
                p.max_T = args.peft_max_t
        return [p for p in ps if peer_filter is None or p.name in peer_filter]

    n_peers_base = sum(1 for p in peers_for() if not p.lora)
    n_peers_lora = sum(1 for p in peers_for() if p.lora)
    total = len(shapes) * len(tokens) * (n_peers_base + len(combos) * n_peers_lora)
    prog = Progress(total, args.budget_s)
    rows: list[dict] = []
    state = dict(cuda_broken=None, configs_done=0, configs_total=len(shapes) * len(tokens) * len(combos))
    anchors = report.load_anchors(args.anchors)

    def write(final=False):
        report.write_all(args.out, meta, rows, plots=final, anchors=anchors)

    try:
        for si, shape in enumerate(shapes):
            run_shape(shape, si, tokens, combos, args, device, dtype, copies, reps_of, row_s, timer, machine,
                      peers_for, rows, prog, state, t_start, write)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); writing what was measured")
        meta["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        prog.close()
        meta["wall_s"] = time.perf_counter() - t_start
        write(final=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        torch.set_num_threads(old_threads)   # in-process callers (the smoke test) get theirs back
    log(f"bench_moe: {len(rows)} rows in {meta['wall_s']:.1f}s -> {os.path.abspath(args.out)}/"
        f"{{results.json, results.md, plots/}}")
    print(report.markdown_summary(meta, rows))
    return dict(rows=rows, meta=meta)


def make_batches(shape: Shape, T: int, S: int, copies: int, dtype, device, seed: int) -> list:
    out = []
    for c in range(copies):
        s = seed * 1_000_003 + T * 97 + c
        x, tw, ti = P.make_batch(T, shape.H, shape.E, shape.k, dtype, device, seed=s)
        out.append(P.Batch(x, tw, ti, P.make_lora_ids(T, S, device, seed=s + 7919 * (S + 1))))
    return out


def run_shape(shape, si, tokens, combos, args, device, dtype, copies, reps_of, row_s, timer, machine, peers_for,
              rows, prog, state, t_start, write):
    log(f"== {shape.name}: H={shape.H} I={shape.I} E={shape.E} k={shape.k}")
    free = None
    if device == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
    est0 = estimate_bytes(shape, 0, 0, 0, copies)
    if free is not None and est0["experts"] > args.mem_frac * free:
        for T in tokens:
            for (R, S) in combos:
                for p in peers_for():
                    rows.append(skip_row(shape, T, R, S, p, f"expert weights {est0['experts'] / 2**30:.1f} GiB "
                                                            f"do not fit ({free / 2**30:.1f} GiB free)"))
                    prog.step(f"{shape.name} skipped")
        return
    W0 = P.make_expert_weights(shape.H, shape.I, shape.E, dtype, device, seed=args.seed + si)
    elem = W0.w13.element_size()
    base_done = set()
    for ci, (R, S) in enumerate(combos):
        lora_W = W = None
        build_err = {}
        peers = peers_for()
        for T in tokens:
            t_cfg = time.perf_counter()
            est = estimate_bytes(shape, T, R, S, copies, elem)
            fits = free is None or est["total"] <= args.mem_frac * free
            if W is None or (lora_W is None and fits and any(p.lora for p in peers)):
                W = W0
                if fits and any(p.lora for p in peers):
                    lora_W = P.make_lora_weights(shape.H, shape.I, shape.E, S, R, dtype, device,
                                                 seed=args.seed + 100 + si)
                    W = W0.with_lora(lora_W)
                build_err = {}
                for p in peers:
                    try:
                        p.build(W)
                    except Exception as e:  # noqa: BLE001  (e.g. the extension is not built)
                        build_err[p.name] = f"build failed: {type(e).__name__}: {str(e)[:200]}"
            batches = make_batches(shape, T, S, copies, dtype, device, args.seed)
            refs = {}
            for p in peers:
                if not p.lora and (T, shape.name) in base_done:
                    continue
                desc = f"{shape.name} T={T} R={R} S={S} {p.name}"
                row_R, row_S = (R, S) if p.lora else (0, 0)
                reason = skip_reason(p, T, device, args, state, t_start, fits, est, free)
                if reason or p.name in build_err:
                    rows.append(skip_row(shape, T, row_R, row_S, p, reason or build_err[p.name],
                                         status="skipped" if reason else "error"))
                    prog.step(desc + " (skipped)")
                    continue
                rows.append(run_peer(p, shape, T, row_R, row_S, batches, W, device, reps_of, row_s, timer,
                                     machine, refs, args.err_tokens, state, elem))
                prog.step(desc)
            base_done.add((T, shape.name))
            del batches, refs
            state["configs_done"] += 1
            state.setdefault("config_s", []).append(time.perf_counter() - t_cfg)
            write()
            log("  " + report.config_line([r for r in rows if r["R"] in (0, R) and r["S"] in (0, S)],
                                          shape.name, T))
        for p in peers:
            p.close()
        del lora_W
        W = None
        if device == "cuda":
            torch.cuda.empty_cache()
    del W0
    if device == "cuda":
        torch.cuda.empty_cache()


def skip_reason(p, T, device, args, state, t_start, fits, est, free) -> Optional[str]:
    if state["cuda_broken"]:
        return f"not run: the CUDA context failed earlier ({state['cuda_broken']})"
    if p.name in state.get("dead_peers", {}):
        return f"not available: {state['dead_peers'][p.name]}"
    if p.cuda_only and device != "cuda":
        return "CUDA only"
    if p.max_T is not None and T > p.max_T:
        return f"capped: T > {p.max_T} for {p.name} (too slow / too much memory there)"
    if not fits:
        return (f"does not fit: ~{est['total'] / 2**30:.1f} GiB estimated "
                f"(experts {est['experts'] / 2**30:.1f}, LoRA copies {est['lora'] / 2**30:.1f}, "
                f"workspace {est['workspace'] / 2**30:.1f}) > {args.mem_frac:.2f} x free")
    if args.budget_s:
        left = args.budget_s - (time.perf_counter() - t_start)
        done = state["configs_done"]
        per_cfg = (sum(state.get("config_s", [])) / done) if done else 0.0
        projected = per_cfg * (state["configs_total"] - done)
        if left <= 0 and not p.name.startswith("ours"):
            return f"budget: --budget-s {args.budget_s:g} spent"
        if p.slow and T >= SLOW_LARGE_T and projected > left:
            return (f"budget: slow peer skipped at large T ({left:.0f}s left, ~{projected:.0f}s projected "
                    f"for the remaining configurations)")
    return None


def _row_base(shape, T, R, S, p) -> dict:
    return dict(shape=shape.name, H=shape.H, I=shape.I, E=shape.E, k=shape.k, T=T, R=R, S=S, peer=p.name,
                lora=bool(p.lora), graph=p.name.endswith("_graph"))


def skip_row(shape, T, R, S, p, reason, status="skipped") -> dict:
    r = _row_base(shape, T, R, S, p)
    r.update(status=status, reason=reason, time_us=float("nan"), err=float("nan"))
    return r


def _lora_ids_for(p, b: P.Batch) -> Optional[torch.Tensor]:
    if p.ref_lora == "batch":
        return b.lora_ids
    if p.ref_lora == "slot0":
        return torch.zeros_like(b.lora_ids)
    return None


def load_reference():
    """moelora_ext.reference.fused_moe_reference; if the package can't load (extension not built), the file
    itself (plain PyTorch), so the peers still get an error column."""
    try:
        from moelora_ext.reference import fused_moe_reference
        return fused_moe_reference
    except Exception:  # noqa: BLE001
        import importlib.util
        path = os.path.join(HERE, "..", "moelora_ext", "reference.py")
        spec = importlib.util.spec_from_file_location("_moelora_reference", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.fused_moe_reference


def reference(p, b: P.Batch, W: P.Weights, n: int, refs: dict) -> torch.Tensor:
    key = p.ref_lora
    if key not in refs:
        fused_moe_reference = load_reference()
        s = b.subset(n)
        ids = _lora_ids_for(p, s)
        kw = dict(token_lora_ids=ids, **W.lora_kwargs()) if ids is not None else {}
        refs[key] = fused_moe_reference(s.x, W.w13, W.w2, s.topk_w, s.topk_ids, **kw,
                                        out_dtype=torch.float32).float()
    return refs[key]


def run_peer(p, shape, T, R, S, batches, W, device, reps_of, row_s, timer, machine, refs, err_tokens, state,
             elem) -> dict:
    row = _row_base(shape, T, R, S, p)
    b0 = batches[0]
    ids = _lora_ids_for(p, b0)
    wl = roofline.workload(shape.H, shape.I, shape.E, b0.topk_ids, ids, R if p.lora else 0, elem_bytes=elem)
    fl = roofline.floor_us(wl["bytes"], wl["flops"], machine["hbm_Bps"], machine["mm_flops"])
    row.update(bytes=wl["bytes"], flops=wl["flops"], experts=wl["experts"], lora_pairs=wl["lora_pairs"],
               floor_us=fl)
    fns = []
    try:
        with P.quiet_warnings(), torch.inference_mode(mode=not p.name.endswith("_graph")):
            fns = [p.prepare(b) for b in batches]
            t, reps = timer.time(fns, reps_of[p.repeats], row_s)
            us = t * 1e6
            row.update(status="ok", reason="", time_us=us, reps=reps, tbps=wl["bytes"] / t / 1e12,
                       tflops=wl["flops"] / t / 1e12, x_floor=us / fl if fl else float("nan"))
            n = min(T, err_tokens)
            out = fns[0]()[:n].float()
            try:
                ref = reference(p, b0, W, n, refs)
                err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if n else 0.0
            except Exception as e:  # noqa: BLE001  (the time stands; the error column says why it's missing)
                err = float("nan")
                row["reason"] = f"reference failed: {type(e).__name__}: {str(e)[:200]}"
            row["err"] = err
    except Exception as e:  # noqa: BLE001  (OOM, missing package, unsupported device: recorded, run goes on)
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row.update(status="error", reason=msg, time_us=float("nan"), err=float("nan"))
        log(f"  {p.name} T={T}: {msg}")
        if isinstance(e, (ImportError, NotImplementedError)):   # deterministic: don't retry at every T
            state.setdefault("dead_peers", {})[p.name] = msg
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        if device == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e2:  # noqa: BLE001  (sticky error: the context is gone)
                state["cuda_broken"] = f"{type(e2).__name__}: {str(e2)[:120]}"
    finally:
        del fns
        if hasattr(p, "graphs"):   # graphs hold their pool until released
            p.graphs = []
            p.pool = None
    return row


if __name__ == "__main__":
    main()
