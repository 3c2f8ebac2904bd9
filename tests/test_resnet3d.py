"""PyTorchVideo's ResNet-50s (slow_r50, i3d_r50, c2d_r50): its module tree, initialisation and
outputs; the head that takes clips smaller than its pool; the Triton kernels on every kind of
layer they have; fine-tuning helpers; the command line.

Fused-vs-stock parity (outputs, gradients, running statistics in every mode), ``c3dzoo.fuse``,
hooks and published weights are tested with the other zoo models (test_models_zoo.py,
test_hooks.py, test_weights.py)."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, transfer
from c3dzoo.models.resnet3d import ResBlock, ResNetBasicHead, ResStage
from conditioning import condition_batch_norms
from interpreter import skip_unless_triton_runs_cpu_tensors
from same_model import assert_same_model
from twins import assert_same_eval_and_training_step, assert_triton_twin_matches

BUILDERS = ("slow_r50", "i3d_r50", "c2d_r50")


def _pytorchvideo_resnet(name: str) -> nn.Module:
    """PyTorchVideo's own model, built as its hub builds ``name`` (without its weights)."""
    resnet = pytest.importorskip("pytorchvideo.models.resnet", reason="pytorchvideo is not installed")
    temporal, spatial = (3, 1, 1), (1, 1, 1)
    kwargs = {
        "slow_r50": dict(stem_conv_kernel_size=(1, 7, 7), head_pool_kernel_size=(8, 7, 7), model_depth=50),
        "c2d_r50": dict(stem_conv_kernel_size=(1, 7, 7), stage1_pool=nn.MaxPool3d,
                        stage_conv_a_kernel_size=(spatial,) * 4),
        "i3d_r50": dict(stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
                        stage_conv_a_kernel_size=(temporal, [temporal, spatial], [temporal, spatial],
                                                  [spatial, temporal])),
    }[name]
    return resnet.create_resnet(**kwargs)


@pytest.mark.parametrize("name", BUILDERS)
def test_matches_pytorchvideo(name):
    """Same seed, same weights (the modules are built in PyTorchVideo's order); the same output
    bit for bit on the 8 × 224 × 224 clips these were trained on."""
    torch.manual_seed(0)
    theirs = _pytorchvideo_resnet(name).eval()
    torch.manual_seed(0)
    ours = c3dzoo.get_model(name).eval()
    x = torch.randn(1, 3, 8, 224, 224, generator=torch.Generator().manual_seed(1))
    assert_same_model(theirs, ours, x, [x])


def test_layout_and_initialisation():
    """What the published weights need without PyTorchVideo at hand: its keys, kernels and
    strides, and its initialisation (each block's last BatchNorm γ = 0)."""
    model = c3dzoo.i3d_r50()
    sd = model.state_dict()
    assert len(sd) == 320 and list(sd)[:2] == ["blocks.0.conv.weight", "blocks.0.norm.weight"]
    assert list(sd)[-2:] == ["blocks.6.proj.weight", "blocks.6.proj.bias"]
    assert sd["blocks.0.conv.weight"].shape == (64, 3, 5, 7, 7)
    assert sd["blocks.1.res_blocks.0.branch1_conv.weight"].shape == (256, 64, 1, 1, 1)
    assert "blocks.1.res_blocks.1.branch1_conv.weight" not in sd  # an identity shortcut
    # I3D alternates 3×1×1 and 1×1×1 first convs in stages 2 and 3, and starts stage 4 with 1×1×1
    kernels = [b.branch2.conv_a.kernel_size for b in model.blocks[3].res_blocks]
    assert kernels == [(3, 1, 1), (1, 1, 1), (3, 1, 1), (1, 1, 1)]
    assert [b.branch2.conv_a.kernel_size for b in model.blocks[5].res_blocks] == [(1, 1, 1), (3, 1, 1), (1, 1, 1)]
    first = model.blocks[4].res_blocks[0]
    assert first.branch2.conv_b.stride == (1, 2, 2) and first.branch1_conv.stride == (1, 2, 2)
    assert torch.count_nonzero(first.branch2.norm_c.weight) == 0 and torch.all(first.branch2.norm_b.weight == 1)
    assert type(model.blocks[2]) is nn.MaxPool3d and model.blocks[2].kernel_size == (2, 1, 1)
    slow = c3dzoo.slow_r50()
    assert len(slow.blocks) == 6 and slow.blocks[5].pool.kernel_size == (8, 7, 7)
    assert [b.branch2.conv_a.kernel_size for b in slow.blocks[3].res_blocks] == [(3, 1, 1)] * 6
    text = repr(model)
    assert text.startswith("ResNet3D(") and "(0): ResNetBasicStem(" in text and "(branch2): BottleneckBlock(" in text
    assert "ChainSequential" not in text


