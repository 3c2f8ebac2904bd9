"""Per-layer benchmarks: every C3D conv → BN → ReLU (→ pool), conv1 … conv5b, at the shape it sees
inside the network (GPU: batch 32 at 16×112×112; CPU: a narrow C3D at 16×32×32), inference (BN
folded, eval mode) and one training step (forward and backward; gradients of the weights and,
except for conv1, of the input), for each contestant of bench/_harness.py."""

from __future__ import annotations

import pytest

import _harness as H

pytestmark = H.BENCH_MARK

LAYERS = {spec.name: spec for spec in H.c3d_layer_specs()}


@pytest.mark.parametrize("contestant", H.contestant_names())
@pytest.mark.parametrize("mode", H.MODES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer(benchmark, request, layer, mode, contestant):
    H.run(benchmark, request, H.layer_case(LAYERS[layer], mode), H.CONTESTANTS[contestant])
