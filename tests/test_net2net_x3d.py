"""Net2Net on X3D: depthwise conv_b and squeeze-excitations growing with conv_a, the stem's depthwise
conv following its first, the head's projected pool, X3D blocks inserted by deeper; exact in eval
and train mode (float64), stock and fused; the optimizer follows; clear errors."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import net2net
from c3dzoo.models.x3d import SqueezeExcitation, Swish, x3d_res_block
from c3dzoo.ops.net2net_remap import divide_incoming, replica_counts, replica_mapping
from test_net2net import (  # noqa: F401 (fused_chains: a fixture)
    _zero_grad_step,
    assert_same,
    assert_same_eval_then_train,
    assert_unchanged,
    fused_chains,
    gen,
    randomize_bn,
    snapshot,
    units,
)

SE_BLOCK = "blocks.2.res_blocks.0"  # every other block, from each stage's first, has a squeeze-excitation
PLAIN_BLOCK = "blocks.2.res_blocks.1"


def small_x3d(**kw):
    """X3D-XS for 5 classes without dropout (train-mode outputs compare deterministically), its
    BatchNorms and squeeze-excitation biases (zero at initialisation) random, so copying them
    wrongly shows."""
    model = randomize_bn(c3dzoo.x3d_xs(num_classes=5, dropout=0.0, **kw))
    g = gen(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcitation):
                for conv in (m.block[0], m.block[2]):
                    conv.bias.copy_(0.3 * torch.randn(conv.bias.shape, generator=g))
    return model


def cut(model, blocks=2):
    """``model`` with each stage cut to its first ``blocks`` blocks (the first with a
    squeeze-excitation, the second without): the same kinds of blocks in a fraction of the CPU
    time (a CPU runs depthwise convs' backward, and float64 ones, a group at a time)."""
    for stage in model.blocks[1:5]:
        del stage.res_blocks[blocks:]
    return model


def x3d_clip(seed=0, dtype=torch.float64):
    return torch.randn(2, 3, 4, 32, 32, generator=gen(seed), dtype=dtype)


def se_convs(model, block):
    se = model.get_submodule(block).branch2.norm_b[1]
    return se.block[0], se.block[2]


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
def test_wider_every_x3d_layer_and_stream_exact(fused, fused_chains):
    """Every widenable layer one at a time (each conv_a, with its depthwise conv_b and the
    squeeze-excitation gating conv_b's channels; each squeeze-excitation's reduced channels; the
    head's pre_conv and post_conv), then every residual stream (the stem's, whose depthwise
    conv_xy follows conv_t; each stage's, stage 1's projection without a BatchNorm): exact in eval
    and train mode, and the fused forward still runs every chain fused."""
    torch.manual_seed(0)
    base = small_x3d(fused=fused).double()
    grown = copy.deepcopy(base)
    layers = net2net.widenable_layers(grown)
    # 26 blocks' conv_a, the 15 squeeze-excitations' first convs, the head's two convs
    assert len(layers) == 26 + 15 + 2
    assert layers[:4] == ["blocks.1.res_blocks.0.branch2.conv_a", "blocks.1.res_blocks.0.branch2.norm_b.1.block.0",
                          "blocks.1.res_blocks.1.branch2.conv_a", "blocks.1.res_blocks.2.branch2.conv_a"]
    assert layers[-2:] == ["blocks.5.pool.pre_conv", "blocks.5.pool.post_conv"]
    assert not any(layer.endswith(("conv_b", "block.2", "proj")) for layer in layers)
    for i, layer in enumerate(layers):
        net2net.wider(grown, layer, units(grown, layer) + 2, generator=gen(i))
    branch = grown.get_submodule(SE_BLOCK).branch2
    assert (branch.conv_b.in_channels, branch.conv_b.out_channels, branch.conv_b.groups) == (110, 110, 110)
    conv1, conv2 = se_convs(grown, SE_BLOCK)
    assert (conv1.in_channels, conv1.out_channels, conv2.in_channels, conv2.out_channels) == (110, 10, 10, 110)
    assert grown.blocks[5].proj.in_features == 2048 + 2

    streams = net2net.residual_streams(grown)
    assert list(streams) == ["stem", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    assert streams["stem"] == ("blocks.0.conv.conv_t", "blocks.0.conv.conv_xy")
    assert streams["blocks.1"][:2] == ("blocks.1.res_blocks.0.branch1_conv", "blocks.1.res_blocks.0.branch2.conv_c")
    assert len(streams["blocks.3"]) == 1 + 11
    # each stream once, by its name or by a layer writing into it
    steps = ["blocks.0.conv.conv_xy", "blocks.1", "blocks.2.res_blocks.3.branch2.conv_c", "blocks.3", "blocks.4"]
    for i, (stream, step) in enumerate(zip(streams, steps)):
        width = units(grown, streams[stream][0]) + 3
        net2net.wider_group(grown, step, width, generator=gen(100 + i))
        assert all(units(grown, writer) == width for writer in streams[stream]), stream
    stem = grown.blocks[0]
    assert (stem.conv.conv_xy.groups, stem.norm.num_features) == (27, 27)
    assert grown.blocks[1].res_blocks[0].branch1_conv.in_channels == 27
    assert grown.blocks[1].res_blocks[0].branch1_norm is None
    assert grown.blocks[5].pool.pre_conv.in_channels == 192 + 3
    assert_same_eval_then_train(grown, base, x3d_clip(), rtol=1e-10, train_rtol=1e-10)
    if fused:  # the grown modules are still ones the fused op takes
        assert fused_chains and all(reason is None for reason in fused_chains), set(fused_chains)


def assert_block_unchanged(grown, base, block):
    """The block alone (a cheap check) computes the same in eval and train mode."""
    channels = base.get_submodule(block).branch2.conv_a.in_channels
    x = torch.randn(2, channels, 2, 8, 8, generator=gen(9), dtype=torch.float64).relu()  # a stream is ReLU'd
    assert_same_eval_then_train(grown.get_submodule(block), base.get_submodule(block), x, 1e-10, 1e-10)


@pytest.mark.parametrize("block", [SE_BLOCK, PLAIN_BLOCK], ids=["with_se", "without_se"])
def test_conv_a_growth_carries_conv_b_and_the_squeeze_excitation(block):
    """conv_a's mapping g copies conv_b's filters and norm_b's BatchNorm; where the block has a
    squeeze-excitation, its last conv's output units (weight rows and bias) are copied with g (so
    replicas get the same gates) and its first conv's incoming weights divided by the replica
    counts (replicas have the same means); conv_c's incoming weights are divided."""
    torch.manual_seed(0)
    base = small_x3d().double()
    grown = copy.deepcopy(base)
    net2net.wider(grown, f"{block}.branch2.conv_a", 108 + 5, generator=gen(3))
    g = replica_mapping(108, 113, gen(3))
    counts = replica_counts(g, 108)
    old, new = base.get_submodule(block).branch2, grown.get_submodule(block).branch2
    assert torch.equal(new.conv_a.weight, old.conv_a.weight[g])
    assert new.conv_b.groups == 113 and torch.equal(new.conv_b.weight, old.conv_b.weight[g])
    for stat in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new.norm_b[0], stat), getattr(old.norm_b[0], stat)[g]), stat
    assert_same(new.conv_c.weight, divide_incoming(old.conv_c.weight, g, counts, 1), rtol=1e-12)
    if block == SE_BLOCK:
        (old1, old2), (new1, new2) = se_convs(base, block), se_convs(grown, block)
        assert torch.equal(new2.weight, old2.weight[g]) and torch.equal(new2.bias, old2.bias[g])
        assert_same(new1.weight, divide_incoming(old1.weight, g, counts, 1), rtol=1e-12)
        assert torch.equal(new1.bias, old1.bias)  # the reduced channels are not grown
    else:
        assert type(new.norm_b[1]) is nn.Identity
    assert_block_unchanged(grown, base, block)