@pytest.mark.parametrize("name", BUILDERS)
def test_small_clips_run_and_the_smallest_is_checked(name):
    """The head's 8×7×7 (4×7×7) pool covers smaller features whole, so 32 × 32 clips run; I3D's
    and C2D's temporal pool needs 2 frames, and fewer get a clear error."""
    model = c3dzoo.get_model(name, num_classes=5).eval()
    frames = 1 if name == "slow_r50" else 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, frames, 32, 32)).shape == (1, 5)
        assert model(torch.randn(2, 3, frames, 1, 1)).shape == (2, 5)
    if name != "slow_r50":
        with pytest.raises(ValueError, match=r"at least 2 frames of 1×1 pixels, got \(1, 3, 1, 32, 32\)"):
            model(torch.randn(1, 3, 1, 32, 32))


def _cut_i3d(classes: int) -> nn.Module:
    """I3D R50 with one block of stage 1 and two of stage 2 (every kind of layer it has: the 5×7×7
    stem with its max-pool, 3×1×1 and 1×1×1 first convs, strided 1×3×3 convs, projection and
    identity shortcuts, the temporal pool), then a head over its 512 channels."""
    model = c3dzoo.i3d_r50(num_classes=classes)
    stage1, stage2 = ResStage(list(model.blocks[1].res_blocks[:1])), ResStage(list(model.blocks[3].res_blocks[:2]))
    model.blocks = nn.ModuleList([model.blocks[0], stage1, model.blocks[2], stage2,
                                  ResNetBasicHead(512, classes, (4, 7, 7), 0.0)])
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm3d)):
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
    return model


def test_triton_backend_runs_every_kind_of_i3d_layer():
    """Under the interpreter on a CPU: the Triton kernels take every chain of the cut I3D with
    nothing falling back, and match the stock model in eval mode and in a training step
    (outputs, gradients, running statistics)."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    assert_triton_twin_matches(_cut_i3d(4), torch.randn(2, 3, 2, 16, 16))


def test_fine_tuning_helpers_know_its_head():
    """The head is the last block's ``proj`` (blocks.5 or blocks.6): found, replaced with
    PyTorchVideo's initialisation, skipped when loading; ``freeze`` counts the blocks."""
    torch.manual_seed(0)
    source = c3dzoo.i3d_r50().state_dict()
    model = c3dzoo.i3d_r50(num_classes=7)
    assert transfer.head_name(model) == "blocks.6.proj" and transfer.head_classes(model) == 7
    assert transfer.head_name(c3dzoo.slow_r50()) == "blocks.5.proj"
    with pytest.raises(transfer.PretrainedError, match=r"has 400 classes \(blocks.6.proj.weight 400×2048\)"):
        transfer.load_pretrained(model, source)
    report = transfer.load_pretrained(model, source, head="skip")
    assert report.head == "blocks.6.proj" and report.file_classes == 400
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if not k.startswith("blocks.6."))
    transfer.replace_head(model, 5)
    head = model.blocks[6].proj
    assert type(head) is nn.Linear and head.weight.shape == (5, 2048)
    assert 0.005 < head.weight.std().item() < 0.015 and not head.bias.any()  # N(0, 0.01²), zero bias
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 2, 32, 32)).shape == (1, 5)
    layers = transfer.model_layers(model)  # the temporal pool (blocks.2) holds nothing
    assert layers == ["blocks.0", "blocks.1", "blocks.3", "blocks.4", "blocks.5", "blocks.6"]
    assert transfer.freeze(model, "features") == layers[:-1]
    assert [p.requires_grad for p in model.parameters()].count(True) == 2  # the head's weight and bias
    assert transfer.freeze(model, "up-to=blocks.3") == layers[:3]
    model.train()  # frozen BatchNorms stay in eval mode
    assert not model.blocks[3].res_blocks[0].branch2.norm_a.training
    assert model.blocks[4].res_blocks[0].branch2.norm_a.training
    fused = c3dzoo.fuse(c3dzoo.slow_r50(num_classes=3))  # a traced copy: the same names
    assert transfer.head_name(fused) == "blocks.5.proj" and transfer.model_layers(fused)[-1] == "blocks.5"


