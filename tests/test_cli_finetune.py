"""``c3dzoo train --pretrained/--new-head/--freeze/--head-lr-mult``, the final per-class report
and confusion matrix, and ``c3dzoo predict`` with several checkpoints (an ensemble)."""

from __future__ import annotations

import csv

import pytest
import torch

import c3dzoo
from c3dzoo import cli

TINY = ["train", "--epochs", "1", "--train-samples", "16", "--val-samples", "8", "--batch-size", "8",
        "--width-mult", "0.0625", "--frames", "16", "--size", "32", "--device", "cpu", "--workers", "0",
        "--no-progress"]
FROZEN_BY_FEATURES = ("conv", )  # C3D-BN: every conv and its BatchNorm (conv1, conv1_bn, ...)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-class run and its exported stock state_dict."""
    root = tmp_path_factory.mktemp("pretrained")
    assert cli.main(TINY + ["--num-classes", "4", "--out", str(root / "run")]) == 0
    assert cli.main(["export", "--checkpoint", str(root / "run" / "last.pt"), "--out", str(root / "w.pt")]) == 0
    return root


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    """3 classes from the 4-class weights: a new head, the conv layers frozen, the head at 10x lr."""
    out = tmp_path_factory.mktemp("finetuned")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(TINY + ["--num-classes", "3", "--pretrained", str(pretrained / "w.pt"), "--new-head",
                                  "--freeze", "features", "--head-lr-mult", "10", "--out", str(out)])
    assert status == 0
    return out, printed.getvalue()


def test_finetune_prints_what_it_loaded_and_froze(finetuned):
    _, printed = finetuned
    loaded = [line for line in printed.splitlines() if line.startswith("loaded ")]
    assert len(loaded) == 1 and "head fc8 not loaded" in loaded[0] and "has 4 classes" in loaded[0]
    frozen = [line for line in printed.splitlines() if line.startswith("frozen: ")]
    assert len(frozen) == 1 and "conv1" in frozen[0] and "conv5b" in frozen[0] and "fc6" not in frozen[0]


def test_frozen_layers_keep_the_pretrained_weights_and_statistics(pretrained, finetuned):
    """--freeze features: every conv weight and BatchNorm tensor (running statistics included, so
    the training loop's model.train() left the pinned BNs in eval mode) is the pretrained one;
    fc6, fc7 and the new head trained."""
    out, _ = finetuned
    before, after = _load(pretrained / "w.pt"), _load(out / "last.pt")["model"]
    conv_keys = [k for k in before if k.startswith(FROZEN_BY_FEATURES)]
    assert any("running_mean" in k for k in conv_keys) and any(k.endswith("num_batches_tracked") for k in conv_keys)
    assert all(torch.equal(before[k], after[k]) for k in conv_keys)
    assert not torch.equal(before["fc6.weight"], after["fc6.weight"])
    # the head: 3 classes, freshly initialised as a model built with --seed 0, then trained
    torch.manual_seed(0)
    initial = c3dzoo.get_model("c3d_bn", num_classes=3, width_mult=0.0625, input_size=(16, 32, 32))
    assert after["fc8.weight"].shape[0] == 3
    assert not torch.equal(after["fc8.weight"], initial.fc8.weight.detach())


def test_head_lr_mult_gives_two_param_groups(finetuned):
    out, _ = finetuned
    checkpoint = _load(out / "last.pt")
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["body", "head"]
    assert groups[0]["initial_lr"] == pytest.approx(0.02) and groups[1]["initial_lr"] == pytest.approx(0.2)
    assert len(groups[1]["params"]) == 2  # fc8 weight and bias
    trainable = ["fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias"]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # frozen parameters left out
    assert checkpoint["args"]["freeze"] == "features" and checkpoint["args"]["head_lr_mult"] == 10


def test_resume_keeps_freezing_without_the_pretrained_file(pretrained, finetuned, tmp_path, capsys):
    """--resume takes --freeze etc. from the checkpoint and its weights from the checkpoint: the
    pretrained file may be gone."""
    import shutil

    out, _ = finetuned
    shutil.copytree(out, tmp_path / "run")
    shutil.copy(pretrained / "w.pt", tmp_path / "w.pt")
    checkpoint = _load(tmp_path / "run" / "last.pt")
    checkpoint["args"]["pretrained"] = str(tmp_path / "w.pt")  # then delete it
    torch.save(checkpoint, tmp_path / "run" / "last.pt")
    (tmp_path / "w.pt").unlink()
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "loaded " not in printed and "frozen: conv1" in printed
    before, after = _load(pretrained / "w.pt"), _load(tmp_path / "run" / "last.pt")
    assert after["epoch"] == 2 and len(after["optimizer"]["param_groups"]) == 2
    assert all(torch.equal(before[k], after["model"][k]) for k in before if k.startswith(FROZEN_BY_FEATURES))


