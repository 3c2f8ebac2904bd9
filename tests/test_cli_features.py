"""``c3dzoo features`` and ``c3dzoo linear-probe`` end to end on tiny synthetic data, and their errors."""

import json
import sys

import pytest
import torch

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli

TINY_MODEL = ["--model", "c3d_bn", "--width-mult", "0.0625", "--frames", "16", "--size", "32",
              "--device", "cpu"]
KWARGS = dict(num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))


def _checkpoint(path, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**KWARGS, **overrides}
    model = c3dzoo.get_model("c3d_bn", **kwargs)
    ckpt.save_atomic({"model": ckpt.plain_state_dict(model.state_dict()), "model_name": "c3d_bn",
                      "model_kwargs": kwargs, "class_names": [f"c{i}" for i in range(kwargs["num_classes"])],
                      "args": {"num_classes": 4, "frames": 16, "size": [32, 32], "seed": 0}}, path)
    return model


def _error(capsys, argv, status=2) -> str:
    assert cli.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("c3dzoo: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def features_file(tmp_path_factory):
    """Features of 32 synthetic training clips (4 classes) from a tiny checkpoint."""
    folder = tmp_path_factory.mktemp("features")
    _checkpoint(folder / "model.pt")
    out = folder / "train.pt"
    assert cli.main(["features", "--checkpoint", str(folder / "model.pt"), "--synthetic", "32",
                     "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_features_writes_labelled_features(features_file):
    data = torch.load(features_file, weights_only=True)
    assert data["features"].shape == (32, 256) and data["layer"] == "fc6"
    assert data["labels"].tolist() == [i % 4 for i in range(32)]
    assert data["class_names"] == ["move_E", "move_NE", "move_N", "move_NW"]  # the synthetic set's
    assert (data["features"] >= 0).all()  # after fc6's ReLU
    assert data["model_name"] == "c3d_bn"


def test_pretrained_gives_the_checkpoints_features(tmp_path, features_file, capsys):
    """--model + --pretrained (another head size, so the head is skipped) computes the same
    features as the checkpoint the weights came from."""
    folder = features_file.parent
    out = tmp_path / "pretrained.pt"
    assert cli.main(["features", *TINY_MODEL, "--num-classes", "9", "--pretrained", str(folder / "model.pt"),
                     "--synthetic", "32", "--classes", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "head fc8 not loaded" in printed and "wrote" in printed
    ours, theirs = torch.load(out, weights_only=True), torch.load(features_file, weights_only=True)
    assert torch.allclose(ours["features"], theirs["features"], atol=1e-5)
    assert torch.equal(ours["labels"], theirs["labels"])


def test_features_of_clip_files(tmp_path, capsys):
    torch.save(torch.randn(3, 16, 32, 32), tmp_path / "one.pt")
    torch.save(torch.randn(2, 3, 16, 32, 32), tmp_path / "batch.pt")
    out = tmp_path / "clips_features.pt"
    assert cli.main(["features", *TINY_MODEL, "--layer", "fc7", "--out", str(out),
                     str(tmp_path / "one.pt"), str(tmp_path / "batch.pt")]) == 0
    data = torch.load(out, weights_only=True)
    assert data["features"].shape == (3, 256) and data["labels"] is None and data["layer"] == "fc7"
    # a features file without labels cannot train a probe
    assert "has no labels" in _error(capsys, ["linear-probe", str(out)])


def _frame_folders(root, classes=("left", "right"), videos=2, frames=18, size=40):
    """root/<class>/<video>/00001.png …: the class-folder layout of c3dzoo.data, as frame images."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        for v in range(videos):
            folder = root / name / f"video{v}"
            folder.mkdir(parents=True)
            for t in range(frames):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{t + 1:05d}.png")
    return root


def test_features_of_a_class_folder(tmp_path):
    pytest.importorskip("PIL", reason="Pillow is not installed")
    root = _frame_folders(tmp_path / "data")
    out = tmp_path / "folder_features.pt"
    assert cli.main(["features", *TINY_MODEL, "--out", str(out), str(root)]) == 0
    data = torch.load(out, weights_only=True)
    assert data["features"].shape == (4, 256) and data["class_names"] == ["left", "right"]
    assert sorted(data["labels"].tolist()) == [0, 0, 1, 1]


def test_linear_probe_reports_and_writes_png(features_file, tmp_path, capsys):
    out = tmp_path / "probe"
    assert cli.main(["linear-probe", str(features_file), "--val-split", "0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe (logreg, torch) on fc6 features: 24 train / 8 val clips, 256 dims, 4 classes" in printed
    assert "val   top-1" in printed and "top-4" in printed and "val per class: move_E" in printed
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["val"]["samples"] == 8 and sum(map(sum, report["val"]["confusion_matrix"])) == 8
    assert report["train"]["top1"] == 1.0  # 256 dimensions separate 24 clips


def test_linear_probe_with_a_validation_file(features_file, tmp_path, capsys):
    folder = features_file.parent
    val = tmp_path / "val.pt"
    assert cli.main(["features", "--checkpoint", str(folder / "model.pt"), "--synthetic", "8", "--split", "val",
                     "--out", str(val), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli.main(["linear-probe", str(features_file), "--val", str(val), "--out", str(tmp_path / "p")]) == 0
    assert "32 train / 8 val clips" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "report.json").read_text())["val"]["samples"] == 8


def test_linear_probe_svm(features_file, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install 'c3dzoo[probe]')")
    assert cli.main(["linear-probe", str(features_file), "--classifier", "svm", "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "(svm, sklearn)" in printed and "24 train / 8 val clips" in printed
    assert (tmp_path / "p" / "confusion_matrix.png").is_file()


def test_features_errors(tmp_path, capsys):
    assert "give a data folder, clip files (.pt) or --synthetic N" in _error(capsys, ["features", *TINY_MODEL, "--out", "x.pt"])
    assert "no layer 'fc9'" in _error(capsys, ["features", *TINY_MODEL, "--layer", "fc9", "--synthetic", "2",
                                                "--out", "x.pt"])
    _checkpoint(tmp_path / "m.pt")
    assert "not allowed with argument" in _error(capsys, ["features", "--checkpoint", str(tmp_path / "m.pt"),
                                                          *TINY_MODEL, "--synthetic", "2", "--out", "x.pt"])
    assert "checkpoint not found" in _error(capsys, ["features", "--checkpoint", str(tmp_path / "none.pt"),
                                                     "--synthetic", "2", "--out", "x.pt"])
    # weights of another architecture (C3D without BN) for c3d_bn
    torch.manual_seed(0)
    torch.save(c3dzoo.c3d(**{**KWARGS}).state_dict(), tmp_path / "c3d.pth")
    message = _error(capsys, ["features", *TINY_MODEL, "--pretrained", str(tmp_path / "c3d.pth"),
                              "--synthetic", "2", "--out", str(tmp_path / "x.pt")])
    assert "does not fit C3D" in message and "conv1_bn.weight" in message
    # clips of a size the model does not take
    torch.save(torch.randn(3, 8, 32, 32), tmp_path / "short.pt")
    assert "expects input of shape" in _error(capsys, ["features", *TINY_MODEL, "--out", str(tmp_path / "x.pt"),
                                                       str(tmp_path / "short.pt")])
    assert "has no layer 'pool6'" in _error(
        capsys, ["features", *TINY_MODEL, "--layer", "pool6", "--synthetic", "2", "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_linear_probe_errors(features_file, tmp_path, capsys, monkeypatch):
    assert "features file not found" in _error(capsys, ["linear-probe", str(tmp_path / "none.pt")])
    torch.save({"a": 1}, tmp_path / "other.pt")
    assert "is not a features file" in _error(capsys, ["linear-probe", str(tmp_path / "other.pt")])
    assert "between 0 and 1" in _error(capsys, ["linear-probe", str(features_file), "--val-split", "1.5"])
    assert "not allowed with argument" in _error(
        capsys, ["linear-probe", str(features_file), "--val", str(features_file), "--val-split", "0.2"])
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert "pip install 'c3dzoo[probe]'" in _error(
        capsys, ["linear-probe", str(features_file), "--classifier", "svm", "--out", str(tmp_path / "p")])
