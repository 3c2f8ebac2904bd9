"""c3dzoo.fuse and the drop-in Conv3dBNAct module."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct, Conv3dBNReLU, FusedChain
from parity import assert_parity
from twins import assert_same_state


class FunctionalForms(nn.Module):
    """Chains written with functional activations/pools, plus one whose conv output is reused."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 4, 3, padding=1)
        self.a_bn = nn.BatchNorm3d(4)
        self.b = nn.Conv3d(4, 5, 3, padding=1)
        self.b_bn = nn.BatchNorm3d(5)
        self.c = nn.Conv3d(5, 5, (1, 3, 3), padding=(0, 1, 1))
        self.c_bn = nn.BatchNorm3d(5)
        self.c_act = nn.LeakyReLU(0.2)
        self.unused_head = nn.Linear(3, 3)  # holds state, never called: must survive fuse()

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.a_bn(self.a(x))), (1, 2, 2), (1, 2, 2))
        y = self.b(x)
        x = torch.relu(self.b_bn(y)) + y  # the conv output is used twice: this chain must stay stock
        return self.c_act(self.c_bn(self.c(x)))


def _reference_pair(model):
    fused = c3dzoo.fuse(copy.deepcopy(model))
    return fused, copy.deepcopy(model).double()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fuse_functional_forms_and_shared_values(mode):
    torch.manual_seed(0)
    model = FunctionalForms()
    fused = c3dzoo.fuse(copy.deepcopy(model))
    assert fused.c3dzoo_fused_chains == 2  # a (relu + F.max_pool3d) and c (LeakyReLU); b stays stock
    chains = [m for m in fused.modules() if isinstance(m, FusedChain)]
    assert sorted(c.activation for c in chains) == ["leaky_relu", "relu"]
    assert set(fused.state_dict()) == set(model.state_dict())
    ref = copy.deepcopy(model).double()
    for m in (model, fused, ref):
        m.train(mode == "train")
    x = torch.randn(2, 3, 4, 8, 8)
    assert_parity(fused(x), model(x), ref(x.double()), torch.float32, "output")
    for name, buf in ref.named_buffers():
        if not name.endswith("num_batches_tracked"):
            assert_parity(dict(fused.named_buffers())[name], dict(model.named_buffers())[name], buf,
                          torch.float32, name)


def test_fuse_shares_parameters_and_follows_train_eval():
    model = FunctionalForms()
    fused = c3dzoo.fuse(model)
    assert fused.a.weight is model.a.weight  # shared with the input model, as fx.symbolic_trace does
    fused.eval()
    assert not fused.a_bn.training
    before = fused.a_bn.running_mean.clone()
    fused(torch.randn(1, 3, 4, 8, 8))
    assert torch.equal(before, fused.a_bn.running_mean)  # eval: statistics untouched
    fused.train()
    fused(torch.randn(2, 3, 4, 8, 8))
    assert not torch.equal(before, fused.a_bn.running_mean)


def test_fuse_checkpoint_round_trip():
    model = FunctionalForms()
    fused = c3dzoo.fuse(copy.deepcopy(model))
    fresh = FunctionalForms()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(model.state_dict(), strict=True)


def test_fuse_keeps_unfusable_pool_stock():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(),
                          nn.MaxPool3d(2, ceil_mode=True))
    fused = c3dzoo.fuse(copy.deepcopy(model))
    assert fused.c3dzoo_fused_chains == 1
    chain = next(m for m in fused.modules() if isinstance(m, FusedChain))
    # the ceil_mode pool runs stock after the fused chain
    assert "MaxPool3d" not in chain.description and chain.pool is None
    call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target.startswith("c3dzoo_fused"))
    assert call.args[3] is None  # (x, conv, bn, pool, activation module)
    model.eval(), fused.eval()
    x = torch.randn(1, 2, 5, 5, 5)
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_rejects_untraceable_models():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    with pytest.raises(TypeError, match="cannot be traced by torch.fx"):
        c3dzoo.fuse(Untraceable())
    with pytest.raises(TypeError, match="takes an nn.Module"):
        c3dzoo.fuse(lambda x: x)