def test_squeeze_excitation_reduced_channels_grow_alone():
    """The squeeze-excitation's first conv (its ReLU per channel) is a layer of its own to widen:
    its output units and biases copied, the last conv's incoming weights divided (its bias kept)."""
    torch.manual_seed(0)
    base = small_x3d().double()
    grown = copy.deepcopy(base)
    net2net.wider(grown, f"{SE_BLOCK}.branch2.norm_b.1.block.0", 8 + 3, generator=gen(4))
    g = replica_mapping(8, 11, gen(4))
    (old1, old2), (new1, new2) = se_convs(base, SE_BLOCK), se_convs(grown, SE_BLOCK)
    assert torch.equal(new1.weight, old1.weight[g]) and torch.equal(new1.bias, old1.bias[g])
    assert_same(new2.weight, divide_incoming(old2.weight, g, replica_counts(g, 8), 1), rtol=1e-12)
    assert torch.equal(new2.bias, old2.bias)
    assert_block_unchanged(grown, base, SE_BLOCK)


def test_deeper_x3d_inserts_an_x3d_block_that_adds_zero():
    """An X3D block (depthwise 3×3×3 conv_b, Swish, no squeeze-excitation, identity shortcut) at
    the stream's width and the inner width of the block before it, its last BatchNorm's γ = β = 0:
    exact in eval and train mode; later blocks move up one index, so the state_dict is that of the
    grown architecture; its parameters join the optimizer; the grown model trains, stock and fused.
    (X3D-XS cut to 2 blocks a stage.)"""
    torch.manual_seed(0)
    base = cut(small_x3d()).double()
    grown = copy.deepcopy(base)
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    shifted = grown.blocks[2].res_blocks[1]
    net2net.deeper(grown, "blocks.2.res_blocks.0", optimizer=opt, generator=gen(1))  # mid-stage
    net2net.deeper(grown, "blocks.4.res_blocks.1", optimizer=opt, generator=gen(2))  # the last, read by the head
    new = grown.blocks[2].res_blocks[1]
    assert grown.blocks[2].res_blocks[2] is shifted and len(grown.blocks[2].res_blocks) == 3
    assert new.branch1_conv is None and new.branch1_norm is None
    conv_b = new.branch2.conv_b
    assert (conv_b.kernel_size, conv_b.stride, conv_b.groups, conv_b.out_channels) == ((3, 3, 3), (1, 1, 1), 108, 108)
    assert type(new.branch2.act_b) is Swish and type(new.branch2.norm_b[1]) is nn.Identity
    assert not new.branch2.norm_c.weight.any() and new.branch2.conv_a.weight.std() > 0
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}

    # the keys (and shapes) of the model with those two blocks built in
    fresh = cut(c3dzoo.x3d_xs(num_classes=5, dropout=0.0))
    fresh.blocks[2].res_blocks.insert(1, x3d_res_block(48, 108, 48, (1, 1, 1), 0))
    fresh.blocks[4].res_blocks.insert(2, x3d_res_block(192, 432, 192, (1, 1, 1), 0))
    assert list(grown.state_dict()) == list(fresh.state_dict())
    fresh.double().load_state_dict(grown.state_dict())  # strict: the same keys and shapes

    x = x3d_clip()
    assert_same_eval_then_train(grown, base, x, rtol=1e-10, train_rtol=1e-10)
    fused = copy.deepcopy(grown).eval()
    fused.fused = True
    with torch.no_grad():
        assert_same(fused(x), base.eval()(x), rtol=1e-10)

    for model, optimizer in ((grown, opt), (fused, torch.optim.SGD(fused.parameters(), lr=0.1))):
        model.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
        loss.backward()
        assert torch.isfinite(loss)
        # the zeroed γ gets a gradient, so the new block learns
        assert model.blocks[2].res_blocks[1].branch2.norm_c.weight.grad.abs().sum() > 0
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_x3d_wider_rewrites_sgd_momentum_and_adam_moments():
    """SGD momentum follows conv_a's growth (conv_b's and the squeeze-excitation's last conv's
    buffers copied with g, its first conv's divided): a momentum-only step after growth equals
    growing after it. Adam moments follow the stem stream's growth (conv_xy's copied, the
    readers' first moments divided by the counts, second moments by their squares). (X3D-XS cut
    to 2 blocks a stage.)"""
    torch.manual_seed(0)
    model = cut(small_x3d()).train()  # float32, as a model being trained
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model(x3d_clip(0, torch.float32)).square().mean().backward()
    opt.step()
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    model_a, opt_a = copy.deepcopy((model, opt))
    model_b, opt_b = copy.deepcopy((model, opt))
    layer = f"{SE_BLOCK}.branch2.conv_a"
    net2net.wider(model_a, layer, 112, generator=gen(5), optimizer=opt_a)
    params = dict(model_a.named_parameters())
    assert {id(p) for g in opt_a.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    assert all(opt_a.state[p]["momentum_buffer"].shape == p.shape for p in params.values())
    g = replica_mapping(108, 112, gen(5))
    se = f"{SE_BLOCK}.branch2.norm_b.1.block."
    for copied in ("branch2.conv_b.weight", "branch2.norm_b.0.weight", "branch2.norm_b.1.block.2.weight",
                   "branch2.norm_b.1.block.2.bias"):
        name = f"{SE_BLOCK}.{copied}"
        assert torch.equal(opt_a.state[params[name]]["momentum_buffer"], momentum[name][g]), name
    assert_same(opt_a.state[params[se + "0.weight"]]["momentum_buffer"],
                divide_incoming(momentum[se + "0.weight"], g, replica_counts(g, 108), 1))
    _zero_grad_step(model_a, opt_a)
    _zero_grad_step(model_b, opt_b)
    net2net.wider(model_b, layer, 112, generator=gen(5))
    for key, value in model_b.state_dict().items():
        assert_same(model_a.state_dict()[key], value)

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.zero_grad()
    model(x3d_clip(3, torch.float32)).square().mean().backward()
    adam.step()
    before = {n: {k: v.clone() for k, v in adam.state[p].items()} for n, p in model.named_parameters()}
    net2net.wider_group(model, "stem", 27, generator=gen(6), optimizer=adam)
    g = replica_mapping(24, 27, gen(6))
    counts = replica_counts(g, 24)
    state = {n: adam.state[p] for n, p in model.named_parameters()}
    for copied in ("blocks.0.conv.conv_t.weight", "blocks.0.conv.conv_xy.weight", "blocks.0.norm.bias"):
        assert torch.equal(state[copied]["exp_avg_sq"], before[copied]["exp_avg_sq"][g]), copied
    for reader in ("blocks.1.res_blocks.0.branch1_conv.weight", "blocks.1.res_blocks.0.branch2.conv_a.weight"):
        assert_same(state[reader]["exp_avg"], divide_incoming(before[reader]["exp_avg"], g, counts, 1))
        assert_same(state[reader]["exp_avg_sq"], divide_incoming(before[reader]["exp_avg_sq"], g, counts, 1, power=2))
    _zero_grad_step(model, adam)  # the moments fit their parameters
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("call,match", [
    (lambda m: net2net.wider(m, f"{SE_BLOCK}.branch2.conv_b", 120),
     r"'blocks.2.res_blocks.0.branch2.conv_b' is a depthwise Conv3d \(groups=108\).*"
     r"wider\(model, 'blocks.2.res_blocks.0.branch2.conv_a', width\)"),
    (lambda m: net2net.wider(m, "blocks.0.conv.conv_xy", 30),
     r"'blocks.0.conv.conv_xy' is a depthwise Conv3d.*wider_group\(model, 'stem', width\)"),
    (lambda m: net2net.wider(m, "blocks.0.conv.conv_t", 30),
     r"'blocks.0.conv.conv_t' writes into the residual stream 'stem'.*wider_group\(model, 'stem', width\)"),
    (lambda m: net2net.wider(m, f"{SE_BLOCK}.branch2.norm_b.1.block.2", 120),
     r"last conv of a squeeze-excitation.*'blocks.2.res_blocks.0.branch2.conv_b'.*"
     r"wider\(model, 'blocks.2.res_blocks.0.branch2.conv_a', width\)"),
    (lambda m: net2net.wider(m, f"{SE_BLOCK}.branch2.norm_b.1", 120), "is a SqueezeExcitation, not a Conv3d"),
    (lambda m: net2net.wider(m, "blocks.1.res_blocks.0.branch1_conv", 30),
     "writes into the residual stream 'blocks.1'.*wider_group"),
    (lambda m: net2net.wider(m, f"{PLAIN_BLOCK}.branch2.conv_c", 60), "residual stream 'blocks.2'"),
    (lambda m: net2net.wider(m, "blocks.5.proj", 8), "'blocks.5.proj' is the output layer of X3D"),
    (lambda m: net2net.wider_group(m, "blocks.5", 300), "unknown residual stream 'blocks.5'"),
    (lambda m: net2net.wider(m, "blocks.5.pool.pre_conv", 432), "larger than"),
    (lambda m: net2net.deeper(m, "blocks.5"), "not one of blocks.1.res_blocks.0, "),
    (lambda m: net2net.deeper(m, f"{SE_BLOCK}.branch2"), "not one of"),
    (lambda m: net2net.deeper(m, SE_BLOCK, name="blocks.2.res_blocks.3"), "'blocks.2.res_blocks.1'"),
])
def test_x3d_errors_leave_model_unchanged(call, match):
    model = c3dzoo.x3d_xs(num_classes=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(before, model)
