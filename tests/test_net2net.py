"""Net2Net wider/deeper: function preservation, BN statistics, gradients, optimizer state, errors."""

import copy

import pytest
import torch
from torch import nn

from c3dzoo import net2net
from c3dzoo.models.c3d_family import _POOL_NAMES, C3D, c3d, c3d_bn
from c3dzoo.models.jester import INPUT_SIZE as JESTER_SIZE
from c3dzoo.models.jester import jester_convcolumn
from c3dzoo.models.resnet3d import ResStage, csn_r101, i3d_r50, r2plus1d_r50, slow_r50, slowfast_r50
from c3dzoo.models.separable_inception import s3d
from c3dzoo.models.video_resnet import mc3_18, r2plus1d_18, r3d_18
from c3dzoo.ops.net2net_remap import (
    dirac_,
    divide_incoming,
    gather_units,
    replica_counts,
    replica_mapping,
)

SMALL = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=5)


def small_c3d_bn(**kw):
    return c3d_bn(**{**SMALL, **kw})


def clip(seed=0, n=2, size=SMALL["input_size"]):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def assert_same(actual, expected, rtol=1e-5):
    """Equal within ``rtol`` relative to the size of ``expected``."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def units(model, layer):
    m = model.get_submodule(layer)
    return m.out_channels if isinstance(m, nn.Conv3d) else m.out_features


def randomize_bn(model, seed=0):
    """Non-trivial BN parameters and running statistics, so copying them wrongly shows."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def snapshot(model, optimizer=None):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    extra = (tuple(getattr(model, "layer_names", ())), dict(model.named_modules()).keys())
    opt = None
    if optimizer is not None:
        opt = ([list(g["params"]) for g in optimizer.param_groups],
               {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for p, s in optimizer.state.items()})
    return state, tuple(extra[0]), list(extra[1]), opt


def assert_unchanged(before, model, optimizer=None):
    state, names, modules, opt = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k in state:
        assert torch.equal(after[k], state[k]), k
    assert tuple(getattr(model, "layer_names", ())) == names
    assert list(dict(model.named_modules()).keys()) == modules
    if optimizer is not None:
        groups, st = opt
        assert [list(g["params"]) for g in optimizer.param_groups] == groups
        assert set(optimizer.state.keys()) == set(st.keys())
        for p, s in st.items():
            for k, v in s.items():
                assert torch.equal(optimizer.state[p][k], v) if torch.is_tensor(v) else optimizer.state[p][k] == v


# --------------------------------------------------------------------------------------------
# remap primitives
# --------------------------------------------------------------------------------------------


def test_replica_mapping_and_counts():
    g = replica_mapping(5, 12, gen(3))
    assert g.dtype == torch.int64 and g.shape == (12,)
    assert torch.equal(g[:5], torch.arange(5))
    assert int(g[5:].min()) >= 0 and int(g[5:].max()) < 5
    assert torch.equal(g, replica_mapping(5, 12, gen(3)))  # reproducible from the generator
    counts = replica_counts(g, 5)
    assert counts.shape == (5,) and int(counts.sum()) == 12 and int(counts.min()) >= 1
    with pytest.raises(ValueError):
        replica_mapping(5, 4)


def test_gather_and_divide_match_a_loop():
    g = torch.tensor([0, 1, 2, 1, 1, 0])
    counts = replica_counts(g, 3)
    t = torch.randn(4, 3 * 2, 5)  # 3 channels × group 2 along dim 1
    out = divide_incoming(t, g, counts, dim=1, group=2)
    expect = torch.stack([t[:, 2 * g[j] + k] / counts[g[j]] for j in range(6) for k in range(2)], 1)
    torch.testing.assert_close(out, expect)
    sq = divide_incoming(t, g, counts, dim=1, group=2, power=2)
    expect_sq = torch.stack([t[:, 2 * g[j] + k] / counts[g[j]] ** 2 for j in range(6) for k in range(2)], 1)
    torch.testing.assert_close(sq, expect_sq)
    w = torch.randn(3, 4, 2)
    torch.testing.assert_close(gather_units(w, g, 0), torch.stack([w[i] for i in g]))


@pytest.mark.parametrize("kernel,padding", [(3, 1), ((1, 3, 3), (0, 1, 1)), ((3, 1, 1), (1, 0, 0)), (5, 2)])
def test_dirac_is_identity(kernel, padding):
    conv = nn.Conv3d(4, 4, kernel, padding=padding, bias=False)
    dirac_(conv.weight.data)
    x = torch.randn(2, 4, 5, 6, 7)
    torch.testing.assert_close(conv(x), x)


# --------------------------------------------------------------------------------------------
# wider: function preservation
# --------------------------------------------------------------------------------------------


def small_c3d(**kw):
    return c3d(**{**SMALL, **kw})


@pytest.mark.parametrize("builder,fused", [(small_c3d_bn, False), (small_c3d_bn, True), (small_c3d, False)],
                         ids=["c3d_bn", "c3d_bn-fused", "c3d"])
def test_wider_every_c3d_layer_eval(builder, fused):
    torch.manual_seed(0)
    model = randomize_bn(builder(fused=fused)).eval()
    x = clip(n=1)
    with torch.no_grad():
        expected = model(x)
    layers = net2net.widenable_layers(model)
    assert layers == ["conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b", "fc6", "fc7"]
    for i, layer in enumerate(layers):
        net2net.wider(model, layer, units(model, layer) + 3 + i, generator=gen(i))
        with torch.no_grad():
            assert_same(model(x), expected)


def test_wider_train_mode_and_bn_statistics():
    torch.manual_seed(0)
    base = randomize_bn(small_c3d_bn())
    grown = copy.deepcopy(base)
    mappings = {}
    for i, layer in enumerate(net2net.widenable_layers(grown)):
        old = units(grown, layer)
        net2net.wider(grown, layer, old + 5, generator=gen(i))
        mappings[layer] = replica_mapping(old, old + 5, gen(i))
    x = clip()
    base.train(), grown.train()
    assert_same(grown(x), base(x))  # replicas have identical batch statistics
    # after that train step every replica's running statistics are its original's
    for layer in base.layer_names:
        b, gr = getattr(base, layer + "_bn"), getattr(grown, layer + "_bn")
        for stat in ("running_mean", "running_var", "weight", "bias"):
            assert_same(getattr(gr, stat), getattr(b, stat)[mappings[layer]])
        assert int(gr.num_batches_tracked) == int(b.num_batches_tracked)


def test_wider_jester_every_layer():
    torch.manual_seed(0)
    model = randomize_bn(jester_convcolumn(num_classes=5)).eval()
    model.drop.p = 0.0  # dropout masks differ between replicas; everything else is deterministic
    x = torch.randn(2, 3, *JESTER_SIZE, generator=gen(0))
    with torch.no_grad():
        expected = model(x[:1])
    reference = copy.deepcopy(model)
    layers = net2net.widenable_layers(model)
    assert layers[-3:] == ["conv_layer5", "fc5", "fc6"] and "conv_layer1.3" in layers
    for i, layer in enumerate(layers):
        net2net.wider(model, layer, units(model, layer) + 2, generator=gen(i))
    assert model.batch0.num_features == 514 and model.fc6.in_features == 514
    assert model.conv_layer1[1].num_features == model.conv_layer1[0].out_channels == 34
    with torch.no_grad():
        assert_same(model(x[:1]), expected)
        # train mode: BatchNorm1d over a batch of 2 normalises by a near-zero variance for some
        # features, amplifying float32 rounding up to 1/sqrt(eps)-fold, so compare in float64
        model.double().train(), reference.double().train()
        assert_same(model(x.double()), reference(x.double()))


