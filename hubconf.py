"""torch.hub entry points: the zoo's builders, with the fused kernels.

    model = torch.hub.load("<owner>/c3dzoo", "c3d_bn", fused=True, num_classes=101)
    torch.hub.list("<owner>/c3dzoo")  # c3d_bn, c3d, ..., x3d_l: c3dzoo.list_models()

A hub checkout is a source tree, not an installed package: ``pip install`` places the top-level
``kernels/`` folder at ``c3dzoo.kernels``, so here an import finder does the same for the c3dzoo
of this checkout. The CUDA C++ extension is not built in a checkout: its backend reports why it is
unavailable and the Triton and reference backends serve (``c3dzoo.backends()``).
"""

import importlib.abc
import importlib.util
import os
import sys

dependencies = ["torch", "numpy"]

_ROOT = os.path.dirname(os.path.abspath(__file__))
_KERNELS = "c3dzoo.kernels"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """``c3dzoo.kernels[.x]`` from this checkout's ``kernels/``, while ``c3dzoo`` is this checkout's."""

    root = _ROOT  # torch.hub imports this file anew on every load: one finder per checkout

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _KERNELS and not fullname.startswith(_KERNELS + "."):
            return None
        package = sys.modules.get("c3dzoo")
        if package is None or not os.path.abspath(getattr(package, "__file__", "") or "").startswith(_ROOT + os.sep):
            return None  # an installed c3dzoo maps its own kernels
        parts = fullname.split(".")[2:]
        folder = os.path.join(_ROOT, "kernels", *parts)
        if os.path.isfile(os.path.join(folder, "__init__.py")):
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        if os.path.isfile(folder + ".py"):
            return importlib.util.spec_from_file_location(fullname, folder + ".py")
        return None


if not any(getattr(finder, "root", None) == _ROOT for finder in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutKernels())

from c3dzoo.models import (c2d_r50, c3d, c3d_bn, csn_r101, i3d_r50, jester_convcolumn, mc3_18,  # noqa: E402
                           r2plus1d_18, r2plus1d_34, r2plus1d_r50, r3d_18, s3d, slow_r50, slowfast_r50,
                           slowfast_r101, slowfast_16x8_r101_50_50, x3d_l, x3d_m, x3d_s, x3d_xs)

__all__ = ["c2d_r50", "c3d", "c3d_bn", "csn_r101", "i3d_r50", "jester_convcolumn", "mc3_18", "r2plus1d_18",
           "r2plus1d_34", "r2plus1d_r50", "r3d_18", "s3d", "slow_r50", "slowfast_r50", "slowfast_r101",
           "slowfast_16x8_r101_50_50", "x3d_xs",
           "x3d_s", "x3d_m", "x3d_l"]