def test_final_validation_writes_per_class_accuracy_and_confusion_png(finetuned):
    out, printed = finetuned
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and sum(int(r["clips"]) for r in rows) == 8
    line = next(line for line in printed.splitlines() if line.startswith("final val top-1 per class: "))
    assert all(r["class"] in line for r in rows)
    # the per-class counts agree with the final top-1 in metrics.csv
    with open(out / "metrics.csv", newline="") as f:
        top1 = float(list(csv.DictReader(f))[-1]["val_top1"])
    assert sum(int(r["correct"]) for r in rows) == round(top1 * 8 / 100)


def test_confusion_png_needs_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(TINY + ["--num-classes", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1 and "confusion.png" in notes[0]
    assert not (tmp_path / "confusion.png").exists() and (tmp_path / "per_class.csv").exists()


@pytest.mark.parametrize("extra, message", [
    (["--num-classes", "3", "--pretrained", "{w}"], "has 4 classes"),  # no --new-head
    (["--num-classes", "4", "--pretrained", "{tmp}/nope.pt"], "not found"),
    (["--num-classes", "4", "--new-head"], "--new-head"),
    (["--num-classes", "4", "--freeze", "up-to=conv9"], "no layer 'conv9'"),
    (["--num-classes", "4", "--freeze", "everything"], "freeze spec"),
    (["--num-classes", "4", "--head-lr-mult", "0"], "--head-lr-mult"),
    (["--num-classes", "4", "--freeze", "features", "--grow", "1:wider=fc6*2"], "--grow cannot"),
])
def test_finetune_errors_one_line_exit_2(extra, message, pretrained, tmp_path, capsys):
    argv = TINY + [a.format(w=pretrained / "w.pt", tmp=tmp_path) for a in extra]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("c3dzoo: error:") and message in err and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out


def test_predict_ensemble_prints_each_model_and_the_mean(pretrained, tmp_path, capsys):
    assert cli.main(TINY + ["--num-classes", "4", "--seed", "1", "--out", str(tmp_path)]) == 0
    a, b = str(pretrained / "run" / "last.pt"), str(tmp_path / "last.pt")
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", a, b, "--synthetic", "2", "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        f"synthetic val[{i}] [{source}]" for i in range(2) for source in (a, b, "ensemble of 2")]
    assert all("(true: " in line for line in lines[2::3])

    def probabilities(line):  # {class: percent}
        return {p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1].rstrip("%")) for p in line.split(": ", 1)[1]
                .split("  (true")[0].split(", ")}

    for i in range(2):
        first, second, mean = (probabilities(line) for line in lines[3 * i:3 * i + 3])
        assert all(abs(mean[c] - (first[c] + second[c]) / 2) <= 0.1 for c in mean)  # printed to 0.1 %


def test_ensemble_of_one_checkpoint_twice_equals_the_checkpoint(pretrained, capsys):
    path = str(pretrained / "run" / "last.pt")
    assert cli.main(["predict", "--checkpoint", path, "--synthetic", "3"]) == 0
    single = capsys.readouterr().out.strip().splitlines()
    assert cli.main(["predict", "--checkpoint", path, path, "--synthetic", "3"]) == 0
    ensemble = [line for line in capsys.readouterr().out.strip().splitlines() if "[ensemble of 2]" in line]
    assert [line.replace(" [ensemble of 2]", "") for line in ensemble] == single


def test_predict_ensemble_of_other_classes_exit_2(pretrained, finetuned, capsys):
    out, _ = finetuned
    assert cli.main(["predict", "--checkpoint", str(pretrained / "run" / "last.pt"), str(out / "last.pt"),
                     "--synthetic", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("c3dzoo: error: checkpoints disagree on the classes") and "\n" not in err


def test_predict_ensemble_of_other_clip_sizes_exit_2(pretrained, tmp_path, capsys):
    checkpoint = _load(pretrained / "run" / "last.pt")
    checkpoint["args"]["size"] = (48, 48)  # as if trained on 48x48 clips
    torch.save(checkpoint, tmp_path / "other.pt")
    assert cli.main(["predict", "--checkpoint", str(pretrained / "run" / "last.pt"), str(tmp_path / "other.pt"),
                     "--synthetic", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoints disagree on the input" in err and "16x32x32" in err and "16x48x48" in err
    assert "\n" not in err
