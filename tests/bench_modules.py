"""bench/'s modules (report.py, _harness.py) for the tests: bench/ is not a package, so each is loaded
by path, under the name bench/conftest.py gives it."""

from __future__ import annotations

import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_bench_module(filename: str):
    """bench/<filename> as module ``c3dzoo_bench_<name>`` (``_harness.py`` → ``c3dzoo_bench_harness``)."""
    name = "c3dzoo_bench_" + os.path.splitext(filename)[0].lstrip("_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
