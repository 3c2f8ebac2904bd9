"""For tests that run the triton backend on CPU tensors: that takes the Triton interpreter, which the
test session turns on only on a machine without a GPU (conftest.py). On a GPU machine such tests
skip, saying so; their GPU counterparts run the compiled kernels on CUDA tensors."""

import pytest


def skip_unless_triton_runs_cpu_tensors() -> None:
    pytest.importorskip("triton")
    from c3dzoo.kernels.conv3d_bias_act_pool import runs_interpreted
    from c3dzoo.ops._registry import triton_interpreter_enabled

    if not (triton_interpreter_enabled() and runs_interpreted()):
        pytest.skip("the triton backend runs CPU tensors under the Triton interpreter only, which the tests "
                    "turn on only on a machine without a GPU")
