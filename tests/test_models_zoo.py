"""The video ResNets and the Jester ConvColumn: fused and stock forwards agree, checkpoints are
interchangeable (with each other and with torchvision), ``c3dzoo.fuse`` handles them.

Comparing gradients of whole piecewise-linear networks needs care. A ReLU or LeakyReLU input
within rounding distance of zero, or two MaxPool3d inputs within rounding distance of each other,
may land on different sides in two fp32 computations that are both correct, and the gradient then
differs by a finite amount. A freshly initialised network has many such values: in training
mode on 2×3×4×32×32 batches, fused and stock r2plus1d_18 input gradients differ by 1–2% for 4 of
8 random inputs, and stock alone moves as much when its input is perturbed by 1e-7. So before
comparing gradients,
``_condition`` shifts every BatchNorm3d so that the activation after it is far from its kink
(each channel then lies wholly on one side; both sides occur) and ``_calibrate`` gives eval-mode
BN the batch's own statistics. The ResNets are then compared tightly everywhere. Jester's pools
cannot be conditioned that way (2 M pooling windows: a few near-ties are certain), so its
gradients upstream of a pool are compared in norm, with a tolerance set by that effect.
Forwards are continuous and are also compared tightly without conditioning.
"""

from __future__ import annotations

import copy
import re
from typing import Dict

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.cli.check import _judge_group

