"""bench/report.py on a small synthetic run: the ratios it prints are the ones its input implies.
Also the benchmark harness's FLOP count, which every TFLOP/s and % of peak rests on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench_modules import BENCH, load_bench_module

report = load_bench_module("report.py")


def _bench(kind, target, mode, contestant, median_s, batch=32, flops=None, peak_tflops=None,
           peak_mem=2_200_000_000, resident_mem=None):
    """One entry as pytest-benchmark writes it (with the extra_info bench/_harness.py adds)."""
    return {
        "group": f"{kind} {target} {mode}",
        "name": f"test_{kind}[{target}-{mode}-{contestant}]",
        "fullname": f"bench/test_bench_{kind}s.py::test_{kind}[{target}-{mode}-{contestant}]",
        "params": {kind: target, "mode": mode, "contestant": contestant},
        "param": f"{target}-{mode}-{contestant}",
        "options": {"timer": "device_timer", "disable_gc": True},
        "stats": {"min": median_s * 0.98, "max": median_s * 1.05, "mean": median_s * 1.01,
                  "median": median_s, "rounds": 10, "iterations": 1},
        "extra_info": {"kind": kind, "target": target, "mode": mode, "contestant": contestant,
                       "baseline": "eager-bf16-cl", "batch": batch, "flops_per_call": flops,
                       "peak_tflops": peak_tflops, "peak_mem_bytes": peak_mem, "resident_mem_bytes": resident_mem,
                       "fallbacks": []},
    }


def _run():
    gflop = 77.0e9 * 32  # C3D-BN forward, batch 32
    return {
        "machine_info": {"gpu_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
                         "c3dzoo_commit": {"id": "0123456789abcdef", "dirty": False}},
        "commit_info": {},
        "datetime": "2026-11-23T10:00:00",
        "version": "5.2.3",
        "benchmarks": [
            _bench("model", "c3d_bn", "inference", "eager-fp32", 0.0640, flops=gflop, peak_tflops=66.9),
            _bench("model", "c3d_bn", "inference", "eager-bf16-cl", 0.0128, flops=gflop, peak_tflops=989.4),
            _bench("model", "c3d_bn", "inference", "c3dzoo-triton-bf16-cl", 0.0064, flops=gflop, peak_tflops=989.4),
            # training: 1 GB resident (parameters, optimizer state) + 4.5 GB / 32 clips for stock
            _bench("model", "c3d_bn", "train", "eager-bf16-cl", 0.0400, peak_mem=5_500_000_000,
                   resident_mem=1_000_000_000),
            _bench("model", "c3d_bn", "train", "compile-bf16-cl", 0.0250, peak_mem=4_400_000_000,
                   resident_mem=1_000_000_000),
            _bench("model", "c3d_bn", "train", "c3dzoo-triton-bf16-cl", 0.0250, peak_mem=2_200_000_000,
                   resident_mem=1_000_000_000),
            _bench("layer", "conv1", "inference", "eager-bf16-cl", 0.0034),
            _bench("layer", "conv1", "inference", "c3dzoo-triton-bf16-cl", 0.0017),
            # a group without its baseline: no speed-up can be claimed
            _bench("layer", "conv2", "inference", "c3dzoo-triton-bf16-cl", 0.0010),
            # something pytest-benchmark may hold that is not ours: ignored
            {"group": None, "name": "test_other", "stats": {"median": 1.0}, "extra_info": {}},
        ],
    }


def _cells(table: str, *row_start: str) -> dict:
    """{column header: cell} of the markdown row that starts with ``row_start``."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    prefix = "| " + " | ".join(row_start) + " |"
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            header = next(lines[j] for j in range(i - 1, -1, -1) if lines[j + 1].startswith("|---"))
            names = [c.strip() for c in header.strip("|").split("|")]
            return dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    raise AssertionError(f"no row {row_start} in\n{table}")


def test_records_compute_throughput_and_efficiency():
    recs = report.records(_run())
    assert len(recs) == 9  # the foreign entry is skipped
    triton = next(r for r in recs if r.contestant == "c3dzoo-triton-bf16-cl" and r.kind == "model")
    assert triton.clips_per_s == pytest.approx(32 / 0.0064)
    assert triton.tflops == pytest.approx(77.0 * 32 / 0.0064 / 1e3)
    assert triton.pct_peak == pytest.approx(100 * 77.0 * 32 / 0.0064 / 1e3 / 989.4)


