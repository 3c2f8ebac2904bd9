"""The command line's CUDA defaults on a GPU: ``c3dzoo train`` builds the full C3D-BN, trains in
bf16 autocast and channels_last through the fused op, validates, and writes a checkpoint that
loads into the stock model; ``c3dzoo evaluate`` and ``predict`` score it on the GPU. Skipped with
the reason without a CUDA device (the CPU tests run the same commands on the CPU)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import c3dzoo
from c3dzoo import cli

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

SMALL_RUN = ["--epochs", "1", "--train-samples", "32", "--val-samples", "16", "--batch-size", "8",
             "--workers", "2", "--no-progress"]


def test_train_evaluate_and_predict_with_the_cuda_defaults(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL_RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused on cuda" in printed and "with bf16 autocast" in printed and "clips 16x112x112" in printed
    assert c3dzoo.fallbacks() == {}, c3dzoo.fallbacks()  # every chain ran on a GPU backend
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    stock = c3dzoo.c3d_bn(num_classes=10)
    stock.load_state_dict(checkpoint["model"], strict=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())

    report_dir = tmp_path / "eval"
    assert cli.main(["evaluate", "--synthetic", "16", "--checkpoint", str(out / "last.pt"), "--out",
                     str(report_dir)]) == 0
    assert "on cuda" in capsys.readouterr().out
    report = json.loads((report_dir / "report.json").read_text())
    # the validation train printed, on the same 16 clips (bf16 either way: a clip near a tie may flip)
    val_top1 = float(re.search(r"final val top-1 ([0-9.]+) %", printed).group(1))
    assert abs(100 * report["top1"] - val_top1) <= 100 / 16 + 0.05 and report["amp"] is True

    assert cli.main(["predict", "--synthetic", "2", "--checkpoint", str(out / "last.pt")]) == 0
    assert capsys.readouterr().out.count("synthetic val[") == 2
