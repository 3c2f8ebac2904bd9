"""``c3dzoo train``: a zoo model on the built-in synthetic motion data set or on real videos (a
folder with one subfolder per class, or videos named by id with a CSV or JSON of labels), with progress bars, a
metrics CSV and a PNG of the curves, a Net2Net ``--grow`` schedule, atomic checkpoints, exact
``--resume`` and a checkpoint on Ctrl-C; fine-tuning from ``--pretrained`` weights (``--new-head``,
``--freeze``, ``--head-lr-mult``); and, started by ``torchrun``, DistributedDataParallel training.

Distributed (``WORLD_SIZE`` > 1 in the environment): every rank builds the same model, reads the
same data and takes every world-th batch of one global batch order (see ``_EpochBatches``);
progress is counted in global batches, so a checkpoint resumes on any number of ranks. Only rank 0
prints, draws progress bars and writes files; a non-finite loss or a Ctrl-C on any rank stops every
rank at the same step (one all-reduce per step carries the flags with the step's statistics)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import distributed as dist
from c3dzoo import evaluation, transfer
from c3dzoo import weights as published_weights
from c3dzoo.data import MOTIONS, BatchMixing, VideoClipDataset, mix_batch

from ._common import (PROG, CommandError, UsageError, backend_arg, backend_choices,
                      builder_accepts, resolve_device, size_arg)
from . import train_ema
from .train_data import DEFAULT_VAL_SPLIT, REAL_DATA_OPTIONS, TrainingData, make_data
from .train_growth import GROW_SYNTAX, apply_growth, resolve_growth
from .train_outputs import (CONFUSION_PNG, CURVES_PNG, METRICS, PER_CLASS_CSV, open_metrics, plot_curves,
                            write_final_report)


# Defaults by device: a small C3D-BN that trains in a few minutes on a laptop CPU, the full model
# on a GPU. Anything given on the command line wins.
# On an idle 2-core CPU the cpu defaults train at ~205 clips/s fused (the reference backend), ~230
# stock (each synthetic clip rendered once: see make_data): 50-60 s in all, ending at 75-90 % top-1
# on the 10 classes depending on rounding (chance: 10 %).
TRAIN_DEFAULTS = {
    "cpu": dict(width_mult=0.125, frames=16, size=(32, 32), batch_size=16, epochs=10,
                train_samples=1024, val_samples=256, workers=0, amp=False),
    "cuda": dict(width_mult=1.0, frames=16, size=(112, 112), batch_size=32, epochs=10,
                 train_samples=8192, val_samples=1024, workers=min(8, os.cpu_count() or 1), amp=True),
}


def _model_kwargs(args: argparse.Namespace) -> dict:
    """Builder arguments from the command line; only those the model's builder takes."""
    kwargs = {"num_classes": args.num_classes}
    if builder_accepts(args.model, "input_size"):
        kwargs["input_size"] = (args.frames, *args.size)
    if builder_accepts(args.model, "width_mult"):
        kwargs["width_mult"] = args.width_mult
    elif args.width_mult_given:
        raise UsageError(f"--width-mult: model {args.model} has no width multiplier")
    return kwargs


