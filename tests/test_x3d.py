"""PyTorchVideo's X3D-XS, -S, -M and -L: its module tree, initialisation and outputs; logits by
default, its softmax on request; small clips; the Triton kernels on every kind of X3D layer
(depthwise convs ending in Swish, squeeze-excitation blocks, BN-less chains); fine-tuning helpers,
published weights and the command line.

Fused-vs-stock parity of the whole X3D-XS in every mode, ``c3dzoo.fuse`` and hooks are tested
with the other zoo models (test_models_zoo.py, test_hooks.py); Net2Net in test_net2net_x3d.py."""

import re

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, transfer
from c3dzoo.models import x3d
from c3dzoo.models.resnet3d import ResNetBasicHead, ResStage
from conditioning import condition_batch_norms
from interpreter import skip_unless_triton_runs_cpu_tensors
from same_model import assert_same_model
from twins import assert_triton_twin_matches
from test_data_folders import make_video
from test_weights import _same, _serve_pytorchvideo

# the hub builders' create_x3d arguments (pytorchvideo/models/hub/x3d.py)
HUB_ARGS = {"x3d_xs": dict(input_clip_length=4, input_crop_size=160),
            "x3d_s": dict(input_clip_length=13, input_crop_size=160),
            "x3d_m": dict(input_clip_length=16, input_crop_size=224),
            "x3d_l": dict(input_clip_length=16, input_crop_size=312, depth_factor=5.0)}


@pytest.mark.parametrize("name", list(HUB_ARGS))
def test_matches_pytorchvideo(name):
    """Same seed, same weights and keys; with ``softmax=True`` the same output bit for bit on the
    clips each was built for (fused: within fp32 rounding); without, logits whose softmax it is
    (one position is left after the head's pool at that size)."""
    pytorchvideo_x3d = pytest.importorskip("pytorchvideo.models.x3d", reason="pytorchvideo is not installed")
    torch.manual_seed(0)
    theirs = pytorchvideo_x3d.create_x3d(**HUB_ARGS[name]).eval()
    torch.manual_seed(0)
    ours = c3dzoo.get_model(name, softmax=True).eval()
    size = HUB_ARGS[name]["input_crop_size"]
    x = torch.randn(1, 3, HUB_ARGS[name]["input_clip_length"], size, size, generator=torch.Generator().manual_seed(1))
    assert_same_model(theirs, ours, x, [x])
    logits = c3dzoo.get_model(name).eval()
    logits.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(logits(x).softmax(1), theirs(x), rtol=1e-5, atol=1e-7)
    # the helpers are PyTorchVideo's
    layer_utils = pytest.importorskip("pytorchvideo.layers.utils")
    for width in (8, 12, 24, 54, 108, 216, 432):
        for multiplier in (0.0, 0.0625, 1.0, 2.0, 2.25):
            assert x3d.round_width(width, multiplier) == layer_utils.round_width(width, multiplier)
    assert [x3d.round_repeats(r, f) for r in (1, 2, 5, 3) for f in (0, 2.2, 5.0)] == \
        [layer_utils.round_repeats(r, f) for r in (1, 2, 5, 3) for f in (0, 2.2, 5.0)]


@pytest.mark.parametrize("name, keys, params, depths", [("x3d_xs", 563, 3_794_274, [3, 5, 11, 7]),
                                                        ("x3d_l", 1141, 6_153_384, [5, 10, 25, 15])])
