"""S3D: torchvision's module tree, initialisation and outputs; the average pool that also takes
inputs smaller than its window; the smallest input; training on the command line.

Fused-vs-stock parity (outputs, gradients, running statistics in every mode), ``c3dzoo.fuse``,
hooks and published weights are tested with the other zoo models (test_models_zoo.py,
test_hooks.py, test_fuse.py, test_weights.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, transfer
from c3dzoo.models.separable_inception import MIN_INPUT, AvgPool3dWithin
from interpreter import skip_unless_triton_runs_cpu_tensors
from same_model import assert_same_model
from twins import assert_triton_twin_matches


def _torchvision_video():
    return pytest.importorskip("torchvision.models.video", reason="torchvision is not installed")


def test_matches_torchvision():
    """Same seed, same weights (the modules are built in torchvision's order); the same output
    bit for bit at an input torchvision takes (its average pool needs 13 × 209 × 209)."""
    video = _torchvision_video()
    torch.manual_seed(0)
    theirs = video.s3d().eval()
    torch.manual_seed(0)
    ours = c3dzoo.s3d().eval()
    x = torch.randn(1, 3, 13, 209, 209, generator=torch.Generator().manual_seed(1))
    assert_same_model(theirs, ours, x, [x])


def test_average_pool_takes_features_smaller_than_its_window():
    pool = AvgPool3dWithin(kernel_size=(2, 7, 7), stride=1)
    stock = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=1)
    fits = torch.randn(2, 4, 3, 9, 8)
    assert torch.equal(pool(fits), stock(fits))
    # a dimension shorter than the window is averaged whole; the others keep the window
    short = torch.randn(2, 4, 1, 9, 5)
    expected = F.avg_pool3d(short, (1, 7, 5), 1)
    assert expected.shape == (2, 4, 1, 3, 1)
    torch.testing.assert_close(pool(short), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        stock(short)
    tiny = torch.randn(2, 4, 1, 1, 1)
    assert torch.equal(pool(tiny), tiny)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_with_a_shrunk_average_pool(dynamo, tmp_path):
    """Both ONNX exporters take the shrunk window with a dynamic batch (the TorchScript one traced
    the input's sizes as tensors and failed on them), and onnxruntime computes the eager output."""
    pytest.importorskip("onnxscript" if dynamo else "onnx", reason="torch.onnx.export needs it")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    torch.manual_seed(0)
    model = c3dzoo.s3d(num_classes=5, fused=True).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    path = str(tmp_path / "s3d.onnx")
    batch = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else {"dynamic_axes": {"x": {0: "batch"}}}
    torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["x"], output_names=["y"], **batch)
    x = torch.randn(3, 3, 8, 32, 32)  # another batch size
    got = ort.InferenceSession(path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        model.fused = False
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-6)


def test_triton_backend_runs_every_kind_of_s3d_layer():
    """Under the interpreter on a CPU: the Triton kernels take every kind of chain S3D has (the
    3-channel 1×7×7 stride-2 stem, 7×1×1 stride 2, 1×1×1, separable 3×3 halves, the stem's
    overlapping max-pool in the epilogue, an Inception block's branches) with nothing falling back,
    and match the stock model in eval mode. The model is cut after its first Inception block (the
    others differ only in widths): the whole one takes half a minute there, a training step a
    minute; training parity is the reference backend's tests'."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    stock = c3dzoo.s3d(num_classes=4).eval()
    stock.features = stock.features[:6]
    stock.classifier[1] = nn.Conv3d(256, 4, kernel_size=1)
    with torch.no_grad():
        for bn in (m for m in stock.modules() if isinstance(m, nn.BatchNorm3d)):
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
    assert_triton_twin_matches(stock, torch.randn(1, 3, *MIN_INPUT), training=False, atol=1e-6)


def test_smallest_input_is_the_smallest_the_features_take():
    model = c3dzoo.s3d(num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *MIN_INPUT)).shape == (1, 5)
        for dim in range(3):
            smaller = list(MIN_INPUT)
            smaller[dim] -= 1
            x = torch.randn(1, 3, *smaller)
            with pytest.raises(ValueError, match=r"at least 5 frames of 17×17 pixels, got \(1, 3, "):
                model(x)
            with pytest.raises(RuntimeError):  # the stock layers fail there, deep inside
                model.features(x)


def test_printed_tree_reads_as_torchvision_s():
    text = repr(c3dzoo.s3d())
    assert "(0): TemporalSeparableConv(" in text and "(0): Conv3dNormActivation(" in text
    assert "(branch1): Sequential(" in text and "(avgpool): AvgPool3dWithin(" in text
    assert "BatchNorm3d(64, eps=0.001, momentum=0.001" in text and "ChainSequential" not in text


def test_fine_tuning_helpers_know_its_conv_head():
    """S3D's classifier is a 1×1×1 Conv3d (``classifier.1``), not a Linear: the head is found,
    replaced by a conv of the new class count, skipped when loading, and ``freeze`` counts its
    layers in the features."""
    torch.manual_seed(0)
    source = c3dzoo.s3d().state_dict()
    model = c3dzoo.s3d(num_classes=7)
    assert transfer.head_name(model) == "classifier.1" and transfer.head_classes(model) == 7
    with pytest.raises(transfer.PretrainedError, match=r"has 400 classes \(classifier.1.weight 400×1024×1×1×1\)"):
        transfer.load_pretrained(model, source)
    report = transfer.load_pretrained(model, source, head="skip")
    assert report.head == "classifier.1" and report.file_classes == 400
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if not k.startswith("classifier."))
    transfer.replace_head(model, 5)
    head = model.classifier[1]
    assert type(head) is nn.Conv3d and head.weight.shape == (5, 1024, 1, 1, 1) and head.bias is not None
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 8, 32, 32)).shape == (1, 5)
    layers = transfer.model_layers(model)
    assert layers[:3] == ["features.0", "features.2", "features.3"] and layers[-2:] == ["features.15", "classifier"]
    assert transfer.freeze(model, "features") == layers[:-1]
    assert [p.requires_grad for p in model.parameters()].count(True) == 2  # the head's weight and bias
    assert [g["name"] for g in transfer.param_groups(model, 0.1, head_lr_mult=10)] == ["head"]
    assert transfer.freeze(model, "up-to=features.6") == layers[:5]
    model.train()  # frozen BatchNorms stay in eval mode
    assert not model.features[5].branch0[1].training and model.features[8].branch0[1].training


def test_train_s3d_on_the_command_line(tmp_path, capsys):
    """The main job with --model s3d, fused, then predict with its checkpoint."""
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "s3d", "--epochs", "1", "--train-samples", "8", "--val-samples", "4",
                     "--batch-size", "4", "--num-classes", "3", "--frames", "8", "--size", "32", "--device", "cpu",
                     "--no-progress", "--out", str(out)]) == 0
    assert "training s3d" in capsys.readouterr().out
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["model_name"] == "s3d"
    model = c3dzoo.s3d(num_classes=3)
    model.load_state_dict(checkpoint["model"], strict=True)


def test_grow_s3d_on_the_command_line(tmp_path, capsys):
    """--grow on S3D: a branch's output conv widens (the next block's branch heads take the wider
    concatenation) and an identity unit goes in after the stem's 1×1×1 conv; the checkpoint
    replays both."""
    out = tmp_path / "grown"
    assert cli.main(["train", "--model", "s3d", "--epochs", "2", "--train-samples", "8", "--val-samples", "4",
                     "--batch-size", "4", "--num-classes", "3", "--frames", "8", "--size", "32", "--device", "cpu",
                     "--no-progress", "--grow", "2:wider=features.5.branch0.0*2,2:deeper=features.2",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wider features.5.branch0.0 64 -> 128 units" in printed and "after features.2" in printed
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = ckpt.stock_model(checkpoint)
    # the new unit is features.3, so the first block moved to features.6
    assert type(model.features[3]).__name__ == "Conv3dNormActivation"
    assert model.features[6].branch0[0].out_channels == 128 and model.features[7].branch1[0][0].in_channels == 320


def test_features_default_to_its_pooled_channels(tmp_path):
    path = tmp_path / "features.pt"
    assert cli.main(["features", "--model", "s3d", "--synthetic", "3", "--frames", "8", "--size", "32",
                     "--out", str(path), "--device", "cpu"]) == 0
    saved = torch.load(path, weights_only=True)
    assert saved["layer"] == "avgpool" and saved["features"].shape == (3, 1024)


def test_features_of_a_long_clip_average_the_pooled_positions():
    """At 24 × 224 × 224 the average pool leaves 2 positions; S3D's head averages them, and so do
    its features: 1024 values, the mean of the two."""
    torch.manual_seed(0)
    model = c3dzoo.s3d(num_classes=4).eval()
    x = torch.randn(1, 3, 24, 224, 224)
    with torch.no_grad():
        pooled = model.avgpool(model.features(x))
    assert pooled.shape == (1, 1024, 2, 1, 1)
    features = transfer.extract_features(model, x, layer="avgpool")
    torch.testing.assert_close(features, pooled.mean(dim=(2, 3, 4)))