def _apply_train_defaults(args: argparse.Namespace, device: torch.device) -> None:
    args.width_mult_given = args.width_mult is not None
    for key, value in TRAIN_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("epochs", "batch_size", "train_samples", "val_samples", "num_classes"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("lr", "width_mult"):
        if not getattr(args, key) > 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not args.weight_decay >= 0:
        raise UsageError(f"--weight-decay must be non-negative, got {args.weight_decay}")
    if args.workers < 0:
        raise UsageError(f"--workers must be non-negative, got {args.workers}")
    if args.amp and device.type != "cuda":
        raise UsageError("--amp (bf16 autocast) is for CUDA devices; drop it on the CPU")


def _make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or Adam over every parameter; with ``--freeze`` or ``--head-lr-mult``, over the trainable
    ones in two groups (``transfer.param_groups``: body at --lr, head at --lr x --head-lr-mult).
    A plain run keeps one group, so its checkpoints stay as they were."""
    if args.freeze != "none" or args.head_lr_mult != 1.0:
        try:
            params = transfer.param_groups(model, args.lr, head_lr_mult=args.head_lr_mult)
        except ValueError as exc:  # everything frozen
            raise UsageError(f"--freeze {args.freeze}: {exc}") from None
    else:
        params = model.parameters()
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def _warmup_cosine(total_clips: int, clips_per_step: int):
    """Linear warm-up over the first 5 % of steps (at most 200), then cosine decay to zero:
    a fast, robust schedule for runs of a few hundred steps as for long ones.

    The factor is a function of the training position in clips (global batches x --batch-size,
    see ``_set_lr``), not of the step count, so that a run resumed on another number of ranks
    goes on with the learning rate of where it is; in one process it is the step's factor."""
    warmup = max(1, min(200, total_clips // clips_per_step // 20)) * clips_per_step

    def factor(position: int) -> float:
        if position < warmup:
            return (position + clips_per_step) / warmup
        progress = (position - warmup) / max(1, total_clips - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _set_lr(scheduler, position: int) -> None:
    """The learning rate of the step that starts at ``position`` clips (LambdaLR.step() evaluates
    its factor at ``last_epoch + 1``)."""
    scheduler.last_epoch = position - 1
    scheduler.step()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # channels-last 3D is what cuDNN's and our kernels prefer
        return x.to(device, non_blocking=True, memory_format=torch.channels_last_3d)
    return x


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (nothing to do in one process)."""
    if dist.world_size() > 1:
        torch_dist.all_reduce(tensor)
    return tensor


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank: without --sync-bn each rank's last
    forward updated them from its own batch. DDP broadcasts them before every training forward
    anyway; doing it before validation makes every rank validate the model rank 0 saves."""
    if dist.world_size() > 1:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, src=0)


@dataclasses.dataclass
class _Validation:
    loss: float
    top1: float  # %
    top5: float  # % (top-min(5, classes))
    confusion: torch.Tensor  # classes x classes counts, row = true class (CPU)
    views: int = 1  # clips x crops per video: above 1, the figures above are per video
    clip_top1: Optional[float] = None  # % of single views classified right (views > 1)


def _evaluate(model, loader, device, amp, progress, views: int = 1, max_clips: Optional[int] = None) -> _Validation:
    """Loss, top-1, top-5 and confusion matrix on ``loader`` (this rank's shard of the validation
    set under torch.distributed: the sums are all-reduced, so every rank gets the same figures).
    Samples of ``views`` > 1 views (``B × V × C × T × H × W``) are scored per video: the mean of the
    views' probabilities (the loss is its negative log); ``clip_top1`` then rates single views.
    ``max_clips``: clips a forward pass at most (a video's many views in several)."""
    model.eval()
    # loss, top-1 hits, top-5 hits, videos, single views right
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    confusion = None
    with torch.no_grad(), tqdm(total=len(loader.dataset), desc="  val", unit="clip" if views == 1 else "video",
                               leave=False, disable=not progress) as bar:
        for clips, labels in loader:
            clips, labels = _to_device(clips.flatten(0, 1) if views > 1 else clips, device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = torch.cat([model(chunk) for chunk in clips.split(max_clips or len(clips))])
            classes = logits.shape[1]
            if views > 1:
                view_hits = (logits.argmax(1).view(-1, views) == labels[:, None]).sum().double()
                scores = evaluation.average_views(logits, views).clamp_min(torch.finfo(torch.float32).tiny).log()
                loss = F.nll_loss(scores, labels, reduction="sum").double()
            else:
                scores, view_hits = logits, torch.zeros((), dtype=torch.float64, device=device)
                loss = F.cross_entropy(logits.float(), labels, reduction="sum").double()
            ranked = scores.topk(min(5, classes), dim=1).indices
            hits = ranked == labels[:, None]
            sums += torch.stack([loss, hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 torch.tensor(labels.numel(), dtype=torch.float64, device=device), view_hits])
            counts = torch.bincount(labels * classes + ranked[:, 0], minlength=classes * classes)
            confusion = counts if confusion is None else confusion + counts
            bar.update(labels.numel())
    if confusion is None:  # an empty shard (fewer validation clips than ranks) still joins the sums
        classes = transfer.head_classes(model)
        confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    _all_reduce_sum(sums)
    _all_reduce_sum(confusion)
    loss_sum, top1, top5, seen, view_hits = sums.tolist()
    classes = int(round(confusion.numel() ** 0.5))
    return _Validation(loss_sum / seen, 100.0 * top1 / seen, 100.0 * top5 / seen,
                       confusion.reshape(classes, classes).cpu(), views,
                       100.0 * view_hits / (seen * views) if views > 1 else None)


class _TensorBoard:
    """``--tensorboard``: each step's training loss and learning rate, and each epoch's metrics.csv
    row, as TensorBoard scalars (``torch.utils.tensorboard``; runs resumed into the same folder go on
    at their step)."""

    EPOCH_SCALARS = ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                     "train_clips_per_s", "data_wait_pct")

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/train_loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def log_epoch(self, epoch: int, row: dict) -> None:
        for key in self.EPOCH_SCALARS:
            self.writer.add_scalar(f"epoch/{key}", float(row[key]), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _class_weights(args: argparse.Namespace, train_set, device: torch.device) -> Optional[torch.Tensor]:
    """--class-weights balanced: class c weighs N / (C · n_c) in the training loss (N clips, C
    classes, n_c of class c), so every class counts as much as if the set were balanced."""
    if args.class_weights is None:
        return None
    counts = torch.bincount(torch.tensor(train_set.labels), minlength=len(train_set.class_names)).double()
    if (counts == 0).any():
        missing = [train_set.class_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise UsageError(f"--class-weights balanced: no training video of class {missing[0]!r}")
    weights = counts.sum() / (len(counts) * counts)
    return weights.float().to(device)


def _views_note(validation: _Validation) -> str:
    """How multi-view figures were made, and what one view alone scores."""
    if validation.views == 1:
        return ""
    return f" over {validation.views} views (one view: top-1 {validation.clip_top1:.1f} %)"


def _build_model(args: argparse.Namespace, device: torch.device, example: torch.Tensor):
    """The model to train, on ``device``, and its builder arguments. Arguments it rejects are
    usage errors, found here rather than after the data loaders have started."""
    model_kwargs = _model_kwargs(args)
    torch.manual_seed(args.seed)
    try:
        model = c3dzoo.get_model(args.model, fused=args.fused, backend=backend_arg(args.backend),
                                 **model_kwargs)
    except ValueError as exc:  # e.g. too few frames for C3D's temporal pools
        raise UsageError(f"cannot build {args.model}: {exc}") from None
    except ImportError as exc:
        raise UsageError(f"model {args.model} is not available in this installation: {exc}") from None
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
    try:  # a model with a fixed input size (jester_convcolumn) rejects other sizes here
        model.eval()
        with torch.no_grad():
            model(_to_device(example[None], device))
    except ValueError as exc:
        raise UsageError(f"--frames/--size do not fit {args.model}: {exc}") from None
    return model, model_kwargs


class _EpochBatches(torch.utils.data.Sampler):
    """Shuffled batches of ``range(n)``; the order depends only on (seed, epoch), and the first
    ``skip`` batches can be left out, so a run resumed mid-epoch sees the batches it had left.
    With ``keyed`` the batches hold ``(index, epoch)`` keys, from which VideoClipDataset draws
    its random clip starts and crops (in whichever worker process reads them).

    Under torch.distributed there is still one global order (of ``global_batches`` batches of
    ``batch_size``): rank r takes batches skip + r, skip + r + world, ... and one training step
    consumes ``world`` consecutive batches. ``skip`` counts global batches, so a run resumed on
    another number of ranks goes on at the same batch of the same order. Only whole steps run: the
    last (global_batches - skip) % world batches of an epoch are left out (every rank must take
    the same number of steps)."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, keyed: bool = False,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.drop_last, self.seed, self.keyed = n, batch_size, drop_last, seed, keyed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 1, 0

    @property
    def global_batches(self) -> int:
        """Batches of the global order in an epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.global_batches // self.world

    def __len__(self) -> int:  # batches this rank takes in the pass that skips ``skip``
        return (self.global_batches - self.skip) // self.world

    def __iter__(self):
        # hash of a tuple of ints is not randomised per process: the same order in every run
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & (2**63 - 1))
        order = torch.randperm(self.n, generator=generator).tolist()
        for step in range(len(self)):
            b = self.skip + step * self.world + self.rank
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, self.epoch) for i in batch] if self.keyed else batch


@dataclasses.dataclass
class _Progress:
    """Where training stands; updated only after a step has completed, so it always describes the
    weights (``updating`` is True while a step is changing them, from the forward on)."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # global batches done in epoch + 1 (world size per step)
    global_step: int = 0  # optimizer steps
    loss_sum: float = 0.0  # sums over the batches of the current epoch (all ranks)
    correct: int = 0
    correct5: int = 0  # top-5 (top-min(5, classes)) hits
    seen: int = 0
    updating: bool = False
    data_wait: float = 0.0  # seconds this epoch spent waiting for the loader's next batch
    best: Tuple[float, int] = (-1.0, 0)  # (val top-1, epoch)
    growth: List[dict] = dataclasses.field(default_factory=list)  # --grow steps applied so far

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.correct, self.correct5, self.seen = 0, 0.0, 0, 0, 0
        self.data_wait = 0.0


class _DeferredInterrupt:
    """Within ``with``: the first Ctrl-C only sets ``requested`` (the training loop stops at the
    next batch boundary, so no weight update is cut in half); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclasses.dataclass
class _StepOptions:
    label_smoothing: float = 0.0
    clip_grad_norm: Optional[float] = None
    micro_batch: Optional[int] = None  # clips a forward/backward pass; None: the whole batch
    class_weights: Optional[torch.Tensor] = None  # per class, on the device (--class-weights)
    log_step: Optional[Callable[[int, float, float], None]] = None  # (step, mean loss, lr)
    mixing: BatchMixing = BatchMixing()  # --mixup / --cutmix
    num_classes: Optional[int] = None  # the model's, for mixed batches' soft targets
    ema: Optional[torch.nn.Module] = None  # --ema: an AveragedModel updated after each step


def _forward_backward(model, clips, labels, amp: bool, options: _StepOptions):
    """Forward and backward of one step's batch, in chunks of ``options.micro_batch`` clips: the
    gradients of the batch's mean loss (weighted by ``options.class_weights`` where given, as
    ``cross_entropy(weight=)`` weighs it), with the activations of one chunk in memory at a time
    (BatchNorm normalises each chunk with its own statistics, as in any gradient accumulation;
    DDP all-reduces once, after the last chunk). ``labels``: class indices, or soft targets N ×
    classes (mixed batches), whose weighted loss cross_entropy averages over the clips. Returns
    (the batch's mean loss, its logits)."""
    size = labels.shape[0]
    step = options.micro_batch or size
    starts = range(0, size, step)
    weight = options.class_weights
    no_sync = getattr(model, "no_sync", None)
    # the whole batch's normaliser: its clips, or the sum of their classes' weights
    norm = weight[labels].sum() if weight is not None and not labels.is_floating_point() else size
    total, logits = 0.0, []
    for start in starts:
        chunk, truth = clips[start:start + step], labels[start:start + step]
        last = start == starts[-1]
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with torch.autocast(clips.device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(chunk)
            if len(starts) == 1:  # the mean itself: a sum divided again could differ in its last bit
                loss = F.cross_entropy(out.float(), truth, weight=weight, label_smoothing=options.label_smoothing)
                loss.backward()
            else:
                chunk_sum = F.cross_entropy(out.float(), truth, weight=weight, reduction="sum",
                                            label_smoothing=options.label_smoothing)
                (chunk_sum / norm).backward()
                total = total + chunk_sum.detach()
        logits.append(out.detach())
    if len(starts) == 1:
        return loss.detach(), logits[0]
    return total / norm, torch.cat(logits)


def _train_epoch(model, loader, optimizer, scheduler, device, amp: bool, bar, progress: _Progress,
                 stop: _DeferredInterrupt, position, reseed, options: Optional[_StepOptions] = None) -> None:
    """The rest of one pass over ``loader``, accumulating into ``progress``. Raises CommandError
    on a non-finite loss (before the optimizer step, so the weights stay finite) and
    KeyboardInterrupt at a batch boundary once ``stop`` was requested. ``position()``: clips
    trained on so far (for the learning rate); ``reseed(position)``: per-rank RNG before each
    forward (None in one process).

    Under torch.distributed one all-reduce per step sums the step's loss and hits over the ranks
    together with a non-finite flag (checked before the optimizer step) and the Ctrl-C flag (acted
    on after the step), so every rank stops at the same step and the epoch sums are global."""
    options = options or _StepOptions()
    model.train()  # frozen BatchNorms stay in eval mode: transfer.freeze pins them
    world = dist.world_size()
    batches = iter(loader)
    while True:
        waited = time.perf_counter()
        try:
            batch = next(batches, None)
        except Exception:  # loader workers die on Ctrl-C too; that is the interrupt, not an error
            if stop.requested:
                raise KeyboardInterrupt from None
            raise
        if batch is None:
            return
        # the loop synchronises with the device every step (the loss sums), so time spent here is
        # time the device had nothing to do
        progress.data_wait += time.perf_counter() - waited
        clips, labels = _to_device(batch[0], device), batch[1].to(device)
        if reseed is not None:
            reseed(position())
        targets = labels
        if options.mixing.enabled:  # from the (reseeded) global RNG, as dropout
            clips, targets = mix_batch(clips, labels, options.num_classes, options.mixing)
            labels = targets.argmax(dim=1)  # the accuracy counts each clip's larger share
        progress.updating = True  # from the forward on: it updates the BatchNorm running stats
        optimizer.zero_grad(set_to_none=True)
        loss, logits = _forward_backward(model, clips, targets, amp, options)
        with torch.no_grad():
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            finite = torch.isfinite(loss)
            # loss sum, top-1 hits, top-5 hits, clips, non-finite losses, Ctrl-C requests
            step_sums = torch.stack([
                torch.where(finite, loss.detach(), torch.zeros_like(loss)).double() * labels.numel(),
                hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
                (~finite).double(), torch.tensor(float(stop.requested), dtype=torch.float64, device=device)])
        loss_sum, top1, top5, seen, non_finite, stop_requested = _all_reduce_sum(step_sums).tolist()
        if non_finite:  # last.pt is left as it was: it has the last good weights
            where = f"{loss.item()}" if not finite else "non-finite on another rank"
            raise CommandError(f"the training loss became {where} at epoch {progress.epoch + 1} "
                               f"step {progress.global_step + 1}; stopped (try a lower --lr)")
        if options.clip_grad_norm is not None:  # all parameters; after DDP's all-reduce every rank agrees
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
        optimizer.step()
        if options.ema is not None:
            options.ema.update_parameters(model)
        progress.updating = False
        progress.batch += world
        progress.global_step += 1
        _set_lr(scheduler, position())
        progress.loss_sum += loss_sum
        progress.correct += int(top1)
        progress.correct5 += int(top5)
        progress.seen += int(seen)
        if options.log_step is not None:  # the step's mean loss over the global batch
            options.log_step(progress.global_step, loss_sum / max(seen, 1), optimizer.param_groups[0]["lr"])
        bar.update(int(seen))
        bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.3f}", refresh=False)
        if stop_requested if world > 1 else stop.requested:  # never one rank alone: it would deadlock
            raise KeyboardInterrupt


DATA_BOUND_PCT = 50  # an epoch waiting for data longer than this says so, once a run

# Options a resumed run takes from the checkpoint unless given again (the machine-dependent ones,
# device, amp, workers and backend, come from this machine as for a new run)
RESUMED_OPTIONS = ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing",
                   "mixup", "cutmix", "ema", "clip_grad_norm", "micro_batch", "class_weights", "num_classes",
                   "train_samples", "val_samples", "frames", "size", "fused", "seed", "data", "grow", "grow_noise",
                   "sync_bn", "pretrained", "new_head", "freeze", "head_lr_mult", *REAL_DATA_OPTIONS)


def _resume_path(args: argparse.Namespace) -> str:
    if args.resume is not True:
        return args.resume
    if not args.out:
        raise UsageError("--resume without a path needs --out DIR (it resumes DIR/last.pt)")
    return os.path.join(args.out, "last.pt")


def _apply_resumed_options(args: argparse.Namespace, checkpoint: dict, given: set) -> None:
    saved = checkpoint.get("args", {})
    for key in RESUMED_OPTIONS:
        if key not in given and key in saved:
            setattr(args, key, tuple(saved[key]) if key == "size" else saved[key])
    if "width_mult" not in given and "width_mult" in checkpoint["model_kwargs"]:
        args.width_mult = checkpoint["model_kwargs"]["width_mult"]
    if saved.get("optimizer", args.optimizer) != args.optimizer:
        raise ckpt.CheckpointError(f"checkpoint {args.resume} was trained with --optimizer "
                                   f"{saved['optimizer']}, not {args.optimizer}")


def _checkpoint_payload(args, model, optimizer, scheduler, model_kwargs, data: TrainingData,
                        progress: _Progress, metrics: Optional[dict], ema=None) -> dict:
    return {
        **train_ema.payload(ema),
        # fused and stock models have the same state_dict: this loads into either
        "model": ckpt.plain_state_dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch,
        "epoch_sums": {"loss_sum": progress.loss_sum, "correct": progress.correct,
                       "correct5": progress.correct5, "seen": progress.seen},
        "global_step": progress.global_step,
        "best": progress.best,
        "rng": ckpt.rng_state(),
        "model_name": args.model,
        "model_kwargs": model_kwargs,
        # Net2Net steps applied after building the model from model_kwargs, in order
        "growth": list(progress.growth),
        "class_names": data.train.class_names,
        "data": data.config,
        "metrics": metrics,
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "given")},
        "world_size": dist.world_size(),  # informative: a checkpoint resumes on any number of ranks
        "c3dzoo_version": c3dzoo.__version__,
    }


