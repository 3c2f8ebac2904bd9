"""``c3dzoo bench``: the pytest-benchmark suite of the source tree (bench/), its tables, a CSV
and a plot."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
from typing import List

import c3dzoo

from ._common import CommandError, UsageError


BENCH_MODELS = ("c3d_bn", "r3d_18", "s3d", "slow_r50", "r2plus1d_r50", "slowfast_r50", "csn_r101",
                "x3d_m")  # _harness NUM_CLASSES
BENCH_MODES = {"inference": ("inference",), "training": ("train",), "both": ("inference", "train")}
# speedup: the baseline's median / the contestant's, both of the same group and batch (speedup_vs)
BENCH_CSV = ("group", "contestant", "batch", "median_ms", "clips_per_s", "speedup", "speedup_vs", "peak_mem_bytes")


def _batch_list(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 8,16,32, got {text!r}")
    return sizes


def _bench_report(bench_dir: str):
    """bench/report.py, loaded by path (as bench/conftest.py does)."""
    spec = importlib.util.spec_from_file_location("c3dzoo_bench_report", os.path.join(bench_dir, "report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench_plot(recs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for (group, name) in dict.fromkeys((r.group, r.contestant) for r in recs):
        points = sorted((r.batch, r.clips_per_s, r.peak_mem_bytes) for r in recs
                        if (r.group, r.contestant) == (group, name))
        label = f"{group}: {name}"
        ax_tp.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        mem = [(b, m / 1e9) for b, _, m in points if m is not None]
        if mem:
            ax_mem.plot([b for b, _ in mem], [m for _, m in mem], marker="o", label=label)
    ax_tp.set(xlabel="batch", ylabel="clips/s", title="throughput")
    ax_mem.set(xlabel="batch", ylabel="GB", title="peak memory")
    if not ax_mem.lines:  # the suite records GPU memory only
        ax_mem.text(0.5, 0.5, "not recorded on this device", ha="center", va="center", transform=ax_mem.transAxes)
    ax_tp.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cmd_bench(args: argparse.Namespace) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(c3dzoo.__file__)))
    bench_dir = os.path.join(repo, "bench")
    if not os.path.isfile(os.path.join(bench_dir, "_harness.py")):
        raise UsageError("the benchmark suite ships with the source tree (bench/), which this "
                         "installation does not have: run it from a checkout")
    report = _bench_report(bench_dir)
    out = args.out or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(out, exist_ok=True)
    modes = " or ".join(f"-{m}-" for m in BENCH_MODES[args.mode])
    tests = f"test_model and {args.model}-"
    if args.layers and args.model == "c3d_bn":  # the per-layer benchmarks are C3D's layers
        tests = f"({tests} or test_layer)"
    select = f"{tests} and ({modes})"
    if args.k:
        select = f"({select}) and ({args.k})"

    benchmarks, data = [], None
    for batch in args.batch or [None]:  # None: the suite's default batch size
        suffix = "" if batch is None else f"-batch{batch}"
        json_path = os.path.join(out, f"bench{suffix}.json")
        log_path = os.path.join(out, f"pytest{suffix}.log")
        # a pytest of its own, never an xdist worker: pytest-benchmark refuses to time when it sees
        # the variable an xdist worker it was started from (e.g. a parallel test run) passes down
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
        if batch is not None:
            env["C3DZOO_BENCH_BATCH"] = str(batch)  # the suite takes one batch size per session
        env["C3DZOO_BENCH_MODELS"] = args.model  # the suite builds only that one
        command = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                   "-p", "no:xdist", "-k", select, f"--benchmark-json={json_path}"]
        print(f"running the benchmarks{'' if batch is None else f' at batch {batch}'} (log: {log_path})",
              flush=True)
        with open(log_path, "w") as log:
            done = subprocess.run(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not os.path.isfile(json_path):
            raise CommandError(f"the benchmark run exited with status {done.returncode}; see {log_path}")
        run = report.load(json_path)
        data = data or run
        benchmarks += run.get("benchmarks", [])
    data = dict(data, benchmarks=benchmarks)
    recs = report.records(data)
    if not recs:
        raise CommandError(f"no benchmark results (every selected benchmark was skipped?); see {out}")
    if len(args.batch or []) > 1:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(data, f, indent=1)

    csv_path = os.path.join(out, "bench.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BENCH_CSV)
        for batch in sorted({r.batch for r in recs}):
            at_batch = [r for r in recs if r.batch == batch]
            print(f"\n{report.headline(data, at_batch)}")  # per-group detail: report.py --groups
            for group, members in report.by_group(at_batch).items():
                baseline = report.baseline_of(members)
                ratios = report.speedups(members, baseline)
                for r in members:
                    ratio = ratios.get(r.contestant)
                    writer.writerow([group, r.contestant, r.batch, f"{r.median_s * 1e3:.4f}",
                                     f"{r.clips_per_s:.3f}", "" if ratio is None else f"{ratio:.4f}",
                                     baseline or "", "" if r.peak_mem_bytes is None else r.peak_mem_bytes])
    print(f"\nwrote {csv_path}")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is missing (pip install matplotlib)")
    else:
        _bench_plot(recs, os.path.join(out, "bench.png"))
        print(f"wrote {os.path.join(out, 'bench.png')}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser("bench", help="run the benchmark suite of the source tree (bench/)",
                           description="Run bench/ (pytest-benchmark) in a subprocess; print its "
                                       "tables and write DIR/bench.json, bench.csv and bench.png.")
    bench.add_argument("--model", choices=BENCH_MODELS, default="c3d_bn", help="(default %(default)s)")
    bench.add_argument("--mode", choices=list(BENCH_MODES), default="both", help="(default %(default)s)")
    bench.add_argument("--batch", type=_batch_list, metavar="N[,N...]",
                       help="batch sizes, one session each (default: the suite's, GPU 32, CPU 2)")
    bench.add_argument("--out", metavar="DIR", help="output folder (default ./bench-out)")
    bench.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                       help="also the per-layer C3D benchmarks (c3d_bn; default on)")
    bench.add_argument("-k", metavar="EXPR", help="further pytest -k selection within the suite")
    bench.set_defaults(func=_cmd_bench)
    return bench
