"""``c3dzoo train`` under torch.distributed: 2 ranks on the CPU (gloo), started as torchrun would
start them — RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment of two
``python -m c3dzoo.cli train`` processes sharing one --out — without needing the torchrun binary.

Each rank runs under a small wrapper (``_RANK_WRAPPER``) that records, with a Python audit hook,
every file it opens for writing, creates or renames under --out, and saves the model it validates
(a test-side patch of ``train._evaluate``; nothing in the package knows about it). So the tests
see which rank wrote what, and whether the ranks' models stayed identical.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed

import c3dzoo
from c3dzoo import cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this PyTorch build has no torch.distributed")

WORLD = 2
RANK_TIMEOUT_S = 180  # a deadlocked rank fails the test instead of hanging it
BASE = ["train", "--train-samples", "16", "--val-samples", "8", "--num-classes", "4",
        "--width-mult", "0.0625", "--frames", "16", "--size", "32", "--device", "cpu",
        "--workers", "0", "--no-progress"]
GROW = ["--grow", "2:wider=conv5b*2"]  # wider only: deeper takes --batch-size clips for its BN

_RANK_WRAPPER = r"""
import os, runpy, sys

out_dir = os.path.realpath(os.environ["TEST_OUT_DIR"])
log = open(os.environ["TEST_WRITES_LOG"], "w", buffering=1)  # opened before the hook: not logged
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def under_out(path):
    return isinstance(path, (str, bytes)) and os.path.realpath(os.fsdecode(path)).startswith(out_dir)


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing and under_out(path):
            log.write(f"open {path}\n")
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.unlink") and under_out(args[0]):
        log.write(f"{event} {' '.join(map(str, args[:2]))}\n")


sys.addaudithook(audit)
dump_dir = os.environ.get("TEST_DUMP_DIR")
if dump_dir:  # the model each rank validates, saved outside --out
    import torch
    from c3dzoo.cli import train

    real_evaluate = train._evaluate

    def evaluate(model, *args, **kwargs):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(dump_dir, f"rank{os.environ['RANK']}.pt"))
        return real_evaluate(model, *args, **kwargs)

    train._evaluate = evaluate