def _save(path: str, payload: dict) -> None:
    try:
        ckpt.save_atomic(payload, path)
    except OSError as exc:
        raise CommandError(f"cannot write checkpoint {path}: {exc}") from None


def _init_distributed(args: argparse.Namespace) -> torch.device:
    """This process's device. Started by torchrun (``WORLD_SIZE`` > 1 in the environment): joins
    the process group first — gloo on the CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        return resolve_device(args.device)
    requested = resolve_device(args.device) if args.device else None
    if requested is not None and requested.type == "cuda" and requested.index is not None:
        raise UsageError(f"--device {args.device}: under torchrun each rank takes cuda:LOCAL_RANK; "
                         f"give --device cuda (or leave it out)")
    on_cuda = torch.cuda.is_available() if requested is None else requested.type == "cuda"
    try:
        device = dist.init_from_env("nccl" if on_cuda else "gloo")
    except ValueError as exc:  # RANK outside WORLD_SIZE, more local ranks than GPUs, ...
        raise UsageError(f"torchrun environment: {exc}") from None
    return device if on_cuda else torch.device("cpu")


def _cmd_train(args: argparse.Namespace) -> int:
    """``c3dzoo train``; under torchrun every rank runs it, and only rank 0 prints or writes."""
    device = _init_distributed(args)
    try:
        if dist.is_main():
            status = _train(args, device)
        else:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                    contextlib.redirect_stderr(sink):
                try:
                    status = _train(args, device)
                except (UsageError, CommandError, ckpt.CheckpointError) as exc:
                    # main() prints it, outside the redirection: say which rank it was
                    raise type(exc)(f"rank {dist.rank()}: {exc}") from None
        if status == 0:
            dist.barrier()  # rank 0 may still be writing; leave together
        return status
    finally:
        dist.teardown()


def _load_checkpoint(path: str) -> dict:
    """``ckpt.load(path)`` on rank 0, shared with the other ranks (they need no copy of the file,
    e.g. on other machines); its error, if any, is raised on every rank."""
    if dist.world_size() == 1:
        return ckpt.load(path)
    loaded = None
    if dist.is_main():
        try:
            loaded = ckpt.load(path)
        except ckpt.CheckpointError as exc:
            loaded = str(exc)
    loaded = dist.broadcast_object(loaded)
    if isinstance(loaded, str):
        raise ckpt.CheckpointError(loaded)
    return loaded


def _check_transfer_options(args: argparse.Namespace) -> None:
    if args.sync_bn and not args.fused:
        given = "" if "sync_bn" in args.given else " (taken from the checkpoint; add --no-sync-bn)"
        raise UsageError(f"--sync-bn needs --fused: the synchronisation lives in the fused op{given}")
    if args.new_head and not args.pretrained:
        raise UsageError("--new-head replaces the head of --pretrained weights: give --pretrained PATH")
    if not args.head_lr_mult > 0:
        raise UsageError(f"--head-lr-mult must be positive, got {args.head_lr_mult}")
    if args.grow and args.freeze != "none":
        raise UsageError("--grow cannot be combined with --freeze (a grown layer gets new, trainable "
                         "parameters); grow first, or fine-tune without growth")


def _prepare_model(args, model: nn.Module, resuming: bool) -> None:
    """--pretrained (not when resuming: the checkpoint has the weights, and the file may be gone),
    then --freeze; both before the optimizer is made."""
    if args.pretrained and not resuming:
        report = transfer.load_pretrained(model, args.pretrained, head="skip" if args.new_head else "load")
        print(report)
    try:
        frozen = transfer.freeze(model, args.freeze)
    except ValueError as exc:
        raise UsageError(f"--freeze: {exc}") from None
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"frozen: {', '.join(frozen)} (their BatchNorms on running statistics); "
              f"{trainable / 1e6:.3f} M parameters train")


def _train(args: argparse.Namespace, device: torch.device) -> int:
    world, rank = dist.world_size(), dist.rank()
    main_rank = dist.is_main()
    checkpoint = None
    if args.resume:
        args.resume = _resume_path(args)
        checkpoint = _load_checkpoint(args.resume)
        _apply_resumed_options(args, checkpoint, args.given)
        if not args.out:  # a resumed run goes on writing where it was
            args.out = os.path.dirname(os.path.abspath(args.resume))
    for key in ("data", "labels", "val_data", "val_labels", "classes", "pretrained", "train_list",
                "val_list"):  # checkpoints outlive the cwd
        if getattr(args, key) and not (key == "pretrained" and published_weights.parse(args.pretrained)):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    _apply_train_defaults(args, device)
    _check_transfer_options(args)
    if args.progress is None:  # bars redrawn with \r only make a mess of a log file
        args.progress = sys.stderr.isatty()
    args.progress = args.progress and main_rank
    if not args.grow_noise >= 0:
        raise UsageError(f"--grow-noise must be non-negative, got {args.grow_noise}")
    if args.tensorboard:
        if not args.out:
            raise UsageError("--tensorboard writes into --out DIR/tensorboard: give --out")
        if importlib.util.find_spec("tensorboard") is None:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pip install \"c3dzoo[tensorboard]\")")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise UsageError(f"--ema takes the average's decay, a number between 0 and 1, got {args.ema}")
    for option, alpha in (("--mixup", args.mixup), ("--cutmix", args.cutmix)):
        if not 0 <= alpha < float("inf"):
            raise UsageError(f"{option} takes the Beta distribution's alpha, a number >= 0 (0: off), got {alpha}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise UsageError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    if args.clip_grad_norm is not None and not args.clip_grad_norm > 0:
        raise UsageError(f"--clip-grad-norm must be positive, got {args.clip_grad_norm}")
    data = make_data(args)
    train_set, val_set = data.train, data.val
    if checkpoint is not None:  # before building: a mismatch is a usage error, not a shape error
        ckpt.check_matches(checkpoint, args.resume, args.model, _model_kwargs(args))
        saved_names = checkpoint.get("class_names")
        if saved_names and list(saved_names) != list(train_set.class_names):
            raise ckpt.CheckpointError(f"checkpoint {args.resume} was trained on other classes "
                                       f"({', '.join(saved_names[:4])}, ...) than this data's "
                                       f"({', '.join(train_set.class_names[:4])}, ...)")
    model, model_kwargs = _build_model(args, device, train_set[0][0])
    model.sync_bn = args.sync_bn  # fused SyncBatchNorm; in one process it changes nothing
    growth_plan = resolve_growth(args, model_kwargs)
    _prepare_model(args, model, resuming=checkpoint is not None)

    # the loaders get their own generators, so that starting an iterator does not draw from the
    # global RNG (which dropout uses): a resumed run draws the same dropout masks
    loader_args = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                       persistent_workers=args.workers > 0)
    # drop the last partial batch (a batch of one breaks BatchNorm) unless there is only one
    drop_last = len(train_set) > args.batch_size
    batches = _EpochBatches(len(train_set), args.batch_size, drop_last, args.seed,
                            keyed=isinstance(train_set, VideoClipDataset), rank=rank, world=world)
    if batches.steps_per_epoch < 1:
        raise UsageError(f"an epoch has {batches.global_batches} batch(es) of {args.batch_size}, fewer "
                         f"than the {world} ranks: lower --batch-size (it is per rank)")
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=batches, generator=torch.Generator().manual_seed(args.seed), **loader_args)
    # validation: rank r takes clips r, r + world, ...; _evaluate sums over the ranks
    val_shard = val_set if world == 1 else torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    # a multi-view sample is clips x crops clips: batches of about --batch-size clips
    val_views = getattr(val_set, "views", 1)
    val_loader = torch.utils.data.DataLoader(
        val_shard, batch_size=max(1, args.batch_size // val_views), shuffle=False,
        generator=torch.Generator().manual_seed(args.seed), **loader_args)
    used_batches = batches.steps_per_epoch * world
    clips_per_epoch = (len(train_set) if used_batches == batches.global_batches and not drop_last
                       else used_batches * args.batch_size)
    optimizer = _make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(
        args.epochs * batches.global_batches * args.batch_size, world * args.batch_size))

    progress = _Progress()
    if checkpoint is not None:
        progress.growth = [dict(step) for step in checkpoint.get("growth", [])]
        if growth_plan[:len(progress.growth)] != progress.growth:
            raise UsageError(f"--grow {args.grow!r} does not begin with the growth checkpoint {args.resume} "
                             f"recorded ({len(progress.growth)} step(s) from "
                             f"--grow {checkpoint.get('args', {}).get('grow')!r})")
        try:  # the grown architecture first (its optimizer param groups too), then the weights
            for step in progress.growth:
                apply_growth(model, step, optimizer)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"checkpoint {args.resume}: cannot replay its growth: {exc}") from None
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last_3d)
        model.load_state_dict(checkpoint["model"])
        try:  # the optimizer after the scheduler: the scheduler's constructor sets the lr
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {args.resume}: cannot restore the optimizer: "
                                       f"{exc}") from None
        progress.epoch = checkpoint.get("epoch", 0)
        progress.batch = checkpoint.get("batch_in_epoch", 0)
        progress.global_step = checkpoint.get("global_step", scheduler.last_epoch)
        progress.best = tuple(checkpoint.get("best", (-1.0, 0)))
        for key, value in checkpoint.get("epoch_sums", {}).items():
            setattr(progress, key, value)
        if "rng" in checkpoint:
            ckpt.set_rng_state(checkpoint["rng"])
        if progress.batch > batches.global_batches:
            raise ckpt.CheckpointError(f"checkpoint {args.resume} is at batch {progress.batch} of an epoch "
                                       f"of {batches.global_batches}: was --batch-size changed?")
    ema = train_ema.make_ema(model, args.ema)  # of the model as loaded and grown
    if checkpoint is not None:
        train_ema.restore(ema, checkpoint, args.resume)
    pending = growth_plan[len(progress.growth):]
    if pending and (pending[0]["epoch"] < progress.epoch + 1
                    or (pending[0]["epoch"] == progress.epoch + 1 and progress.batch > 0)):
        raise UsageError(f"--grow: epoch {pending[0]['epoch']} has begun or passed in checkpoint "
                         f"{args.resume} (it resumes in epoch {progress.epoch + 1})")

    def position() -> int:  # clips trained on: the learning rate is a function of it
        return (progress.epoch * batches.global_batches + progress.batch) * args.batch_size

    if checkpoint is not None and checkpoint.get("world_size", 1) != world:
        _set_lr(scheduler, position())  # the saved lr is for the other world size's step
    def reseed(at: int) -> None:
        # dropout masks differ between ranks and depend only on the position, so a run resumed on
        # as many ranks draws the same ones (only rank 0's RNG state is in the checkpoint)
        torch.manual_seed(hash((args.seed, rank, at)) & (2**63 - 1))
    ddp_model = dist.wrap_ddp(model)  # after loading and growth: DDP broadcasts rank 0's weights

    params = sum(p.numel() for p in model.parameters())
    ranks = (f", {world} ranks{' with SyncBatchNorm' if args.sync_bn else ''} (global batch "
             f"{world * args.batch_size})" if world > 1 else "")
    print(f"training {args.model} ({', '.join(f'{k}={v}' for k, v in model_kwargs.items())}; "
          f"{params / 1e6:.2f} M parameters) {'fused' if args.fused else 'stock'} on {device}"
          f"{' with bf16 autocast' if args.amp else ''}: {args.epochs} epochs of {data.description}, "
          f"clips {args.frames}x{args.size[0]}x{args.size[1]}, batch {args.batch_size}{ranks}, "
          f"{args.optimizer} lr {args.lr:g}"
          f"{f' (head x{args.head_lr_mult:g})' if args.head_lr_mult != 1.0 else ''}; "
          f"chance is {100 / args.num_classes:.1f} %")
    if data.skipped_note:
        print(f"{data.skipped_note} (warnings above)")
    if growth_plan:
        print("grow schedule: " + "; ".join(
            f"epoch {s['epoch']} {s['op']} {s['layer']}" + (f" to {s['width']}" if "width" in s else "")
            for s in growth_plan))
    if checkpoint is not None:
        print(f"resuming from {args.resume} at epoch {progress.epoch + 1}, batch {progress.batch + 1} "
              f"(step {progress.global_step})")
    writes = bool(args.out) and main_rank  # only rank 0 writes files
    if writes:
        os.makedirs(args.out, exist_ok=True)
    last_path = os.path.join(args.out, "last.pt") if args.out else None
    best_path = os.path.join(args.out, "best.pt") if args.out else None
    metrics_path = os.path.join(args.out, "metrics.csv") if args.out else None
    curves_path = os.path.join(args.out, CURVES_PNG) if args.out else None
    plot = writes and importlib.util.find_spec("matplotlib") is not None
    if args.out and not plot:
        print(f"note: matplotlib is not installed, so no {CURVES_PNG} and no {CONFUSION_PNG} "
              f"(pip install matplotlib)")
    append = writes and checkpoint is not None and os.path.isfile(metrics_path) and os.path.getsize(metrics_path) > 0
    start = time.perf_counter()
    row = validation = None
    warned_data_bound = False
    step_options = _StepOptions(label_smoothing=args.label_smoothing, clip_grad_norm=args.clip_grad_norm,
                                micro_batch=args.micro_batch, class_weights=_class_weights(args, train_set, device),
                                mixing=BatchMixing(args.mixup, args.cutmix), num_classes=transfer.head_classes(model),
                                ema=ema)
    board = _TensorBoard(os.path.join(args.out, "tensorboard")) if args.tensorboard and writes else None
    step_options.log_step = board.log_step if board else None
    payload = lambda metrics: _checkpoint_payload(args, model, optimizer, scheduler, model_kwargs,
                                                  data, progress, metrics, step_options.ema)
    with (open_metrics(metrics_path, append) if writes
          else contextlib.nullcontext()) as metrics_file, _DeferredInterrupt() as stop, \
            (contextlib.closing(board) if board else contextlib.nullcontext()):
        writer = csv.DictWriter(metrics_file, fieldnames=METRICS) if metrics_file else None
        if writer and not append:
            writer.writeheader()
        try:
            while progress.epoch < args.epochs:
                epoch = progress.epoch + 1
                epoch_start = time.perf_counter()
                if pending and pending[0]["epoch"] == epoch:
                    while pending and pending[0]["epoch"] == epoch:
                        # the same seeded growth on every rank (see _grow), then a new DDP
                        # wrapper: the old one holds the old parameters
                        _grow(model, pending.pop(0), optimizer, train_set, args, device, progress)
                    ddp_model = dist.wrap_ddp(model)
                    if step_options.ema is not None:  # another architecture: the average starts again
                        step_options.ema = train_ema.make_ema(model, args.ema)
                batches.epoch, batches.skip = epoch, progress.batch
                with tqdm(total=clips_per_epoch, initial=progress.seen, desc=f"epoch {epoch}/{args.epochs}",
                          unit="clip", disable=not args.progress) as bar:
                    seen_before = progress.seen
                    _train_epoch(ddp_model, train_loader, optimizer, scheduler, device, args.amp, bar,
                                 progress, stop, position, reseed if world > 1 else None, step_options)
                train_seconds = time.perf_counter() - epoch_start
                clips_per_s = (progress.seen - seen_before) / train_seconds
                data_wait = 100.0 * progress.data_wait / max(train_seconds, 1e-9)
                train_loss = progress.loss_sum / max(1, progress.seen)
                train_top1 = 100.0 * progress.correct / max(1, progress.seen)
                train_top5 = 100.0 * progress.correct5 / max(1, progress.seen)
                validated = model if step_options.ema is None else step_options.ema.module
                _broadcast_buffers(validated)
                validation = _evaluate(validated, val_loader, device, args.amp, args.progress, val_views,
                                       max_clips=args.batch_size)
                progress.epoch += 1
                progress.start_epoch()
                progress.best = max(progress.best, (validation.top1, epoch))
                row = dict(epoch=epoch, lr=f"{optimizer.param_groups[0]['lr']:.6g}",
                           train_loss=f"{train_loss:.4f}", train_top1=f"{train_top1:.2f}",
                           train_top5=f"{train_top5:.2f}", val_loss=f"{validation.loss:.4f}",
                           val_top1=f"{validation.top1:.2f}", val_top5=f"{validation.top5:.2f}",
                           epoch_seconds=f"{time.perf_counter() - epoch_start:.1f}",
                           train_clips_per_s=f"{clips_per_s:.1f}", data_wait_pct=f"{data_wait:.1f}")
                tqdm.write(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} top-1 {train_top1:.1f} % "
                           f"| val loss {validation.loss:.4f} top-1 {validation.top1:.1f} % top-5 "
                           f"{validation.top5:.1f} %{_views_note(validation)} | {clips_per_s:.1f} clips/s, "
                           f"{data_wait:.0f} % waiting for data")
                if data_wait > DATA_BOUND_PCT and not warned_data_bound:
                    warned_data_bound = True
                    tqdm.write(f"note: training waited for its data {data_wait:.0f} % of the time: the loader "
                               f"is the bottleneck; raise --workers (now {args.workers}), or decode less "
                               f"(videos extracted once to frame folders, smaller frames)")
                if board:
                    board.log_epoch(epoch, row)
                if writer:
                    writer.writerow(row)
                    metrics_file.flush()
                    _save(last_path, payload(row))
                    if progress.best[1] == epoch:  # the best validation top-1 so far (ties: the later)
                        _save(best_path, payload(row))
                    if plot:
                        plot_curves(metrics_path, curves_path, progress.growth)
        except KeyboardInterrupt:
            if progress.updating:  # the weights are half-updated: keep the previous checkpoint
                note = f"not saved (mid-step); {last_path} is the previous checkpoint" if last_path \
                    else "nothing saved (no --out)"
            elif writes:
                _save(last_path, payload(None))
                note = f"saved {last_path}; continue with --resume --out {args.out}"
            else:
                note = "nothing saved (no --out)"
            print(f"{PROG}: interrupted at epoch {progress.epoch + 1} step {progress.global_step}: {note}",
                  file=sys.stderr)
            return 130
    if row is None:
        print(f"nothing to do: the checkpoint has finished all {args.epochs} epochs (raise --epochs "
              f"to train on)")
        return 0
    written = ["metrics.csv", "last.pt"]
    if best_path and os.path.isfile(best_path):
        written.append(f"best.pt (epoch {progress.best[1]})")
    if board:
        written.append("tensorboard/")
    if writes:
        written += write_final_report(validation, train_set.class_names, args.out, plot)
    if plot:
        written.insert(1, CURVES_PNG)
    saved = f"; wrote {', '.join(written)} to {args.out}" if args.out else "; nothing saved (no --out)"
    skipped = f"; {data.skipped_note}" if data.skipped_note else ""
    print(f"done in {time.perf_counter() - start:.0f} s: final val top-1 {validation.top1:.1f} % top-5 "
          f"{validation.top5:.1f} %{_views_note(validation)}, best top-1 {progress.best[0]:.1f} % "
          f"(epoch {progress.best[1]}), chance "
          f"{100 / args.num_classes:.1f} %{skipped}{saved}")
    return 0


def _grow(model, step: dict, optimizer, train_set, args, device, progress: _Progress) -> None:
    """One ``--grow`` step at the start of its epoch on the plain model; ``deeper`` sets its new
    BatchNorm from a batch of training clips, ``wider`` perturbs the replicas by ``--grow-noise``.
    Both depend only on (seed, epoch, step) and the weights, so every rank of a distributed run
    grows identically (then the caller wraps the model in a new DDP)."""
    before = sum(p.numel() for p in model.parameters())
    data = None
    if step["op"] == "deeper":
        data = _to_device(torch.stack([train_set[i][0] for i in range(min(len(train_set), args.batch_size))]),
                          device)
    generator = torch.Generator().manual_seed(hash((args.seed, step["epoch"], len(progress.growth))) & (2**63 - 1))
    try:
        what = apply_growth(model, step, optimizer, data=data, noise=args.grow_noise, generator=generator)
    except ValueError as exc:  # resolve_growth tried every step already; this is a safety net
        raise CommandError(f"--grow at epoch {step['epoch']}: {exc}") from None
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    progress.growth.append(step)
    after = sum(p.numel() for p in model.parameters())
    tqdm.write(f"epoch {step['epoch']}: grew {what}; {before / 1e6:.3f} M -> {after / 1e6:.3f} M parameters")


def _short_side_range(text: str) -> Tuple[int, int]:
    """``128,160``: the short-side range of --scale-jitter."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in pixels, got {text!r}") from None
    return low, high


