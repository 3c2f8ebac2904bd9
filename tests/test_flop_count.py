"""torch.utils.flop_counter.FlopCounterMode (how users report a model's FLOPs) counts a fused model
as it counts the stock twin: the same total for a forward, and for the forward and backward of a
training step. (Per module the counts differ: a fused chain does not call its Conv3d child's forward.)"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import c3dzoo

SMALL = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=10)


class Chains(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 5, 3, padding=1)
        self.a_bn = nn.BatchNorm3d(5)
        self.a_pool = nn.MaxPool3d((1, 2, 2))
        self.b = nn.Conv3d(5, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.b_bn = nn.BatchNorm3d(4)

    def forward(self, x):
        x = self.a_pool(torch.relu(self.a_bn(self.a(x))))
        return torch.relu(self.b_bn(self.b(x)))


def _twins(kind):
    torch.manual_seed(0)
    if kind == "c3d_bn":
        stock = c3dzoo.c3d_bn(**SMALL)
        fused = c3dzoo.c3d_bn(fused=True, **SMALL)
        fused.load_state_dict(stock.state_dict())
        return stock, fused, torch.randn(2, 3, 16, 32, 32)
    stock = Chains()
    fused = c3dzoo.fuse(copy.deepcopy(stock))
    assert fused.c3dzoo_fused_chains == 2
    return stock, fused, torch.randn(2, 3, 4, 8, 8)


def _count(model, x, step):
    with FlopCounterMode(display=False) as counter:
        y = model(x)
        if step:
            y.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["c3d_bn", "fuse"])
@pytest.mark.parametrize("mode", ["eval", "train_step"])
def test_flop_counter_counts_the_fused_model_as_stock(kind, mode):
    stock, fused, x = _twins(kind)
    for model in (stock, fused):
        model.train(mode == "train_step")
    stock_total = _count(stock, x, mode == "train_step")
    fused_total = _count(fused, x, mode == "train_step")
    assert stock_total > 0
    assert fused_total == stock_total