# name → (input shape, parameter count with the builder's default num_classes, conv chains)
MODELS = {
    # stem 1 + 8 blocks × 2 + 3 shortcuts
    "r3d_18": ((2, 3, 2, 24, 24), 33_371_472, 20),
    "mc3_18": ((2, 3, 2, 24, 24), 11_695_440, 20),
    # stem 2 + 8 blocks × 4 + 3 shortcuts
    "r2plus1d_18": ((2, 3, 2, 24, 24), 31_505_325, 37),
    # stem 2 + 16 blocks × 4 + 3 shortcuts
    "r2plus1d_34": ((2, 3, 2, 24, 24), 63_697_175, 69),
    # parameters counted from the architecture: 4 conv blocks 2,304,264 + conv_layer5 1,180,160
    # + head 402,459; 4 blocks × 2 chains (conv_layer5 has no BN or activation)
    "jester_convcolumn": ((2, 3, 18, 84, 84), 3_886_883, 8),
    # stem 2 + 1 + 2, then 9 Inception blocks of 1 + 3 + 3 + 1 chains; 64×64 pixels leave its last
    # BatchNorms 2 × 2 positions per clip
    "s3d": ((2, 3, 8, 64, 64), 8_320_048, 77),
    # PyTorchVideo's ResNet-50s: stem 1 + 16 bottlenecks × 3 + 4 shortcuts; 4 frames of 64 × 64
    # leave stage 4's BatchNorms 2 × 2 positions a frame (2 frames after I3D's and C2D's temporal
    # pool): at 32 × 32 its BatchNorm γ gradients were ill-conditioned (stock and fused both
    # ~2e-4 from float64), and one near-tie in the temporal pool flipped
    "slow_r50": ((2, 3, 4, 64, 64), 32_454_096, 53),
    "i3d_r50": ((2, 3, 4, 64, 64), 28_043_472, 53),
    "c2d_r50": ((2, 3, 4, 64, 64), 24_327_632, 53),
    # R(2+1)D R50: stem 1 + 16 bottlenecks × 4 (its (2+1)D conv_b is two chains) + 4 shortcuts;
    # no stem max-pool, every stage strides space and stages 3-4 time: 8 frames of 64 × 64 leave
    # stage 4's BatchNorms 2 × 2 × 2 positions a clip
    "r2plus1d_r50": ((2, 3, 8, 64, 64), 28_107_600, 69),
    # CSN R101: stem 1 + 33 bottlenecks × 3 (conv_b depthwise 3×3×3) + 4 shortcuts; it strides
    # time too: 16 frames of 64 × 64 leave stage 4's BatchNorms 2 × 2 × 2 positions a clip (at 8
    # frames, 1 × 2 × 2: 8 values a channel, and fp32 gradients ill-conditioned)
    "csn_r101": ((2, 3, 16, 64, 64), 22_213_776, 104),
    # two pathways of 53 chains each, and 4 fusions (after the stems and stages 1-3); 8 frames for
    # the fast pathway, 2 for the slow one, 64 × 64 pixels: the slow pathway's last BatchNorms see
    # 2 × 2 × 2 × 2 values per channel (at 4 × 32 × 32, 2 values: fp32 gradients were all rounding
    # noise, stock's as fused's, 100 % from float64)
    "slowfast_r50": ((2, 3, 8, 64, 64), 34_566_488, 110),
    # X3D-XS: its depthwise conv_b chains end in Swish (SiLU) where the block has no squeeze-
    # excitation; 4 frames of 64 × 64 leave stage 4's BatchNorms 2 × 2 positions a frame. The FX
    # fuse takes stem 1 + 26 blocks × 3 + 3 shortcuts with a BN + 15 SE conv → ReLU + head 2 (the
    # model's own forward also runs the stem's bare 1×3×3 conv and stage 1's BN-less shortcut
    # through the fused op, and leaves the SEs stock)
    "x3d_xs": ((2, 3, 4, 64, 64), 3_794_274, 99),
}
RESNETS = ("r3d_18", "mc3_18", "r2plus1d_18")
# S3D in training mode: its last BatchNorms see 8 values per channel here, and fp32 rounding
# grows through its 77 chains to ~1e-4 of the largest weight gradient in stock as in fused (both
# measured against float64), beyond a fused-vs-stock tolerance; these are judged by the budget
JUDGED_BY_BUDGET = {"train": ("s3d",)}
# the same for the unconditioned training-mode forward of the 34-layer R(2+1)D (eps 1e-3, 16
# blocks): both fp32 outputs are ~5e-4 (relative) from float64 there
FORWARD_JUDGED_BY_BUDGET = ("r2plus1d_34",)
MODES = ("train", "eval", "frozen_bn")
# S3D's inference-mode gradients: a max-pool in every Inception block and between stages, whose
# inputs (γ = 0.5 after conditioning) have near-ties that two correct fp32 computations break
# differently — fused against stock, the worst gradient differs by 1e-4 to 5e-2 (relative L2) over
# inputs, and stock alone as much between one CPU thread and two. In float64 no near-tie flips, so
# there the gradients are compared tightly; the fp32 output and buffers are compared as elsewhere.
GRADIENTS_IN_FLOAT64 = {"eval": ("s3d",), "frozen_bn": ("s3d",)}
# Jester gradients upstream of a MaxPool3d: relative L2 error allowed (measured up to 7e-3 over
# several inputs, from pooling near-ties; a stock fp32 run differs from fp64 by as much)
POOLED_GRAD_RTOL = 2e-2
_JESTER_BEFORE_POOL = re.compile(r"input|conv_layer[1-4]\.")
_JESTER_BN_CONV_BIAS = re.compile(r"conv_layer[1-4]\.[03]\.bias\.grad")


def _build(name: str, fused: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return c3dzoo.get_model(name, fused=fused)


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(name, stock model, fused model), both built from seed 0. Tests deep-copy before use."""
    name = request.param
    return name, _build(name, fused=False), _build(name, fused=True)


@pytest.fixture(scope="module")
def conditioned_state(pair):
    """The stock model's state_dict after ``_condition`` and ``_calibrate`` on the test input."""
    name, stock, _ = pair
    stock = copy.deepcopy(stock)
    _condition(stock)
    _calibrate(stock, _input(name))
    return stock.state_dict()


def _input(name: str) -> torch.Tensor:
    return torch.randn(MODELS[name][0], generator=torch.Generator().manual_seed(1))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float = 0.0) -> None:
    # fp32 sums in a different order: relative error, plus an absolute part relative to the
    # tensor's magnitude (elements near zero carry the error of their larger neighbours) and an
    # optional floor (gradients that are analytically zero hold only rounding noise).
    # (torch.testing.assert_close is exact about this too, but several times slower on 30 M values)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    actual, expected = actual.detach(), expected.detach()
    magnitude = expected.abs()
    atol = 2e-4 * magnitude.max().item() + floor
    excess = (actual - expected).abs_().sub_(magnitude.mul_(1e-4).add_(atol))
    worst = int(excess.argmax())
    assert excess.view(-1)[worst] <= 0, (
        f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements differ; worst: "
        f"{actual.view(-1)[worst].item():.6g} vs {expected.view(-1)[worst].item():.6g} (atol {atol:.2e}, rtol 1e-4)"
    )


