"""pytest configuration of the benchmarks: session facts for the JSON, run order, summary tables.

    python -m pytest bench/ --benchmark-only -q                    # CPU: small shapes, < 3 minutes
    python -m pytest bench/ --benchmark-only --benchmark-json=X.json  # GPU: see bench/gpu_session.sh

Knobs are environment variables, listed in bench/_harness.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Triton decides when a kernel module is imported whether it runs compiled or interpreted, so the
# interpreter switch has to be on before anything imports c3dzoo's kernels. On CPU it is on only
# when asked for: interpreted kernels are slow.
if os.environ.get("C3DZOO_BENCH_TRITON_INTERPRET", "").strip() not in ("", "0"):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import _harness as H  # noqa: E402  (bench/ is on sys.path: pytest inserts a conftest's folder)


def _load_report():
    # report.py is a stand-alone script (stdlib only); loaded by path under a unique name, since
    # "report" alone could shadow or be shadowed by an installed module
    spec = importlib.util.spec_from_file_location(
        "c3dzoo_bench_report", os.path.join(os.path.dirname(__file__), "report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = _load_report()
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    config.stash[H.RESULTS] = []
    H.start_session()


def pytest_report_header(config):
    return [f"c3dzoo bench: {H.describe_profile()}"]


def pytest_collection_modifyitems(config, items):
    """Run the most wanted numbers first (``_harness.run_order``), so that a session cut short by
    its time budget (C3DZOO_BENCH_BUDGET_S) loses the least. Only this folder's items move; their
    relative order otherwise stays as collected."""
    positions = [i for i, item in enumerate(items) if str(item.path).startswith(_BENCH_DIR)]

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        contestant = H.CONTESTANTS.get(params.get("contestant"))
        kind = "model" if "model" in params else "layer"
        if contestant is None:
            return (1, 0, 0)
        return H.run_order(kind, params.get(kind, ""), contestant)

    ordered = sorted((items[i] for i in positions), key=key)  # sorted() is stable
    for i, item in zip(positions, ordered):
        items[i] = item


def pytest_benchmark_update_machine_info(config, machine_info):
    # the GPU, driver, versions and commit go into the JSON once, at session level
    machine_info.update(H.session_info())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(H.RESULTS, [])
    if not results:
        return
    records = report.records({"benchmarks": results})
    terminalreporter.write_sep(
        "=", f"c3dzoo: speed-up vs {H.BASELINE} measured in this run ({len(records)} benchmarks)")
    for line in report.group_tables(records).splitlines():
        terminalreporter.write_line(line)
