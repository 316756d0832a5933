"""The benchmark driver must not rot: run its CPU quick mode in-process and check what it wrote."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import bench_moe

    out = tmp_path_factory.mktemp("bench")
    # One tiny shape and two token counts keep this a few seconds; peers whose packages are missing
    # (transformers, peft) are recorded as errors, which the checks below allow.
    res = bench_moe.main(["--device", "cpu", "--quick", "--shapes", "tiny-a", "--tokens", "1,16",
                          "--out", str(out), "--budget-s", "120"])
    return out, res


def test_outputs_written(quick_run):
    out, _ = quick_run
    assert (out / "results.json").is_file()
    assert (out / "results.md").is_file()
    md = (out / "results.md").read_text()
    assert "| shape | T |" in md and "tiny-a" in md and "ours/floor" in md
    try:
        import matplotlib  # noqa: F401
        assert list((out / "plots").glob("*.png")), "matplotlib is importable but no plot was written"
    except ImportError:
        pass


def test_json_rows_sane(quick_run):
    out, res = quick_run
    data = json.loads((out / "results.json").read_text())
    meta, records = data["meta"], data["records"]
    assert meta["machine"]["hbm_Bps"] > 1e8 and meta["machine"]["mm_flops"] > 1e8
    assert meta["env"]["device"] == "cpu" and meta["env"]["torch"]
    peers = {r["peer"] for r in records}
    assert {"ours", "ours_lora", "torch_lora", "hf_grouped_mm"} <= peers
    assert not any(r["peer"].endswith("_graph") for r in records), "graph peers are CUDA only"
    assert {r["T"] for r in records} == {1, 16}
    for r in records:
        assert r["status"] in ("ok", "skipped", "error"), r
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        assert r["time_us"] > 0 and math.isfinite(r["time_us"]), r
        assert r["floor_us"] > 0 and r["bytes"] > 0 and r["flops"] > 0, r
        assert r["x_floor"] >= 0.5, r   # nothing beats its roofline floor by 2x (sanity of bytes/FLOPs)
        assert r["tbps"] > 0 and r["tflops"] > 0, r
        assert r["err"] < 5e-2, r        # bf16 against the fp32 reference
    # ours must have run (the op is the point of the benchmark)
    ok = {(r["peer"], r["T"]) for r in records if r["status"] == "ok"}
    for T in (1, 16):
        assert ("ours", T) in ok and ("ours_lora", T) in ok and ("torch_lora", T) in ok


def test_lora_rows_count_adapter_work(quick_run):
    _, res = quick_run
    rows = {(r["peer"], r["T"]): r for r in res["rows"]}
    base, lora = rows[("ours", 16)], rows[("ours_lora", 16)]
    assert lora["R"] == 16 and lora["S"] == 8 and base["R"] == 0
    assert lora["bytes"] > base["bytes"] and lora["flops"] > base["flops"]


def test_roofline_workload_counts_distinct_experts():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import torch
    import roofline

    H, I, E = 8, 4, 6  # noqa: E741
    ids = torch.tensor([[0, 1], [1, 2], [0, -1]])            # experts 0, 1, 2; one invalid route
    lora = torch.tensor([0, -1, 1], dtype=torch.int32)
    w = roofline.workload(H, I, E, ids, lora, R=2, elem_bytes=2)
    assert w["experts"] == 3 and w["rows"] == 5 and w["lora_rows"] == 3
    assert w["lora_pairs"] == 3                               # (0,0), (1,0), (0,1)
    expert_bytes = 3 * 3 * H * I * 2
    lora_bytes = 3 * 2 * (H + 2 * I + I + H) * 2
    assert w["bytes"] == expert_bytes + lora_bytes
    assert w["flops"] == 2 * 5 * 3 * H * I + 2 * 3 * 2 * (2 * H + 3 * I)