def test_headline_ratios_against_the_runs_baseline():
    text = report.headline(_run())
    assert "NVIDIA H100 80GB HBM3" in text and "commit 0123456789ab" in text
    inference = _cells(text, "c3d_bn", "inference")
    assert inference["eager-bf16-cl"] == "2,500 (1.00×)"  # 32 / 0.0128 s
    assert inference["c3dzoo-triton-bf16-cl"] == "5,000 (2.00×)"
    assert inference["eager-fp32"] == "500 (0.20×)"
    train = _cells(text, "c3d_bn", "train")
    assert train["compile-bf16-cl"] == "1,280 (1.60×)"  # 0.040 / 0.025
    assert train["eager-fp32"] == "—"  # not measured in this group
    assert _cells(text, "conv1", "inference")["c3dzoo-triton-bf16-cl"] == "1.70 ms (2.00×)"
    assert _cells(text, "conv2", "inference")["c3dzoo-triton-bf16-cl"] == "1.00 ms (—)"
    # columns: eager first, then torch.compile, then c3dzoo
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header.index("eager-fp32") < header.index("compile-bf16-cl") < header.index("c3dzoo-triton")


def test_another_baseline_on_request():
    text = report.headline(_run(), baseline="eager-fp32")
    inference = _cells(text, "c3d_bn", "inference")
    assert inference["c3dzoo-triton-bf16-cl"] == "5,000 (10.00×)"  # 0.064 / 0.0064
    # groups without eager-fp32 fall back to the run's own baseline, and the caption says so
    assert _cells(text, "c3d_bn", "train")["compile-bf16-cl"] == "1,280 (1.60×)"
    except_line = next(line for line in text.splitlines() if line.startswith("Except: "))
    assert "model c3d_bn train vs eager-bf16-cl" in except_line
    assert "layer conv2 inference vs nothing (no baseline ran)" in except_line
    assert "model c3d_bn inference" not in except_line
    # against the run's own baseline, only the group that has no baseline at all is an exception
    default = next(line for line in report.headline(_run()).splitlines() if line.startswith("Except: "))
    assert default == "Except: layer conv2 inference vs nothing (no baseline ran)."


def test_group_tables():
    text = report.group_tables(report.records(_run()))
    row = _cells(text, "c3dzoo-triton-bf16-cl", "6.40")
    assert row["speed-up"] == "2.00×" and row["clips/s"] == "5,000" and row["peak mem"] == "2.20 GB"
    assert "layer conv2 inference (batch 32; speed-up vs no baseline)" in text


def test_compile_times_say_whether_the_caches_were_warmed():
    data = _run()
    compiled = next(b for b in data["benchmarks"] if b["extra_info"].get("contestant") == "compile-bf16-cl")
    compiled["extra_info"]["compile_s"] = 41.6
    assert _cells(report.group_tables(report.records(data)), "compile-bf16-cl")["notes"] == "compile 42 s"
    compiled["extra_info"]["caches_prewarmed"] = True  # bench/gpu_session.sh filled them first
    assert (_cells(report.group_tables(report.records(data)), "compile-bf16-cl")["notes"]
            == "compile 42 s (warm cache)")


def test_cli_reads_json_and_jsonl(tmp_path):
    data = _run()
    path = tmp_path / "nvidia-h100-80gb-hbm3.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), str(path), "--groups"],
                         capture_output=True, text=True, check=True).stdout
    assert "5,000 (2.00×)" in out and "speed-up vs eager-bf16-cl" in out
    lines = tmp_path / "partial.jsonl"
    lines.write_text("".join(json.dumps(b) + "\n" for b in data["benchmarks"][:3]))
    out = subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), str(lines)],
                         capture_output=True, text=True, check=True).stdout
    assert _cells(out, "c3d_bn", "inference")["c3dzoo-triton-bf16-cl"] == "5,000 (2.00×)"


def test_flop_counts_from_shapes():
    """C3D-BN: 38.5 GMAC = 77.1 GFLOP per 16×112×112 clip forward (baselines.md); a training step
    is 3× that, less conv1's input gradient. Counted on the meta device: no memory, no time."""
    pytest.importorskip("pytest_benchmark")  # the harness's module imports pytest's mark for it
    harness = load_bench_module("_harness.py")
    import torch

    with torch.device("meta"):  # built without initialising 78 M parameters
        model = harness.c3dzoo.get_model("c3d_bn")
    counter = harness._FlopCounter(model.eval())
    counter.run(torch.empty(1, 3, 16, 112, 112, device="meta"))
    assert counter.forward_flops / 1e9 == pytest.approx(77.09, rel=1e-3)
    conv1 = 2 * 64 * 16 * 112 * 112 * 3 * 27
    assert counter.train_flops == 3 * counter.forward_flops - conv1


