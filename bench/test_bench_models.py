"""Whole-model benchmarks: C3D-BN and R3D-18, inference (eval mode) and one SGD training step
(forward, cross-entropy, backward, optimizer step), for each contestant of bench/_harness.py."""

from __future__ import annotations

import pytest

import _harness as H

pytestmark = H.BENCH_MARK


@pytest.mark.parametrize("contestant", H.contestant_names())
@pytest.mark.parametrize("mode", H.MODES)
@pytest.mark.parametrize("model", H.MODELS)
def test_model(benchmark, request, model, mode, contestant):
    c = H.CONTESTANTS[contestant]
    reason = H.skip_reason(c)
    if reason:  # before building anything
        pytest.skip(reason)
    try:
        case = H.model_case(model, mode)
    except Exception as exc:  # e.g. a zoo model whose module fails to import
        pytest.skip(f"{model} cannot be built: {type(exc).__name__}: {exc}")
    H.run(benchmark, request, case, c)