def _assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, floor: float) -> None:
    err = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    assert err <= rtol * ref + floor, f"{what}: relative L2 error {err / max(ref, 1e-30):.2e} > {rtol:.0e}"


def _assert_within_budget(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                          reference: Dict[str, torch.Tensor]) -> None:
    """The parity budget (``c3dzoo check``'s): per group of tensors, the fused fp32 error against
    float64 at most twice stock fp32's."""
    groups = {"output": lambda k: k == "output", "input grad": lambda k: k == "input.grad",
              "parameter grads": lambda k: k.endswith(".grad") and k != "input.grad",
              "buffers": lambda k: not k.endswith(".grad") and k != "output"}
    for group, member in groups.items():
        keys = [k for k in reference if member(k)]
        fused_err, stock_err, ok, worst = _judge_group({k: actual[k] for k in keys}, {k: expected[k] for k in keys},
                                                       {k: reference[k] for k in keys}, torch.float32)
        assert ok, f"{group}: fused error {fused_err:.2e} (worst {worst}) > 2 × stock's {stock_err:.2e}"


def _set_mode(model: nn.Module, mode: str) -> None:
    model.train(mode != "eval")
    for m in model.modules():
        # Jester's BatchNorm1d head is no fused chain; on a batch of 2 in training mode it maps
        # every feature to ±1 and passes back almost no gradient, so it stays in eval mode
        if isinstance(m, nn.BatchNorm1d) or (mode == "frozen_bn" and isinstance(m, nn.BatchNorm3d)):
            m.eval()


def _condition(model: nn.Module) -> None:
    """BN γ = 0.5 and β = ±3 (a random sign per channel), so every activation input after a
    BatchNorm3d lies ~3 ± 0.5·x̂ from the kink. BNs that feed a residual add get β = +3: with a
    non-negative shortcut the block's final ReLU is then far from its kink too."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.BatchNorm3d):
                continue
            m.weight.fill_(0.5)
            if name.endswith(("conv2.1", "downsample.1", "norm_c", "branch1_norm")):
                m.bias.fill_(3.0)
            else:
                m.bias.copy_(3.0 * (torch.randint(0, 2, (m.num_features,), generator=gen) * 2 - 1))


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics of every BatchNorm3d := the statistics of batch ``x``, so that eval-mode
    BN normalises as training-mode BN does (and conditioning keeps its effect)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    _set_mode(model, "train")
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1


def _run(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Output, input gradient, parameter gradients and buffers after one forward and backward."""
    x = x.clone().requires_grad_()
    torch.manual_seed(2)  # the same dropout masks (jester) in both runs
    out = model(x)
    # a fixed random weighting, so that every logit's gradient is exercised
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    result = {"output": out.detach(), "input.grad": x.grad}
    for key, p in model.named_parameters():
        assert p.grad is not None, f"{key}: no gradient"
        result[key + ".grad"] = p.grad
    result.update({key: b.clone() for key, b in model.named_buffers()})
    return result


