"""torch.hub: ``hubconf.py`` serves the zoo's builders from a checkout that is not installed, with
the Triton kernels of that checkout (pip maps ``kernels/`` to ``c3dzoo.kernels``; in a checkout the
hub module's import finder does), fused models equal to stock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run in a fresh interpreter that does not see this installation of c3dzoo (an editable install
# adds an import finder and a path entry that would serve c3dzoo.kernels from here)
_SCRIPT = r"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "editable" not in (f if isinstance(f, type) else type(f)).__module__.lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and p.rstrip("/") != sys.argv[2]]
import torch
checkout = sys.argv[1]
kwargs = dict(width_mult=0.125, num_classes=5, input_size=(16, 16, 16))
fused = torch.hub.load(checkout, "c3d_bn", source="local", fused=True, backend="triton", **kwargs).eval()
stock = torch.hub.load(checkout, "c3d_bn", source="local", fused=False, **kwargs).eval()
stock.load_state_dict(fused.state_dict(), strict=True)
import c3dzoo
assert c3dzoo.__file__.startswith(checkout), c3dzoo.__file__
assert sys.modules["c3dzoo.kernels"].__file__.startswith(checkout), sys.modules["c3dzoo.kernels"].__file__
x = torch.randn(2, 3, 16, 16, 16)
with torch.no_grad():
    error = (fused(x) - stock(x)).abs().max().item()
print("backends", {k: v["available"] for k, v in c3dzoo.backends().items()})
print("fallbacks", c3dzoo.fallbacks())
print("error", error)
print("r3d_18", type(torch.hub.load(checkout, "r3d_18", source="local", num_classes=3)).__name__)
import hubconf  # torch.hub.list's rule (it takes no local checkout): the public callables
entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
print("listed", sorted(entries) == sorted(c3dzoo.list_models()))
"""


def _checkout(tmp_path) -> str:
    """This repository's sources as a hub download has them: no build products, nothing installed."""
    checkout = tmp_path / "c3dzoo-main"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for folder in ("c3dzoo", "kernels"):
        shutil.copytree(os.path.join(ROOT, folder), checkout / folder, ignore=ignore)
    shutil.copy(os.path.join(ROOT, "hubconf.py"), checkout / "hubconf.py")
    return str(checkout)


def _run(checkout: str, root: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH="")
    return subprocess.run([sys.executable, "-c", _SCRIPT, checkout, root], env=env, capture_output=True,
                          text=True, timeout=300, cwd=checkout)


def test_hub_loads_fused_models_with_the_checkouts_kernels(tmp_path):
    pytest.importorskip("triton")
    result = _run(_checkout(tmp_path), ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert "'triton': True" in lines["backends"] and lines["fallbacks"] == "{}"
    assert float(lines["error"]) < 1e-5 and lines["r3d_18"] == "VideoResNet"
    assert lines["listed"] == "True"  # every zoo model is a hub entry point


def test_without_the_finder_a_checkout_lacks_its_kernels(tmp_path):
    """The control: the same checkout without hubconf's finder cannot import c3dzoo.kernels (so the
    test above is not passing on an installed copy)."""
    checkout = _checkout(tmp_path)
    hubconf = os.path.join(checkout, "hubconf.py")
    with open(hubconf) as f:
        text = f.read()
    with open(hubconf, "w") as f:
        f.write(text.replace("sys.meta_path.insert(0, _CheckoutKernels())", "pass"))
    result = _run(checkout, ROOT)
    assert result.returncode != 0 and "No module named 'c3dzoo.kernels'" in result.stderr, result.stderr[-2000:]