def test_train_grow_and_extract_features_on_the_command_line(tmp_path, capsys):
    """The main job with --model slow_r50, fused, growing a stage's stream and inserting a block
    (the checkpoint replays both); then features from its checkpoint default to the head's pool,
    averaged over positions as the head does: 2048 values a clip."""
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "slow_r50", "--epochs", "2", "--train-samples", "8", "--val-samples", "4",
                     "--batch-size", "4", "--num-classes", "3", "--frames", "4", "--size", "32", "--device", "cpu",
                     "--no-progress", "--grow", "2:wider=blocks.2*1.5,2:deeper=blocks.1.res_blocks.0",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training slow_r50" in printed and "wider blocks.2 512 -> 768 units" in printed
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = ckpt.stock_model(checkpoint)
    assert type(model).__name__ == "ResNet3D" and model.blocks[5].proj.out_features == 3
    assert model.blocks[3].res_blocks[0].branch1_conv.in_channels == 768 and len(model.blocks[1].res_blocks) == 4
    path = tmp_path / "features.pt"
    assert cli.main(["features", "--checkpoint", str(out / "last.pt"), "--synthetic", "3", "--frames", "4",
                     "--size", "32", "--out", str(path), "--device", "cpu"]) == 0
    saved = torch.load(path, weights_only=True)
    assert saved["layer"] == "blocks.5.pool" and saved["features"].shape == (3, 2048)


# --------------------------------------------------------------------------------------------
# R(2+1)D R50: (2+1)D conv_b, no stem max-pool
# --------------------------------------------------------------------------------------------


def test_r2plus1d_r50_matches_pytorchvideo():
    """PyTorchVideo's hub r2plus1d_r50 (create_r2plus1d, dropout 0.5; its head ends in a softmax,
    so ours with ``softmax=True``): keys, weights from a seed, the output bit for bit on the 16 ×
    224 × 224 clips it was trained on; fused within fp32 rounding."""
    r2plus1d = pytest.importorskip("pytorchvideo.models.r2plus1d", reason="pytorchvideo is not installed")
    torch.manual_seed(0)
    theirs = r2plus1d.create_r2plus1d(dropout_rate=0.5).eval()
    torch.manual_seed(0)
    ours = c3dzoo.r2plus1d_r50(softmax=True).eval()
    assert [(tuple(m.kernel_size), tuple(m.stride)) for m in theirs.modules() if isinstance(m, nn.Conv3d)] == \
        [(m.kernel_size, m.stride) for m in ours.modules() if isinstance(m, nn.Conv3d)]
    x = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1))
    assert_same_model(theirs, ours, x, [x])