def test_state_dicts_interchangeable(pair):
    name, stock, fused = pair
    stock_sd, fused_sd = stock.state_dict(), fused.state_dict()
    assert list(stock_sd) == list(fused_sd)
    for key in stock_sd:
        assert stock_sd[key].shape == fused_sd[key].shape, key
        assert torch.equal(stock_sd[key], fused_sd[key]), f"{key}: same seed, different values"
    # load into models whose every parameter and buffer was zeroed, so values must really move
    for target, source in ((copy.deepcopy(fused), stock_sd), (copy.deepcopy(stock), fused_sd)):
        for value in target.state_dict().values():
            value.zero_()
        target.load_state_dict(source, strict=True)
        assert all(torch.equal(v, source[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_stock(pair, conditioned_state, mode):
    name, stock, fused = pair
    x = _input(name)
    stock, fused = copy.deepcopy(stock), copy.deepcopy(fused)
    stock.load_state_dict(conditioned_state)
    fused.load_state_dict(conditioned_state)
    for model in (stock, fused):
        _set_mode(model, mode)
    expected, actual = _run(stock, x), _run(fused, x)
    assert list(actual) == list(expected)

    if name in JUDGED_BY_BUDGET.get(mode, ()):
        reference = _run(copy.deepcopy(stock).double(), x.double())
        _assert_within_budget(actual, expected, reference)
        return
    if name in GRADIENTS_IN_FLOAT64.get(mode, ()):
        expected64 = _run(copy.deepcopy(stock).double(), x.double())
        actual64 = _run(copy.deepcopy(fused).double(), x.double())
        for key in expected:
            if key.endswith(".grad"):
                expected[key], actual[key] = expected64[key], actual64[key]
    grads = [v for k, v in expected.items() if k.endswith(".grad")]
    grad_floor = 1e-6 * max(g.abs().max().item() for g in grads)
    for key, want in expected.items():
        got = actual[key]
        if name != "jester_convcolumn":
            _assert_close(got, want, key, floor=grad_floor if key.endswith(".grad") else 0.0)
        elif mode == "train" and _JESTER_BN_CONV_BIAS.fullmatch(key):
            # a conv bias in front of a training-mode BN has an analytically zero gradient (the BN
            # removes any per-channel shift): the fused one must be rounding noise (stock's is too,
            # but how much depends on its conv backward's summation order: 1.1e-4 of the
            # weight gradient with one CPU thread, over the 1e-4 bound)
            bound = 1e-4 * expected[key.replace("bias", "weight")].abs().max().item()
            assert got.abs().max() <= bound, key
        elif key.endswith(".grad") and _JESTER_BEFORE_POOL.match(key):
            _assert_close_norm(got, want, key, POOLED_GRAD_RTOL, floor=grad_floor * want.numel() ** 0.5)
        else:
            _assert_close(got, want, key, floor=grad_floor if key.endswith(".grad") else 0.0)
    counts = {m.num_batches_tracked.item() for m in fused.modules() if isinstance(m, nn.BatchNorm3d)}
    assert counts == ({2} if mode == "train" else {1})  # one calibration batch, plus this one in training


def test_fused_forward_at_initialisation(pair):
    """Without conditioning: the forward is continuous, so outputs and the running statistics a
    training step leaves must agree tightly even where gradients may not."""
    name, stock, fused = pair
    stock, fused = copy.deepcopy(stock), copy.deepcopy(fused)
    x = _input(name)
    with torch.no_grad():
        for model in (stock, fused):
            _set_mode(model, "train")
        if name in FORWARD_JUDGED_BY_BUDGET:
            reference = copy.deepcopy(stock).double()
            results = []
            for model, dtype in ((fused, torch.float32), (stock, torch.float32), (reference, torch.float64)):
                torch.manual_seed(2)
                results.append({"output": model(x.to(dtype)), **{k: b for k, b in model.named_buffers()}})
            _assert_within_budget(*results)
            return
        torch.manual_seed(2)
        expected = stock(x)
        torch.manual_seed(2)
        _assert_close(fused(x), expected, "output")
    fused_buffers = dict(fused.named_buffers())
    for key, want in stock.named_buffers():
        _assert_close(fused_buffers[key], want, key)


def test_fx_fuse(pair):
    name, stock, _ = pair
    stock = copy.deepcopy(stock).eval()
    gm = c3dzoo.fuse(stock)
    assert gm.c3dzoo_fused_chains == MODELS[name][2]
    assert list(gm.state_dict()) == list(stock.state_dict())
    x = _input(name)
    with torch.no_grad():
        _assert_close(gm(x), stock(x), "fx-fused output")


def test_parameter_count(pair):
    name, stock, _ = pair
    assert sum(p.numel() for p in stock.parameters()) == MODELS[name][1]


def test_bad_input_raises(pair):
    name, stock, _ = pair
    if name == "jester_convcolumn":
        bad = [(2, 3, 16, 84, 84), (2, 3, 18, 112, 112), (2, 1, 18, 84, 84), (3, 18, 84, 84)]
        match = r"\(N, 3, 18, 84, 84\)"
    else:
        bad = [(2, 3, 4, 32), (2, 1, 4, 32, 32), (2, 3, 4, 32, 32, 1), (2, 3, 0, 32, 32)]
        match = "N, 3, frames, height, width"
    for shape in bad:
        with pytest.raises(ValueError, match=match):
            stock(torch.zeros(shape))


@pytest.mark.parametrize("name", RESNETS)
def test_matches_torchvision(name):
    video = pytest.importorskip("torchvision.models.video", reason="torchvision is not installed")
    theirs = getattr(video, name)(num_classes=400).eval()
    ours = _build(name, fused=False).eval()
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(our_sd) == list(their_sd)
    assert all(our_sd[k].shape == v.shape for k, v in their_sd.items())
    ours.load_state_dict(their_sd, strict=True)
    x = _input(name)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(ours(x), expected)
        ours.fused = True
        _assert_close(ours(x), expected, "fused output vs torchvision")


def test_r2plus1d_34_has_the_ig65m_layout():
    """moabitcoin/ig65m-pytorch's R(2+1)D-34: torchvision's VideoResNet (3, 4, 6, 3) with the first
    blocks' conv2 of layers 2-4 rebuilt at Caffe2's widths and BatchNorm eps 1e-3. Its state_dict
    loads into ours, and both compute the same."""
    video = pytest.importorskip("torchvision.models.video.resnet", reason="torchvision is not installed")
    torch.manual_seed(0)
    theirs = video.VideoResNet(block=video.BasicBlock, conv_makers=[video.Conv2Plus1D] * 4, layers=[3, 4, 6, 3],
                               stem=video.R2Plus1dStem, num_classes=400)
    for layer, width in (("layer2", 288), ("layer3", 576), ("layer4", 1152)):
        planes = getattr(theirs, layer)[0].conv2[1].num_features
        getattr(theirs, layer)[0].conv2[0] = video.Conv2Plus1D(planes, planes, width)
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = 1e-3
    ours = _build("r2plus1d_34", fused=False)
    their_sd = theirs.state_dict()
    assert list(ours.state_dict()) == list(their_sd)
    ours.load_state_dict(their_sd, strict=True)
    x = _input("r2plus1d_34")
    with torch.no_grad():
        theirs.eval(), ours.eval()
        assert torch.equal(ours(x), theirs(x))


def test_user_edited_containers_of_a_fused_video_resnet_still_run():
    """What fine-tuning code does to a video ResNet: a new plain ``nn.Sequential`` stem (2-channel
    optical flow), a Dropout3d put into a block's Sequential, SyncBatchNorm from
    ``convert_sync_batchnorm`` (one process: it normalises as BatchNorm3d). The fused model runs
    what the stock one runs: modules that start no chain are simply called."""
    torch.manual_seed(0)
    fused = c3dzoo.r3d_18(num_classes=3, fused=True)
    fused.stem = nn.Sequential(nn.Conv3d(2, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                               nn.BatchNorm3d(64), nn.ReLU(inplace=True))
    fused.layer2[0].conv1.insert(1, nn.Dropout3d(0.0))
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = torch.randn(2, 2, 4, 32, 32)
    for model in (fused, stock):
        model(x).square().mean().backward()
    torch.testing.assert_close(fused.layer1[0].conv1[0].weight.grad, stock.layer1[0].conv1[0].weight.grad,
                               rtol=1e-4, atol=1e-6)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    fused.eval(), stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)


def test_printed_video_resnet_reads_as_torchvision_s():
    """The containers the fused forward calls with its chain print as torchvision's Sequentials."""
    text = repr(c3dzoo.r3d_18())
    assert "(layer1): Sequential(" in text and "(conv1): Sequential(" in text and "(stem): BasicStem(" in text
    assert "ChainSequential" not in text