RESNETS = {"r3d_18": r3d_18, "mc3_18": mc3_18, "r2plus1d_18": r2plus1d_18}


@pytest.mark.parametrize("name", list(RESNETS))
def test_wider_resnet_inner_convs(name):
    torch.manual_seed(0)
    model = randomize_bn(RESNETS[name](num_classes=5, fused=(name == "r2plus1d_18"))).eval()
    x = torch.randn(1, 3, 4, 16, 16, generator=gen(0))
    with torch.no_grad():
        expected = model(x)
    layers = net2net.widenable_layers(model)
    inner = {"r3d_18": 8, "mc3_18": 8, "r2plus1d_18": 25}[name]  # + R(2+1)D's stem.0 and midplanes convs
    assert len(layers) == inner and ("layer1.0.conv1.0" in layers or "layer1.0.conv1.0.0" in layers)
    # one check after growing every layer (a forward costs ~1 s here): a wrong rewrite cannot cancel out
    for i, layer in enumerate(layers):
        net2net.wider(model, layer, units(model, layer) + 2, generator=gen(i))
    with torch.no_grad():
        assert_same(model(x), expected)


def test_wider_residual_tied_raises():
    model = r3d_18(num_classes=5)
    before = snapshot(model)
    for layer, tied in [("layer1.0.conv2.0", "stem.0"), ("stem.0", "layer1.1.conv2.0"),
                        ("layer2.0.downsample.0", "layer2.0.conv2.0"),
                        ("layer3.1.conv2.0", "layer3.0.downsample.0")]:
        with pytest.raises(ValueError, match="residual") as info:
            net2net.wider(model, layer, 600)
        assert tied in str(info.value)
    with pytest.raises(ValueError, match="output layer"):
        net2net.wider(model, "fc", 600)
    assert_unchanged(before, model)


# --------------------------------------------------------------------------------------------
# wider: gradients, noise, state_dict, repeated growth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,consumer", [("conv3a", "conv3b"), ("conv5b", "fc6"), ("fc6", "fc7")])
def test_wider_gradients_follow_replication(layer, consumer):
    torch.manual_seed(0)
    base = randomize_bn(small_c3d_bn()).train()
    grown = copy.deepcopy(base)
    old = units(base, layer)
    net2net.wider(grown, layer, old + 4, generator=gen(7))
    g = replica_mapping(old, old + 4, gen(7))
    counts = replica_counts(g, old)[g]
    x = clip()
    base(x).square().sum().backward()
    grown(x).square().sum().backward()
    p, pg = base.get_submodule(layer), grown.get_submodule(layer)
    shape = (-1,) + (1,) * (p.weight.dim() - 1)
    # a replica's output gets 1/count of its original's downstream weight, so 1/count of its gradient
    assert_same(pg.weight.grad, p.weight.grad[g] / counts.view(shape), rtol=1e-4)
    if layer + "_bn" in dict(base.named_modules()):
        # (a conv bias before a train-mode BN has zero gradient: nothing to compare there)
        assert_same(getattr(grown, layer + "_bn").weight.grad, getattr(base, layer + "_bn").weight.grad[g] / counts,
                    rtol=1e-4)
    else:
        assert_same(pg.bias.grad, p.bias.grad[g] / counts, rtol=1e-4)
    # each divided incoming weight sees its original's input, so gets its original's gradient
    c, cg = base.get_submodule(consumer), grown.get_submodule(consumer)
    group = c.weight.shape[1] // old
    expected = c.weight.grad.reshape(c.weight.shape[0], old, group, -1)[:, g].reshape(cg.weight.shape)
    assert_same(cg.weight.grad, expected, rtol=1e-4)
    if consumer + "_bn" not in dict(base.named_modules()):
        assert_same(cg.bias.grad, c.bias.grad, rtol=1e-4)


def test_wider_noise_only_on_replicas():
    torch.manual_seed(0)
    base = randomize_bn(small_c3d_bn()).eval()
    exact = copy.deepcopy(base)
    noisy = copy.deepcopy(base)
    old = units(base, "conv3a")
    net2net.wider(exact, "conv3a", old + 6, generator=gen(2))
    net2net.wider(noisy, "conv3a", old + 6, noise=0.1, generator=gen(2))
    assert torch.equal(noisy.conv3a.weight[:old], base.conv3a.weight)
    assert not torch.equal(noisy.conv3a.weight[old:], exact.conv3a.weight[old:])
    # the rest of the rewrite is the exact one (noise does not change the mapping)
    for key, value in exact.state_dict().items():
        if key != "conv3a.weight":
            assert torch.equal(noisy.state_dict()[key], value), key
    x = clip()
    with torch.no_grad():
        assert not torch.allclose(noisy(x), base(x), rtol=1e-6, atol=0)


def test_state_dict_round_trip_and_repeated_growth():
    torch.manual_seed(0)

    def grow(model, seed):
        net2net.wider(model, "conv3a", units(model, "conv3a") + 3, generator=gen(seed))
        net2net.wider(model, "conv3a", units(model, "conv3a") + 5, generator=gen(seed + 1))  # twice in a row
        net2net.deeper(model, "conv4a")  # inserts conv4c between conv4a and conv4b
        net2net.wider(model, "conv4c", units(model, "conv4c") + 2, generator=gen(seed + 2))
        net2net.wider(model, "fc6", units(model, "fc6") + 7, generator=gen(seed + 3))
        return model

    base = randomize_bn(small_c3d_bn()).eval()
    x = clip()
    with torch.no_grad():
        expected = base(x)
        grown = grow(base, 10)
        assert grown.layer_names.index("conv4c") == grown.layer_names.index("conv4a") + 1
        assert_same(grown(x), expected)
        fresh = grow(small_c3d_bn(), 20).eval()
        assert fresh.state_dict().keys() == grown.state_dict().keys()
        fresh.load_state_dict(grown.state_dict())  # strict: same keys and shapes
        assert_same(fresh(x), expected)
    assert "conv4c.weight" in grown.state_dict() and "conv4c_bn.running_var" in grown.state_dict()


# --------------------------------------------------------------------------------------------
# deeper
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
def test_deeper_preserves_eval_and_train_with_data(fused):
    torch.manual_seed(0)
    base = randomize_bn(small_c3d_bn(fused=fused))
    x = clip()
    plain, fitted = copy.deepcopy(base), copy.deepcopy(base)
    net2net.deeper(plain, "conv3a")
    buffers = [b.clone() for b in fitted.buffers()]
    net2net.deeper(fitted, "conv5a", data=x)
    assert plain.layer_names[2:4] == ("conv3a", "conv3c") and fitted.layer_names[6:8] == ("conv5a", "conv5c")
    # estimating the statistics ran the model in train mode but left its buffers and modes alone
    assert all(torch.equal(a, b) for a, b in zip(buffers, list(fitted.buffers())[:len(buffers)]))
    assert fitted.conv5c_bn.training == fitted.conv5a_bn.training == base.training
    with torch.no_grad():
        base.eval(), plain.eval(), fitted.eval()
        expected = base(x)
        assert_same(plain(x), expected)
        assert_same(fitted(x), expected)
        base.train(), fitted.train()
        assert_same(fitted(x), base(x))  # the new BN is identity on the batch it was fitted on