def test_training_memory_and_the_batch_that_fits():
    recs = report.records(_run())
    stock = next(r for r in recs if r.contestant == "eager-bf16-cl" and r.mode == "train")
    # (80 GB − 1 GB resident) / (4.5 GB / 32 clips) = 561.8 → 561
    assert stock.batch_that_fits() == 561
    assert stock.batch_that_fits(capacity_bytes=5.5e9) == 32  # the measured batch itself fits exactly
    fused = next(r for r in recs if r.contestant == "c3dzoo-triton-bf16-cl" and r.mode == "train")
    assert fused.batch_that_fits() == int(79e9 // (1.2e9 / 32))  # 2106
    # inference entries hold no resident figure: no extrapolation
    assert next(r for r in recs if r.mode == "inference").batch_that_fits() is None
    text = report.headline(_run())
    row = _cells(text[text.index("Training step memory"):], "c3d_bn")
    assert row["eager-bf16-cl"] == "5.50 GB (1.00×); batch ≤ 561"
    assert row["c3dzoo-triton-bf16-cl"] == "2.20 GB (0.40×); batch ≤ 2,106"
    assert "eager-fp32" not in row  # measured in inference only
    # a CPU run measures no memory: no table
    cpu = _run()
    for bench in cpu["benchmarks"]:
        if bench.get("extra_info"):
            bench["extra_info"]["peak_mem_bytes"] = None
    assert "Training step memory" not in report.headline(cpu)


def test_untimed_run_records_each_cases_first_call(tmp_path):
    """bench/gpu_session.sh's cache warm-up: pytest bench/ --benchmark-disable makes one call per case
    and, asked to, writes its first-call (compile) seconds to a JSONL file apart from the results."""
    pytest.importorskip("pytest_benchmark")
    path = tmp_path / "first-calls.jsonl"
    env = {k: v for k, v in os.environ.items()  # a pytest of its own, even under a parallel test run
           if not k.startswith("PYTEST_XDIST_") and k != "TRITON_INTERPRET"}  # the bench decides that
    env.update(C3DZOO_BENCH_FIRST_CALLS_JSONL=str(path), C3DZOO_BENCH_PREWARMED="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", "test_model and c3d_bn and inference and (eager-fp32 or c3dzoo-reference-fp32)"],
        cwd=os.path.dirname(BENCH), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["contestant"] for r in rows) == ["c3dzoo-reference-fp32", "eager-fp32"]
    for r in rows:
        assert r["group"] == "model c3d_bn inference" and r["first_call_s"] > 0 and r["caches_prewarmed"] is True


def test_fused_speedup_over_each_stock_contestant():
    text = report.headline(_run())
    assert "c3dzoo's speed-up over each stock contestant" in text
    inference = _cells(text, "c3d_bn", "inference", "c3dzoo-triton-bf16-cl")
    assert inference["vs eager-fp32"] == "10.00×" and inference["vs eager-bf16-cl"] == "2.00×"
    assert inference["vs compile-bf16-cl"] == "—"  # not measured in that group
    train = _cells(text, "c3d_bn", "train", "c3dzoo-triton-bf16-cl")
    assert train["vs compile-bf16-cl"] == "1.00×" and train["vs eager-bf16-cl"] == "1.60×"


def test_several_batch_sizes_are_never_compared_with_each_other():
    """c3dzoo bench --batch 16,32 merges its sessions into one JSON: each batch gets its own tables."""
    data = _run()
    doubled = []
    for bench in data["benchmarks"]:
        if bench.get("extra_info"):
            twin = json.loads(json.dumps(bench))
            twin["extra_info"]["batch"] = 64
            twin["stats"]["median"] *= 3.0 if twin["extra_info"]["contestant"].startswith("eager") else 1.5
            doubled.append(twin)
    data["benchmarks"] += doubled
    text = report.headline(data)
    first, second = text.split("\n\nNVIDIA H100")
    assert "Batch 32." in first and "Batch 64." in second
    assert _cells(first, "c3d_bn", "inference")["c3dzoo-triton-bf16-cl"] == "5,000 (2.00×)"
    assert _cells(second, "c3d_bn", "inference")["c3dzoo-triton-bf16-cl"] == "6,667 (4.00×)"  # 3 / 1.5 × 2
    groups = report.group_tables(report.records(data))
    assert "model c3d_bn inference (batch 32;" in groups and "model c3d_bn inference (batch 64;" in groups
