"""The ``c3dzoo`` command line: info, check, train, and how it reports bad arguments."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli

TINY_TRAIN = ["train", "--epochs", "1", "--train-samples", "16", "--val-samples", "8",
              "--batch-size", "8", "--num-classes", "4", "--width-mult", "0.0625",
              "--frames", "16", "--size", "32", "--device", "cpu", "--no-progress"]


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "available" in out
    assert torch.__version__ in out and c3dzoo.__version__ in out
    for name in c3dzoo.list_models():
        assert name in out
    # the published weights beside their model, in one column
    weights = [line for line in out.splitlines() if re.fullmatch(r"  \w+ +\w+:\w+.*", line)]
    assert any(re.fullmatch(r"  r2plus1d_18 +r2plus1d_18:kinetics400", line) for line in weights)
    assert len(weights) >= 15 and len({line.index(":") - len(line.split(":")[0].split()[-1]) for line in weights}) == 1


def test_info_lists_optional_features_and_what_installs_them(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxscript", "sklearn") else real(name, *a))
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.split("optional features:\n")[1].splitlines()
    states = {line[:39].strip(): line[39:].strip() for line in lines}
    assert states["ONNX export"] == "no (pip install onnxscript)"
    assert states["linear-probe --classifier svm"] == "no (pip install scikit-learn)"
    assert set(states) == {feature for feature, _ in cli.info.OPTIONAL_FEATURES}
    for feature, modules in cli.info.OPTIONAL_FEATURES:
        if not {"onnxscript", "sklearn"} & set(modules):
            installed = all(real(module) is not None for module in modules)
            assert (states[feature] == "yes") == installed, feature


def test_check_passes(capsys):
    assert cli.main(["check", "--models", "c3d_bn", "c3d"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("c3d_bn ")]
    assert {row[1] for row in rows} == set(cli.check.CHECK_MODES)  # a row per mode and quantity
    assert len(rows) == 4 * len(cli.check.CHECK_MODES)  # output, input grad, param grads, running stats
    assert all("PASS" in row and "FAIL" not in row for row in rows)
    assert "0 FAIL" in out


def test_check_catches_a_wrong_fused_op(monkeypatch, capsys):
    """A fused chain that is off by 1e-3 must fail the budget (exit status 1)."""
    from c3dzoo.models import _common

    real = _common.conv_bn_act

    def off_by_a_little(*args, **kwargs):
        return real(*args, **{**kwargs, "defer": False}) + 1e-3  # a tensor, not a deferred output

    monkeypatch.setattr(_common, "conv_bn_act", off_by_a_little)
    assert cli.main(["check", "--models", "c3d_bn", "--attempts", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and ", 0 FAIL" not in out


def test_check_skips_missing_model(monkeypatch, capsys):
    monkeypatch.setitem(c3dzoo.models._MODELS, "not_shipped", "c3dzoo.models.not_shipped:build")
    assert cli.main(["check", "--models", "not_shipped"]) == 0
    assert "not_shipped: skipped" in capsys.readouterr().out


def test_train_writes_metrics_and_loadable_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert cli.main(TINY_TRAIN + ["--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "val" in printed and "top-1" in printed and "done in" in printed

    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert 0.0 <= float(rows[0]["val_top1"]) <= 100.0

    checkpoint = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["model_name"] == "c3d_bn"
    assert "state" in checkpoint["optimizer"]
    # the fused model's state_dict loads strictly into the stock model built the same way
    stock = c3dzoo.get_model("c3d_bn", num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    stock.load_state_dict(checkpoint["model"], strict=True)
    assert checkpoint["model_kwargs"] == dict(num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    assert not os.path.exists(out_dir / "last.pt.tmp")


def test_train_says_when_it_waits_for_its_data(tmp_path, capsys, monkeypatch):
    """A loader slower than the model: the epoch line and metrics.csv give the share of the time
    spent waiting for batches, and a note names the remedies once."""
    import time as time_module

    from c3dzoo.data import SyntheticVideoDataset

    real_getitem = SyntheticVideoDataset.__getitem__

    def slow_getitem(self, index):
        time_module.sleep(0.2)  # 1.6 s a batch of 8: far above a step of this model, even on a loaded machine
        return real_getitem(self, index)

    monkeypatch.setattr(SyntheticVideoDataset, "__getitem__", slow_getitem)
    out = tmp_path / "run"
    assert cli.main(TINY_TRAIN + ["--epochs", "2", "--train-samples", "8", "--val-samples", "2", "--workers", "0",
                                  "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "metrics.csv", newline="") as f:
        waits = [float(row["data_wait_pct"]) for row in csv.DictReader(f)]
    assert len(waits) == 2 and all(50 < w <= 100 for w in waits), waits
    # the epoch line rounds the share to a whole percent, metrics.csv to a tenth
    shown = [int(m) for m in re.findall(r"(\d+) % waiting for data", printed)]
    assert len(shown) == 2 and all(abs(a - b) <= 0.55 for a, b in zip(shown, waits)), (shown, waits)
    assert printed.count("note: training waited for its data") == 1 and "raise --workers (now 0)" in printed


def test_train_renders_each_synthetic_clip_once(tmp_path, monkeypatch):
    """Loading in this process (--workers 0), the synthetic sets keep their clips: three epochs
    render each training and validation clip once."""
    from c3dzoo.data import SyntheticVideoDataset

    rendered = []
    real_render = SyntheticVideoDataset._render
    monkeypatch.setattr(SyntheticVideoDataset, "_render",
                        lambda self, *args: rendered.append(self.split) or real_render(self, *args))
    assert cli.main(TINY_TRAIN + ["--epochs", "3", "--train-samples", "8", "--val-samples", "2", "--workers", "0",
                                  "--out", str(tmp_path / "run")]) == 0
    assert sorted(rendered) == ["train"] * 8 + ["val"] * 2


def test_train_logs_for_tensorboard(tmp_path, capsys):
    """--tensorboard: every step's loss and lr, every epoch's metrics.csv row, in --out/tensorboard;
    a resumed run goes on at its step."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extras: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run = TINY_TRAIN + ["--train-samples", "16", "--batch-size", "4", "--tensorboard", "--out", str(out)]
    assert cli.main(run) == 0
    assert "tensorboard/" in capsys.readouterr().out
    assert cli.main(run[:run.index("--epochs") + 1] + ["2"] + run[run.index("--epochs") + 2:] + ["--resume"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = events.Scalars("step/train_loss")
    assert [e.step for e in steps] == list(range(1, 9))  # 4 steps an epoch, the second epoch resumed
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for epoch, row in enumerate(rows, 1):
        logged = {key: [e.value for e in events.Scalars(f"epoch/{key}") if e.step == epoch]
                  for key in ("train_loss", "val_top1", "data_wait_pct")}
        assert all(len(v) == 1 for v in logged.values()), logged
        assert logged["val_top1"][0] == pytest.approx(float(row["val_top1"]), abs=0.01)
        # the epoch's training loss is the mean of its equal-sized steps' losses
        mean = sum(e.value for e in steps[4 * (epoch - 1):4 * epoch]) / 4
        assert mean == pytest.approx(float(row["train_loss"]), abs=1e-4)
        assert logged["train_loss"][0] == pytest.approx(float(row["train_loss"]), abs=1e-4)
    assert cli.main(TINY_TRAIN + ["--tensorboard"]) == 2
    assert "--tensorboard writes into --out DIR/tensorboard" in capsys.readouterr().err


def test_train_stock_without_out(capsys):
    assert cli.main(TINY_TRAIN + ["--no-fused", "--optimizer", "sgd"]) == 0
    assert "nothing saved" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["train", "--bogus"],
    ["train", "--epochs", "0"],
    ["train", "--lr", "-1"],
    ["train", "--size", "3y"],
    ["train", "--model", "nope"],
    ["train", "--optimizer", "lbfgs"],
    ["train", "--num-classes", "1000"],
    ["train", "--frames", "4", "--size", "32"],  # too few frames for C3D's four temporal pools
    ["train", "--model", "jester_convcolumn", "--width-mult", "0.5"],
    ["check", "--models", "nope"],
    ["check", "--dtype", "float8"],
    ["check", "--backend", "nope"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("c3dzoo: error:") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    assert cli.main(["train", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert cli.main(["train", "--amp", "--device", "cpu"]) == 2


def test_debug_shows_the_exception():
    with pytest.raises(cli.UsageError):
        cli.main(["--debug", "train", "--epochs", "0"])
    with pytest.raises(cli.UsageError):
        cli.main(["train", "--epochs", "0", "--debug"])


def test_help_and_version_return_0(capsys):
    assert cli.main(["--version"]) == 0
    assert c3dzoo.__version__ in capsys.readouterr().out
    assert cli.main(["train", "--help"]) == 0
    assert "--width-mult" in capsys.readouterr().out


def test_console_entry_point_exit_status():
    """``python -m c3dzoo.cli`` (what the ``c3dzoo`` script runs) passes main's status to the shell."""
    result = subprocess.run([sys.executable, "-m", "c3dzoo.cli", "train", "--epochs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# checkpoints: resume, interrupt, divergence, atomic writes; predict and export
# --------------------------------------------------------------------------------------------

TWO_EPOCHS = ["train", "--epochs", "2", "--train-samples", "8", "--val-samples", "4",
              "--batch-size", "4", "--num-classes", "4", "--width-mult", "0.0625",
              "--frames", "16", "--size", "32", "--device", "cpu", "--workers", "0", "--no-progress"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _interrupt_at_train_step(monkeypatch, step):
    """Ctrl-C (a real SIGINT) during the ``step``-th training batch (1-based): training stops once
    that step is done."""
    real, calls = cli.train.F.cross_entropy, []

    def cross_entropy(*args, **kwargs):
        if torch.is_grad_enabled():  # training, not validation
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli.train.F, "cross_entropy", cross_entropy)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert cli.main(TWO_EPOCHS + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("top1s, best_epoch", [([80.0, 50.0], 1), ([50.0, 50.0], 2)])
def test_best_checkpoint_is_the_best_validated_epoch(top1s, best_epoch, tmp_path, monkeypatch, capsys):
    """best.pt holds the epoch whose validation top-1 is highest (the later one on a tie), as the
    final line reports it; last.pt the last epoch."""
    real_evaluate, scores = cli.train._evaluate, iter(top1s)
    snapshots, real_save = {}, cli.train._save

    def evaluate(*args, **kwargs):
        validation = real_evaluate(*args, **kwargs)
        validation.top1 = next(scores)
        return validation

    def save(path, payload):
        real_save(path, payload)
        if path.endswith("last.pt"):
            snapshots[payload["epoch"]] = {k: v.clone() for k, v in payload["model"].items()}

    monkeypatch.setattr(cli.train, "_evaluate", evaluate)
    monkeypatch.setattr(cli.train, "_save", save)
    assert cli.main(TWO_EPOCHS + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"best top-1 {max(top1s):.1f} % (epoch {best_epoch})" in printed and f"best.pt (epoch {best_epoch})" in printed
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"] == (max(top1s), best_epoch)
    assert all(torch.equal(v, snapshots[best_epoch][k]) for k, v in best["model"].items())
    assert best_epoch == 2 or not all(torch.equal(v, snapshots[2][k]) for k, v in best["model"].items())


def test_resume_after_interrupt_is_exact(two_epoch_run, tmp_path, monkeypatch, capsys):
    """2 epochs in one go == interrupted in epoch 2 (after its first step) + resumed, bit for bit;
    the dropout masks and the batch order come back with the checkpoint."""
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, 3)
        assert cli.main(TWO_EPOCHS + ["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted" in err and "\n" not in err
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (1, 1, 3)
    # every option comes back from the checkpoint
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--no-progress"]) == 0
    expected, got = _weights(two_epoch_run / "last.pt"), _weights(tmp_path / "last.pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


def test_resume_from_epoch_boundary_is_exact(two_epoch_run, tmp_path, monkeypatch):
    """1 epoch, then --resume PATH for the other one (into another folder)."""
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, 2)  # the last step of epoch 1, before its validation
        assert cli.main(TWO_EPOCHS + ["--out", str(tmp_path / "a")]) == 130
    assert cli.main(["train", "--resume", str(tmp_path / "a" / "last.pt"),
                     "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    expected, got = _weights(two_epoch_run / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = cli.train.F.cross_entropy, []

    def nan_in_epoch_2(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(cli.train.F, "cross_entropy", nan_in_epoch_2)
    assert cli.main(TWO_EPOCHS + ["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "nan" in err and "--lr" in err and "\n" not in err and "Traceback" not in err
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                       if v.is_floating_point())


def test_checkpoint_write_is_atomic(two_epoch_run, tmp_path, monkeypatch, capsys):
    before = (two_epoch_run / "last.pt").read_bytes()
    target = tmp_path / "last.pt"
    target.write_bytes(before)

    def fails_half_way(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fails_half_way)
    from c3dzoo import checkpoint
    with pytest.raises(OSError):
        checkpoint.save_atomic({"x": torch.zeros(1)}, str(target))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_export_loads_strictly_into_stock_model(two_epoch_run, tmp_path, capsys):
    out = tmp_path / "weights.pt"
    assert cli.main(["export", "--checkpoint", str(two_epoch_run / "last.pt"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = c3dzoo.get_model("c3d_bn", fused=False, num_classes=4, width_mult=0.0625,
                             input_size=(16, 32, 32))
    model.load_state_dict(state, strict=True)


def test_export_onnx_runs_in_onnxruntime_at_any_batch(two_epoch_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export test runs the file in onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(two_epoch_run / "last.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "N x 3 x 16 x 32 x 32" in printed.out and "ONNX Runtime matches torch" in printed.out
    assert "torchvision" not in printed.err and "[torch.onnx]" not in printed.out  # no exporter chatter
    model = c3dzoo.get_model("c3d_bn", fused=False, num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    model.load_state_dict(_weights(two_epoch_run / "last.pt"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        clips = torch.randn(batch, 3, 16, 32, 32)
        with torch.no_grad():
            expected = model.eval()(clips)
        got = torch.from_numpy(session.run(["logits"], {"clips": clips.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_onnx_of_a_video_resnet_takes_any_clip_size(tmp_path, capsys):
    """A video ResNet (global average pool) takes clips of any size, and so does its ONNX file; C3D
    above keeps its one size (its flatten feeds a fixed-width fc6)."""
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export test runs the file in onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    if not hasattr(torch.export.Dim, "AUTO"):
        pytest.skip("this torch has no torch.export.Dim.AUTO: the file takes one clip size")
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "mc3_18", "--epochs", "1", "--train-samples", "4", "--val-samples", "2",
                     "--batch-size", "2", "--num-classes", "4", "--frames", "8", "--size", "32", "--device", "cpu",
                     "--workers", "0", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "mc3.onnx"
    assert cli.main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(out)]) == 0
    assert "input 'clips' N x 3 x T x H x W" in capsys.readouterr().out
    model = ckpt.stock_model(ckpt.load(str(run / "last.pt"))).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 8, 32, 32), (3, 3, 4, 40, 24)):
        clips = torch.randn(*shape)
        with torch.no_grad():
            expected = model(clips)
        got = torch.from_numpy(session.run(["logits"], {"clips": clips.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_onnx_without_onnx_says_what_to_install(two_epoch_run, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(two_epoch_run / "last.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs onnxscript" in err and "c3dzoo[onnx]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_predict_prints_class_names(two_epoch_run, tmp_path, capsys):
    from c3dzoo.data import SyntheticVideoDataset
    clip_path = tmp_path / "clip.pt"
    torch.save(SyntheticVideoDataset(num_classes=4, frames=16, size=32, num_samples=1)[0][0], clip_path)
    names = SyntheticVideoDataset(num_classes=4).class_names
    assert cli.main(["predict", "--checkpoint", str(two_epoch_run / "last.pt"), "--synthetic", "3",
                     "--top-k", "2", str(clip_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("synthetic val[") and "(true: " in line for line in lines[:3])
    assert lines[3].startswith(str(clip_path))
    assert all(sum(name in line for name in names) >= 2 for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["predict", "--checkpoint", "{missing}", "--synthetic", "1"], "not found"),
    (["export", "--checkpoint", "{garbage}", "--out", "{tmp}/w.pt"], "cannot read"),
    (["train", "--resume", "{ckpt}", "--num-classes", "5", "--epochs", "3"], "is for c3d_bn"),
    (["train", "--resume", "{ckpt}", "--model", "c3d"], "is for c3d_bn"),
    (["train", "--resume"], "needs --out"),
])
def test_checkpoint_errors_one_line_exit_2(argv, message, two_epoch_run, tmp_path, capsys):
    # (a missing PyAV is tested by test_data_folders.py, which hides the installed one)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    paths = dict(missing=str(tmp_path / "nope.pt"), garbage=str(tmp_path / "garbage.pt"),
                 tmp=str(tmp_path), ckpt=str(two_epoch_run / "last.pt"))
    assert cli.main([a.format(**paths) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("c3dzoo: error:") and message in err and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out


def test_bench_writes_csv(tmp_path, capsys):
    """c3dzoo bench runs bench/ in a subprocess (CPU profile: a narrow C3D, seconds per benchmark)."""
    out = tmp_path / "bench"
    assert cli.main(["bench", "--model", "c3d_bn", "--mode", "inference", "--no-layers",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| c3d_bn | inference |" in printed and "eager-fp32" in printed
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["group"] == "model c3d_bn inference" for row in rows)
    assert all(float(row["clips_per_s"]) > 0 for row in rows)
    assert {"eager-fp32"} <= {row["contestant"] for row in rows}
    base = next(row for row in rows if row["contestant"] == "eager-fp32")
    assert all(row["speedup_vs"] == "eager-fp32" for row in rows) and float(base["speedup"]) == 1.0
    fused = next(row for row in rows if row["contestant"] == "c3dzoo-reference-fp32")
    assert float(fused["speedup"]) == pytest.approx(float(base["median_ms"]) / float(fused["median_ms"]), rel=1e-3)
    assert "c3dzoo's speed-up over each stock contestant" in printed
    assert (out / "bench.json").is_file()


def test_bench_runs_a_model_outside_the_default_suite(tmp_path, capsys, monkeypatch):
    """S3D is no part of `pytest bench/`'s default session; c3dzoo bench --model s3d builds it alone."""
    monkeypatch.setenv("C3DZOO_BENCH_COMPILE", "0")  # on a GPU machine: no minutes of torch.compile here
    out = tmp_path / "bench"
    assert cli.main(["bench", "--model", "s3d", "--mode", "inference", "--out", str(out)]) == 0
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["group"] for row in rows} == {"model s3d inference"}
    assert {"eager-fp32", "c3dzoo-reference-fp32"} <= {row["contestant"] for row in rows}


@pytest.mark.parametrize("argv", [["bench", "--mode", "fast"], ["bench", "--batch", "0"]])
def test_bench_bad_arguments_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("c3dzoo: error:") and len(err.strip().splitlines()) == 1


def test_bench_without_source_tree_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(c3dzoo, "__file__", str(tmp_path / "site-packages" / "c3dzoo" / "__init__.py"))
    assert cli.main(["bench", "--out", str(tmp_path / "out")]) == 2
    assert "ships with the source tree" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# real data (video folders, frame folders with a CSV), --grow, curves PNG, predict on videos
# --------------------------------------------------------------------------------------------

TINY_MODEL = ["--width-mult", "0.0625", "--frames", "16", "--size", "32", "--device", "cpu",
              "--workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Two classes (a square moving left or right) of 4 tiny videos each, plus a corrupt file and
    a video too short to use."""
    from test_data_folders import make_video

    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("videos") / "data"
    for name, frames in (("left", 18), ("right", 20)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            make_video(root / name / f"v{i}.mp4", frames=frames + i)
    (root / "left" / "corrupt.mp4").write_bytes(b"\x00\x01 not a video" * 64)
    make_video(root / "right" / "short.mp4", frames=3)
    return root


def test_train_on_video_folder_counts_skips_and_plots(video_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(video_folder), "--epochs", "1", "--out", str(out)] + TINY_MODEL) == 0
    captured = capsys.readouterr()
    assert "6 videos from" in captured.out and "2 classes" in captured.out and "val 2" in captured.out
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("done in") and "skipped 1 unreadable and 1 too-short" in summary
    warned = [line for line in captured.err.splitlines() if "warning: skipped" in line]
    assert len(warned) == 2 and any("corrupt.mp4" in w for w in warned) and any("short.mp4" in w for w in warned)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["train_top5"]) == 100.0  # 2 classes: top-5 is everything
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == ["left", "right"] and checkpoint["model_kwargs"]["num_classes"] == 2
    assert checkpoint["data"]["kind"] == "videos" and checkpoint["data"]["frames"] == 16


def test_train_on_frame_folders_with_csv(tmp_path, capsys):
    from test_data_folders import make_frame_folder

    pytest.importorskip("PIL")
    root = tmp_path / "frames"
    for vid in range(6):
        make_frame_folder(root / str(100 + vid), frames=16)
    (tmp_path / "train.csv").write_text("".join(f"{100 + v};{'ab'[v % 2]}\n" for v in range(4)))
    (tmp_path / "val.csv").write_text("104,a\n105,b\n")  # the other separator
    assert cli.main(["train", "--data", str(root), "--labels", str(tmp_path / "train.csv"),
                     "--val-labels", str(tmp_path / "val.csv"), "--epochs", "1"] + TINY_MODEL) == 0
    out = capsys.readouterr().out
    assert "4 videos from" in out and "val 2 (given)" in out and "skipped" not in out


def test_curves_png_needs_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(TINY_TRAIN + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "pip install matplotlib" in out
    assert not (tmp_path / "curves.png").exists() and (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/nope"], "data folder not found"),
    (["--data", "{tmp}/flat"], "one subfolder per class"),
    (["--data", "{tmp}/emptyclass"], "holds no videos"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/missing_ids.csv"], "name no frame folder or video file"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/bad_rows.csv"], "is not 'video id;label'"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/nope.csv"], "labels CSV not found"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--classes", "{tmp}/other_classes.txt"],
     "not a known class"),
    (["--labels", "{tmp}/good.csv"], "give --data"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--val-split", "0.5",
      "--val-labels", "{tmp}/good.csv"], "give one of --val-data/--val-labels, --val-split and --val-list"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--train-samples", "8"], "synthetic"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--val-split", "2"], "between 0 and 1"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--num-classes", "5"], "has 2 classes"),
    (["--data", "{tmp}/frames", "--labels", "{tmp}/good.csv", "--frame-stride", "0"], "stride"),
    (["--grow", "2:wider=conv5b"], "needs *FACTOR"),
    (["--grow", "2:taller=conv5b"], "cannot read"),
    (["--grow", "2:wider=conv9z*2"], "unknown layer"),
    (["--grow", "2:wider=fc8*2"], "--grow 2:wider=fc8"),
    (["--grow", "5:deeper=conv5b"], "outside 1..2"),
    (["--grow", "2:deeper=fc8"], "unknown layer 'fc8' for deeper"),
])
def test_bad_data_and_grow_one_line_exit_2(argv, message, tmp_path, capsys):
    from test_data_folders import make_frame_folder

    pytest.importorskip("PIL")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.mp4").write_bytes(b"x")
    (tmp_path / "emptyclass" / "a").mkdir(parents=True)
    for vid in ("1", "2"):
        make_frame_folder(tmp_path / "frames" / vid, frames=16)
    (tmp_path / "good.csv").write_text("1;a\n2;b\n")
    (tmp_path / "missing_ids.csv").write_text("1;a\n2;b\n3;a\n")
    (tmp_path / "bad_rows.csv").write_text("1;a\n2\n")
    (tmp_path / "other_classes.txt").write_text("a\nc\n")
    base = ["train", "--epochs", "2", "--device", "cpu", "--no-progress", "--width-mult", "0.0625",
            "--frames", "16", "--size", "32"]
    assert cli.main(base + [a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("c3dzoo: error:") and message in err and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out


GROW = ["--grow", "2:wider=conv5b*2,3:deeper=conv4b"]
THREE_EPOCHS = TWO_EPOCHS[:2] + ["3"] + TWO_EPOCHS[3:]  # TWO_EPOCHS with --epochs 3


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """3 epochs on synthetic data, conv5b widened at epoch 2 and a conv inserted after conv4b at 3."""
    out = tmp_path_factory.mktemp("grown")
    assert cli.main(THREE_EPOCHS + GROW + ["--out", str(out)]) == 0
    return out


def test_grow_applies_wider_and_deeper_at_their_epochs(grown_run, capsys):
    checkpoint = torch.load(grown_run / "last.pt", map_location="cpu", weights_only=True)
    base = c3dzoo.get_model("c3d_bn", num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    assert checkpoint["model"]["conv5b.weight"].shape[0] == 2 * base.conv5b.out_channels
    assert checkpoint["model"]["conv4c.weight"].shape == (base.conv4b.out_channels,) * 2 + (3, 3, 3)
    assert [(s["epoch"], s["op"], s["layer"]) for s in checkpoint["growth"]] == [
        (2, "wider", "conv5b"), (3, "deeper", "conv4b")]
    assert checkpoint["growth"][1]["name"] == "conv4c"
    # the momentum buffers were remapped with their parameters: one per parameter, same shapes
    state = checkpoint["optimizer"]["state"]
    assert len(state) == len(list(checkpoint["model"])) - sum(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in checkpoint["model"])
    assert (grown_run / "curves.png").exists()


def test_grow_prints_what_grew(tmp_path, capsys):
    assert cli.main(TWO_EPOCHS + ["--grow", "2:wider=fc6:300"]) == 0
    out = capsys.readouterr().out
    assert "epoch 2: grew wider fc6 256 -> 300 units" in out
    assert out.index("epoch 1/2:") < out.index("grew") < out.index("epoch 2/2:")


@pytest.mark.parametrize("interrupt_step", [3, 5])  # epoch 2 after the wider; epoch 3 after deeper
def test_resume_after_growth_is_exact(grown_run, interrupt_step, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, interrupt_step)
        assert cli.main(THREE_EPOCHS + GROW + ["--out", str(tmp_path)]) == 130
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert len(saved["growth"]) == (1 if interrupt_step == 3 else 2)
    # the grown architecture is rebuilt from the checkpoint before its weights load
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--no-progress"]) == 0
    expected, got = _weights(grown_run / "last.pt"), _weights(tmp_path / "last.pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_with_a_different_grow_schedule_exit_2(grown_run, tmp_path, capsys):
    assert cli.main(["train", "--resume", str(grown_run / "last.pt"), "--out", str(tmp_path),
                     "--epochs", "4", "--grow", "2:wider=conv5b*3"]) == 2
    err = capsys.readouterr().err
    assert "does not begin with the growth" in err and len(err.strip().splitlines()) == 1


def test_predict_and_export_grown_checkpoint(grown_run, tmp_path, capsys):
    assert cli.main(["predict", "--checkpoint", str(grown_run / "last.pt"), "--synthetic", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    out = tmp_path / "w.pt"
    assert cli.main(["export", "--checkpoint", str(grown_run / "last.pt"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    expected = _weights(grown_run / "last.pt")
    assert state.keys() == expected.keys() and "conv4c.weight" in state
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert "--grow step(s)" in capsys.readouterr().out
    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime"):
        onnx_out = tmp_path / "grown.onnx"  # the grown architecture exports too (checked in onnxruntime)
        assert cli.main(["export", "--checkpoint", str(grown_run / "last.pt"), "--out", str(onnx_out)]) == 0
        assert "ONNX Runtime matches torch" in capsys.readouterr().out


@pytest.fixture(scope="module")
def video_checkpoint(video_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_run")
    assert cli.main(["train", "--data", str(video_folder), "--epochs", "1", "--out", str(out)] + TINY_MODEL) == 0
    return out / "last.pt"


def test_predict_on_video_files_and_frame_folders(video_folder, video_checkpoint, tmp_path, capsys):
    from test_data_folders import make_frame_folder

    frames = make_frame_folder(tmp_path / "clip_frames", frames=16)
    inputs = [str(video_folder / "left" / "v0.mp4"), frames, str(video_folder / "left" / "corrupt.mp4"),
              str(video_folder / "right" / "short.mp4"), str(tmp_path / "nope.mp4")]
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(video_checkpoint), "--top-k", "2"] + inputs) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == inputs[:2]
    assert all("left" in line and "right" in line and "%" in line for line in lines)
    errors = captured.err.strip().splitlines()
    assert [e.split(": ")[1].split()[-1] for e in errors[:3]] == inputs[2:]
    assert "too short" in errors[1] and "not found" in errors[2]
    assert errors[3] == "c3dzoo: 3 of 5 input(s) could not be read"


def test_predict_video_matches_validation_clip(video_folder, video_checkpoint, capsys):
    """predict reads a video as validation does: its printed top-1 is the model's on the val clip."""
    from c3dzoo.data import ClipSampler, VideoClipDataset, VideoItem, count_frames

    checkpoint = torch.load(video_checkpoint, map_location="cpu", weights_only=True)
    model = ckpt.stock_model(checkpoint).eval()
    path = str(video_folder / "right" / "v2.mp4")
    val = VideoClipDataset([VideoItem(path, 1, count_frames(path))], checkpoint["class_names"], frames=16,
                           size=32, train=False)
    with torch.no_grad():
        probs = model(val[0][0][None]).softmax(1)[0]
    assert cli.main(["predict", "--checkpoint", str(video_checkpoint), "--top-k", "1", path]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: {checkpoint['class_names'][probs.argmax()]} {probs.max():.1%}"
    assert ClipSampler(16).fits(count_frames(path))


def test_resume_on_videos_with_workers_is_exact(video_folder, tmp_path, monkeypatch, capsys):
    """Random clip starts and crops come from (seed, epoch, index), not from a worker's RNG: a run
    interrupted in epoch 2 and resumed ends with the same weights as one run straight through."""
    argv = ["train", "--data", str(video_folder), "--epochs", "2", "--frame-stride", "2"] + TINY_MODEL
    argv[argv.index("--workers") + 1] = "2"
    argv[argv.index("--batch-size") + 1] = "2"  # 6 videos: 3 steps an epoch
    assert cli.main(argv + ["--out", str(tmp_path / "full")]) == 0
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, 4)  # the first step of epoch 2; the resumed run does the other two
        assert cli.main(argv + ["--out", str(tmp_path / "cut")]) == 130
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0
    expected, got = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_video_batches_carry_the_epoch():
    """Real-data batches hold (index, epoch) keys, so each epoch draws new clip starts and crops."""
    batches = cli.train._EpochBatches(5, 2, drop_last=True, seed=0, keyed=True)
    batches.epoch = 3
    keys = [key for batch in batches for key in batch]
    assert len(keys) == 4 and {epoch for _, epoch in keys} == {3} and len({i for i, _ in keys}) == 4
    assert all(isinstance(i, int) for i in next(iter(cli.train._EpochBatches(5, 2, True, 0))))


def test_grow_video_resnet_stream_and_block(tmp_path, capsys):
    """--grow on a video ResNet: a residual stream grows as a group (wider=layer4*2) and deeper
    inserts a block; the checkpoint replays both (export loads it strictly)."""
    out = tmp_path / "r3d"
    argv = ["train", "--model", "r3d_18", "--epochs", "2", "--train-samples", "8", "--val-samples", "4",
            "--batch-size", "4", "--num-classes", "3", "--frames", "8", "--size", "32", "--device", "cpu",
            "--no-progress", "--grow", "2:wider=layer4*2,2:deeper=layer3.1", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "wider layer4 512 -> 1024 units" in printed and "deeper: new block after layer3.1" in printed
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = ckpt.stock_model(checkpoint)
    assert model.fc.in_features == 1024 and len(model.layer3) == 3
    assert cli.main(["export", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "w.pt")]) == 0
