"""``c3dzoo train --ema DECAY``: the moving average of the weights (and BatchNorm statistics), what
validation and the checkpoint readers take, exact resume, and growth restarting it."""

import pytest
import torch
from torch import nn

from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, transfer
from c3dzoo.cli import train_ema

from test_cli import TWO_EPOCHS, _interrupt_at_train_step, _weights


def test_average_moves_floats_and_copies_counters():
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3))
    ema = train_ema.make_ema(model, 0.75)
    states = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(2, 2, 2, 3, 3))  # training mode: running statistics and the counter move
        ema.update_parameters(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    expected = dict(states[0])  # the first update copies
    for state in states[1:]:
        expected = {k: (0.75 * expected[k] + 0.25 * v) if v.is_floating_point() else v for k, v in state.items()}
    got = ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    assert int(got["1.num_batches_tracked"]) == 3 and int(ema.n_averaged) == 3
    assert train_ema.make_ema(model, None) is None and train_ema.payload(None) == {}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """Two epochs with --ema 0.5, recording the model after each step and what validation ran."""
    out = tmp_path_factory.mktemp("ema")
    steps, validated = [], []
    real_make, real_evaluate = train_ema.make_ema, cli.train._evaluate

    def make_ema(model, decay):
        ema = real_make(model, decay)
        update = ema.update_parameters

        def recording_update(current):
            steps.append({k: v.detach().clone() for k, v in current.state_dict().items()})
            update(current)
        ema.update_parameters = recording_update
        ema.recorded = steps
        return ema

    def evaluate(model, *args, **kwargs):
        validated.append(model)
        return real_evaluate(model, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_ema, "make_ema", make_ema)
    mp.setattr(cli.train, "_evaluate", evaluate)
    try:
        assert cli.main(TWO_EPOCHS + ["--ema", "0.5", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out, steps, validated


def test_checkpoint_holds_the_average_of_every_step(ema_run):
    out, steps, _ = ema_run
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert saved["ema_updates"] == len(steps) == 4  # 2 epochs of 2 steps
    expected = steps[0]
    for state in steps[1:]:
        expected = {k: (0.5 * expected[k] + 0.5 * v) if v.is_floating_point() else v for k, v in state.items()}
    assert saved["ema"].keys() == saved["model"].keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved["ema"][key], value, msg=key)
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])


def test_validation_and_readers_take_the_average(ema_run):
    out, _, validated = ema_run
    assert len(validated) == 2 and all(type(m).__name__ == "C3D" for m in validated)
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(validated[-1].state_dict()["conv1.weight"], saved["ema"]["conv1.weight"])
    model = ckpt.stock_model(saved)  # predict, evaluate, export, features
    assert all(torch.equal(v, saved["ema"][k]) for k, v in model.state_dict().items())
    target = ckpt.stock_model(saved)
    for value in target.state_dict().values():
        value.zero_()
    report = transfer.load_pretrained(target, str(out / "last.pt"))  # --pretrained
    assert "its EMA weights" in str(report)
    assert all(torch.equal(v, saved["ema"][k]) for k, v in target.state_dict().items())


def test_resume_with_ema_is_exact(ema_run, tmp_path, monkeypatch):
    out, _, _ = ema_run
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, 3)
        assert cli.main(TWO_EPOCHS + ["--ema", "0.5", "--out", str(tmp_path)]) == 130
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--no-progress"]) == 0
    for key in ("model", "ema"):
        expected = torch.load(out / "last.pt", map_location="cpu", weights_only=True)[key]
        got = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)[key]
        assert all(torch.equal(expected[k], got[k]) for k in expected), key
    assert _weights(out / "last.pt").keys() == _weights(tmp_path / "last.pt").keys()


def test_growth_restarts_the_average(tmp_path, capsys):
    assert cli.main(TWO_EPOCHS + ["--ema", "0.5", "--grow", "2:wider=conv5b*2", "--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert saved["ema_updates"] == 2  # epoch 2's steps, after the growth
    assert saved["ema"]["conv5b.weight"].shape == saved["model"]["conv5b.weight"].shape
    assert ckpt.stock_model(saved).conv5b.out_channels == saved["model"]["conv5b.weight"].shape[0]


@pytest.mark.parametrize("value", ["0", "1", "1.5"])
def test_decay_outside_0_1_is_a_usage_error(value, capsys):
    assert cli.main(["train", "--ema", value, "--device", "cpu"]) == 2
    assert "--ema takes the average's decay" in capsys.readouterr().err