def test_conv3d_bn_act_module_is_drop_in():
    torch.manual_seed(0)
    module = Conv3dBNReLU(3, 4, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0))
    assert Conv3dBNReLU is Conv3dBNAct
    assert isinstance(module.conv, nn.Conv3d) and isinstance(module.bn, nn.BatchNorm3d)
    assert isinstance(module.pool, nn.MaxPool3d)
    assert set(module.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    }
    stock = nn.Sequential(copy.deepcopy(module.conv), copy.deepcopy(module.bn), nn.ReLU(), module.pool)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(2, 3, 4, 6, 6)
    torch.testing.assert_close(module(x), stock(x))
    before = module.conv.weight.detach().clone()
    module(x).sum().backward()
    opt.step()
    assert not torch.equal(before, module.conv.weight)
    # a frozen BN in a training module uses and keeps its running statistics
    module.train()
    module.bn.eval()
    stats = module.bn.running_mean.clone()
    stock[1].load_state_dict(module.bn.state_dict())
    stock[0].load_state_dict(module.conv.state_dict())
    stock[1].eval()
    # the frozen BN is folded into the conv weight (fp32 rounding of the product, not of a BN pass):
    # after the SGD step on a sum loss the outputs reach the hundreds, so allow rounding of that size
    torch.testing.assert_close(module(x), stock(x), rtol=2e-5, atol=1e-4)
    assert torch.equal(stats, module.bn.running_mean)


def test_conv_without_bn_fuses_activation_and_pool():
    module = Conv3dBNAct(3, 4, 3, padding=1, batch_norm=False, activation="leaky_relu",
                         negative_slope=0.3, pool=((2, 2, 2), (2, 2, 2), 0))
    assert module.bn is None
    x = torch.randn(1, 3, 4, 6, 6)
    expected = F.max_pool3d(F.leaky_relu(module.conv(x), 0.3), 2)
    torch.testing.assert_close(module(x), expected)


class _FrozenBN(nn.BatchNorm3d):
    """Normalises with its running statistics whatever the training flag (a common fine-tuning
    module): not what nn.BatchNorm3d computes in train mode."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _ClippedReLU(nn.ReLU):
    def forward(self, x):
        return x.clamp(0.0, 0.5)


class _AvgOfMaxPool(nn.MaxPool3d):
    def forward(self, x):
        return 0.5 * super().forward(x)


class _Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.a_bn = nn.Conv3d(3, 4, 3, padding=1), _FrozenBN(4)
        self.b, self.b_bn, self.b_act = nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), _ClippedReLU()
        self.c, self.c_bn, self.c_pool = nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), _AvgOfMaxPool(2)

    def forward(self, x):
        x = torch.relu(self.a_bn(self.a(x)))
        x = self.b_act(self.b_bn(self.b(x)))
        return self.c_pool(torch.relu(self.c_bn(self.c(x))))


@pytest.mark.parametrize("how", ["fuse", "zoo_block"])
def test_subclasses_that_override_forward_are_not_fused_as_their_base(how):
    """A BatchNorm3d / ReLU / MaxPool3d subclass with its own forward computes something else: its
    chain must run it (stock), not the base class's fused arithmetic."""
    torch.manual_seed(0)
    if how == "fuse":
        stock = _Subclassed().train()
        with torch.no_grad():
            stock.a_bn.running_mean.uniform_(-0.5, 0.5)
        fused = c3dzoo.fuse(copy.deepcopy(stock))
        shape = (2, 3, 4, 6, 6)
    else:  # the zoo models' Sequential blocks (run_chained), e.g. a fine-tuned R3D with frozen BNs
        stock = c3dzoo.r3d_18(num_classes=3).train()
        block = stock.layer1[0]
        frozen = _FrozenBN(block.conv1[1].num_features)
        frozen.load_state_dict(block.conv1[1].state_dict())
        with torch.no_grad():
            frozen.running_mean.uniform_(-0.5, 0.5)
        block.conv1[1] = frozen
        block.conv1[2] = _ClippedReLU()
        fused = copy.deepcopy(stock)
        fused.fused = True
        shape = (2, 3, 4, 32, 32)
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-5, atol=1e-6)
    if how == "fuse":
        # torch.fx traces into the subclasses' own forwards (they are not torch.nn leaves): b's
        # conv → BN fuses and its ReLU subclass runs after it, c's pool subclass calls F.max_pool3d,
        # which fuses, and scales after; a's BN subclass calls F.batch_norm, which does not
        assert fused.c3dzoo_fused_chains == 2