def _by_device(key: str) -> str:
    """Help text for an option whose default depends on the device."""
    values = {device: defaults[key] for device, defaults in TRAIN_DEFAULTS.items()}
    values = {d: "x".join(map(str, v)) if isinstance(v, tuple) else v for d, v in values.items()}
    return "default by device: " + ", ".join(f"{d} {v}" for d, v in values.items())


def add_parser(sub) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train", help="train a zoo model on real videos or the built-in synthetic motion data set",
        description="Train a zoo model on a folder of videos (one subfolder per class; video files "
                    "or folders of frame images), on videos named by id labelled by a CSV or JSON (--labels), or "
                    "by default on the built-in SyntheticVideoDataset, whose classes are defined by "
                    "motion. The defaults by device are a small model that trains in a few minutes "
                    "on a CPU, and the full model on CUDA.")
    train.add_argument("--model", default="c3d_bn", choices=c3dzoo.list_models(),
                       help="zoo model (default %(default)s)")
    train.add_argument("--epochs", type=int, help=_by_device("epochs"))
    train.add_argument("--batch-size", type=int, help=_by_device("batch_size"))
    train.add_argument("--lr", type=float, default=0.02,
                       help="peak learning rate, after a short warm-up; cosine decay to 0 (default 0.02)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                       help="SGD with Nesterov momentum 0.9, or Adam (default %(default)s)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="(default %(default)s)")
    train.add_argument("--micro-batch", type=int, metavar="N",
                       help="run each batch's forward and backward N clips at a time and step once on the "
                            "whole batch's gradients: a batch larger than fits in memory (BatchNorm normalises "
                            "each N-clip chunk by its own statistics; default: the whole batch at once)")
    train.add_argument("--clip-grad-norm", type=float, metavar="X",
                       help="scale each step's gradients down to a total 2-norm of at most X (default: no clipping)")
    train.add_argument("--class-weights", choices=("balanced",),
                       help="balanced: weigh each class's clips in the training loss by N / (classes x clips "
                            "of the class), for imbalanced data (default: every clip alike)")
    train.add_argument("--label-smoothing", type=float, default=0.0, metavar="X",
                       help="training targets 1 - X on the class, X spread over all classes (default 0)")
    train.add_argument("--ema", type=float, metavar="DECAY",
                       help="keep an exponential moving average of the weights (after each step: "
                            "average = DECAY x average + (1 - DECAY) x weights; 0.999 or 0.9999 are common), "
                            "validate it, and give it to predict/evaluate/export (default: none)")
    train.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                       help="MixUp: blend each training clip with another of its batch, weights lambda and "
                            "1 - lambda ~ Beta(ALPHA, ALPHA), and their targets alike (0.8 is common; "
                            "default 0: off)")
    train.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                       help="CutMix: paste a box of another clip of the batch through all frames, of area "
                            "~ Beta(ALPHA, ALPHA), targets by area (1.0 is common; default 0: off; with --mixup "
                            "each batch takes one of the two)")
    train.add_argument("--num-classes", type=int, default=10,
                       help=f"synthetic motion classes, 1 to {len(MOTIONS)} (default %(default)s; "
                            f"with --data the data's class count)")
    real = train.add_argument_group("real data (default: the built-in synthetic set)")
    real.add_argument("--data", metavar="PATH",
                      help="a folder with one subfolder per class holding videos (files, or folders of "
                           "frame images); or, with --labels, a folder of videos named by id (frame folders "
                           "<id>/, or files <id>.webm ...)")
    real.add_argument("--labels", metavar="CSV",
                      help="labels of the videos under --data: rows 'video id;label' or 'video id,label', or "
                           "JSON objects with id and label (or Something-Something's template)")
    real.add_argument("--classes", metavar="FILE",
                      help="class names in label order, one a line, or JSON (a list, or SSv2's labels.json "
                           "name-to-index map; default: sorted folder names or labels)")
    real.add_argument("--val-data", metavar="PATH", help="validation videos, laid out as --data")
    real.add_argument("--val-labels", metavar="CSV",
                      help="labels of validation videos named by id (under --val-data, else under --data)")
    real.add_argument("--val-split", type=float, metavar="FRACTION",
                      help=f"validate on this fraction of each class of --data, chosen by --seed; UCF101-named "
                           f"clips (v_X_gNN_cNN) by source-video group (default {DEFAULT_VAL_SPLIT:g} without "
                           f"--val-data/--val-labels/--val-list)")
    real.add_argument("--train-list", metavar="FILE",
                      help="train only on the videos of --data this list names, one 'Class/video.avi' a line "
                           "(an official split: UCF101's trainlist01.txt; anything after the path is ignored)")
    real.add_argument("--val-list", metavar="FILE",
                      help="validate on the videos of --data this list names (UCF101's testlist01.txt); "
                           "without --train-list the others are trained on")
    real.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                      help="mirror training clips left-right half the time (UCF101, HMDB51, Kinetics); never "
                           "where classes name a direction (Jester, Something-Something); default off")
    real.add_argument("--scale-jitter", type=_short_side_range, metavar="MIN,MAX",
                      help="resize each training clip's short side to a random MIN..MAX pixels before its "
                           "random crop (e.g. 128,160 for a 112 crop; default: 8/7 of the crop)")
    real.add_argument("--val-clips", type=int, metavar="N",
                      help="validate each video on N clips spread evenly over it and score it by their mean "
                           "probability, as video models are tested (default 1: the centred clip)")
    real.add_argument("--val-crops", type=int, metavar="K",
                      help="and on K crops of each clip spread along the frame's longer side (3: left, "
                           "centre, right; default 1: the centre crop)")
    real.add_argument("--frame-stride", type=int, metavar="N",
                      help="take every N-th frame (default 1; lowered for videos too short for the span)")
    real.add_argument("--min-frames", type=int, metavar="N",
                      help="skip videos with fewer frames; shorter than a clip but not than this: looped "
                           "(default: half of --frames, at least 2)")
    train.add_argument("--train-samples", type=int, help="synthetic clips per epoch; " + _by_device("train_samples"))
    train.add_argument("--val-samples", type=int, help="synthetic validation clips; " + _by_device("val_samples"))
    train.add_argument("--frames", type=int, help="frames per clip; " + _by_device("frames"))
    train.add_argument("--size", type=size_arg, help="frame size, N or HxW; " + _by_device("size"))
    train.add_argument("--width-mult", type=float, help="channel multiplier; " + _by_device("width_mult"))
    train.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="run conv chains through the fused op (default) or stock PyTorch")
    train.add_argument("--backend", choices=backend_choices(), default="auto")
    train.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on for CUDA; CUDA only)")
    train.add_argument("--workers", type=int, help="data loader workers; " + _by_device("workers"))
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data and shuffling (default 0)")
    train.add_argument("--grow", metavar="SCHEDULE",
                       help="Net2Net growth at the start of given epochs: " + GROW_SYNTAX.replace("%", "%%"))
    train.add_argument("--grow-noise", type=float, default=0.02,
                       help="noise (x the layer's weight std) on the replicas of a wider layer, so they "
                            "can diverge; 0 keeps the function exactly (default %(default)s)")
    tune = train.add_argument_group("fine-tuning")
    tune.add_argument("--pretrained", metavar="PATH",
                      help="start from these weights (a c3dzoo checkpoint or export, a stock state_dict "
                           "of the model, torchvision video ResNet weights, or published weights by name: "
                           "r3d_18:kinetics400, downloaded once); strict: a mismatch stops with one line. "
                           "Not reloaded on --resume")
    tune.add_argument("--new-head", action="store_true",
                      help="load everything but the final Linear, which stays freshly initialised "
                           "(for a different class count)")
    tune.add_argument("--freeze", default="none", metavar="none|features|up-to=LAYER",
                      help="do not train these layers (BatchNorms there on running statistics): none, "
                           "every layer before the first fully connected one, or LAYER and all "
                           "before it (default %(default)s)")
    tune.add_argument("--head-lr-mult", type=float, default=1.0, metavar="X",
                      help="learning rate of the final Linear = --lr x X (default %(default)s)")
    multi = train.add_argument_group(
        "several GPUs or machines",
        "Start with torchrun (torchrun --nproc_per_node=N -m c3dzoo.cli train ...): each rank trains "
        "on its own device, --batch-size is per rank, rank 0 alone prints and writes, and a "
        "checkpoint resumes on any number of ranks. Without torchrun these options change nothing.")
    multi.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                       help="BatchNorm statistics over the global batch (fused SyncBatchNorm; needs "
                            "--fused); changes nothing in a single process (default: off)")
    train.add_argument("--out", metavar="DIR",
                       help=f"write metrics.csv, {CURVES_PNG}, last.pt, best.pt (the epoch of the best "
                            f"validation top-1) and, after the last epoch, {PER_CLASS_CSV} and {CONFUSION_PNG} here")
    train.add_argument("--tensorboard", action="store_true",
                       help="also log each step's loss and each epoch's metrics for TensorBoard into "
                            "--out DIR/tensorboard (tensorboard --logdir DIR)")
    train.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                       help="continue from checkpoint CKPT (default with --out: DIR/last.pt); "
                            "options not given again are taken from the checkpoint")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="tqdm progress bars (default: when stderr is a terminal)")
    train.set_defaults(func=_cmd_train)
    return train