def test_deeper_c3d_without_bn():
    torch.manual_seed(0)
    base = small_c3d().eval()
    grown = net2net.deeper(copy.deepcopy(base), "conv4a")
    assert not hasattr(grown, "conv4c_bn")
    x = clip()
    with torch.no_grad():
        assert_same(grown(x), base(x))


@pytest.mark.parametrize("after", ["conv1", "conv3b", "conv5b", "fc6", "fc7"])
def test_deeper_pooled_convs_and_fcs(after):
    torch.manual_seed(0)
    base = randomize_bn(C3D(5, batch_norm=True, width_mult=0.125, input_size=(16, 32, 32))).eval()
    grown = copy.deepcopy(base)
    x = clip()
    net2net.deeper(grown, after, data=x)
    new = {"conv1": "conv1a", "conv3b": "conv3c", "conv5b": "conv5c", "fc6": "fc6a", "fc7": "fc7a"}[after]
    if after.startswith("conv"):
        assert grown.pool_names[new] == _POOL_NAMES[after] and after not in grown.pool_names
        assert base.pool_names == _POOL_NAMES  # the original's table is not shared
    else:
        assert grown.fc_names == (("fc6", "fc6a", "fc7") if after == "fc6" else ("fc6", "fc7", "fc7a"))
    with torch.no_grad():
        assert_same(grown(x), base(x))
        # growing around the new layer uses the new order
        net2net.wider(grown, new, units(grown, new) + 3, generator=gen(0))
        assert_same(grown(x), base(x))
        # last: a train step updates the new BN's running statistics (unbiased variance), after
        # which eval mode is no longer exactly the original's
        base.train(), grown.train()
        assert_same(grown(x), base(x))


# --------------------------------------------------------------------------------------------
# optimizer state
# --------------------------------------------------------------------------------------------