def test_from_modules_refuses_a_subclass_that_overrides_forward():
    with pytest.raises(ValueError, match="overrides forward"):
        Conv3dBNAct.from_modules(nn.Conv3d(3, 4, 3), _FrozenBN(4))
    with pytest.raises(ValueError, match="overrides forward"):
        Conv3dBNAct.from_modules(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), pool=_AvgOfMaxPool(2))
    with pytest.raises(ValueError, match="override forward"):
        Conv3dBNAct.from_modules(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), activation=_ClippedReLU())


def test_fused_models_trace_as_the_stock_graph():
    """torch.fx symbolic tracing of a fused module or model (FX passes, torchvision-style feature
    extraction, fuse() of a fused model) records the stock modules' calls: it used to fail inside
    the fused op ("x must be a torch.Tensor, got Proxy")."""
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 4, 3, padding=1, pool=nn.MaxPool3d((1, 2, 2))).eval()
    traced = torch.fx.symbolic_trace(layer)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert called == ["conv", "bn", "pool"], called
    x = torch.randn(2, 3, 4, 6, 6)
    torch.testing.assert_close(traced(x), layer(x))

    model = FunctionalForms().eval()
    once = c3dzoo.fuse(copy.deepcopy(model))
    twice = c3dzoo.fuse(once)
    assert twice.c3dzoo_fused_chains == once.c3dzoo_fused_chains == 2
    torch.testing.assert_close(twice(torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
                               model(torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fuse_takes_a_fused_zoo_model(mode):
    torch.manual_seed(0)
    zoo = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32), fused=True).train(mode == "train")
    for module in zoo.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    rewritten = c3dzoo.fuse(copy.deepcopy(zoo))
    assert rewritten.c3dzoo_fused_chains == 8  # conv1 .. conv5b
    assert list(rewritten.state_dict()) == list(zoo.state_dict())
    x = torch.randn(2, 3, 16, 32, 32)
    expected, got = zoo(x), rewritten(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if mode == "train":
        expected.sum().backward()
        got.sum().backward()
        assert_same_state(rewritten, zoo, rtol=1e-4, atol=1e-4, buffers=False)
        assert_same_state(rewritten, zoo, rtol=1e-5, atol=1e-6, grads=False)


@pytest.mark.parametrize("name", c3dzoo.list_models())
def test_traced_and_fused_zoo_models_pickle(name):
    """``torch.save`` of a whole fx-traced or ``fuse()``d zoo model (as one saves a traced torchvision
    model) failed: the model files' postponed annotations (``from __future__ import annotations``)
    put the string "torch.Tensor" where fx's pickling expects a type."""
    model = c3dzoo.get_model(name).eval()
    for graph_module in (torch.fx.symbolic_trace(model), c3dzoo.fuse(model)):
        buffer = io.BytesIO()
        torch.save(graph_module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        calls = [sorted(n.target for n in gm.graph.nodes if n.op == "call_module") for gm in (loaded, graph_module)]
        assert calls[0] == calls[1]
        assert loaded.state_dict().keys() == model.state_dict().keys()


def test_pickled_fused_model_computes_the_same():
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32)).eval()
    fused = c3dzoo.fuse(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.c3dzoo_fused_chains == fused.c3dzoo_fused_chains == 8
    x = torch.randn(2, 3, 16, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


class SiLUForms(nn.Module):
    """X3D's swish written as a module and as F.silu, after a dense and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.a, self.a_bn, self.a_act = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.SiLU()
        self.b, self.b_bn = nn.Conv3d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm3d(4)

    def forward(self, x):
        return F.silu(self.b_bn(self.b(self.a_act(self.a_bn(self.a(x))))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fuse_takes_silu_chains(mode):
    torch.manual_seed(0)
    model = SiLUForms()
    fused = c3dzoo.fuse(copy.deepcopy(model))
    chains = [m for m in fused.modules() if isinstance(m, FusedChain)]
    assert [c.activation for c in chains] == ["silu", "silu"]
    ref = copy.deepcopy(model).double()
    for m in (model, fused, ref):
        m.train(mode == "train")
    x = torch.randn(2, 3, 4, 6, 6)
    assert_parity(fused(x), model(x), ref(x.double()), torch.float32, "output")
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