def test_r2plus1d_r50_layout_and_initialisation():
    """What its published weights need without PyTorchVideo at hand: 28,107,600 parameters (as
    pytorchvideo 0.1.5's r2plus1d_r50 counts), a stem without max-pool, conv_b a Conv2plus1d
    (conv_t 3×1×1 striding time → norm → activation → conv_xy 1×3×3 striding space) in every
    block, every stage's first block striding space (stages 3-4 time too) as its projection does,
    a 4×7×7 head pool; logits unless ``softmax=True``."""
    model = c3dzoo.r2plus1d_r50()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 28_107_600 and len(sd) == 416
    assert sd["blocks.0.conv.weight"].shape == (64, 3, 1, 7, 7) and not hasattr(model.blocks[0], "pool")
    assert list(sd)[-2:] == ["blocks.5.proj.weight", "blocks.5.proj.bias"]
    assert [k for k in sd if k.startswith("blocks.1.res_blocks.0.branch2.conv_b.")] == [
        "blocks.1.res_blocks.0.branch2.conv_b.conv_t.weight", "blocks.1.res_blocks.0.branch2.conv_b.norm.weight",
        "blocks.1.res_blocks.0.branch2.conv_b.norm.bias", "blocks.1.res_blocks.0.branch2.conv_b.norm.running_mean",
        "blocks.1.res_blocks.0.branch2.conv_b.norm.running_var",
        "blocks.1.res_blocks.0.branch2.conv_b.norm.num_batches_tracked",
        "blocks.1.res_blocks.0.branch2.conv_b.conv_xy.weight"]
    for index, (inner, stride) in enumerate([(64, (1, 2, 2)), (128, (1, 2, 2)), (256, (2, 2, 2)), (512, (2, 2, 2))], 1):
        first = model.blocks[index].res_blocks[0]
        conv_b = first.branch2.conv_b
        assert type(conv_b).__name__ == "Conv2plus1d" and type(conv_b.activation) is nn.ReLU
        assert (conv_b.conv_t.kernel_size, conv_b.conv_t.stride, conv_b.conv_t.padding) == \
            ((3, 1, 1), (stride[0], 1, 1), (1, 0, 0))
        assert (conv_b.conv_xy.kernel_size, conv_b.conv_xy.stride, conv_b.conv_xy.padding) == \
            ((1, 3, 3), (1, *stride[1:]), (0, 1, 1))
        assert conv_b.conv_t.out_channels == conv_b.conv_xy.out_channels == inner
        assert first.branch1_conv.stride == stride and torch.all(conv_b.norm.weight == 1)
        assert torch.count_nonzero(first.branch2.norm_c.weight) == 0
    head = model.blocks[5]
    assert head.pool.kernel_size == (4, 7, 7) and head.dropout.p == 0.5 and head.activation is None
    assert "(conv_b): Conv2plus1d(" in repr(model) and "ChainSequential" not in repr(model)
    assert transfer.head_name(model) == "blocks.5.proj"
    assert c3dzoo.cli.features.DEFAULT_LAYER["ResNet3D"](model) == "blocks.5.pool"
    probabilities = c3dzoo.r2plus1d_r50(num_classes=5, softmax=True).eval()
    with torch.no_grad():
        out = probabilities(torch.randn(2, 3, 4, 32, 32))
    assert type(probabilities.blocks[5].activation) is nn.Softmax
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    # the smallest clip: every size 1 (the head's pool covers smaller features whole)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 1, 1, 1)).shape == (1, 400)


def _cut_r2plus1d(classes: int) -> nn.Module:
    """R(2+1)D R50 cut to stages 1-2 (one block each) and a head over their 512 channels, stage 2's
    block rebuilt to stride time too, as stages 3-4 do: every kind of layer it has (the 1×7×7 stem
    without max-pool, projection shortcuts, (2+1)D conv_b striding space, and time and space) at
    a fraction of its cost. BatchNorms conditioned as test_models_zoo's ``_condition`` does."""
    model = c3dzoo.r2plus1d_r50(num_classes=classes, dropout=0.0)
    strided = ResBlock(256, 128, 512, (1, 1, 1), (2, 2, 2), (3, 3, 3), separable_b=True)
    model.blocks = nn.ModuleList([model.blocks[0], ResStage(list(model.blocks[1].res_blocks[:1])), ResStage([strided]),
                                  ResNetBasicHead(512, classes, (4, 7, 7), 0.0)])
    condition_batch_norms(model)
    return model


