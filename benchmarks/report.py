#!/usr/bin/env python3
"""Evidence from a bench_moe run: results.json (everything), results.md (tables), plots/*.png (matplotlib).

    python benchmarks/report.py DIR     # rebuild results.md and the plots from DIR/results.json
"""
from __future__ import annotations

import json
import math
import os

BASE_PEERS = ["hf_eager", "hf_grouped_mm", "ours", "ours_graph"]
LORA_PEERS = ["peft1", "peft_split", "torch_lora", "ours_lora", "ours_lora_graph"]
ORDER = BASE_PEERS + LORA_PEERS


def _nan(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v, spec=".0f"):
    return "—" if _nan(v) else format(v, spec)


def _time_fmt(v):
    if _nan(v):
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def write_json(out_dir, meta, records):
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def load_json(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        d = json.load(f)
    return d["meta"], d["records"]


def _index(records):
    """{(shape, T, R, S, peer): record}, base peers under R = S = 0."""
    return {(r["shape"], r["T"], r["R"], r["S"], r["peer"]): r for r in records}


def _configs(meta, records):
    """(shape, T, R, S) rows in run order, one per LoRA combo."""
    seen, rows = set(), []
    combos = [tuple(c) for c in meta.get("combos", [])] or sorted({(r["R"], r["S"]) for r in records if r["R"]})
    for r in records:
        for R, S in combos:
            key = (r["shape"], r["T"], R, S)
            if key not in seen:
                seen.add(key)
                rows.append(key)
    return rows


def _t(idx, shape, T, R, S, peer):
    r = idx.get((shape, T, 0, 0, peer)) or idx.get((shape, T, R, S, peer))
    return r.get("time_us", float("nan")) if r and r.get("status") == "ok" else float("nan")


def _rec(idx, shape, T, R, S, peer):
    return idx.get((shape, T, 0, 0, peer)) or idx.get((shape, T, R, S, peer))


def summary_rows(meta, records):
    """One dict per (shape, T, R, S): every peer's time, floors, ours/floor, LoRA overhead."""
    idx = _index(records)
    peers = [p for p in ORDER if any(r["peer"] == p for r in records)]
    rows = []
    for shape, T, R, S in _configs(meta, records):
        row = dict(shape=shape, T=T, R=R, S=S)
        ob, ol = _rec(idx, shape, T, R, S, "ours"), _rec(idx, shape, T, R, S, "ours_lora")
        anyb = next((_rec(idx, shape, T, R, S, p) for p in BASE_PEERS
                     if (_rec(idx, shape, T, R, S, p) or {}).get("status") == "ok"), None)
        anyl = next((_rec(idx, shape, T, R, S, p) for p in ("ours_lora", "ours_lora_graph", "torch_lora",
                                                                "peft_split")
                     if (_rec(idx, shape, T, R, S, p) or {}).get("status") == "ok"), None)
        row["experts"] = anyb.get("experts") if anyb else None
        row["floor_us"] = anyb.get("floor_us", float("nan")) if anyb else float("nan")
        row["floor_lora_us"] = anyl.get("floor_us", float("nan")) if anyl else float("nan")
        for p in peers:
            row[p] = _t(idx, shape, T, R, S, p)
        for tag in ("", "_graph"):
            b, lo = row.get("ours" + tag, float("nan")), row.get("ours_lora" + tag, float("nan"))
            row["ours%s_x_floor" % tag] = b / row["floor_us"]
            row["ours_lora%s_x_floor" % tag] = lo / row["floor_lora_us"]
            row["lora_overhead%s" % tag] = lo / b - 1
        row["err"] = (ob or {}).get("err", float("nan"))
        row["err_lora"] = (ol or {}).get("err", float("nan"))
        rows.append(row)
    return rows, peers


def _header(meta):
    env, m = meta.get("env", {}), meta.get("machine", {})
    lines = [f"- device: **{env.get('device_name')}** ({env.get('device')}), {env.get('date')}",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, python {env.get('python')}, git {env.get('git')}",
             f"- measured in this run: HBM {m.get('hbm_Bps', float('nan')) / 1e12:.2f} TB/s "
             f"({m.get('copy_bytes', 0) / 2**20:.0f} MiB device copy), {m.get('dtype')} matmul "
             f"{m.get('mm_flops', float('nan')) / 1e12:.1f} TFLOP/s ({m.get('mm_n')}^3); "
             "floor = max(bytes / HBM, FLOPs / matmul rate)",
             f"- command: `bench_moe.py {env.get('argv', '')}`; wall {meta.get('wall_s', float('nan')):.0f} s "
             + (f" (budget {meta['budget_s']:g} s)" if meta.get("budget_s") else "")
             + (f"; **interrupted**: {meta['interrupted']}" if meta.get("interrupted") else "")]
    for n in meta.get("notes", []):
        lines.append(f"- note: {n}")
    return "\n".join(lines)


def markdown_summary(meta, records):
    rows, peers = summary_rows(meta, records)
    cols = ["shape", "T", "R", "S", "experts", "floor µs", "floor+LoRA µs"] + [f"{p} µs" for p in peers] + \
        ["ours/floor", "ours_lora/floor", "LoRA ovh", "ours_graph/floor", "LoRA ovh graph", "err", "err LoRA"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["shape"], str(r["T"]), str(r["R"]), str(r["S"]), str(r["experts"] or "—"),
                 _time_fmt(r["floor_us"]), _time_fmt(r["floor_lora_us"])]
        cells += [_time_fmt(r[p]) for p in peers]
        cells += [_fmt(r["ours_x_floor"], ".2f"), _fmt(r["ours_lora_x_floor"], ".2f"),
                  _fmt(100 * r["lora_overhead"], "+.0f") + ("%" if not _nan(r["lora_overhead"]) else ""),
                  _fmt(r["ours_graph_x_floor"], ".2f"),
                  _fmt(100 * r["lora_overhead_graph"], "+.0f") + ("%" if not _nan(r["lora_overhead_graph"]) else ""),
                  _fmt(r["err"], ".1e"), _fmt(r["err_lora"], ".1e")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown_detail(records):
    cols = ["shape", "T", "R", "S", "peer", "time µs", "TB/s", "TFLOP/s", "floor µs", "x floor", "err", "reps",
            "status"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        ok = r.get("status") == "ok"
        status = "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}".replace("|", "/")
        out.append("| " + " | ".join([
            r["shape"], str(r["T"]), str(r["R"] or "—"), str(r["S"] or "—"), r["peer"],
            _time_fmt(r.get("time_us")), _fmt(r.get("tbps"), ".2f"), _fmt(r.get("tflops"), ".1f"),
            _time_fmt(r.get("floor_us")), _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("err"), ".1e"),
            str(r.get("reps", "—")), status]) + " |")
    return "\n".join(out)


def write_markdown(out_dir, meta, records, plots=(), anchors=None):
    text = ["# MoE layer benchmark", "", _header(meta), "",
            "Times are medians in µs (CUDA events per call, or perf_counter on CPU), inputs rotated among "
            "several copies. `ours/floor` = our time over the roofline floor of the base workload; "
            "`ours_lora/floor` over the floor with the adapters' bytes and FLOPs; `LoRA ovh` = ours_lora / "
            "ours - 1. `err` = max |out - ref| / max |ref| against moelora_ext.reference on <= 128 tokens. "
            "peft1 runs one adapter for all tokens (a different, single-adapter workload); peft_split runs "
            "the same mixed batch as ours_lora, one PEFT forward per adapter.", "",
            "## Summary", "", markdown_summary(meta, records), ""]
    anchor_md = markdown_anchors(meta, records, anchors)
    if anchor_md and meta.get("env", {}).get("device") == "cuda":
        text += ["## Against the anchors (earlier H100 runs, ../shared/anchors)", "",
                 "Anchor columns come from earlier runs (their floor assumes 3.0 TB/s and 800 TFLOP/s); ours "
                 "from this run, CUDA-graph replay where measured (else eager). `ours_lora / HF grouped_mm` uses this "
                 "run's grouped_mm. Only comparable when this run's device is an H100.", "", anchor_md, ""]
    if plots:
        text += ["## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots] + [""]
    text += ["## Every measurement", "", markdown_detail(records), ""]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def write_plots(out_dir, meta, records):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    rows, peers = summary_rows(meta, records)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    paths = []
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["R"], r["S"]), []).append(r)
    for (shape, R, S), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["T"])
        Ts = [r["T"] for r in rs]
        if all(_nan(r[p]) for r in rs for p in peers):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for p in peers:
            ys = [r[p] for r in rs]
            if all(_nan(y) for y in ys):
                continue
            style = dict(marker="o", linewidth=2.2) if p.startswith("ours") else dict(marker=".", linewidth=1.2)
            ax.plot(Ts, [float("nan") if _nan(y) else y for y in ys], label=p,
                    linestyle="-" if p in BASE_PEERS else "-.", **style)
        for key, st, label in (("floor_us", dict(color="k", linewidth=1.5), "floor (base)"),
                               ("floor_lora_us", dict(color="gray", linewidth=1.2), "floor (LoRA)")):
            ys = [r[key] for r in rs]
            if not all(_nan(y) for y in ys):
                ax.plot(Ts, ys, linestyle="--", label=label, **st)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("time per call (µs)")
        dev = meta.get("env", {}).get("device_name", "")
        ax.set_title(f"{shape}: LoRA rank {R}, {S} adapters ({dev})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, "plots", f"{shape}_R{R}_S{S}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def config_line(records, shape, T):
    """A one-line digest of one (shape, T) for the log."""
    parts = []
    for r in records:
        if r["shape"] != shape or r["T"] != T:
            continue
        tag = r["peer"] + (f"[R{r['R']}S{r['S']}]" if r["R"] else "")
        if r.get("status") == "ok":
            parts.append(f"{tag} {_time_fmt(r['time_us'])}us ({r['x_floor']:.2f}x)")
        else:
            parts.append(f"{tag} {r.get('status')}")
    return f"{shape} T={T}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------- anchors
# Earlier H100 runs of the peers and of vLLM (../shared/anchors/*.json): shown next to this run's numbers.
ANCHOR_COLS = [("grouped_mm", "HF grouped_mm"), ("peft1", "PEFT 1 adapter"), ("split", "PEFT split"),
               ("vllm_graph", "vLLM graph"), ("vllm_lora8_graph", "vLLM LoRA8 graph")]


def load_anchors(path):
    """{(shape, T): {column: µs}} merged over the JSON files of `path` (missing dir or bad file: skipped)."""
    out = {}
    if not path or not os.path.isdir(path):
        return out
    for name in sorted(os.listdir(path)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(path, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        for r in data if isinstance(data, list) else []:
            if not isinstance(r, dict) or "shape" not in r or "T" not in r:
                continue
            d = out.setdefault((r["shape"], int(r["T"])), {"source": []})
            d["source"].append(name)
            for k, v in r.items():
                if isinstance(v, (int, float)) and k not in ("T",) and k not in d:
                    d[k] = float(v)
    return out


def markdown_anchors(meta, records, anchors):
    """Ours (graph replay where measured) next to the anchors of the same shape and T (issue 6's targets)."""
    if not anchors:
        return ""
    idx = _index(records)
    combos = [tuple(c) for c in meta.get("combos", [])]
    R, S = (16, 8) if (16, 8) in combos else (combos[0] if combos else (0, 0))
    cols = ["shape", "T", "anchor floor µs"] + [f"{lab} µs" for _, lab in ANCHOR_COLS] + \
        ["hf_grouped_mm now µs", "ours µs", "ours_lora µs", "ours_lora / vLLM graph", "ours_lora / HF grouped_mm"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    n = 0
    for shape, T, R_, S_ in _configs(meta, records):
        if (R_, S_) != (R, S) or (shape, T) not in anchors:
            continue
        a = anchors[(shape, T)]
        b = _t(idx, shape, T, R, S, "ours_graph")
        b = b if not _nan(b) else _t(idx, shape, T, R, S, "ours")
        lo = _t(idx, shape, T, R, S, "ours_lora_graph")
        lo = lo if not _nan(lo) else _t(idx, shape, T, R, S, "ours_lora")
        cells = [shape, str(T), _time_fmt(a.get("floor_us"))] + [_time_fmt(a.get(k)) for k, _ in ANCHOR_COLS]
        hf = _t(idx, shape, T, R, S, "hf_grouped_mm")
        cells += [_time_fmt(hf), _time_fmt(b), _time_fmt(lo), _fmt(lo / a.get("vllm_graph", float("nan")), ".2f"),
                  _fmt(lo / (hf if not _nan(hf) else a.get("grouped_mm", float("nan"))), ".2f")]
        out.append("| " + " | ".join(cells) + " |")
        n += 1
    if not n:
        return ""
    return "\n".join(out)


def write_all(out_dir, meta, records, plots=True, anchors=None):
    """results.json, results.md and (plots=True, matplotlib importable) plots/*.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    j = write_json(out_dir, meta, records)
    pngs = write_plots(out_dir, meta, records) if plots else _existing_plots(out_dir)
    md = write_markdown(out_dir, meta, records, pngs, anchors=anchors)
    return [j, md] + pngs


def _existing_plots(out_dir):
    d = os.path.join(out_dir, "plots")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="rebuild results.md and plots/ from DIR/results.json")
    ap.add_argument("dir")
    ap.add_argument("--anchors", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                      "shared", "anchors"))
    a = ap.parse_args()
    m, recs = load_json(a.dir)
    print("\n".join(write_all(a.dir, m, recs, anchors=load_anchors(a.anchors))))
