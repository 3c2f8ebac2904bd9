"""C3D / C3D-BN: fused models keep the stock state_dict and compute what the stock model computes."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import net2net
from parity import assert_parity

SMALL = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=5)


class OriginalC3DBN(nn.Module):
    """The "C3D with Batch Normalization" class as published (conv → BN → ReLU, pools, view(-1, 8192))."""

    def __init__(self, num_classes=101):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv1_bn = nn.BatchNorm3d(64)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.conv2 = nn.Conv3d(64, 128, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv2_bn = nn.BatchNorm3d(128)
        self.pool2 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv3a = nn.Conv3d(128, 256, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv3a_bn = nn.BatchNorm3d(256)
        self.conv3b = nn.Conv3d(256, 256, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv3b_bn = nn.BatchNorm3d(256)
        self.pool3 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv4a = nn.Conv3d(256, 512, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv4a_bn = nn.BatchNorm3d(512)
        self.conv4b = nn.Conv3d(512, 512, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv4b_bn = nn.BatchNorm3d(512)
        self.pool4 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv5a = nn.Conv3d(512, 512, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv5a_bn = nn.BatchNorm3d(512)
        self.conv5b = nn.Conv3d(512, 512, kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv5b_bn = nn.BatchNorm3d(512)
        self.pool5 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 1, 1))
        self.fc6 = nn.Linear(8192, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.pool1(self.relu(self.conv1_bn(self.conv1(x))))
        x = self.pool2(self.relu(self.conv2_bn(self.conv2(x))))
        x = self.relu(self.conv3a_bn(self.conv3a(x)))
        x = self.pool3(self.relu(self.conv3b_bn(self.conv3b(x))))
        x = self.relu(self.conv4a_bn(self.conv4a(x)))
        x = self.pool4(self.relu(self.conv4b_bn(self.conv4b(x))))
        x = self.relu(self.conv5a_bn(self.conv5a(x)))
        x = self.pool5(self.relu(self.conv5b_bn(self.conv5b(x))))
        x = x.view(-1, 8192)
        x = self.relu(self.fc6(x))
        x = self.relu(self.fc7(x))
        return self.fc8(x)


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_original_checkpoint_loads_strict_both_ways():
    original = OriginalC3DBN()
    _randomise_bn(original)
    fused = c3dzoo.c3d_bn(fused=True)
    fused.load_state_dict(original.state_dict(), strict=True)
    back = OriginalC3DBN()
    back.load_state_dict(fused.state_dict(), strict=True)
    for key, value in original.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    assert list(fused.state_dict()) == list(c3dzoo.c3d_bn(fused=False).state_dict())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in original.parameters())


def test_full_size_fused_matches_original_in_eval():
    torch.manual_seed(0)
    original = OriginalC3DBN().eval()
    _randomise_bn(original)
    fused = c3dzoo.c3d_bn(fused=True).eval()
    fused.load_state_dict(original.state_dict())
    x = torch.randn(1, 3, 16, 112, 112)
    with torch.no_grad():
        ref = copy.deepcopy(original).double()(x.double())
        assert_parity(fused(x), original(x), ref, torch.float32, "logits")
        fx = c3dzoo.fuse(original)
        assert fx.c3dzoo_fused_chains == 8
        assert_parity(fx(x), original(x), ref, torch.float32, "logits of fuse(original)")
    assert set(fx.state_dict()) == set(original.state_dict())


def _set_mode(model, mode):
    model.train(mode != "eval")
    if mode == "train_frozen_bn":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eval()


@pytest.mark.parametrize("mode", ["train", "eval", "train_frozen_bn"])
@pytest.mark.parametrize("builder", ["c3d_bn", "c3d"])
def test_small_model_parity(builder, mode):
    torch.manual_seed(0)
    stock = c3dzoo.get_model(builder, **SMALL, dropout=0.0)
    _randomise_bn(stock)
    fused = c3dzoo.get_model(builder, **SMALL, dropout=0.0, fused=True)
    fused.load_state_dict(stock.state_dict(), strict=True)
    ref = copy.deepcopy(stock).double()
    for m in (stock, fused, ref):
        _set_mode(m, mode)
    x = torch.randn(3, 3, 16, 32, 32)
    outs, grads = [], []
    for model, inp in ((fused, x), (stock, x), (ref, x.double())):
        inp = inp.clone().requires_grad_(True)
        out = model(inp)
        out.square().sum().backward()
        outs.append(out)
        grads.append({"input": inp.grad, **{n: p.grad for n, p in model.named_parameters()}})
    assert_parity(*outs, torch.float32, "logits")
    for key in grads[2]:
        assert_parity(grads[0][key], grads[1][key], grads[2][key], torch.float32, f"grad {key}")
    buffers = [dict(m.named_buffers()) for m in (fused, stock, ref)]
    for key in buffers[2]:
        if key.endswith("num_batches_tracked"):
            assert buffers[0][key].item() == buffers[1][key].item(), key
        else:
            assert_parity(buffers[0][key], buffers[1][key], buffers[2][key], torch.float32, key)


def test_three_sgd_momentum_steps_match_stock():
    torch.manual_seed(1)
    stock = c3dzoo.c3d_bn(**SMALL)
    fused = c3dzoo.c3d_bn(**SMALL, fused=True)
    fused.load_state_dict(stock.state_dict())
    ref = copy.deepcopy(stock).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, stock, ref)]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(4, 3, 16, 32, 32, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        for model, opt, inp in zip((fused, stock, ref), opts, (x, x, x.double())):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inp), y).backward()
            opt.step()
    states = [m.state_dict() for m in (fused, stock, ref)]
    for key in states[2]:
        if key.endswith("num_batches_tracked"):
            assert states[0][key].item() == states[1][key].item() == 3
        else:
            assert_parity(states[0][key], states[1][key], states[2][key], torch.float32, key)


def test_fused_flag_changes_nothing_but_compute():
    model = c3dzoo.c3d_bn(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fused = True
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 32, 32))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_c3d_port_keys():
    keys = set(c3dzoo.c3d().state_dict())
    expected = {f"{name}.{p}" for name in ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b",
                                            "conv5a", "conv5b", "fc6", "fc7", "fc8") for p in ("weight", "bias")}
    assert keys == expected
    assert c3dzoo.c3d().fc8.out_features == 487
    assert c3dzoo.c3d().fc6.in_features == 8192


def test_optical_flow_stream_with_two_input_channels():
    """A two-stream model's flow stream: ``in_channels=2`` at build time, or conv1 replaced by a
    2-channel conv afterwards; the fused model takes 2-channel clips as the stock one does, and a
    3-channel clip gets an error naming the expected shape."""
    torch.manual_seed(0)
    built = c3dzoo.c3d_bn(**SMALL, in_channels=2, fused=True)
    edited = c3dzoo.c3d_bn(**SMALL, fused=True)
    edited.conv1 = torch.nn.Conv3d(2, edited.conv1.out_channels, 3, padding=1)
    x = torch.randn(2, 2, *SMALL["input_size"])
    for fused in (built, edited):
        stock = copy.deepcopy(fused)
        stock.fused = False
        fused.eval(), stock.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"expects input of shape \(N, 2, 16, 32, 32\)"):
            fused(torch.randn(1, 3, *SMALL["input_size"]))
    net2net.deeper(edited, "conv1", data=x)  # its probe takes the model's own input shape
    assert tuple(built.state_dict()["conv1.weight"].shape[:2]) == (8, 2)