def test_layout_and_initialisation(name, keys, params, depths):
    """What the published weights need without PyTorchVideo at hand (the numbers pytorchvideo
    0.1.5's create_x3d gives): keys and parameters, stage depths and widths (24, 48, 96, 192 out;
    2.25× inside; squeeze-excitation to 8, 8, 16, 32 in every other block of a stage, from its
    first), depthwise conv_b, the stem's (2+1)D convs under PyTorchVideo's swapped names, stage 1's
    projection without a BatchNorm, the 2048-channel projected head pool; each block's last BN γ
    zero, the SE's biases zero."""
    model = c3dzoo.get_model(name)
    sd = model.state_dict()
    assert len(sd) == keys and sum(p.numel() for p in model.parameters()) == params
    assert list(sd)[:3] == ["blocks.0.conv.conv_t.weight", "blocks.0.conv.conv_xy.weight", "blocks.0.norm.weight"]
    assert list(sd)[-3:] == ["blocks.5.pool.post_conv.weight", "blocks.5.proj.weight", "blocks.5.proj.bias"]
    assert sd["blocks.0.conv.conv_t.weight"].shape == (24, 3, 1, 3, 3)
    assert sd["blocks.0.conv.conv_xy.weight"].shape == (24, 1, 5, 1, 1)
    assert model.blocks[0].conv.conv_xy.padding == (2, 0, 0) and model.blocks[0].conv.conv_t.stride == (1, 2, 2)
    assert [len(stage.res_blocks) for stage in model.blocks[1:5]] == depths
    for stage, (inner, out, squeezed) in zip(model.blocks[1:5], [(54, 24, 8), (108, 48, 8), (216, 96, 16),
                                                                 (432, 192, 32)]):
        first = stage.res_blocks[0]
        assert first.branch1_conv.stride == first.branch2.conv_b.stride == (1, 2, 2)
        assert first.branch1_conv.out_channels == out
        for index, block in enumerate(stage.res_blocks):
            branch = block.branch2
            assert (branch.conv_a.out_channels, branch.conv_c.out_channels) == (inner, out)
            assert branch.conv_b.groups == inner and branch.conv_b.weight.shape == (inner, 1, 3, 3, 3)
            assert type(branch.act_b) is x3d.Swish and isinstance(branch.act_b, nn.SiLU)
            se = branch.norm_b[1]
            if index % 2 == 0:
                assert type(se) is x3d.SqueezeExcitation and se.block[0].out_channels == squeezed
                assert not se.block[0].bias.any() and not se.block[2].bias.any()
            else:
                assert type(se) is nn.Identity
            assert torch.count_nonzero(branch.norm_c.weight) == 0
            assert (block.branch1_conv is None) == (index > 0)
    assert model.blocks[1].res_blocks[0].branch1_norm is None
    assert all(stage.res_blocks[0].branch1_norm is not None for stage in model.blocks[2:5])
    head = model.blocks[5]
    assert head.pool.pre_conv.weight.shape == (432, 192, 1, 1, 1) and head.pool.post_conv.weight.shape == (2048, 432, 1,
                                                                                                         1, 1)
    assert head.pool.pool.kernel_size == ((4, 5, 5) if name == "x3d_xs" else (16, 10, 10))
    assert head.dropout.p == 0.5 and head.proj.weight.shape == (400, 2048) and head.activation is None
    assert type(c3dzoo.get_model(name, softmax=True).blocks[5].activation) is nn.Softmax
    assert c3dzoo.get_model(name, dropout=0.0).blocks[5].dropout is None
    text = repr(model)
    assert "ResNetBasicStem" in text and "Conv2plus1d" in text and "ChainSequential" not in text


def test_logits_by_default_and_small_clips():
    """Logits (any real numbers), or probabilities with the softmax; the head's pool covers
    smaller features whole, so one frame of 1 × 1 pixels runs; a clip is checked for its shape."""
    torch.manual_seed(0)
    model = c3dzoo.x3d_xs(num_classes=5).eval()
    probabilities = c3dzoo.x3d_xs(num_classes=5, softmax=True).eval()
    probabilities.load_state_dict(model.state_dict())
    with torch.no_grad():
        for shape in [(1, 3, 1, 32, 32), (2, 3, 1, 1, 1), (2, 3, 6, 190, 170)]:
            logits, probs = model(torch.randn(shape)), probabilities(torch.randn(shape))
            assert logits.shape == probs.shape == (shape[0], 5)
            assert (logits < 0).any() and torch.allclose(probs.sum(1), torch.ones(shape[0]))
    with pytest.raises(ValueError, match=r"N, 3, frames, height, width"):
        model(torch.randn(1, 1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"crop_size >= 32"):
        x3d.X3D(crop_size=16)


def _cut_x3d(classes: int) -> nn.Module:
    """X3D-XS cut to stages 1 and 2 of 2 and 1 blocks, and a head over stage 2's channels (every
    kind of layer it has: the stem's bare 1×3×3 conv and depthwise 5×1×1 conv; stage 1's BN-less
    projection, stage 2's with a BN; depthwise 3×3×3 conv_b striding space and not, followed by a
    BN and an SE or by a BN and Swish directly; the projected head pool), its BatchNorms
    conditioned as test_models_zoo's ``_condition`` does (γ = 0.5, β = ±3; +3 before a residual
    add), so no ReLU input lies within rounding of its kink and fp32 gradients compare tightly."""
    model = c3dzoo.x3d_xs(num_classes=classes, dropout=0.0)
    stage2 = model.blocks[2].res_blocks[0]
    head = ResNetBasicHead(x3d.HEAD_DIM_OUT, classes, None, 0.0,
                           pool=x3d.ProjectedPool(stage2.branch2.conv_c.out_channels, 108, x3d.HEAD_DIM_OUT,
                                                  (1, 4, 4)))
    model.blocks = nn.ModuleList([model.blocks[0], ResStage(list(model.blocks[1].res_blocks[:2])),
                                  ResStage([stage2]), head])
    condition_batch_norms(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the SE's biases too (initialised to zero)
        for se in (m for m in model.modules() if isinstance(m, x3d.SqueezeExcitation)):
            for conv in (se.block[0], se.block[2]):
                conv.bias.uniform_(-0.5, 0.5, generator=gen)
    return model


def test_triton_backend_runs_every_kind_of_x3d_layer():
    """Under the interpreter on a CPU: the Triton kernels take every chain of the cut X3D with
    nothing falling back (the depthwise kernels with the SiLU epilogue among them), and match the
    stock model in eval mode and in a training step (outputs, gradients, running statistics)."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_triton_twin_matches(_cut_x3d(4), x)


def test_fine_tuning_helpers_know_its_head():
    """The head is ``blocks.5.proj``: found, replaced with PyTorchVideo's initialisation, skipped
    when loading; ``freeze`` counts the blocks (the head block, its projected pool with it,
    trains); features default to the head's pool (post_conv after its ReLU, averaged: 2048-d)."""
    torch.manual_seed(0)
    source = c3dzoo.x3d_xs().state_dict()
    model = c3dzoo.x3d_xs(num_classes=7)
    assert transfer.head_name(model) == "blocks.5.proj" and transfer.head_classes(model) == 7
    with pytest.raises(transfer.PretrainedError, match=r"has 400 classes \(blocks.5.proj.weight 400×2048\)"):
        transfer.load_pretrained(model, source)
    report = transfer.load_pretrained(model, source, head="skip")
    assert report.head == "blocks.5.proj" and report.file_classes == 400
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if not k.startswith("blocks.5.proj"))
    transfer.replace_head(model, 5)
    head = model.blocks[5].proj
    assert type(head) is nn.Linear and head.weight.shape == (5, 2048)
    assert 0.005 < head.weight.std().item() < 0.015 and not head.bias.any()  # N(0, 0.01²), zero bias
    layers = transfer.model_layers(model)
    assert layers == [f"blocks.{i}" for i in range(6)]
    assert transfer.freeze(model, "features") == layers[:-1]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("blocks.5.") for n in trainable)
    assert c3dzoo.cli.features.DEFAULT_LAYER["X3D"](model) == "blocks.5.pool"
    fused = c3dzoo.fuse(c3dzoo.x3d_xs(num_classes=3))  # a traced copy: the same names
    assert transfer.head_name(fused) == "blocks.5.proj" and transfer.model_layers(fused)[-1] == "blocks.5"


