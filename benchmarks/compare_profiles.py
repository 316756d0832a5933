#!/usr/bin/env python3
"""Two profile_stages.py JSON files side by side: graph totals and the LoRA call's kernels, before -> after.

    python benchmarks/compare_profiles.py before.json after.json

For A/B runs across builds (NOTES.md v14): build the old commit in place elsewhere, run profile_stages.py
once with it on PYTHONPATH and once without, in the same device session, then compare. Kernel names are
shortened to the kernel and its template arguments; CUTLASS GEMMs and memsets are left out.
"""
from __future__ import annotations

import json
import re
import sys


def short(name: str) -> str:
    if name.startswith("_ZN7cutlass"):
        return "cutlass_gemm"
    m = re.search(r"(\w+_kernel)<([^>]*)>", name)
    if m is None:
        m2 = re.search(r"(\w+_kernel)", name)
        return m2.group(1) if m2 else name[:40]
    args = re.sub(r"__nv_bfloat16|moelora::cuda::|ActivationKind|\(|\)|\bint\b|\bbool\b", "", m.group(2))
    args = args.replace(" ", "").strip(",")  # the element type is dropped: "<,16,true>" -> "<16,true>"
    return f"{m.group(1)}<{args}>" if args else m.group(1)


def kernels(rows) -> dict:
    out: dict = {}
    for k in rows or []:
        out[short(k["name"])] = out.get(short(k["name"]), 0.0) + k["us"]
    return out


def load(path: str) -> dict:
    runs = {}
    for r in json.load(open(path))["results"]:
        key = (r["shape"], r["T"], r.get("variant", "default"))
        runs[key] = (r["base_us"], r["lora_us"], kernels(r.get("kernels")), kernels(r.get("base_kernels")))
    return runs


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = load(sys.argv[1]), load(sys.argv[2])
    for key, (b_base, b_lora, b_k, b_bk) in before.items():
        if key not in after:
            continue
        a_base, a_lora, a_k, a_bk = after[key]
        print(f"## {key[0]} T={key[1]} [{key[2]}]  graph base {b_base:.1f} -> {a_base:.1f}   "
              f"lora {b_lora:.1f} -> {a_lora:.1f}")
        for name, us in b_k.items():
            if name != "cutlass_gemm" and "Memset" not in name:
                print(f"    {name:50s} {us:8.1f} -> {a_k.get(name, float('nan')):8.1f}")
        for name, us in b_bk.items():
            if "activation" in name:
                print(f"    base:{name:45s} {us:8.1f} -> {a_bk.get(name, float('nan')):8.1f}")


if __name__ == "__main__":
    main()