def _train(model, optimizer, steps, seed=0):
    losses = []
    for s in range(steps):
        optimizer.zero_grad()
        loss = model(clip(seed + s)).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _zero_grad_step(model, optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()


@pytest.mark.parametrize("layer", ["conv3a", "conv5b", "fc6"])
def test_sgd_momentum_remap_is_consistent(layer):
    torch.manual_seed(0)
    model = randomize_bn(small_c3d_bn()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train(model, opt, 2)
    model_a, opt_a = copy.deepcopy((model, opt))
    model_b, opt_b = copy.deepcopy((model, opt))
    old = units(model, layer)
    net2net.wider(model_a, layer, old + 4, generator=gen(5), optimizer=opt_a)

    params = dict(model_a.named_parameters())
    assert {id(p) for g in opt_a.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    for p in params.values():
        assert opt_a.state[p]["momentum_buffer"].shape == p.shape
    g = replica_mapping(old, old + 4, gen(5))
    assert torch.equal(opt_a.state[params[layer + ".weight"]]["momentum_buffer"],
                       opt.state[dict(model.named_parameters())[layer + ".weight"]]["momentum_buffer"][g])

    # a momentum-only step after growth equals growing after that step: the buffers of divided
    # weights are divided like the weights, so the step moves the function as before
    _zero_grad_step(model_a, opt_a)
    _zero_grad_step(model_b, opt_b)
    net2net.wider(model_b, layer, old + 4, generator=gen(5))
    for key, value in model_b.state_dict().items():
        assert_same(model_a.state_dict()[key], value)

    losses = _train(model_a, opt_a, 2, seed=10)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_adam_moments_remap():
    torch.manual_seed(0)
    model = randomize_bn(small_c3d_bn()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    old = units(model, "conv5b")
    net2net.wider(model, "conv5b", old + 3, generator=gen(4), optimizer=opt)
    g = replica_mapping(old, old + 3, gen(4))
    counts = replica_counts(g, old)
    params = dict(model.named_parameters())
    for name, p in params.items():
        state = opt.state[p]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape, name
        assert torch.equal(state["step"], before[name]["step"])
    w, bn_w, fc6 = params["conv5b.weight"], params["conv5b_bn.weight"], params["fc6.weight"]
    assert torch.equal(opt.state[w]["exp_avg"], before["conv5b.weight"]["exp_avg"][g])
    assert torch.equal(opt.state[bn_w]["exp_avg_sq"], before["conv5b_bn.weight"]["exp_avg_sq"][g])
    group = model.fc6.in_features // (old + 3)
    assert_same(opt.state[fc6]["exp_avg"],
                divide_incoming(before["fc6.weight"]["exp_avg"], g, counts, 1, group))
    assert_same(opt.state[fc6]["exp_avg_sq"],
                divide_incoming(before["fc6.weight"]["exp_avg_sq"], g, counts, 1, group, power=2))
    net2net.deeper(model, "conv4a", optimizer=opt, data=clip())
    new = [model.conv4c.weight, model.conv4c.bias, model.conv4c_bn.weight, model.conv4c_bn.bias]
    assert all(any(q is p for q in opt.param_groups[0]["params"]) for p in new)
    assert all(p not in opt.state for p in new)
    losses = _train(model, opt, 2, seed=10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())


# --------------------------------------------------------------------------------------------
# bad input leaves everything unchanged
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_c3d_bn():
    """A small C3D-BN and its SGD optimizer with momentum buffers (copy before use)."""
    torch.manual_seed(0)
    model = small_c3d_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1)
    return model, opt


@pytest.mark.parametrize("call,match", [
    (lambda m, o: net2net.wider(m, "conv9", 10, optimizer=o), "conv9"),
    (lambda m, o: net2net.wider(m, "pool1", 10, optimizer=o), "MaxPool3d"),
    (lambda m, o: net2net.wider(m, "conv3a", 32, optimizer=o), "larger than"),
    (lambda m, o: net2net.wider(m, "conv3a", 16, optimizer=o), "larger than"),
    (lambda m, o: net2net.wider(m, "conv3a", 40.0, optimizer=o), "int"),
    (lambda m, o: net2net.wider(m, "conv3a", 40, noise=-1.0, optimizer=o), "noise"),
    (lambda m, o: net2net.wider(m, "fc8", 10, optimizer=o), "output layer"),
    (lambda m, o: net2net.deeper(m, "fc8", optimizer=o), "fc8"),
    (lambda m, o: net2net.deeper(m, "conv9", optimizer=o), "conv9"),
    (lambda m, o: net2net.deeper(m, "conv3a", name="conv3b", optimizer=o), "conv3b"),
    (lambda m, o: net2net.deeper(m, "conv3a", data=torch.randn(1, 3, 8, 32, 32), optimizer=o), "expects input"),
    (lambda m, o: net2net.deeper(m, "conv3a", optimizer=torch.optim.SGD(m.fc8.parameters(), lr=0.1)), "optimizer"),
])
def test_errors_leave_model_and_optimizer_unchanged(call, match, trained_c3d_bn):
    model, opt = copy.deepcopy(trained_c3d_bn)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        call(model, opt)
    assert_unchanged(before, model, opt)


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="supports the zoo's"):
        net2net.deeper(nn.Sequential(nn.Conv3d(3, 4, 3), nn.Conv3d(4, 4, 3)), "0")
    with pytest.raises(ValueError, match="does not know"):
        net2net.wider(nn.Sequential(nn.Conv3d(3, 4, 3), nn.Conv3d(4, 4, 3)), "0", 8)


# --------------------------------------------------------------------------------------------
# video ResNets: residual streams grown as one (wider_group)
# --------------------------------------------------------------------------------------------


def small_resnet(name, **kw):
    return randomize_bn(RESNETS[name](num_classes=5, **kw))


def resnet_clip(seed=0, n=2):
    return torch.randn(n, 3, 4, 32, 32, generator=gen(seed))


def stream_units(model, stream):
    return units(model, net2net.residual_streams(model)[stream][0])


def assert_same_eval_then_train(grown, base, x, rtol=1e-5, train_rtol=1e-4):
    """Same outputs in eval mode, then in train mode. (Train-mode BN over the few values per
    channel of the last stages amplifies rounding: R(2+1)D in float32 is itself 1e-5 away from
    float64 there, hence the default ``train_rtol``.)"""
    with torch.no_grad():
        for training, tolerance in ((False, rtol), (True, train_rtol)):
            base.train(training), grown.train(training)
            assert_same(grown(x), base(x), rtol=tolerance)


@pytest.fixture
def fused_chains(monkeypatch):
    """Why each chain of a fused model's forward could not run fused (None: it ran fused)."""
    from c3dzoo.models import _common
    from c3dzoo.nn.conv_bn_act import unsupported_reason

    reasons = []
    fused_op = _common.conv_bn_act

    def spy(x, conv, bn=None, activation="relu", negative_slope=0.01, pool=None, *args, **kwargs):
        reasons.append(unsupported_reason(conv, bn, pool))
        return fused_op(x, conv, bn, activation, negative_slope, pool, *args, **kwargs)

    monkeypatch.setattr(_common, "conv_bn_act", spy)
    return reasons


def test_residual_streams_layout():
    streams = net2net.residual_streams(r3d_18(num_classes=5))
    assert list(streams) == ["layer1", "layer2", "layer3", "layer4"]
    assert streams["layer1"] == ("stem.0", "layer1.0.conv2.0", "layer1.1.conv2.0")
    assert streams["layer3"] == ("layer3.0.downsample.0", "layer3.0.conv2.0", "layer3.1.conv2.0")
    assert net2net.residual_streams(r2plus1d_18(num_classes=5))["layer2"][1] == "layer2.0.conv2.0.3"
    assert net2net.residual_streams(small_c3d_bn()) == {}


# each stream once, by stream name or by a member; R(2+1)D also grows its factored convs' mid channels
STREAM_STEPS = {
    "r3d_18": ["stem.0", "layer2", "layer3.0.downsample.0", "layer4"],
    "mc3_18": ["layer1", "layer2.1.conv2.0", "layer3", "layer4.0.conv2.0"],
    "r2plus1d_18": ["stem.3", "layer2", "layer3.0.downsample.0", "layer4", ("stem.0",), ("layer4.0.conv2.0.0",)],
}


@pytest.mark.parametrize("name,fused", [("r3d_18", False), ("mc3_18", True), ("r2plus1d_18", False),
                                        ("r2plus1d_18", True)])
def test_wider_group_every_stream_exact(name, fused, fused_chains):
    torch.manual_seed(0)
    base = small_resnet(name, fused=fused).eval()
    grown = copy.deepcopy(base)
    x = resnet_clip()
    with torch.no_grad():
        expected = base(x)
    for i, step in enumerate(STREAM_STEPS[name]):
        if isinstance(step, tuple):  # a single inner layer (a mid-channel conv), grown by wider
            net2net.wider(grown, step[0], units(grown, step[0]) + 5, generator=gen(i))
        else:
            stream = next(s for s, writers in net2net.residual_streams(grown).items() if step in (s,) + writers)
            width = stream_units(grown, stream) + 3 + i
            net2net.wider_group(grown, step, width, generator=gen(i))
            for writer in net2net.residual_streams(grown)[stream]:
                assert units(grown, writer) == width, writer
        with torch.no_grad():
            assert_same(grown(x), expected)
    assert grown.fc.in_features == stream_units(grown, "layer4")
    assert_same_eval_then_train(grown, base, x)
    if fused:  # the grown modules are still ones the fused op takes
        assert fused_chains and all(reason is None for reason in fused_chains), set(fused_chains)


def test_wider_accepts_stream_names_and_points_tied_layers_to_wider_group():
    a, b = r3d_18(num_classes=5), r3d_18(num_classes=5)
    b.load_state_dict(a.state_dict())
    net2net.wider(a, "layer3", 260, generator=gen(3))
    net2net.wider_group(b, "layer3.1.conv2.0", 260, generator=gen(3))
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"wider_group\(model, 'layer2', width\)"):
        net2net.wider(a, "layer2.1.conv2.0", 200)


def test_wider_group_noise_only_on_each_writers_replicas():
    base = r3d_18(num_classes=5)
    exact, noisy = copy.deepcopy(base), copy.deepcopy(base)
    net2net.wider_group(exact, "layer2", 136, generator=gen(4))
    net2net.wider_group(noisy, "layer2", 136, noise=0.1, generator=gen(4))
    writers = {w + ".weight" for w in net2net.residual_streams(base)["layer2"]}
    for key, value in exact.state_dict().items():
        if key in writers:
            assert torch.equal(noisy.state_dict()[key][:128], base.state_dict()[key]), key
            assert not torch.equal(noisy.state_dict()[key][128:], value[128:]), key
        else:
            assert torch.equal(noisy.state_dict()[key], value), key


def test_wider_group_twice_then_deeper_and_state_dict_round_trip():
    def grow(model):
        net2net.wider_group(model, "layer2", 130, generator=gen(1))
        net2net.wider_group(model, "layer2.1.conv2.0", 137, generator=gen(2))  # twice in a row
        net2net.wider(model, "layer2.1.conv1.0", 140, generator=gen(3))  # the block's inner width
        net2net.deeper(model, "layer2.0")  # the grown layer2.1 becomes layer2.2
        net2net.wider_group(model, "layer2", 141, generator=gen(4))  # the new block's conv2 too
        return model

    torch.manual_seed(0)
    base = small_resnet("mc3_18")
    x = resnet_clip()
    grown = grow(copy.deepcopy(base))
    assert [block.conv2[0].out_channels for block in grown.layer2] == [141, 141, 141]
    assert grown.layer2[2].conv1[0].out_channels == 140 and grown.layer3[0].conv1[0].in_channels == 141
    assert_same_eval_then_train(grown, base, x)
    fresh = grow(mc3_18(num_classes=5))
    fresh.load_state_dict(grown.state_dict())  # strict: same keys and shapes
    fresh.eval(), grown.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), grown(x))


def test_wider_group_gradients_follow_replication():
    torch.manual_seed(0)
    base = small_resnet("mc3_18").train()
    grown = copy.deepcopy(base)
    net2net.wider_group(grown, "layer1", 70, generator=gen(6))
    g = replica_mapping(64, 70, gen(6))
    counts = replica_counts(g, 64)[g]
    x = resnet_clip()
    base(x).square().sum().backward()
    grown(x).square().sum().backward()
    old, new = dict(base.named_parameters()), dict(grown.named_parameters())
    for writer in net2net.residual_streams(base)["layer1"]:
        # a replica's output reaches the loss through 1/count of its original's downstream weights
        w = writer + ".weight"
        assert_same(new[w].grad, old[w].grad[g] / counts.view(-1, 1, 1, 1, 1), rtol=1e-4)
    for norm in ("stem.1", "layer1.0.conv2.1", "layer1.1.conv2.1"):
        assert_same(new[norm + ".weight"].grad, old[norm + ".weight"].grad[g] / counts, rtol=1e-4)
    for reader in ("layer1.0.conv1.0", "layer1.1.conv1.0", "layer2.0.conv1.0", "layer2.0.downsample.0"):
        w = reader + ".weight"  # each divided incoming weight sees its original's input
        assert_same(new[w].grad, old[w].grad[:, g], rtol=1e-4)
    assert_same(new["layer3.0.conv1.0.weight"].grad, old["layer3.0.conv1.0.weight"].grad, rtol=1e-4)