def test_r2plus1d_r50_triton_backend_runs_its_2plus1d_chains():
    """Under the interpreter on a CPU: the Triton kernels take every chain of the cut R(2+1)D,
    conv_t → BN → ReLU deferring its BatchNorm to conv_xy's prologue in training, with nothing
    falling back, and match the stock model in eval mode and in a training step (outputs,
    gradients, running statistics)."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    # 4 frames of 24 × 24: stage 2's BatchNorms see 2 × 3 × 3 positions a clip
    x = torch.randn(2, 3, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    assert_triton_twin_matches(_cut_r2plus1d(4), x)


# --------------------------------------------------------------------------------------------
# SlowFast R50
# --------------------------------------------------------------------------------------------


def _pack_pathways(clip: torch.Tensor, alpha: int = 4):
    """PyTorchVideo's PackPathway: the slow pathway's frames evenly spaced over the clip."""
    index = torch.linspace(0, clip.shape[2] - 1, clip.shape[2] // alpha).long()
    return [clip.index_select(2, index), clip]


@pytest.mark.parametrize("name, frames", [("slowfast_r50", 32), ("slowfast_r101", 32),
                                          ("slowfast_16x8_r101_50_50", 64)])
def test_slowfast_matches_pytorchvideo(name, frames):
    """Keys, weights from a seed and the output bit for bit, for PyTorchVideo's [slow, fast] pair
    and for one clip packed the way its PackPathway does, on the clips each was trained on (its
    hub's builders of the same names)."""
    hub = pytest.importorskip("pytorchvideo.models.hub", reason="pytorchvideo is not installed")
    torch.manual_seed(0)
    theirs = getattr(hub, name)().eval()
    torch.manual_seed(0)
    ours = c3dzoo.get_model(name).eval()
    clip = torch.randn(1, 3, frames, 224, 224, generator=torch.Generator().manual_seed(1))
    # (PyTorchVideo's forward replaces the pathways in the list it is given: a fresh pair each)
    assert_same_model(theirs, ours, _pack_pathways(clip), [clip, _pack_pathways(clip)])


def test_slowfast_layout_and_inputs():
    model = c3dzoo.slowfast_r50(num_classes=6).eval()
    sd = model.state_dict()
    assert len(sd) == 662 and sum(p.numel() for p in model.parameters()) == 34_566_488 - 2305 * (400 - 6)
    fuse = model.blocks[0].multipathway_fusion.conv_fast_to_slow
    assert fuse.weight.shape == (16, 8, 7, 1, 1) and fuse.stride == (4, 1, 1)
    assert sd["blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"].shape == (64, 80, 1, 1, 1)
    assert type(model.blocks[4].multipathway_fusion) is nn.Identity and model.blocks[6].proj.in_features == 2304
    deep = c3dzoo.slowfast_r101()  # ResNet-101's 23 blocks in stage 3, 5×1×1 fusions
    assert sum(p.numel() for p in deep.parameters()) == 62_826_968
    assert [len(stage.res_blocks) for stage in deep.blocks[3].multipathway_blocks] == [23, 23]
    assert deep.blocks[0].multipathway_fusion.conv_fast_to_slow.kernel_size == (5, 1, 1)
    # the 50/50 R101: 3×1×1 conv_a in only the first 6 of stage 3's 23 blocks, in both pathways;
    # head pools for 64-frame clips
    fifty = c3dzoo.slowfast_16x8_r101_50_50()
    assert sum(p.numel() for p in fifty.parameters()) == 53_774_808
    for pathway in fifty.blocks[3].multipathway_blocks:
        assert [b.branch2.conv_a.kernel_size for b in pathway.res_blocks] == [(3, 1, 1)] * 6 + [(1, 1, 1)] * 17
    assert [b.branch2.conv_a.kernel_size for b in fifty.blocks[2].multipathway_blocks[1].res_blocks] == \
        [(3, 1, 1)] * 4
    assert [pool.kernel_size for pool in fifty.blocks[5].pool] == [(16, 7, 7), (64, 7, 7)]
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(clip), model(_pack_pathways(clip)))
        # the slow pathway takes frames 0 and 7 of 8 (evenly spaced, as PackPathway does)
        assert torch.equal(c3dzoo.models.resnet3d.slow_frames(clip, 4), clip[:, :, [0, 7]])
    for bad, match in [(torch.randn(2, 3, 6, 32, 32), "a multiple of 4 frames .* got 6"),
                       (torch.randn(2, 3, 2, 32, 32), r"at least 4 frames of 1×1 pixels, got \(2, 3, 2, 32, 32\)"),
                       ([torch.randn(2, 3, 2, 32, 32), torch.randn(2, 3, 4, 32, 32)], "4 × the frames"),
                       ([clip], "a list of 1"),
                       ([torch.randn(2, 3, 2, 32, 32), torch.randn(2, 1, 8, 32, 32)], r"\(N, 3, frames, height")]:
        with pytest.raises(ValueError, match=match):
            model(bad)


