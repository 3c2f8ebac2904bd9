import os
import sys

# Triton decides at import time whether @triton.jit kernels run compiled or interpreted: without a
# GPU, run them under the interpreter (that is how CI and reviewers test the triton backend on CPU).
# Tests that need real compilation (sm_90 machine code) run in a subprocess without this variable.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # the shared `parity` helper

# caches (the video frame-count index) go to a directory of this test session, not the user's,
# removed when the session ends
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "C3DZOO_CACHE_DIR" not in os.environ:
    _session_cache_dir = tempfile.mkdtemp(prefix="c3dzoo-test-cache-")
    os.environ["C3DZOO_CACHE_DIR"] = _session_cache_dir
    atexit.register(shutil.rmtree, _session_cache_dir, ignore_errors=True)


import pytest  # noqa: E402
import torch  # noqa: E402

# `pytest -n N` (pytest-xdist, README's test command): N worker processes share the machine's
# cores, so each takes its share of torch's intra-op threads. With torch's default (every core per
# worker) the workers' thread pools oversubscribe the cores: on 2 cores, 2 workers took 17 min
# against 13 min for one process, and 8 min with a thread each.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // _workers))


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch):
    """fp32 is compared in full precision everywhere: with cuDNN's default allow_tf32 the Triton
    kernels use TF32 on a GPU, and cuDNN may or may not (it picks non-tensor-core algorithms for tiny
    channel counts), so neither error would be fp32's. The TF32 tests turn it on themselves."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True)
def _own_fallback_record():
    """``c3dzoo.fallbacks()`` is one record per process: each test starts with it empty, so a test
    that asserts no call fell back sees its own calls only, whatever ran before it in the process."""
    from c3dzoo.ops import backends

    backends.clear_fallbacks()