def test_wider_group_sgd_momentum_and_adam_moments():
    torch.manual_seed(0)
    model = small_resnet("mc3_18").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    loss = lambda m, seed: m(resnet_clip(seed)).square().mean()  # noqa: E731
    for seed in range(2):
        opt.zero_grad()
        loss(model, seed).backward()
        opt.step()
    model_a, opt_a = copy.deepcopy((model, opt))
    model_b, opt_b = copy.deepcopy((model, opt))
    net2net.wider_group(model_a, "layer4", 515, generator=gen(5), optimizer=opt_a)  # writers and fc
    params = dict(model_a.named_parameters())
    assert {id(p) for g in opt_a.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    assert all(opt_a.state[p]["momentum_buffer"].shape == p.shape for p in params.values())
    # a momentum-only step after growth equals growing after that step
    _zero_grad_step(model_a, opt_a)
    _zero_grad_step(model_b, opt_b)
    net2net.wider_group(model_b, "layer4", 515, generator=gen(5))
    for key, value in model_b.state_dict().items():
        assert_same(model_a.state_dict()[key], value)

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.zero_grad()
    loss(model, 3).backward()
    adam.step()
    before = {n: {k: v.clone() for k, v in adam.state[p].items()} for n, p in model.named_parameters()}
    net2net.wider_group(model, "layer4", 515, generator=gen(5), optimizer=adam)
    g = replica_mapping(512, 515, gen(5))
    counts = replica_counts(g, 512)
    state = {n: adam.state[p] for n, p in model.named_parameters()}
    assert torch.equal(state["layer4.0.downsample.1.weight"]["exp_avg_sq"],
                       before["layer4.0.downsample.1.weight"]["exp_avg_sq"][g])
    assert_same(state["fc.weight"]["exp_avg"], divide_incoming(before["fc.weight"]["exp_avg"], g, counts, 1))
    assert_same(state["fc.weight"]["exp_avg_sq"],
                divide_incoming(before["fc.weight"]["exp_avg_sq"], g, counts, 1, power=2))
    adam.zero_grad()
    loss(model, 4).backward()
    adam.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# deeper: video ResNets and the ConvColumn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fused", [("r3d_18", False), ("mc3_18", True), ("r2plus1d_18", False),
                                        ("r2plus1d_18", True)])
def test_deeper_resnet_exact_in_eval_and_train(name, fused, fused_chains):
    from c3dzoo.models.video_resnet import BasicBlock

    torch.manual_seed(0)
    base = small_resnet(name, fused=fused)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    shifted = grown.layer1[1]
    net2net.deeper(grown, "layer1.0", optimizer=opt, generator=gen(0))  # mid-layer: later blocks shift
    net2net.deeper(grown, "layer4.1", optimizer=opt, generator=gen(1))  # the last block, read by fc
    assert len(grown.layer1) == 3 and grown.layer1[2] is shifted and isinstance(grown.layer1[1], BasicBlock)
    assert len(grown.layer4) == 3 and grown.layer4[2].downsample is None
    kind = type(base.layer4[1].conv2[0])
    assert type(grown.layer4[2].conv2[0]) is kind and type(grown.layer1[1].conv1[0]) is type(base.layer1[1].conv1[0])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    x = resnet_clip()
    assert_same_eval_then_train(grown, base, x, rtol=1e-6, train_rtol=1e-6)
    if fused:
        assert fused_chains and all(reason is None for reason in fused_chains), set(fused_chains)
    # the zero γ that silences the new branch still learns
    grown(x).square().sum().backward()
    assert grown.layer4[2].conv2[1].weight.grad.abs().sum() > 0
    fresh = RESNETS[name](num_classes=5, fused=fused)
    net2net.deeper(fresh, "layer1.0")
    net2net.deeper(fresh, "layer4.1")
    fresh.load_state_dict(grown.state_dict())  # strict: the grown architecture rebuilds by replaying
    fresh.eval(), grown.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), grown(x))


def test_deeper_convcolumn_linear_identity_layer():
    torch.manual_seed(0)
    # float64: train-mode BatchNorm1d over a batch of 2 amplifies float32 rounding (see above)
    base = randomize_bn(jester_convcolumn(num_classes=5)).double()
    base.drop.p = 0.0
    x = torch.randn(2, 3, *JESTER_SIZE, generator=gen(0), dtype=torch.float64)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    pool = grown.conv_layer2[6]
    net2net.deeper(grown, "conv_layer2.3", optimizer=opt, data=x)  # BN fitted on x: exact in train mode
    # conv → BN → LeakyReLU → new conv → new BN (no activation: LeakyReLU is not idempotent) → pool
    assert [type(m) for m in grown.conv_layer2][3:] == [nn.Conv3d, nn.BatchNorm3d, nn.LeakyReLU, nn.Conv3d,
                                                        nn.BatchNorm3d, nn.MaxPool3d]
    assert grown.conv_layer2[8] is pool
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    assert_same_eval_then_train(grown, base, x)

    # without data the new BN is identity in eval mode; the new conv then grows like any other
    base, x = base.float().eval(), x[:1].float()
    grown = copy.deepcopy(base)
    with torch.no_grad():
        expected = base(x)
    net2net.deeper(grown, "conv_layer1.0")
    net2net.wider(grown, "conv_layer1.3", 40, generator=gen(1))
    assert grown.conv_layer1[5].in_channels == 40
    with torch.no_grad():
        assert_same(grown(x), expected)
    fresh = jester_convcolumn(num_classes=5)
    net2net.deeper(fresh, "conv_layer1.0")
    net2net.wider(fresh, "conv_layer1.3", 40, generator=gen(1))
    fresh.load_state_dict(grown.state_dict())  # strict: the grown architecture rebuilds by replaying


# --------------------------------------------------------------------------------------------
# residual-group and deeper errors leave everything unchanged
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mc3():
    """A small MC3-18 and its SGD optimizer with momentum buffers (copy before use)."""
    torch.manual_seed(0)
    model = mc3_18(num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    model(resnet_clip()).square().mean().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("call,match", [
    (lambda m, o: net2net.wider_group(m, "layer5", 300, optimizer=o), "layer1, layer2, layer3, layer4"),
    (lambda m, o: net2net.wider_group(m, "layer2.0.conv1.0", 300, optimizer=o), "unknown residual stream"),
    (lambda m, o: net2net.wider_group(m, "layer2", 128, optimizer=o), "larger than residual stream 'layer2'"),
    (lambda m, o: net2net.wider_group(m, "layer2", 200, noise=float("nan"), optimizer=o), "noise"),
    (lambda m, o: net2net.wider(m, "layer4.1.conv2.0", 600, optimizer=o), "wider_group"),
    (lambda m, o: net2net.wider(m, "layer9", 600, optimizer=o), "residual streams: layer1"),
    (lambda m, o: net2net.deeper(m, "layer5.0", optimizer=o), "layer4.1"),
    (lambda m, o: net2net.deeper(m, "layer2.0.conv1.0", optimizer=o), "inserts a block after a block"),
    (lambda m, o: net2net.deeper(m, "layer2.1", name="layer2.5", optimizer=o), "'layer2.2'"),
    (lambda m, o: net2net.deeper(m, "layer2.1", optimizer=torch.optim.SGD(m.fc.parameters(), lr=0.1)),
     "optimizer"),
])
def test_resnet_errors_leave_model_and_optimizer_unchanged(call, match, trained_mc3):
    model, opt = copy.deepcopy(trained_mc3)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        call(model, opt)
    assert_unchanged(before, model, opt)


def test_convcolumn_deeper_errors_leave_model_unchanged():
    model = jester_convcolumn(num_classes=5)
    before = snapshot(model)
    for kwargs, match in [(dict(after="fc5"), "conv_layer4.3"), (dict(after="conv_layer5"), "conv_layer1.0"),
                          (dict(after="conv_layer1.0", name="conv_layer1.4"), "'conv_layer1.3'"),
                          (dict(after="conv_layer1.0", data=torch.randn(1, 3, 16, 84, 84)), "expects input")]:
        with pytest.raises(ValueError, match=match):
            net2net.deeper(model, **kwargs)
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="no residual streams"):
        net2net.wider_group(small_c3d_bn(), "conv3a", 40)