def test_train_grow_and_extract_features_on_the_command_line(tmp_path, capsys):
    """The main job with --model x3d_xs, fused (cross-entropy on its logits), growing a stage's
    stream, a block's conv_a (its depthwise conv_b and squeeze-excitation with it) and inserting a
    block (the checkpoint replays all three); then features from its checkpoint default to the
    head's pool, averaged over positions as the head does."""
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "x3d_xs", "--epochs", "2", "--train-samples", "8", "--val-samples", "4",
                     "--batch-size", "4", "--num-classes", "3", "--frames", "4", "--size", "32", "--device", "cpu",
                     "--no-progress", "--grow", "1:wider=blocks.1*1.5,1:wider=blocks.2.res_blocks.0.branch2.conv_a*1.5,"
                     "1:deeper=blocks.3.res_blocks.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training x3d_xs" in printed and "wider blocks.1 24 -> 36 units" in printed
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = ckpt.stock_model(checkpoint)
    assert type(model).__name__ == "X3D" and model.blocks[5].proj.out_features == 3
    grown = model.blocks[2].res_blocks[0].branch2
    assert model.blocks[1].res_blocks[0].branch2.conv_c.out_channels == 36
    assert grown.conv_b.groups == grown.norm_b[1].block[2].out_channels == 162
    assert len(model.blocks[3].res_blocks) == 12
    path = tmp_path / "features.pt"
    assert cli.main(["features", "--checkpoint", str(out / "last.pt"), "--synthetic", "3", "--frames", "4",
                     "--size", "32", "--out", str(path), "--device", "cpu"]) == 0
    saved = torch.load(path, weights_only=True)
    assert saved["layer"] == "blocks.5.pool" and saved["features"].shape == (3, 2048)


def test_published_weights_load_and_predict_feeds_their_clips(tmp_path, monkeypatch, capsys):
    """x3d_xs:kinetics400 (PyTorchVideo's X3D_XS.pyth, its hub's keys) loads strictly into the
    stock and the fused model, and predict feeds it 4 frames of 182 × 182 (its test crop)."""
    state = _serve_pytorchvideo("x3d_xs", tmp_path, monkeypatch)
    model = c3dzoo.x3d_xs(weights="kinetics400", fused=True)
    assert model.fused and _same(model.state_dict(), state)
    checkpoint = ckpt.load("x3d_xs:kinetics400")
    assert (checkpoint["data"]["frames"], checkpoint["data"]["stride"], tuple(checkpoint["data"]["size"])) == \
        (4, 12, (182, 182))
    shapes, real = [], x3d.check_video_input
    monkeypatch.setattr(x3d, "check_video_input", lambda x, *rest: (shapes.append(tuple(x.shape[1:])), real(x, *rest)))
    video = make_video(tmp_path / "clip.mp4", frames=40, size=40)
    assert cli.main(["predict", video, "--checkpoint", "x3d_xs:kinetics400", "--device", "cpu"]) == 0
    assert shapes == [(3, 4, 182, 182)]
    assert re.fullmatch(rf"{re.escape(video)}: .+ [0-9.]+%.*", capsys.readouterr().out.strip().splitlines()[-1])