def test_triton_backend_runs_slowfasts_stems_and_fusion():
    """Under the interpreter: both stems (1×7×7 and 5×7×7, their max-pools in the epilogue) and
    the fast-to-slow fusion (7×1×1, stride 4 in time) run on the Triton kernels with nothing
    falling back, and match stock in eval mode (the stages are I3D's bottlenecks, tested above)."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    stock = c3dzoo.slowfast_r50(num_classes=3).eval()
    stock.blocks = nn.ModuleList([stock.blocks[0], stock.blocks[5], ResNetBasicHead(80 + 8, 3, None, 0.0)])
    assert_triton_twin_matches(stock, torch.randn(1, 3, 8, 16, 16), training=False)


def test_slowfast_fine_tuning_helpers_and_features():
    """The head is blocks.6.proj; the layers are the blocks that hold parameters; features
    default to the pooled and concatenated pathways (2048 + 256 values)."""
    model = c3dzoo.slowfast_r50(num_classes=3)
    assert transfer.head_name(model) == "blocks.6.proj" and transfer.head_classes(model) == 3
    assert transfer.model_layers(model) == [f"blocks.{i}" for i in (0, 1, 2, 3, 4, 6)]
    assert transfer.freeze(model, "features") == [f"blocks.{i}" for i in (0, 1, 2, 3, 4)]
    assert c3dzoo.cli.features.DEFAULT_LAYER["SlowFast"](model) == "blocks.5"
    features = transfer.extract_features(model, torch.randn(2, 3, 8, 32, 32), "blocks.5")
    assert features.shape == (2, 2304)


# --------------------------------------------------------------------------------------------
# CSN R101: depthwise 3×3×3 conv_b, striding time and space
# --------------------------------------------------------------------------------------------


def test_csn_matches_pytorchvideo():
    """PyTorchVideo's hub csn_r101 (create_csn at depth 101 with a stem max-pool and a 4×7×7 head
    pool): keys, weights from a seed, the output bit for bit on the 32 × 224 × 224 clips it was
    trained on; fused within fp32 rounding."""
    csn = pytest.importorskip("pytorchvideo.models.csn", reason="pytorchvideo is not installed")
    torch.manual_seed(0)
    theirs = csn.create_csn(model_depth=101, stem_pool=nn.MaxPool3d, head_pool_kernel_size=(4, 7, 7)).eval()
    torch.manual_seed(0)
    ours = c3dzoo.csn_r101().eval()
    assert [tuple(m.stride) for m in theirs.modules() if isinstance(m, nn.Conv3d)] == \
        [m.stride for m in ours.modules() if isinstance(m, nn.Conv3d)]
    x = torch.randn(1, 3, 32, 224, 224, generator=torch.Generator().manual_seed(1))
    assert_same_model(theirs, ours, x, [x])


def test_csn_layout_and_initialisation():
    """What its published weights need without PyTorchVideo at hand: 626 keys (22,213,776
    parameters, as pytorchvideo 0.1.5's csn_r101 counts), depthwise 3×3×3 conv_b striding time
    and space in stages 2–4 as its projection does, a 3×7×7 stem with a max-pool, no dropout."""
    model = c3dzoo.csn_r101()
    sd = model.state_dict()
    assert len(sd) == 626 and sum(p.numel() for p in model.parameters()) == 22_213_776
    assert list(sd)[:2] == ["blocks.0.conv.weight", "blocks.0.norm.weight"]
    assert list(sd)[-2:] == ["blocks.5.proj.weight", "blocks.5.proj.bias"]
    assert sd["blocks.0.conv.weight"].shape == (64, 3, 3, 7, 7) and model.blocks[0].conv.padding == (1, 3, 3)
    assert type(model.blocks[0].pool) is nn.MaxPool3d
    assert [len(stage.res_blocks) for stage in model.blocks[1:5]] == [3, 4, 23, 3]
    for index, (inner, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], 1):
        first = model.blocks[index].res_blocks[0]
        conv_b = first.branch2.conv_b
        assert (conv_b.in_channels, conv_b.out_channels, conv_b.groups) == (inner, inner, inner)
        assert conv_b.weight.shape == (inner, 1, 3, 3, 3) and conv_b.padding == (1, 1, 1)
        assert conv_b.stride == first.branch1_conv.stride == (stride,) * 3
        assert first.branch2.conv_a.kernel_size == (1, 1, 1)
        assert torch.count_nonzero(first.branch2.norm_c.weight) == 0
    assert model.blocks[3].res_blocks[1].branch1_conv is None and model.blocks[3].res_blocks[1].branch2.conv_b.stride \
        == (1, 1, 1)
    head = model.blocks[5]
    assert head.pool.kernel_size == (4, 7, 7) and head.dropout is None and head.proj.in_features == 2048
    assert c3dzoo.csn_r101(num_classes=7, dropout=0.5).blocks[5].dropout.p == 0.5
    assert "csn_r101" in c3dzoo.list_models() and transfer.head_name(model) == "blocks.5.proj"
    assert c3dzoo.cli.features.DEFAULT_LAYER["ResNet3D"](model) == "blocks.5.pool"
    assert transfer.freeze(model, "features") == [f"blocks.{i}" for i in range(5)]
    transfer.replace_head(model, 3)
    assert model.blocks[5].proj.weight.shape == (3, 2048) and not model.blocks[5].proj.bias.any()


def test_csn_fused_and_stock_share_a_state_dict_and_agree_in_eval_mode():
    """Keys load strictly both ways between the fused and the stock model; on a 4 × 32 × 32 clip
    (stage 4 sees 1 × 1 × 1: the head's pool covers it) they agree within fp32 rounding."""
    torch.manual_seed(0)
    stock = c3dzoo.csn_r101(num_classes=5).eval()
    with torch.no_grad():
        for bn in (m for m in stock.modules() if isinstance(m, nn.BatchNorm3d)):
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
    fused = c3dzoo.csn_r101(num_classes=5, fused=True).eval()
    fused.load_state_dict(stock.state_dict(), strict=True)
    back = c3dzoo.csn_r101(num_classes=5)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert list(back.state_dict()) == list(stock.state_dict())
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def _cut_csn(classes: int) -> nn.Module:
    """CSN R101 with 2, 1, 1, 1 blocks (every kind of layer it has: the 3×7×7 stem with its
    max-pool, projection and identity shortcuts, depthwise 3×3×3 conv_b unstrided and striding
    time and space). Its BatchNorms are conditioned as test_models_zoo's ``_condition`` does
    (γ = 0.5, β = ±3; +3 before a residual add), so no ReLU input lies within rounding of its kink
    and fp32 gradients compare tightly."""
    model = c3dzoo.csn_r101(num_classes=classes)
    for index, count in enumerate((2, 1, 1, 1), 1):
        model.blocks[index] = ResStage(list(model.blocks[index].res_blocks[:count]))
    condition_batch_norms(model)
    return model


def test_csn_fused_training_step_matches_stock():
    """A training step of the fused model (its depthwise conv_b chains taking conv_a's deferred
    BatchNorm) gives stock's output, gradients and running statistics within fp32 rounding."""
    torch.manual_seed(0)
    stock = _cut_csn(4).train()
    fused = copy.deepcopy(stock)
    fused.fused = True
    # 8 × 64 × 64: stage 4's BatchNorms see 1 × 2 × 2 positions a clip (8 values in the batch)
    x = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_same_eval_and_training_step(stock, fused, x, eval_mode=False)