def test_deeper_fused_convcolumn_runs_the_inserted_layer_fused(monkeypatch):
    """A fused ConvColumn reads its chains from each block's Sequential, so a layer inserted by
    deeper runs (fused, with the following pool) and the function is kept."""
    from c3dzoo.models import _common

    torch.manual_seed(0)
    base = randomize_bn(jester_convcolumn(num_classes=5)).eval()
    x = torch.randn(1, 3, *JESTER_SIZE, generator=gen(2))
    with torch.no_grad():
        expected = base(x)
    fused = jester_convcolumn(num_classes=5, fused=True).eval()
    fused.load_state_dict(base.state_dict())
    net2net.deeper(fused, "conv_layer2.3")
    calls = []
    real = _common.conv_bn_act
    monkeypatch.setattr(_common, "conv_bn_act", lambda x, conv, *a, **k: calls.append(conv) or real(x, conv, *a, **k))
    with torch.no_grad():
        assert_same(fused(x), expected)
    assert fused.conv_layer2[6] in calls  # the inserted conv ran through the fused op
    assert len(calls) == 9  # 2 chains in each of the 4 blocks + the inserted one


@pytest.mark.parametrize("name", ["c3d_bn", "r3d_18"])
def test_growing_a_model_converted_to_sync_batch_norm(name):
    """After ``nn.SyncBatchNorm.convert_sync_batchnorm`` (the DDP recipe), ``wider`` grows the
    SyncBatchNorms with their layer and ``deeper`` adds SyncBatchNorms of the same process group
    (a plain BatchNorm3d there would normalise per rank), and both preserve the function."""
    torch.manual_seed(0)
    if name == "c3d_bn":
        base, x = randomize_bn(small_c3d_bn(fused=True)), clip()
        widen, deepen = ("conv3a", 2 * units(base, "conv3a")), "conv3b"
    else:
        base, x = small_resnet("r3d_18", fused=True), resnet_clip()
        widen, deepen = ("layer1.0.conv1.0", 80), "layer2.1"
    group = object()  # stands for a process group: only passed along, never used without a forward
    grown = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base), group)
    norms_before = sum(isinstance(m, nn.SyncBatchNorm) for m in grown.modules())
    net2net.wider(grown, *widen)
    net2net.deeper(grown, deepen)
    norms = [m for m in grown.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, nn.SyncBatchNorm) and m.process_group is group for m in norms)
    assert len(norms) > norms_before
    for m in norms:
        m.process_group = None  # one process: SyncBatchNorm normalises as BatchNorm3d
    base.eval(), grown.eval()
    with torch.no_grad():
        assert_same(grown(x), base(x))


# --------------------------------------------------------------------------------------------
# S3D: chains inside Inception branches, channel concatenations between blocks
# --------------------------------------------------------------------------------------------


def small_s3d(**kw):
    # dropout 0: train-mode outputs must compare deterministically
    return randomize_bn(s3d(num_classes=5, dropout=0.0, **kw))


def s3d_clip(seed=0, dtype=torch.float32):
    return torch.randn(2, 3, 8, 32, 32, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
def test_wider_every_s3d_layer_exact(fused):
    """Every conv but the head grows, including a branch's last conv, whose output is a slice of
    the block's concatenation: each next block's four branch heads (or the classifier) have that
    slice's incoming weights divided. Exact in eval and train mode (float64: train-mode BatchNorm
    over the last blocks' few positions amplifies float32 rounding)."""
    torch.manual_seed(0)
    base = small_s3d(fused=fused).double()
    grown = copy.deepcopy(base)
    layers = net2net.widenable_layers(grown)
    assert len(layers) == 77 and layers[:2] == ["features.0.0.0", "features.0.1.0"]
    assert "features.5.branch3.1.0" in layers and "classifier.1" not in layers
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i))
    assert grown.classifier[1].in_channels == 1024 + 4 * 2
    assert grown.features[6].branch0[0].in_channels == 256 + 4 * 2  # block 5's four branches grew
    assert_same_eval_then_train(grown, base, s3d_clip(dtype=torch.float64), rtol=1e-10, train_rtol=1e-10)


def test_wider_s3d_branch_rewrites_only_its_slice_and_the_optimizer():
    torch.manual_seed(0)
    model = small_s3d()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(s3d_clip()).square().mean().backward()
    opt.step()
    reader = model.features[6].branch1[0][0]  # block 6 reads block 5's 64 + 128 + 32 + 32 channels
    before, momentum = reader.weight.detach().clone(), opt.state[reader.weight]["momentum_buffer"].clone()
    net2net.wider(model, "features.5.branch1.1.1.0", 131, optimizer=opt, generator=gen(3))
    g = replica_mapping(128, 131, gen(3))
    counts = replica_counts(g, 128)[g].view(1, -1, 1, 1, 1)
    grown = model.features[6].branch1[0][0]
    assert grown.in_channels == 259
    for new, old in ((grown.weight.detach(), before), (opt.state[grown.weight]["momentum_buffer"], momentum)):
        assert torch.equal(new[:, :64], old[:, :64]) and torch.equal(new[:, 64 + 131:], old[:, 64 + 128:])
        assert_same(new[:, 64:64 + 131], old[:, 64:64 + 128][:, g] / counts)
    assert any(p is grown.weight for group in opt.param_groups for p in group["params"])


@pytest.mark.parametrize("after", ["features.0.0", "features.2", "features.3.1", "features.5.branch1.1.0",
                                   "features.15.branch3.1"])
def test_deeper_s3d_identity_unit(after):
    """An identity Conv3dNormActivation (1×1×1 Dirac conv, BN fitted on the data, ReLU) after a
    unit of a Sequential: exact in eval mode and, on that data, in train mode."""
    torch.manual_seed(0)
    base = small_s3d().double()
    x = s3d_clip(dtype=torch.float64)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    count = sum(1 for _ in grown.parameters())
    net2net.deeper(grown, after, optimizer=opt, data=x)
    parent, index = after.rsplit(".", 1)
    new = grown.get_submodule(f"{parent}.{int(index) + 1}")
    assert type(new).__name__ == "Conv3dNormActivation" and new[0].kernel_size == (1, 1, 1)
    assert sum(1 for _ in grown.parameters()) == count + 3  # conv weight, BN γ and β
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    fused = copy.deepcopy(grown).eval()
    fused.fused = True  # the fused forward runs the longer Sequential's chains too
    with torch.no_grad():
        assert_same(fused(x), base.eval()(x), rtol=1e-10)
    # train mode: the fitted statistics' float64 rounding, amplified by BatchNorms over 2 values
    # per channel in the last blocks, leaves ~1e-9
    assert_same_eval_then_train(grown, base, x, rtol=1e-10, train_rtol=1e-8)


