"""Published weights by name (``c3dzoo.weights``): torchvision's Kinetics-400 video ResNets through
the builders (``r3d_18(weights="kinetics400")``), ``--checkpoint``/``--pretrained MODEL:WEIGHTS``
and ``load_pretrained``. No network here: the entries' URLs are pointed at local files named the
way torch.hub checks them (``-<SHA-256 prefix>.pth``), in a temporary cache."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys

import pytest
import torch

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, transfer, weights

from test_data_folders import make_video


def test_the_registry_names_torchvisions_files_and_kinetics_classes():
    # an attribute of the package without an import of its own, as c3dzoo.transfer
    probe = subprocess.run([sys.executable, "-c", "import c3dzoo; print(len(c3dzoo.weights.available()))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "20", probe.stderr[-2000:]
    torchvision = [("r3d_18", "kinetics400"), ("mc3_18", "kinetics400"), ("r2plus1d_18", "kinetics400"),
                   ("s3d", "kinetics400")]
    ig65m = [("r2plus1d_34", n) for n in ("ig65m_kinetics", "ig65m_kinetics32", "ig65m", "ig65m32")]
    pytorchvideo = [(m, "kinetics400")
                    for m in ("slow_r50", "i3d_r50", "c2d_r50", "csn_r101", "slowfast_r50", "slowfast_r101",
                              "r2plus1d_r50", "slowfast_16x8_r101_50_50")]
    x3d = [(m, "kinetics400") for m in ("x3d_xs", "x3d_s", "x3d_m", "x3d_l")]
    assert weights.available() == torchvision + ig65m + pytorchvideo + x3d
    for model, name in torchvision:
        found = weights.entry(model, name)
        assert re.fullmatch(rf"https://download\.pytorch\.org/models/{model}-[0-9a-f]{{8}}\.pth", found.url)
        clips = (128, (224, 224), 256) if model == "s3d" else (16, (112, 112), 128)  # as torchvision's presets
        assert (found.frames, found.size, found.short_side, found.num_classes) == (*clips, 400)
        assert found.class_names == weights.kinetics400_classes()
    for (model, name), (frames, classes) in zip(ig65m, [(8, 400), (32, 400), (8, 359), (32, 487)]):
        found = weights.entry(model, name)
        # torch.hub checks the file against the hash prefix in its name
        assert re.fullmatch(r"https://github\.com/moabitcoin/ig65m-pytorch/releases/download/v1\.0\.0/"
                            r"r2plus1d_34_clip\d+_[a-z0-9_]+-[0-9a-f]{8}\.pth", found.url)
        assert (found.frames, found.size, found.short_side, found.num_classes) == (frames, (112, 112), 128, classes)
        assert found.class_names == tuple(f"class {i}" for i in range(classes))  # no published label order
    files = ("SLOW_8x8_R50", "I3D_8x8_R50", "C2D_8x8_R50", "CSN_32x2_R101", "SLOWFAST_8x8_R50", "SLOWFAST_8x8_R101",
             "R2PLUS1D_16x4_R50", "SLOWFAST_16x8_R101_50_50")
    for (model, name), file in zip(pytorchvideo, files):
        found = weights.entry(model, name)
        assert found.url == f"https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/{file}.pyth"
        # PyTorchVideo's 8x8 clips (SlowFast's fast pathway: 32 frames, one in 2; CSN's 32x2 clips
        # likewise; R(2+1)D's 16x4; SlowFast 16x8's fast pathway 64 frames, one in 2) and its
        # evaluation transform and normalisation
        clips = {"r2plus1d_r50": (16, 4), "slowfast_16x8_r101_50_50": (64, 2)}.get(
            model, (32, 2) if model.startswith(("slowfast", "csn")) else (8, 8))
        named = {"csn_r101": "32x2", "r2plus1d_r50": "16x4", "slowfast_16x8_r101_50_50": "16x8"}.get(model, "8x8")
        assert found.source == f"PyTorchVideo (Kinetics-400, {named} clips)"
        assert (found.frames, found.frame_stride, found.size, found.short_side) == (*clips, (256, 256), 256)
        assert (found.mean, found.std, found.state_key) == ((0.45,) * 3, (0.225,) * 3, "model_state")
        assert found.class_names == weights.kinetics400_classes()
    # the X3Ds: PyTorchVideo's model zoo clips (4x12 ...), cropped as PySlowFast's X3D configs test
    # them (TEST_CROP_SIZE; the torch.hub page's transform for XS, S and M)
    for (model, name), file, clips, crop in zip(x3d, ("X3D_XS", "X3D_S", "X3D_M", "X3D_L"),
                                                 ((4, 12), (13, 6), (16, 5), (16, 5)), (182, 182, 256, 356)):
        found = weights.entry(model, name)
        assert found.url == f"https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/{file}.pyth"
        assert found.source == f"PyTorchVideo (Kinetics-400, {clips[0]}x{clips[1]} clips)"
        assert (found.frames, found.frame_stride, found.size, found.short_side) == (*clips, (crop, crop), crop)
        assert (found.mean, found.std, found.state_key) == ((0.45,) * 3, (0.225,) * 3, "model_state")
        assert found.class_names == weights.kinetics400_classes()
    names = weights.kinetics400_classes()
    assert len(names) == len(set(names)) == 400 and list(names) == sorted(names)
    assert names[0] == "abseiling" and names[-1] == "zumba"
    assert weights.parse("r2plus1d_18:Kinetics400") == ("r2plus1d_18", "kinetics400")
    assert weights.parse("runs/a/last.pt") is None and weights.parse("c3d:sports1m") is None
    with pytest.raises(weights.WeightsError, match="no weights 'imagenet' for r3d_18; known: r3d_18:kinetics400, "):
        weights.entry("r3d_18", "imagenet")


def _serve(model: str, tmp_path, monkeypatch):
    """``model``:kinetics400 served from a local file of random weights (as torchvision would have
    written them: no num_batches_tracked), with torch.hub's cache in tmp_path."""
    return _serve_as(model, "kinetics400", tmp_path, monkeypatch)


