"""For tests that run the triton backend on CPU tensors: that takes the Triton interpreter, which the
test session turns on only on a machine without a GPU (conftest.py). On a GPU machine such tests
skip, saying so; their GPU counterparts run the compiled kernels on CUDA tensors."""

import pytest


def skip_unless_triton_runs_cpu_tensors() -> None:
    pytest.importorskip("triton")
    from c3dzoo.kernels.conv3d_bias_act_pool import runs_interpreted
    from c3dzoo.ops._registry import triton_cpu_unsupported_reason

    reason = triton_cpu_unsupported_reason(runs_interpreted)
    if reason is not None:
        pytest.skip(f"the triton backend cannot run CPU tensors here ({reason}); the tests turn the "
                    "interpreter on only on a machine without a GPU")
