"""Facts read off PTX text, shared by the sm_90 compilation tests of the Triton and CUDA C++ kernels."""

from __future__ import annotations

import re
from typing import List

# atomic and reduction-to-memory instructions, optionally predicated: the order they land in, and so
# an fp32 sum's bits, changes from run to run
_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:atom|red)\.[\w.]+)", re.MULTILINE)


def atomics(ptx: str) -> List[str]:
    """The distinct atomic instructions in ``ptx`` (``[]`` for a kernel whose sums have a fixed order)."""
    return sorted(set(_ATOMIC.findall(ptx)))
