#!/usr/bin/env python3
"""Run a pytest selection as N processes side by side on one GPU, so the whole CUDA suite fits one device call.

    python3 scripts/run_tests_sharded.py --shards 6 --log-dir $OUT/tests -- tests/test_fused_moe_cuda.py -k "not slow"

The tests are short and mostly wait on the host (reference math, launches, graph capture), so one GPU runs
several processes at once. The collected test ids are dealt round-robin to the shards; each shard's log lands in
--log-dir, and the summary line of each plus the totals are printed. Exit status: 0 only if every shard passed and
every collected test ran (passed, skipped or xfailed).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time


def collect(args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode not in (0, 5) or not ids:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"collection failed (rc {out.returncode}, {len(ids)} ids)")
    return ids


def counts(text: str) -> dict[str, int]:
    """The `N passed, M failed, ...` counts of pytest's last summary line."""
    found = {}
    for line in reversed(text.splitlines()):
        pairs = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if pairs:
            for n, what in pairs:
                found["error" if what.startswith("error") else what] = int(n)
            break
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--log-dir", default="test-shards")
    ap.add_argument("--timeout", type=int, default=540, help="seconds for each shard")
    ap.add_argument("pytest_args", nargs="*", help="after --: the pytest selection (paths, -k, -m)")
    opts = ap.parse_args()
    if opts.shards < 1:
        ap.error("--shards must be at least 1")
    ids = collect(opts.pytest_args)
    os.makedirs(opts.log_dir, exist_ok=True)
    shards = [ids[i::opts.shards] for i in range(opts.shards)]
    # Each shard's host threads: the machine's cores shared out, not each shard taking all of them.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.shards)))
    procs = []
    start = time.time()
    for i, shard in enumerate(shards):
        if not shard:
            continue
        log = open(os.path.join(opts.log_dir, f"shard{i}.log"), "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *shard]
        procs.append((i, len(shard), log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    total: dict[str, int] = {}
    ok = True
    for i, n, log, proc in procs:
        try:
            rc = proc.wait(timeout=max(1, opts.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        text = open(log.name).read()
        c = counts(text)
        ran = c.get("passed", 0) + c.get("skipped", 0) + c.get("xfailed", 0) + c.get("xpassed", 0)
        good = rc == 0 and ran == n
        ok &= good
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
        print(f"shard {i}: {n} tests, rc {rc}, {c}{'' if good else '  <-- FAILED'}")
        if not good:
            print("\n".join(line for line in text.splitlines() if line.startswith(("FAILED", "ERROR")))[:4000])
    print(f"total: {len(ids)} collected, {total}, {time.time() - start:.0f} s, {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