def test_s3d_deeper_errors_leave_model_unchanged():
    model = s3d(num_classes=5)
    before = snapshot(model)
    for kwargs, match in [(dict(after="features.5.branch0"), "not one of features.2, "),
                          (dict(after="features.5"), "inside a Sequential"),
                          (dict(after="features.2", name="features.4"), "'features.3'")]:
        with pytest.raises(ValueError, match=match):
            net2net.deeper(model, **kwargs)
    with pytest.raises(ValueError, match="output layer"):
        net2net.wider(model, "classifier.1", 500)
    assert_unchanged(before, model)


# --------------------------------------------------------------------------------------------
# PyTorchVideo's ResNet-50s: bottleneck branches, projection shortcuts, a temporal pool
# --------------------------------------------------------------------------------------------


def small_resnet3d(builder=i3d_r50, **kw):
    # dropout 0: train-mode outputs must compare deterministically
    return randomize_bn(builder(num_classes=5, dropout=0.0, **kw))


def resnet3d_clip(seed=0, dtype=torch.float32):
    return torch.randn(2, 3, 4, 32, 32, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
def test_wider_every_resnet3d_layer_and_stream_exact(fused):
    """Every bottleneck's conv_a and conv_b grow one at a time (conv_b and conv_c read them), and
    every residual stream as a group: the stem's (read by stage 1's first block), then each
    stage's (its shortcut and every conv_c write it; conv_a of each block, the next shortcut and
    the head's proj read it, the temporal pool in between acting per channel). Exact in eval and
    train mode (float64)."""
    torch.manual_seed(0)
    base = small_resnet3d(fused=fused).double()
    grown = copy.deepcopy(base)
    layers = net2net.widenable_layers(grown)
    assert len(layers) == 32 and layers[:2] == ["blocks.1.res_blocks.0.branch2.conv_a",
                                                "blocks.1.res_blocks.0.branch2.conv_b"]
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i))
    streams = net2net.residual_streams(grown)
    assert list(streams) == ["stem", "blocks.1", "blocks.3", "blocks.4", "blocks.5"]
    assert streams["blocks.3"][:2] == ("blocks.3.res_blocks.0.branch1_conv", "blocks.3.res_blocks.0.branch2.conv_c")
    for i, stream in enumerate(streams):
        net2net.wider_group(grown, stream, units(grown, streams[stream][0]) + 3, generator=gen(100 + i))
    assert grown.blocks[6].proj.in_features == 2048 + 3
    assert grown.blocks[3].res_blocks[0].branch2.conv_a.in_channels == 256 + 3
    assert_same_eval_then_train(grown, base, resnet3d_clip(dtype=torch.float64), rtol=1e-10, train_rtol=1e-10)


@pytest.mark.parametrize("builder, stage3", [(i3d_r50, 4), (slow_r50, 3)], ids=["i3d_r50", "slow_r50"])
def test_deeper_resnet3d_inserts_a_block_that_adds_zero(builder, stage3):
    """A ResBlock like the one before it (its conv_a kernel and inner width) with its last
    BatchNorm's γ = β = 0: exact in eval and train mode without data; later blocks move up one
    index; the fused forward runs it; its parameters join the optimizer."""
    torch.manual_seed(0)
    base = small_resnet3d(builder).double()
    x = resnet3d_clip(dtype=torch.float64)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    net2net.deeper(grown, "blocks.1.res_blocks.2", optimizer=opt, generator=gen(1))
    net2net.deeper(grown, f"blocks.{stage3}.res_blocks.0", optimizer=opt, generator=gen(2))
    new = grown.blocks[stage3].res_blocks[1]
    assert type(new).__name__ == "ResBlock" and new.branch1_conv is None and len(grown.blocks[stage3].res_blocks) == 7
    like = base.blocks[stage3].res_blocks[0].branch2
    assert new.branch2.conv_a.kernel_size == like.conv_a.kernel_size and new.branch2.conv_b.out_channels == 256
    assert not new.branch2.norm_c.weight.any() and new.branch2.conv_a.weight.std() > 0
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    assert_same_eval_then_train(grown, base, x, rtol=1e-10, train_rtol=1e-10)
    fused = copy.deepcopy(grown).eval()
    fused.fused = True
    with torch.no_grad():
        assert_same(fused(x), base.eval()(x), rtol=1e-10)


def test_resnet3d_growth_errors_leave_model_unchanged():
    model = i3d_r50(num_classes=5)
    before = snapshot(model)
    for kwargs, match in [(dict(after="blocks.2"), "not one of blocks.1.res_blocks.0, "),
                          (dict(after="blocks.1.res_blocks.0.branch2"), "not one of"),
                          (dict(after="blocks.1.res_blocks.0", name="blocks.1.res_blocks.3"),
                           "'blocks.1.res_blocks.1'")]:
        with pytest.raises(ValueError, match=match):
            net2net.deeper(model, **kwargs)
    with pytest.raises(ValueError, match="writes into the residual stream 'blocks.3'.*wider_group"):
        net2net.wider(model, "blocks.3.res_blocks.1.branch2.conv_c", 600)
    with pytest.raises(ValueError, match="output layer"):
        net2net.wider(model, "blocks.6.proj", 500)
    assert_unchanged(before, model)


def _cut_float64(builder, blocks_per_stage=(2, 1, 1, 1)):
    """``small_resnet3d(builder)`` (seed 0) with its four stages cut to ``blocks_per_stage``, in float64."""
    torch.manual_seed(0)
    base = small_resnet3d(builder)
    for index, count in enumerate(blocks_per_stage, 1):
        base.blocks[index] = ResStage(list(base.blocks[index].res_blocks[:count]))
    return base.double()