sys.argv = ["c3dzoo"] + sys.argv[1:]
runpy.run_module("c3dzoo.cli", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv, out, logs, dump=None, world=WORLD):
    """Starts ``world`` ranks of ``c3dzoo <argv> --out out``; returns [(exit status, stdout,
    stderr, writes log)] per rank. Kills every rank if one of them hangs."""
    logs.mkdir(parents=True, exist_ok=True)
    wrapper = logs / "rank_wrapper.py"
    wrapper.write_text(_RANK_WRAPPER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TEST_OUT_DIR=str(out), TEST_WRITES_LOG=str(logs / f"writes{rank}.log"))
        if dump is not None:
            env["TEST_DUMP_DIR"] = str(dump)
        procs.append(subprocess.Popen([sys.executable, str(wrapper), *argv, "--out", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=RANK_TIMEOUT_S)
            results.append((proc.returncode, stdout, stderr, (logs / f"writes{rank}.log").read_text()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not finish in {RANK_TIMEOUT_S} s (deadlock?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_relative_difference(a: dict, b: dict) -> float:
    """max over floating tensors of max|a - b| / max(1, max|b|); the integer counters must be equal."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        scale = max(1.0, b[key].abs().max().item())
        worst = max(worst, (a[key] - b[key]).abs().max().item() / scale)
    return worst


# 4 optimizer steps in float32 from different summation orders (per-rank vs whole-batch sums, one
# all-reduce): measured 1.2e-7; a BatchNorm on per-rank statistics instead of the global batch's
# moves the weights by ~5e-2 in the same run (the control test checks it on a shorter one)
SAME_TRAINING = 1e-5


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """2 ranks x batch 4 with --sync-bn, 2 epochs, conv5b widened at epoch 2; and the same in one
    process with batch 8 (the same global batches: _EpochBatches' order depends on the seed only)."""
    root = tmp_path_factory.mktemp("sync")
    argv = BASE + ["--epochs", "2", "--batch-size", "4", "--sync-bn"] + GROW
    (root / "dump").mkdir()
    ranks = run_ranks(argv, root / "run", root / "logs", dump=root / "dump")
    single = root / "single"
    assert cli.main(BASE + ["--epochs", "2", "--batch-size", "8", "--out", str(single)] + GROW) == 0
    return root, ranks, single


def test_both_ranks_finish_and_only_rank_0_speaks(sync_run):
    _, ranks, _ = sync_run
    for rank, (status, stdout, stderr, _) in enumerate(ranks):
        assert status == 0, f"rank {rank} exited {status}: {stderr[-2000:]}"
    assert "2 ranks with SyncBatchNorm (global batch 8)" in ranks[0][1]
    assert "epoch 2: grew wider conv5b" in ranks[0][1] and ranks[0][1].strip().splitlines()[-1].startswith("done in")
    assert ranks[1][1] == "" and ranks[1][2] == ""


def test_only_rank_0_writes_checkpoint_and_metrics(sync_run):
    root, ranks, _ = sync_run
    writes0, writes1 = ranks[0][3], ranks[1][3]
    assert writes1 == "", f"rank 1 wrote under --out:\n{writes1}"
    assert "metrics.csv" in writes0 and "last.pt" in writes0 and "confusion.png" in writes0
    with open(root / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    saved = torch.load(root / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["world_size"] == WORLD and saved["global_step"] == 4
    base = c3dzoo.get_model("c3d_bn", num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    assert saved["model"]["conv5b.weight"].shape[0] == 2 * base.conv5b.out_channels  # grown
    assert (root / "run" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_ranks_hold_identical_models_after_growth(sync_run):
    """Every rank grew identically and kept its optimizer state in step: the models the two ranks
    validate after epoch 2 (2 steps after the growth) are equal bit for bit."""
    root, _, _ = sync_run
    rank0 = torch.load(root / "dump" / "rank0.pt", weights_only=True)
    rank1 = torch.load(root / "dump" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and rank0["conv5b.weight"].shape == rank1["conv5b.weight"].shape
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_sync_bn_on_two_ranks_trains_as_one_process_on_the_global_batch(sync_run):
    root, _, single = sync_run
    difference = _max_relative_difference(_weights(root / "run" / "last.pt"), _weights(single / "last.pt"))
    assert difference <= SAME_TRAINING, difference


def test_without_sync_bn_the_ranks_train_on_their_own_statistics(tmp_path):
    """The control for the test above: without --sync-bn each rank normalises by its own 4 clips,
    and the weights differ from one process on the 8 clips far beyond SAME_TRAINING."""
    ranks = run_ranks(BASE + ["--epochs", "1", "--batch-size", "4"], tmp_path / "run", tmp_path / "logs")
    assert [r[0] for r in ranks] == [0, 0], ranks[1][2][-2000:]
    assert cli.main(BASE + ["--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    difference = _max_relative_difference(_weights(tmp_path / "run" / "last.pt"),
                                          _weights(tmp_path / "single" / "last.pt"))
    assert difference > 100 * SAME_TRAINING, difference


def test_ctrl_c_on_rank_0_stops_both_ranks_and_resumes_in_one_process(tmp_path, capsys):
    """SIGINT to rank 0 alone: both ranks stop after the same step (exit 130, no deadlock), rank 0
    saves; the checkpoint (mid-epoch, in global batches) resumes in one process where it stopped."""
    import signal
    import time

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    argv = BASE + ["--epochs", "50", "--train-samples", "64", "--batch-size", "4"]  # 8 steps an epoch
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "c3dzoo.cli", *argv, "--out", str(out)],
        env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    try:
        for line in procs[0].stdout:  # after the first epoch: mid-training, with a checkpoint
            if line.startswith("epoch 1/50:"):
                break
        time.sleep(0.3)
        procs[0].send_signal(signal.SIGINT)
        statuses = [proc.wait(timeout=RANK_TIMEOUT_S) for proc in procs]
        err0 = procs[0].stderr.read()
    except subprocess.TimeoutExpired:
        pytest.fail("a rank did not stop after Ctrl-C (deadlock?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert statuses == [130, 130], err0
    assert "interrupted at epoch" in err0 and "saved" in err0
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    epoch, batch, step = saved["epoch"], saved["batch_in_epoch"], saved["global_step"]
    assert batch % 2 == 0 and step == epoch * 8 + batch // 2  # 2 global batches a step
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", str(epoch + 1), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'last.pt'} at epoch {epoch + 1}, batch {batch + 1} (step {step})" in printed
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    # one process, batch 4: the other 16 - batch global batches of the epoch, one a step
    assert resumed["epoch"] == epoch + 1 and resumed["global_step"] == step + 16 - batch
    assert resumed["world_size"] == 1
    with open(out / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == [str(e) for e in range(1, epoch + 2)]


def test_finished_two_rank_checkpoint_trains_on_in_one_process(sync_run, tmp_path, capsys):
    root, _, _ = sync_run
    shutil.copytree(root / "run", tmp_path / "run")
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "run"), "--epochs", "3", "--no-progress"]) == 0
    assert "at epoch 3, batch 1 (step 4)" in capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]
    saved = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 3 and saved["global_step"] == 8  # one process, batch 4: 4 steps an epoch


def test_sync_bn_needs_fused(capsys):
    assert cli.main(BASE + ["--epochs", "1", "--sync-bn", "--no-fused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("c3dzoo: error: --sync-bn needs --fused") and "\n" not in err


def test_sharded_batches_cover_the_global_order_once():
    """Rank r takes global batches skip + r, skip + r + world, ...: together the ranks take every
    batch of the one-process order once (whole steps only), from any skip."""
    one = cli.train._EpochBatches(40, 4, True, seed=3)
    one.epoch = 2
    order = list(one)
    for world, skip in ((2, 0), (3, 0), (2, 3), (3, 4)):
        shards = []
        for rank in range(world):
            sampler = cli.train._EpochBatches(40, 4, True, seed=3, rank=rank, world=world)
            sampler.epoch, sampler.skip = 2, skip
            shards.append(list(sampler))
        steps = (10 - skip) // world
        assert all(len(s) == steps for s in shards)
        taken = [shards[rank][step] for step in range(steps) for rank in range(world)]
        assert taken == order[skip:skip + steps * world]


def test_micro_batches_on_two_ranks_keep_the_ranks_in_step(tmp_path):
    """--micro-batch under DDP: gradients are all-reduced once per step, after the last chunk (the
    others run under no_sync); the ranks then hold the same model bit for bit. A chunk that skipped
    the all-reduce would leave each rank with its own gradients, and the models would differ."""
    (tmp_path / "dump").mkdir()
    ranks = run_ranks(BASE + ["--epochs", "1", "--batch-size", "4", "--micro-batch", "2"], tmp_path / "run",
                      tmp_path / "logs", dump=tmp_path / "dump")
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    rank0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=True)
    weights = [k for k in rank0 if "running" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(rank0[k], rank1[k]) for k in weights)


def test_ema_and_mixing_on_two_ranks(tmp_path):
    """--ema with --sync-bn on 2 ranks: every rank validates the same average, and it is the average
    one process keeps on the global batch. --mixup mixes each rank's clips with its own partners
    (a different run from one process), and the ranks still step together."""
    (tmp_path / "dump").mkdir()
    argv = BASE + ["--epochs", "1", "--batch-size", "4", "--sync-bn", "--ema", "0.5"]
    ranks = run_ranks(argv, tmp_path / "run", tmp_path / "logs", dump=tmp_path / "dump")
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    validated = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(validated[0][k], validated[1][k]) for k in validated[0])
    assert cli.main(BASE + ["--epochs", "1", "--batch-size", "8", "--ema", "0.5", "--out", str(tmp_path / "one")]) == 0
    saved, single = (torch.load(p / "last.pt", map_location="cpu", weights_only=True)
                     for p in (tmp_path / "run", tmp_path / "one"))
    assert saved["ema_updates"] == single["ema_updates"] == 2
    assert _max_relative_difference(saved["ema"], single["ema"]) <= SAME_TRAINING
    assert all(torch.equal(saved["ema"][k], validated[0][k]) for k in saved["ema"])  # what rank 0 validated

    mixed = run_ranks(BASE + ["--epochs", "1", "--batch-size", "4", "--mixup", "0.8", "--cutmix", "1.0"],
                      tmp_path / "mixed", tmp_path / "mixed_logs", dump=tmp_path / "dump")
    assert [r[0] for r in mixed] == [0, 0], mixed[0][2][-2000:] + mixed[1][2][-2000:]
    validated = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    weights = [k for k in validated[0] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(validated[0][k], validated[1][k]) for k in weights)
