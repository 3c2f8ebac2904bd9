"""Transfer learning (c3dzoo.transfer) and evaluation reports (c3dzoo.evaluation): pretrained weights
in every supported layout, head replacement, freezing, features, linear probe, ensembles."""

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import evaluation, transfer
from c3dzoo.transfer import PretrainedError
from parity import assert_parity

TINY = dict(width_mult=0.0625, input_size=(16, 32, 32))  # pool5 → 32 × 1 × 2 × 2, fc6/fc7 256 wide


def tiny(name="c3d_bn", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {**TINY, "num_classes": 5, **kwargs} if name.startswith("c3d") else kwargs
    return c3dzoo.get_model(name, **kwargs)


def clips(n=3, seed=1, size=(16, 32, 32)):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def randomise_bn(model, seed=0):
    """Non-trivial BN parameters and running statistics (a fresh BN is the identity in eval)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class PortC3D(nn.Module):
    """The widely used PyTorch C3D port's class (module names and order as in its Sports-1M file:
    conv1 … conv5b, pool1 … pool5, fc6, fc7, fc8 of 487 classes), with channels divided by
    ``div`` so the test stays small; its forward returns logits (the port adds a softmax)."""

    def __init__(self, div=16, flat=128):
        super().__init__()
        c = [64 // div, 128 // div, 256 // div, 512 // div]
        self.conv1 = nn.Conv3d(3, c[0], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.conv2 = nn.Conv3d(c[0], c[1], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.pool2 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv3a = nn.Conv3d(c[1], c[2], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv3b = nn.Conv3d(c[2], c[2], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.pool3 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv4a = nn.Conv3d(c[2], c[3], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv4b = nn.Conv3d(c[3], c[3], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.pool4 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv5a = nn.Conv3d(c[3], c[3], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.conv5b = nn.Conv3d(c[3], c[3], kernel_size=(3, 3, 3), padding=(1, 1, 1))
        self.pool5 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 1, 1))
        self.flat = flat
        self.fc6 = nn.Linear(flat, 4096 // div)
        self.fc7 = nn.Linear(4096 // div, 4096 // div)
        self.fc8 = nn.Linear(4096 // div, 487)
        self.dropout = nn.Dropout(p=0.5)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.pool1(self.relu(self.conv1(x)))
        h = self.pool2(self.relu(self.conv2(h)))
        h = self.pool3(self.relu(self.conv3b(self.relu(self.conv3a(h)))))
        h = self.pool4(self.relu(self.conv4b(self.relu(self.conv4a(h)))))
        h = self.pool5(self.relu(self.conv5b(self.relu(self.conv5a(h)))))
        h = h.view(-1, self.flat)
        h = self.dropout(self.relu(self.fc6(h)))
        h = self.dropout(self.relu(self.fc7(h)))
        return self.fc8(h)


# --------------------------------------------------------------------------------------------
# load_pretrained: every supported layout round-trips
# --------------------------------------------------------------------------------------------


def _our_checkpoint(source, path):
    ckpt.save_atomic({"model": ckpt.plain_state_dict(source.state_dict()), "model_name": "c3d_bn",
                      "model_kwargs": {**TINY, "num_classes": 5}, "class_names": list("abcde"),
                      "epoch": 3}, path)


def _plain(source, path):
    torch.save(source.state_dict(), path)


def _wrapped(source, path):
    torch.save({"state_dict": source.state_dict(), "epoch": 7, "arch": "c3d_bn"}, path)


def _data_parallel(source, path):
    # the real thing: DataParallel's state_dict prefixes every key with "module."
    torch.save({"model": nn.DataParallel(source).state_dict()}, path)


@pytest.mark.parametrize("write", [_our_checkpoint, _plain, _wrapped, _data_parallel],
                         ids=["c3dzoo-checkpoint", "state_dict", "wrapped", "data-parallel"])
@pytest.mark.parametrize("target", ["stock", "fused", "fx"])
def test_c3d_bn_formats_round_trip(tmp_path, write, target):
    source = randomise_bn(tiny(seed=1))
    path = tmp_path / "weights.pt"
    write(source, path)
    model = tiny(seed=2, fused=target == "fused")
    if target == "fx":
        model = c3dzoo.fuse(model)
    assert not same_state(model, source)
    report = transfer.load_pretrained(model, path)
    assert same_state(model, source)
    assert report.loaded == len(source.state_dict()) and report.head is None
    assert report.stripped_prefix == ("module." if write is _data_parallel else "")
    assert report.class_names == (list("abcde") if write is _our_checkpoint else None)
    x = clips(2)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), source.eval()(x), atol=1e-5)


def test_c3d_port_sports1m_layout_loads_into_c3d(tmp_path):
    torch.manual_seed(3)
    port = PortC3D().eval()
    torch.save(port.state_dict(), tmp_path / "c3d.pickle")
    model = c3dzoo.c3d(**TINY, fused=True)  # 487 classes by default, as the Sports-1M file
    report = transfer.load_pretrained(model, tmp_path / "c3d.pickle")
    assert report.loaded == 22 and report.file_classes == 487
    x = clips(2)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), port(x), atol=1e-5)


def test_video_resnet_layout_round_trips(tmp_path):
    torch.manual_seed(4)
    source = randomise_bn(c3dzoo.mc3_18(num_classes=5))
    keys = set(source.state_dict())
    # torchvision's key names, which its published Kinetics-400 files use
    assert {"stem.0.weight", "stem.1.running_var", "layer1.0.conv1.0.weight", "layer2.0.downsample.0.weight",
            "layer4.1.conv2.1.num_batches_tracked", "fc.weight", "fc.bias"} <= keys
    torch.save(source.state_dict(), tmp_path / "mc3_18.pth")
    model = c3dzoo.mc3_18(num_classes=5, fused=True)
    transfer.load_pretrained(model, tmp_path / "mc3_18.pth")
    assert same_state(model, source)
    x = clips(1, size=(4, 32, 32))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), source.eval()(x), atol=1e-5)


def test_torchvision_weights_load(tmp_path):
    video = pytest.importorskip("torchvision.models.video", reason="torchvision is not installed")
    torch.save(video.r2plus1d_18(num_classes=5).state_dict(), tmp_path / "tv.pth")
    model = c3dzoo.r2plus1d_18(num_classes=5)
    assert transfer.load_pretrained(model, tmp_path / "tv.pth").loaded == len(model.state_dict())


def test_missing_num_batches_tracked_is_tolerated():
    source = randomise_bn(tiny(seed=1))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = tiny(seed=2)
    transfer.load_pretrained(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------------------
# load_pretrained: what does not fit is an error, and the model is left untouched
# --------------------------------------------------------------------------------------------


def _load_error(model, source, **kwargs) -> str:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PretrainedError) as info:
        transfer.load_pretrained(model, source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"
    return message


def test_architecture_mismatch_names_missing_keys():
    message = _load_error(tiny("c3d_bn"), tiny("c3d", num_classes=5).state_dict())
    assert "does not fit C3D" in message and "missing" in message and "conv1_bn.weight" in message


def test_width_mismatch_names_shapes():
    message = _load_error(tiny("c3d_bn"), tiny("c3d_bn", width_mult=0.125).state_dict())
    assert "of another shape" in message and "conv1.weight file 8×3×3×3×3 vs model 4×3×3×3×3" in message


def test_a_file_without_head_suggests_skipping_it():
    source = tiny(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc8.")}
    assert "2 missing (fc8.weight, fc8.bias); it has no head: load with head='skip'" in _load_error(tiny(), state)
    model = tiny(seed=2)
    transfer.load_pretrained(model, state, head="skip")
    assert torch.equal(model.fc7.weight, source.fc7.weight)


def test_unexpected_keys_are_an_error():
    state = dict(tiny().state_dict())
    state["fc9.weight"] = torch.zeros(3, 3)
    assert "1 unexpected (fc9.weight)" in _load_error(tiny(), state)


def test_other_class_count_says_what_to_do(tmp_path):
    _our_checkpoint(tiny(seed=1), tmp_path / "five.pt")
    model = tiny(num_classes=7)
    message = _load_error(model, tmp_path / "five.pt")
    assert "has 5 classes" in message and "the model has 7" in message
    assert "num_classes=5" in message and "replace_head(model, 5)" in message and "head='skip'" in message


def test_skip_head_loads_everything_else_and_says_so():
    source = randomise_bn(tiny(seed=1))
    model = tiny(seed=2, num_classes=7)
    head_before = model.fc8.weight.clone()
    report = transfer.load_pretrained(model, source.state_dict(), head="skip")
    assert torch.equal(model.fc8.weight, head_before)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.startswith("fc8."))
    assert report.head == "fc8" and report.file_classes == 5
    assert report.loaded == len(source.state_dict()) - 2
    assert "head fc8 not loaded" in str(report) and "5 classes" in str(report)


def test_unreadable_sources(tmp_path):
    model = tiny()
    assert "not found" in _load_error(model, tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds no state_dict" in _load_error(model, tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "cannot read" in _load_error(model, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="head must be"):
        transfer.load_pretrained(model, model.state_dict(), head="maybe")


# --------------------------------------------------------------------------------------------
# replace_head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stock", "fused", "fx"])
def test_replace_head_changes_output_and_trains(kind):
    model = tiny(fused=kind == "fused")
    if kind == "fx":
        model = c3dzoo.fuse(model)
    old = model.fc8
    assert transfer.replace_head(model, 3) is model
    assert model.fc8 is not old and model.fc8.out_features == 3 and model.fc8.in_features == old.in_features
    x, y = clips(4), torch.tensor([0, 1, 2, 0])
    model.train()
    assert model(x).shape == (4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = model.fc8.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.fc8.weight, head)


def test_replace_head_keeps_dtype_and_finds_every_family_head():
    model = tiny().double()
    transfer.replace_head(model, 2)
    assert model.fc8.weight.dtype == torch.float64
    assert model(clips(1).double()).shape == (1, 2)
    resnet = transfer.replace_head(c3dzoo.mc3_18(num_classes=400), 10)
    assert resnet.fc.out_features == 10 and torch.count_nonzero(resnet.fc.bias) == 0
    assert resnet.fc.weight.std() < 0.02  # torchvision's normal(0, 0.01)
    jester = transfer.replace_head(c3dzoo.jester_convcolumn(), 4)
    assert jester.fc7.out_features == 4
    with pytest.raises(ValueError, match="positive"):
        transfer.replace_head(model, 0)


# --------------------------------------------------------------------------------------------
# freeze and param_groups
# --------------------------------------------------------------------------------------------


def _step(model, optimizer, x, y):
    # zeroed, not None: a frozen parameter that kept a zero gradient would still move by weight
    # decay and momentum, so freezing must drop the gradients
    optimizer.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_layers_do_not_change_after_sgd_steps(fused):
    model = randomise_bn(tiny(fused=fused))
    x, y = clips(4), torch.tensor([0, 1, 2, 3])
    # an optimizer over every parameter, with momentum and weight decay, that has already stepped:
    # frozen parameters must still not move (no stale gradient, no decay, no momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    model.train()
    _step(model, optimizer, x, y)
    assert transfer.freeze(model, "up-to=conv3b") == ["conv1", "conv2", "conv3a", "conv3b"]
    model.train()  # must not wake the frozen BatchNorms
    frozen = ["conv1", "conv1_bn", "conv2", "conv2_bn", "conv3a", "conv3a_bn", "conv3b", "conv3b_bn"]
    assert [m.training for m in (model.conv1_bn, model.conv3b_bn, model.conv4a_bn)] == [False, False, True]
    before = copy.deepcopy(model.state_dict())
    _step(model, optimizer, x, y)
    _step(model, optimizer, x, y)
    after = model.state_dict()
    for key in before:
        unchanged = torch.equal(before[key], after[key])
        if key.split(".")[0] in frozen:
            assert unchanged, f"frozen {key} changed"
        elif not key.endswith("num_batches_tracked"):
            assert not unchanged, f"trainable {key} did not change"
    assert all(not p.requires_grad for name in frozen for p in model.get_submodule(name).parameters())
    assert transfer.frozen_layers(model) == ["conv1", "conv2", "conv3a", "conv3b"]


def test_frozen_bn_runs_the_folded_path_of_the_fused_op(monkeypatch):
    from c3dzoo.models import _common

    seen = []
    real = _common.conv_bn_act

    def spy(x, conv, bn=None, *args, **kwargs):
        seen.append(bn.training)
        return real(x, conv, bn, *args, **kwargs)

    monkeypatch.setattr(_common, "conv_bn_act", spy)
    model = tiny(fused=True)
    transfer.freeze(model, "features")
    model.train()
    model(clips(2))
    assert seen == [False] * 8


def test_freeze_survives_copy_and_unfreezes():
    model = tiny()
    transfer.freeze(model, "features")
    twin = copy.deepcopy(model)
    twin.train()
    assert not twin.conv5b_bn.training and twin.fc6.training
    transfer.freeze(model, "none")
    model.train()
    assert model.conv1_bn.training and all(p.requires_grad for p in model.parameters())
    assert transfer.frozen_layers(model) == []


def test_freeze_features_per_family_and_bad_specs():
    resnet = c3dzoo.r2plus1d_18(num_classes=3)
    assert transfer.freeze(resnet, "features") == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [n for n, p in resnet.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    jester = c3dzoo.jester_convcolumn()
    assert transfer.freeze(jester, "up-to=fc6") == [
        "conv_layer1", "conv_layer2", "conv_layer3", "conv_layer4", "conv_layer5", "fc5", "batch0", "fc6"]
    jester.train()
    assert not jester.batch0.training and jester.batch1.training
    with pytest.raises(ValueError, match="has no layer 'conv9'.*conv1, conv2"):
        transfer.freeze(tiny(), "up-to=conv9")
    with pytest.raises(ValueError, match="'none', 'features' or 'up-to=LAYER'"):
        transfer.freeze(tiny(), "all")


def test_param_groups_split_head_and_body():
    model = tiny()
    transfer.freeze(model, "up-to=conv2")
    groups = transfer.param_groups(model, 0.01, head_lr_mult=10.0)
    assert [(g["name"], g["lr"]) for g in groups] == [("body", 0.01), ("head", 0.1)]
    assert groups[1]["params"] == [model.fc8.weight, model.fc8.bias]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups[0]["params"]) + 2 == len(trainable)
    assert all(p.requires_grad for g in groups for p in g["params"])
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the optimizer takes them as they are
    transfer.freeze(model, "up-to=fc7")
    assert [g["name"] for g in transfer.param_groups(model, 0.01)] == ["head"]


# --------------------------------------------------------------------------------------------
# extract_features
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fused", "fx"])
def test_fc6_features_match_stock_activations_within_parity_budget(kind):
    stock = randomise_bn(tiny(seed=5)).eval()
    x = clips(3)
    with torch.no_grad():
        expected = torch.relu(stock.fc6(stock.features(x).flatten(1)))  # C3D's fc6 features
        ref = copy.deepcopy(stock).double()
        reference = torch.relu(ref.fc6(ref.features(x.double()).flatten(1)))
    model = copy.deepcopy(stock)
    if kind == "fused":
        model.fused = True
    else:
        model = c3dzoo.fuse(model)
    model.train()  # extraction must switch to eval (BN running statistics) and restore after
    features = transfer.extract_features(model, x, "fc6", batch_size=2)
    assert features.shape == (3, 256) and features.dtype == torch.float32
    assert_parity(features, expected, reference, torch.float32, f"fc6 features ({kind})")
    assert model.training and model.conv1_bn.training
    # the same layer through the stock model's hook, and the raw (pre-ReLU) output
    assert torch.allclose(transfer.extract_features(stock, x, "fc6"), expected, atol=1e-6)
    raw = transfer.extract_features(model, x, "fc6", activation="none", batch_size=2)
    assert (raw < 0).any() and torch.allclose(raw.clamp(min=0), features, atol=1e-6)


def test_features_of_the_head_are_the_logits_and_labels_come_along():
    model = randomise_bn(tiny(fused=True)).eval()
    data = torch.utils.data.TensorDataset(clips(5), torch.tensor([4, 3, 2, 1, 0]))
    features, labels = transfer.extract_features(model, data, "fc8", batch_size=2, return_labels=True)
    with torch.no_grad():
        assert torch.allclose(features, model(clips(5)), atol=1e-6)
    assert labels.tolist() == [4, 3, 2, 1, 0]
    resnet = c3dzoo.mc3_18(num_classes=3, fused=True)
    assert transfer.extract_features(resnet, clips(2, size=(4, 32, 32)), "avgpool").shape == (2, 512)


def test_features_of_a_layer_inside_a_fused_chain_are_the_stock_models():
    """The extraction hook makes that chain run module by module (``c3dzoo.nn.runs_hooks``)."""
    fused = randomise_bn(tiny(fused=True)).eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = clips(2)
    for layer in ("pool5", "conv3a_bn"):
        # the chains before it are fused (BatchNorm folded): equal within fp32 rounding
        torch.testing.assert_close(transfer.extract_features(fused, x, layer),
                                   transfer.extract_features(stock, x, layer), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no layer 'fc9'"):
        transfer.extract_features(tiny(), clips(1), "fc9")


def test_features_of_a_video_resnet_stage_are_the_stock_models():
    """``layer4`` (a Sequential of blocks) or a block's ``downsample``: the fused forward calls those
    containers as the stock one does, so the extraction hook runs there (it raised "did not run as
    a module" before)."""
    torch.manual_seed(0)
    fused = c3dzoo.mc3_18(num_classes=3, fused=True).eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = clips(2, size=(4, 32, 32))
    for layer, width in (("layer4", 512 * 4 * 2 * 2), ("layer3.0.downsample", 256 * 4 * 4 * 4)):
        got = transfer.extract_features(fused, x, layer)
        assert got.shape == (2, width)
        torch.testing.assert_close(got, transfer.extract_features(stock, x, layer), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------


def _separable(n_per_class=40, classes=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_torch_logistic_regression_separates_and_is_deterministic():
    x, y = _separable()
    probe = transfer.linear_probe(x, y)
    x_val, y_val = _held_out()
    assert (probe.predict(x_val) == y_val).float().mean() >= 0.95
    again = transfer.linear_probe(x, y)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)
    assert probe.scores(x_val).shape == (len(y_val), 4)


def _held_out():
    """Fresh samples of the clusters of ``_separable()`` (same centres, new noise)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(25)
    noise = torch.randn(len(labels), 16, generator=torch.Generator().manual_seed(99))
    return centres[labels] + noise, labels


def test_linear_probe_rejects_bad_input():
    x, y = _separable()
    with pytest.raises(ValueError, match="labels"):
        transfer.linear_probe(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        transfer.linear_probe(x * float("nan"), y)
    with pytest.raises(ValueError, match="out of range"):
        transfer.linear_probe(x, y, num_classes=2)


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_sklearn_probes(classifier):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install 'c3dzoo[probe]')")
    x, y = _separable()
    probe = transfer.linear_probe(x, y, classifier=classifier, backend="sklearn", num_classes=5)
    x_val, y_val = _held_out()
    assert probe.backend == "sklearn" and probe.scores(x_val).shape == (len(y_val), 5)
    assert (probe.predict(x_val) == y_val).float().mean() >= 0.95


def test_svm_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec then reports it missing
    with pytest.raises(ValueError, match=r"pip install 'c3dzoo\[probe\]'"):
        transfer.linear_probe(*_separable(), classifier="svm")


# --------------------------------------------------------------------------------------------
# ensembles
# --------------------------------------------------------------------------------------------


def test_ensemble_of_identical_models_equals_one_model():
    model = randomise_bn(tiny(seed=6)).eval()
    x = clips(3)
    with torch.no_grad():
        single = model(x).softmax(1)
    twin = copy.deepcopy(model)
    twin.fused = True
    per_model, combined = transfer.ensemble_probabilities([model, twin, copy.deepcopy(model)], x)
    assert per_model.shape == (3, 3, 5)
    assert torch.allclose(combined, single, atol=1e-6)
    assert all(torch.allclose(p, single, atol=1e-6) for p in per_model)


def test_ensemble_averages_different_models_and_checks_classes():
    a, b = tiny(seed=7).eval(), tiny(seed=8).eval()
    x = clips(2)
    result = transfer.ensemble_probabilities([a, b], x)
    with torch.no_grad():
        expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    assert torch.allclose(result.combined, expected, atol=1e-6)
    assert not torch.allclose(result.per_model[0], result.per_model[1])
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        transfer.ensemble_probabilities([a, tiny(num_classes=3)], x)


def test_models_from_checkpoints(tmp_path):
    _our_checkpoint(tiny(seed=1), tmp_path / "a.pt")
    _our_checkpoint(tiny(seed=2), tmp_path / "b.pt")
    models, names = transfer.models_from_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert len(models) == 2 and names == list("abcde")
    other = torch.load(tmp_path / "b.pt", weights_only=True)
    other["class_names"] = list("vwxyz")
    torch.save(other, tmp_path / "c.pt")
    with pytest.raises(ckpt.CheckpointError, match="disagree on the classes"):
        transfer.models_from_checkpoints([tmp_path / "a.pt", tmp_path / "c.pt"])


# --------------------------------------------------------------------------------------------
# evaluation reports
# --------------------------------------------------------------------------------------------


def test_topk_confusion_and_per_class():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    labels = [0, 1, 1, 1]
    acc = evaluation.topk_accuracy(scores, labels, (1, 2, 5))
    assert acc == {1: 0.5, 2: 1.0, 5: 1.0}
    confusion = evaluation.confusion_matrix(labels, scores.argmax(1), 3)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    per_class = evaluation.per_class_accuracy(confusion)
    assert per_class[0] == 1.0 and per_class[1] == pytest.approx(1 / 3) and np.isnan(per_class[2])
    report = evaluation.evaluate(scores, labels, ["a", "b", "c"])
    assert report.top1 == 0.5 and report.top5_k == 3 and "b 33 %" in report.per_class_line()
    with pytest.raises(ValueError, match="out of range"):
        evaluation.confusion_matrix([0, 3], [0, 0], 3)


def test_pngs_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    confusion = np.array([[3, 1], [0, 4]])
    evaluation.save_confusion_matrix_png(confusion, tmp_path / "cm.png", ["left", "right"])
    rows = [{"epoch": "1", "train_loss": "2.0", "val_loss": "2.1", "train_top1": "20", "val_top1": "18",
             "val_top5": "60"}, {"epoch": "2", "train_loss": "1.0", "val_loss": "1.3", "train_top1": "60",
                                 "val_top1": "50", "val_top5": "90"}]
    evaluation.save_curves_png(rows, tmp_path / "curves.png")
    for name in ("cm.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(evaluation.PlotUnavailable, match=r"pip install 'c3dzoo\[plot\]'"):
        evaluation.save_confusion_matrix_png(np.eye(2, dtype=int), tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_load_pretrained_from_a_grown_training_checkpoint(tmp_path):
    """A checkpoint of a run grown with --grow loads through the growth it records."""
    from c3dzoo import net2net

    kwargs = dict(num_classes=5, width_mult=0.125, input_size=(16, 32, 32))
    grown = c3dzoo.get_model("c3d_bn", **kwargs)
    net2net.wider(grown, "conv5b", 96, generator=torch.Generator().manual_seed(3))
    payload = {"model": grown.state_dict(), "model_name": "c3d_bn", "model_kwargs": kwargs,
               "growth": [{"op": "wider", "layer": "conv5b", "width": 96, "epoch": 2}]}
    path = tmp_path / "grown.pt"
    torch.save(payload, path)
    model = ckpt.stock_model(torch.load(path, weights_only=True), str(path))
    for key, value in grown.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    without_growth = dict(payload, growth=[])
    with pytest.raises(ckpt.CheckpointError, match="does not build"):
        ckpt.stock_model(without_growth)