def test_csn_grows_exactly_its_depthwise_convs_following_conv_a():
    """CSN (cut to 2, 1, 1, 1 blocks): a depthwise conv_b is no layer of its own to widen; it
    grows with conv_a (its filters and BatchNorm copied with conv_a's mapping, groups = its new
    channels) and conv_c is divided; the streams grow as in the other ResNets; deeper inserts a
    block with a depthwise 3×3×3 conv_b. Exact in eval and train mode (float64); the fused
    forward runs it; the optimizer follows."""
    base = _cut_float64(csn_r101)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    grown(resnet3d_clip(dtype=torch.float64)).square().mean().backward()
    opt.step()
    grown.zero_grad()
    base.load_state_dict(grown.state_dict())
    layers = net2net.widenable_layers(grown)
    assert layers == [f"blocks.{i}.res_blocks.{b}.branch2.conv_a" for i, b in ((1, 0), (1, 1), (2, 0), (3, 0), (4, 0))]
    with pytest.raises(ValueError, match=r"'blocks.2.res_blocks.0.branch2.conv_b' is a depthwise Conv3d "
                                         r"\(groups=128\).*wider\(model, 'blocks.2.res_blocks.0.branch2.conv_a'"):
        net2net.wider(grown, "blocks.2.res_blocks.0.branch2.conv_b", 130)
    momentum = opt.state[grown.blocks[2].res_blocks[0].branch2.conv_b.weight]["momentum_buffer"].clone()
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i), optimizer=opt)
    conv_b = grown.blocks[2].res_blocks[0].branch2.conv_b
    assert (conv_b.in_channels, conv_b.out_channels, conv_b.groups) == (130, 130, 130)
    assert conv_b.weight.shape == (130, 1, 3, 3, 3) and grown.blocks[2].res_blocks[0].branch2.norm_b.num_features == 130
    streams = net2net.residual_streams(grown)
    assert list(streams) == ["stem", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    for i, stream in enumerate(streams):
        net2net.wider_group(grown, stream, units(grown, streams[stream][0]) + 3, generator=gen(100 + i),
                            optimizer=opt)
    net2net.deeper(grown, "blocks.1.res_blocks.1", generator=gen(1), optimizer=opt)
    net2net.deeper(grown, "blocks.3.res_blocks.0", generator=gen(2), optimizer=opt)
    new = grown.blocks[3].res_blocks[1].branch2.conv_b
    assert (new.kernel_size, new.stride, new.groups, new.out_channels) == ((3, 3, 3), (1, 1, 1), 258, 258)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    grown_momentum = opt.state[conv_b.weight]["momentum_buffer"]  # copied with the filters, not divided
    assert grown_momentum.shape == (130, 1, 3, 3, 3) and torch.equal(grown_momentum[:128], momentum)
    assert any(torch.equal(grown_momentum[128], m) for m in momentum)
    x = resnet3d_clip(dtype=torch.float64)
    assert_same_eval_then_train(grown, base, x, rtol=1e-10, train_rtol=1e-10)
    fused = copy.deepcopy(grown).eval()
    fused.fused = True
    with torch.no_grad():
        assert_same(fused(x), base.eval()(x), rtol=1e-10)


def test_r2plus1d_r50_grows_both_halves_of_its_2plus1d_convs():
    """R(2+1)D R50 (cut to 2, 1, 1, 1 blocks): conv_a, and each half of a (2+1)D conv_b on its own
    (conv_t: its norm and conv_xy follow; conv_xy: norm_b and conv_c follow), every residual
    stream as a group (the stem, without max-pool, writes the first); deeper inserts a block with
    a (2+1)D conv_b of the same kernels. Exact in eval and train mode (float64); the fused forward
    runs it; the optimizer follows."""
    base = _cut_float64(r2plus1d_r50)
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    layers = net2net.widenable_layers(grown)
    branch = "blocks.2.res_blocks.0.branch2"
    assert len(layers) == 15 and layers[3:6] == [f"blocks.1.res_blocks.1.branch2.{part}"
                                                 for part in ("conv_a", "conv_b.conv_t", "conv_b.conv_xy")]
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i), optimizer=opt)
    conv_b = grown.get_submodule(f"{branch}.conv_b")
    assert (conv_b.conv_t.in_channels, conv_b.conv_t.out_channels, conv_b.norm.num_features) == (130, 130, 130)
    assert (conv_b.conv_xy.in_channels, conv_b.conv_xy.out_channels) == (130, 130)
    assert grown.get_submodule(f"{branch}.norm_b").num_features == grown.get_submodule(f"{branch}.conv_c").in_channels \
        == 130
    streams = net2net.residual_streams(grown)
    assert list(streams) == ["stem", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    assert streams["stem"] == ("blocks.0.conv",)
    for i, stream in enumerate(streams):
        net2net.wider_group(grown, stream, units(grown, streams[stream][0]) + 3, generator=gen(100 + i),
                            optimizer=opt)
    net2net.deeper(grown, "blocks.3.res_blocks.0", generator=gen(2), optimizer=opt)
    new = grown.blocks[3].res_blocks[1].branch2.conv_b
    assert type(new).__name__ == "Conv2plus1d" and new.conv_t.kernel_size == (3, 1, 1)
    assert (new.conv_xy.kernel_size, new.conv_xy.stride, new.conv_xy.out_channels) == ((1, 3, 3), (1, 1, 1), 258)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    # 8 frames of 64 × 64 (no stem max-pool: stage 4 sees 2 × 2 × 2 positions a clip)
    x = torch.randn(2, 3, 8, 64, 64, generator=gen(0), dtype=torch.float64)
    assert_same_eval_then_train(grown, base, x, rtol=1e-10, train_rtol=1e-10)
    fused = copy.deepcopy(grown).eval()
    fused.fused = True
    with torch.no_grad():
        assert_same(fused(x), base.eval()(x), rtol=1e-10)


def test_slowfast_grows_exactly():
    """Every widenable layer (bottleneck convs of both pathways, the four fast-to-slow fusion
    convs, whose output is a slice of the concatenation the next slow stage reads) and every
    stream of both pathways (the head's proj reads them as the [slow, fast] concatenation), then
    a block inserted into each pathway: exact in eval and train mode (float64)."""
    torch.manual_seed(0)
    base = small_resnet3d(slowfast_r50).double()
    grown = copy.deepcopy(base)
    layers = net2net.widenable_layers(grown)
    assert len(layers) == 68 and "blocks.0.multipathway_fusion.conv_fast_to_slow" in layers
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i))
    streams = net2net.residual_streams(grown)
    assert len(streams) == 10
    assert list(streams)[:2] == ["blocks.0.multipathway_blocks.0", "blocks.0.multipathway_blocks.1"]
    for i, stream in enumerate(streams):
        net2net.wider_group(grown, stream, units(grown, streams[stream][0]) + 3, generator=gen(100 + i))
    assert grown.blocks[6].proj.in_features == 2048 + 3 + 256 + 3
    # the slow stage 1 reads the slow stem's 64 + 3 channels, then the fusion's 16 + 2
    assert grown.blocks[1].multipathway_blocks[0].res_blocks[0].branch2.conv_a.in_channels == 64 + 3 + 16 + 2
    net2net.deeper(grown, "blocks.1.multipathway_blocks.0.res_blocks.2", generator=gen(1))
    net2net.deeper(grown, "blocks.3.multipathway_blocks.1.res_blocks.0", generator=gen(2))
    assert len(grown.blocks[3].multipathway_blocks[1].res_blocks) == 7
    # 8 frames: the slow pathway's 2 keep its last train-mode BatchNorms from amplifying rounding
    clip = torch.randn(2, 3, 8, 32, 32, generator=gen(0), dtype=torch.float64)
    assert_same_eval_then_train(grown, base, clip, rtol=1e-10, train_rtol=1e-10)


def test_wider_slowfast_fusion_rewrites_only_its_slice():
    torch.manual_seed(0)
    model = small_resnet3d(slowfast_r50)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(resnet3d_clip()).square().mean().backward()
    opt.step()
    reader = model.blocks[2].multipathway_blocks[0].res_blocks[0].branch2.conv_a  # reads 256 slow + 64 fused
    before, momentum = reader.weight.detach().clone(), opt.state[reader.weight]["momentum_buffer"].clone()
    net2net.wider(model, "blocks.1.multipathway_fusion.conv_fast_to_slow", 67, optimizer=opt, generator=gen(3))
    g = replica_mapping(64, 67, gen(3))
    counts = replica_counts(g, 64)[g].view(1, -1, 1, 1, 1)
    grown = model.blocks[2].multipathway_blocks[0].res_blocks[0].branch2.conv_a
    assert grown.in_channels == 256 + 67
    for new, old in ((grown.weight.detach(), before), (opt.state[grown.weight]["momentum_buffer"], momentum)):
        assert torch.equal(new[:, :256], old[:, :256])
        assert_same(new[:, 256:], old[:, 256:][:, g] / counts)