def _serve_as(model: str, name: str, tmp_path, monkeypatch, num_classes: int = 400):
    torch.manual_seed(0)
    state = {k: v for k, v in c3dzoo.get_model(model, num_classes=num_classes).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    served_file = tmp_path / "server" / f"{model}-{digest[:8]}.pth"
    served_file.parent.mkdir(exist_ok=True)
    staging.rename(served_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    key = (model, name)
    monkeypatch.setitem(weights._REGISTRY, key, dataclasses.replace(weights._REGISTRY[key],
                                                                    url=served_file.as_uri()))
    return state, served_file


@pytest.fixture
def served(tmp_path, monkeypatch):
    return _serve("r3d_18", tmp_path, monkeypatch)


def _same(model_state, state) -> bool:
    return all(torch.equal(model_state[k], v) for k, v in state.items())


def test_builder_loads_the_published_weights_once(served):
    state, served_file = served
    model = c3dzoo.r3d_18(weights="kinetics400", fused=True)
    assert model.fused and _same(model.state_dict(), state)
    served_file.unlink()  # the second time from torch.hub's cache
    assert _same(c3dzoo.get_model("r3d_18", weights="Kinetics400").state_dict(), state)
    with pytest.raises(ValueError, match="have 400 classes, not 10; for another class count fine-tune"):
        c3dzoo.r3d_18(10, weights="kinetics400")


def test_a_file_that_fails_its_hash_check_is_refused(served):
    _, served_file = served
    served_file.write_bytes(served_file.read_bytes() + b"tampered")
    with pytest.raises(weights.WeightsError, match="cannot get r3d_18:kinetics400 from .*hash"):
        c3dzoo.r3d_18(weights="kinetics400")


def test_published_weights_fine_tune_with_a_new_head(served):
    state, _ = served
    model = c3dzoo.r3d_18(num_classes=7)
    report = transfer.load_pretrained(model, "r3d_18:kinetics400", head="skip")
    assert report.source == "r3d_18:kinetics400"
    assert _same(model.state_dict(), {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert model.fc.out_features == 7


def test_commands_take_published_weights_as_a_checkpoint(served, tmp_path, capsys):
    state, _ = served
    checkpoint = ckpt.load("r3d_18:kinetics400")
    assert checkpoint["model_name"] == "r3d_18" and len(checkpoint["class_names"]) == 400
    assert checkpoint["data"]["short_side"] == 128 and _same(checkpoint["model"], state)
    video = make_video(tmp_path / "clip.mp4", frames=20, size=48)
    assert cli.main(["predict", video, "--checkpoint", "r3d_18:kinetics400", "--top-k", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]  # after torch.hub's "Downloading: ..."
    ranked = re.fullmatch(rf"{re.escape(video)}: (.+) [0-9.]+%, (.+) [0-9.]+%, (.+) [0-9.]+%", printed)
    assert ranked and all(name in weights.kinetics400_classes() for name in ranked.groups()), printed
    # fine-tuning from them on the command line (the name is not a path to make absolute)
    assert cli.main(["train", "--model", "r3d_18", "--pretrained", "r3d_18:kinetics400", "--new-head", "--epochs", "1",
                     "--train-samples", "4", "--val-samples", "2", "--num-classes", "2", "--frames", "8", "--size",
                     "32", "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    assert "r3d_18:kinetics400" in capsys.readouterr().out


def test_s3d_takes_its_published_weights_and_clips(tmp_path, monkeypatch, capsys):
    """s3d:kinetics400 loads into the builder, and predict feeds it what torchvision measured it
    on: 128 frames, short side 256, centre crop 224 (a video of at least half that length is
    looped to it)."""
    state, _ = _serve("s3d", tmp_path, monkeypatch)
    model = c3dzoo.s3d(weights="kinetics400", fused=True)
    assert model.fused and _same(model.state_dict(), state)
    checkpoint = ckpt.load("s3d:kinetics400")
    assert checkpoint["model_name"] == "s3d" and len(checkpoint["class_names"]) == 400
    assert (checkpoint["data"]["frames"], tuple(checkpoint["data"]["size"])) == (128, (224, 224))
    shapes = []
    s3d_class = c3dzoo.models.separable_inception.S3D
    monkeypatch.setattr(s3d_class, "_check_input",
                        lambda self, x, real=s3d_class._check_input: (shapes.append(x.shape), real(self, x)))
    video = make_video(tmp_path / "clip.mp4", frames=70, size=40)
    assert cli.main(["predict", video, "--checkpoint", "s3d:kinetics400", "--device", "cpu"]) == 0
    assert [tuple(s[1:]) for s in shapes] == [(3, 128, 224, 224)]
    assert re.fullmatch(rf"{re.escape(video)}: .+ [0-9.]+%.*", capsys.readouterr().out.strip().splitlines()[-1])
    # fine-tuning on the command line: a new 1×1×1 conv head, the first Inception blocks frozen
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "s3d", "--pretrained", "s3d:kinetics400", "--new-head", "--freeze",
                     "up-to=features.6", "--epochs", "1", "--train-samples", "4", "--val-samples", "2", "--num-classes",
                     "2", "--frames", "8", "--size", "32", "--batch-size", "2", "--device", "cpu", "--no-progress",
                     "--out", str(out)]) == 0
    trained = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert trained["classifier.1.weight"].shape == (2, 1024, 1, 1, 1)
    assert torch.equal(trained["features.6.branch0.0.weight"], state["features.6.branch0.0.weight"])  # frozen
    assert not torch.equal(trained["features.8.branch0.0.weight"], state["features.8.branch0.0.weight"])


def test_ig65m_weights_load_by_name_and_number_their_classes(tmp_path, monkeypatch, capsys):
    state, _ = _serve_as("r2plus1d_34", "ig65m", tmp_path, monkeypatch, num_classes=359)
    model = c3dzoo.r2plus1d_34(weights="ig65m", fused=True)
    assert model.fc.out_features == 359 and _same(model.state_dict(), state)
    video = make_video(tmp_path / "clip.mp4", frames=12, size=40)
    assert cli.main(["predict", video, "--checkpoint", "r2plus1d_34:ig65m", "--top-k", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"{re.escape(video)}: class \d+ [0-9.]+%, class \d+ [0-9.]+%", printed), printed


def _serve_pytorchvideo(model: str, tmp_path, monkeypatch, content=None):
    """``model``:kinetics400 served as PyTorchVideo publishes it: a training checkpoint (the
    state_dict under "model_state", beside the epoch, optimizer state and config text) in a file
    named without a hash."""
    torch.manual_seed(0)
    state = c3dzoo.get_model(model).state_dict()
    if content is None:
        content = {"epoch": 196, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
                   "cfg": "MODEL:\n  ARCH: slow\n"}
    entry = weights.entry(model, "kinetics400")
    served_file = tmp_path / "server" / entry.url.rsplit("/", 1)[1]
    served_file.parent.mkdir(exist_ok=True)
    torch.save(content, served_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(weights._REGISTRY, (model, "kinetics400"), dataclasses.replace(entry, url=served_file.as_uri()))
    return state


def test_pytorchvideo_weights_load_from_its_training_checkpoints(tmp_path, monkeypatch, capsys):
    """slow_r50:kinetics400 comes out of PyTorchVideo's checkpoint format, and predict feeds it
    PyTorchVideo's clips: 8 frames one in 8 (a shorter video is looped), 256 × 256."""
    state = _serve_pytorchvideo("slow_r50", tmp_path, monkeypatch)
    model = c3dzoo.slow_r50(weights="kinetics400", fused=True)
    assert model.fused and _same(model.state_dict(), state)
    checkpoint = ckpt.load("slow_r50:kinetics400")
    assert (checkpoint["data"]["frames"], checkpoint["data"]["stride"], tuple(checkpoint["data"]["size"])) == \
        (8, 8, (256, 256))
    assert checkpoint["data"]["mean"] == (0.45,) * 3
    shapes, real = [], c3dzoo.models.resnet3d.check_video_input
    monkeypatch.setattr(c3dzoo.models.resnet3d, "check_video_input",
                        lambda x, *rest: (shapes.append(tuple(x.shape[1:])), real(x, *rest)))
    video = make_video(tmp_path / "clip.mp4", frames=40, size=40)
    assert cli.main(["predict", video, "--checkpoint", "slow_r50:kinetics400", "--device", "cpu"]) == 0
    assert shapes == [(3, 8, 256, 256)]
    assert re.fullmatch(rf"{re.escape(video)}: .+ [0-9.]+%.*", capsys.readouterr().out.strip().splitlines()[-1])


def test_csn_r101_weights_load_strictly_from_pytorchvideos_file(tmp_path, monkeypatch):
    """csn_r101:kinetics400 (PyTorchVideo's CSN_32x2_R101.pyth, its hub's keys) loads strictly into
    the stock and the fused model alike."""
    state = _serve_pytorchvideo("csn_r101", tmp_path, monkeypatch)
    model = c3dzoo.csn_r101(weights="kinetics400", fused=True)
    assert model.fused and _same(model.state_dict(), state)
    assert c3dzoo.get_model("csn_r101", weights="kinetics400").blocks[5].proj.out_features == 400


def test_a_pytorchvideo_file_without_its_state_dict_is_refused(tmp_path, monkeypatch):
    _serve_pytorchvideo("i3d_r50", tmp_path, monkeypatch, content={"epoch": 1, "model": {}})
    with pytest.raises(weights.WeightsError, match=r"i3d_r50:kinetics400 from .* holds no 'model_state' state_dict "
                                                   r"\(it holds epoch, model\): not the file published there"):
        c3dzoo.i3d_r50(weights="kinetics400")
