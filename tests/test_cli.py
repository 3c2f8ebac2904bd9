"""The ``c3dzoo`` command line: info, check, train, and how it reports bad arguments."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

import c3dzoo
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


def test_check_passes(capsys):
    assert cli.main(["check", "--models", "c3d_bn", "c3d"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("c3d_bn ")]
    assert {row[1] for row in rows} == set(cli.CHECK_MODES)  # a row per mode and quantity
    assert len(rows) == 4 * len(cli.CHECK_MODES)  # output, input grad, param grads, running stats
    assert all("PASS" in row and "FAIL" not in row for row in rows)
    assert "0 FAIL" in out


def test_check_catches_a_wrong_fused_op(monkeypatch, capsys):
    """A fused chain that is off by 1e-3 must fail the budget (exit status 1)."""
    from c3dzoo.models import _common

    real = _common.conv_bn_act

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) + 1e-3

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
