"""Running statistics keep the buffers' precision. ``momentum=None`` (a cumulative average, what
``torch.optim.swa_utils.update_bn`` sets) blends with 1/num_batches_tracked, which was the
reciprocal of the int64 counter: an fp32 number, so float64 buffers drifted from stock's by ~1e-9
(relative) from the third batch on."""

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct
from twins import assert_same_state

# float64 buffers of the same computation agree to rounding (~1e-16 relative); fp32-rounded
# factors (the defect) put them ~1e-9 apart
RTOL, ATOL = 1e-13, 1e-15


def _model_pair():
    torch.manual_seed(0)
    stock = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32)).double()
    fused = copy.deepcopy(stock)
    fused.fused = True
    return fused, stock


def test_update_bn_matches_stock_in_float64():
    """SWA's BN recalibration: reset statistics, momentum=None, one pass over a loader of 3 batches
    (factors 1, 1/2, 1/3; 1/3 is where fp32 rounding shows)."""
    fused, stock = _model_pair()
    loader = [torch.randn(2, 3, 16, 32, 32, dtype=torch.float64) for _ in range(3)]
    for model in (fused, stock):
        update_bn(loader, model)
    assert int(fused.conv1_bn.num_batches_tracked) == 3
    assert_same_state(fused, stock, rtol=RTOL, atol=ATOL, grads=False)


def test_averaged_model_of_fused_model_matches_stock():
    """``AveragedModel`` (a deep copy) of a fused model keeps it fused and recalibrates like stock."""
    fused, stock = _model_pair()
    loader = [torch.randn(2, 3, 16, 32, 32, dtype=torch.float64) for _ in range(3)]
    averaged = [AveragedModel(model) for model in (fused, stock)]
    assert averaged[0].module.fused
    for model in averaged:
        update_bn(loader, model)
    assert_same_state(averaged[0], averaged[1], rtol=RTOL, atol=ATOL, grads=False)
    x = loader[0]
    torch.testing.assert_close(averaged[0].eval()(x), averaged[1].eval()(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_traced_running_stats_keep_float64(momentum):
    """A ``torch.jit.trace``d training-mode layer (count taken from the traced shape, as a tensor)
    keeps float64 statistics too."""
    torch.manual_seed(0)
    fused = Conv3dBNAct(3, 5, 3, padding=1, momentum=momentum).double().train()
    stock = copy.deepcopy(fused)
    x = torch.randn(3, 3, 4, 6, 6, dtype=torch.float64)
    traced = torch.jit.trace(fused, (x,), check_trace=False)  # a training call: it counts
    stock_layers = torch.nn.Sequential(stock.conv, stock.bn, torch.nn.ReLU())
    stock_layers(x)
    for _ in range(3):
        xs = torch.randn(3, 3, 4, 6, 6, dtype=torch.float64)
        traced(xs)
        stock_layers(xs)
    assert_same_state(fused, stock, rtol=RTOL, atol=ATOL, grads=False)
