"""MixUp and CutMix (``c3dzoo.data.mixing``, ``c3dzoo train --mixup/--cutmix``): the mixed clips
and soft targets, the loss on soft targets, and training with them (resumed exactly)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from c3dzoo import cli
from c3dzoo.cli.train import _forward_backward, _StepOptions
from c3dzoo.data.mixing import BatchMixing, mix_batch

from test_cli import TWO_EPOCHS, _interrupt_at_train_step, _weights


def _batch(n=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 10, 12, generator=g), torch.randint(classes, (n,), generator=g)


def _partner(clips, mixed, lam):
    """The partner of each clip, found from a MixUp: mixed = lam·clip + (1 − lam)·partner."""
    others = (mixed - lam * clips) / (1 - lam)
    return [min(range(len(clips)), key=lambda j: (others[i] - clips[j]).abs().max().item()) for i in range(len(clips))]


def test_mixup_blends_clips_and_targets_alike():
    clips, labels = _batch()
    torch.manual_seed(3)
    mixed, targets = mix_batch(clips, labels, 5, BatchMixing(mixup_alpha=0.8))
    assert mixed.shape == clips.shape and targets.shape == (6, 5) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = targets[torch.arange(6), labels].min().item()  # own share (or more, where partners share a class)
    partner = _partner(clips, mixed, lam)
    assert sorted(partner) == list(range(6))  # a permutation of the batch
    torch.testing.assert_close(mixed, lam * clips + (1 - lam) * clips[partner])
    want = lam * F.one_hot(labels, 5).float() + (1 - lam) * F.one_hot(labels[partner], 5).float()
    torch.testing.assert_close(targets, want)
    torch.manual_seed(3)
    again, _ = mix_batch(clips, labels, 5, BatchMixing(mixup_alpha=0.8))
    assert torch.equal(again, mixed)  # from the global RNG: a seed repeats it


def test_cutmix_pastes_one_box_through_all_frames():
    clips, labels = _batch(classes=6)
    labels = torch.arange(6)  # distinct classes: each target row names its partner
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = mix_batch(clips, labels, 6, BatchMixing(cutmix_alpha=1.0))
        changed = (mixed != clips).any(dim=(0, 1, 2))  # H × W: the pixels that came from a partner
        rows, cols = changed.nonzero(as_tuple=True)
        if rows.numel():
            box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
            assert changed[box].all() and changed.sum() == changed[box].numel()  # one rectangle
        own = 1 - changed.sum().item() / changed.numel()
        for i in range(6):
            keep = ~changed
            assert torch.equal(mixed[i][..., keep], clips[i][..., keep])  # every frame, every channel
            if torch.equal(mixed[i], clips[i]):  # its own partner (a fixed point of the permutation)
                assert torch.equal(targets[i], F.one_hot(labels[i], 6).float())
                continue
            partner = int(targets[i].argsort()[-2]) if targets[i, i] > 0.5 else int(targets[i].argmax())
            torch.testing.assert_close(targets[i, i], torch.tensor(own))
            torch.testing.assert_close(targets[i, partner], torch.tensor(1 - own))
            assert torch.equal(mixed[i][..., box[0], box[1]], clips[partner][..., box[0], box[1]])


def test_both_on_each_batch_takes_one():
    clips, labels = _batch()
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, _ = mix_batch(clips, labels, 5, BatchMixing(mixup_alpha=0.8, cutmix_alpha=1.0))
        untouched = (mixed == clips).all(dim=(0, 1, 2)).any().item()
        kinds.add("cutmix" if untouched else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_off_or_one_clip_draws_nothing_and_gives_one_hot_targets():
    clips, labels = _batch()
    state = torch.get_rng_state()
    for mixing, n in ((BatchMixing(), 6), (BatchMixing(mixup_alpha=1.0), 1)):
        mixed, targets = mix_batch(clips[:n], labels[:n], 5, mixing)
        assert mixed is clips[:n] or torch.equal(mixed, clips[:n])
        assert torch.equal(targets, F.one_hot(labels[:n], 5).float())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=-1.0), dict(cutmix_alpha=float("nan")), dict(cutmix_share=2.0)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchMixing(**kwargs)


def test_bad_shapes_raise():
    clips, labels = _batch()
    with pytest.raises(ValueError, match="clips N × C × T × H × W and N labels"):
        mix_batch(clips[0], labels, 5, BatchMixing(mixup_alpha=1.0))


def test_soft_target_loss_in_micro_batches_is_the_batch_mean():
    """Soft targets through _forward_backward: cross_entropy's mean over the clips (class weights
    included, as cross_entropy weighs probability targets), the same in chunks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 2 * 8 * 10, 5))
    clips, labels = _batch()
    mixed, targets = mix_batch(clips, labels, 5, BatchMixing(mixup_alpha=1.0))
    options = _StepOptions(label_smoothing=0.1, class_weights=torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8]))
    loss, logits = _forward_backward(model, mixed, targets, False, options)
    whole = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, weight=options.class_weights,
                                                     label_smoothing=0.1))
    model.zero_grad()
    loss4, _ = _forward_backward(model, mixed, targets, False, dataclasses.replace(options, micro_batch=4))
    torch.testing.assert_close(loss4, loss)
    for grad, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, grad)


def _last_metrics(out):
    import csv
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_train_with_mixup_and_cutmix(tmp_path):
    tiny_lr = ["--lr", "1e-12", "--epochs", "1"]
    assert cli.main(TWO_EPOCHS + tiny_lr + ["--out", str(tmp_path / "plain")]) == 0
    assert cli.main(TWO_EPOCHS + tiny_lr + ["--mixup", "0.8", "--cutmix", "1.0", "--out", str(tmp_path / "mixed")]) == 0
    plain, mixed = _last_metrics(tmp_path / "plain"), _last_metrics(tmp_path / "mixed")
    # lr ~0: the same weights, so validation agrees; the training loss saw mixed clips and targets
    assert mixed["val_loss"] == plain["val_loss"] and mixed["train_loss"] != plain["train_loss"]
    saved = torch.load(tmp_path / "mixed" / "last.pt", map_location="cpu", weights_only=True)
    assert (saved["args"]["mixup"], saved["args"]["cutmix"]) == (0.8, 1.0)


def test_resume_with_mixing_is_exact(tmp_path, monkeypatch):
    """The mixing draws from the global RNG, which the checkpoint carries: interrupted + resumed
    equals one run, bit for bit."""
    argv = TWO_EPOCHS + ["--mixup", "0.8", "--cutmix", "1.0"]
    assert cli.main(argv + ["--out", str(tmp_path / "full")]) == 0
    with monkeypatch.context() as m:
        _interrupt_at_train_step(m, 3)
        assert cli.main(argv + ["--out", str(tmp_path / "cut")]) == 130
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0
    expected, got = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("option", ["--mixup", "--cutmix"])
def test_negative_alpha_is_a_usage_error(option, capsys):
    assert cli.main(["train", option, "-1", "--device", "cpu"]) == 2
    assert f"{option} takes the Beta distribution's alpha" in capsys.readouterr().err
