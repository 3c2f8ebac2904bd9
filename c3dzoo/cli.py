"""The ``c3dzoo`` command line: ``info``, ``check``, ``train``, ``predict``, ``export`` and ``bench``.

``main(argv)`` returns the exit status: 0 on success, 1 when a check fails, training diverges or a
command hits an unexpected error, 2 for bad arguments (including a missing, unreadable or mismatched
checkpoint), 130 when interrupted; errors are one line on stderr, no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo.testing import FLOOR, PARITY_FACTOR
from c3dzoo.data import MOTIONS, SyntheticVideoDataset

PROG = "c3dzoo"


class UsageError(Exception):
    """Bad arguments, or a request this machine cannot serve (exit status 2)."""


class CommandError(Exception):
    """A command that cannot go on, e.g. a diverging training run (exit status 1, one line)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; report one line through main() instead
    def error(self, message: str):
        raise UsageError(message)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _resolve_device(name: Optional[str]) -> torch.device:
    """``None`` → cuda if available, else cpu. Refuses devices this machine does not have."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def _backend_arg(name: Optional[str]) -> Optional[str]:
    """``--backend`` value as the models take it (None means auto)."""
    return None if name in (None, "auto") else name


def _backend_choices() -> List[str]:
    return ["auto", *c3dzoo.backends()]


def _set_mode(model: nn.Module, mode: str) -> None:
    """``train``, ``eval`` or ``frozen_bn`` (training, with every BatchNorm on running statistics,
    as when fine-tuning)."""
    model.train(mode != "eval")
    if mode == "frozen_bn":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _builder_accepts(model_name: str, parameter: str) -> bool:
    return parameter in inspect.signature(getattr(c3dzoo.models, model_name)).parameters


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"c3dzoo   {c3dzoo.__version__}")
    print(f"python   {platform.python_version()} ({platform.system()} {platform.machine()})")
    build = "CPU-only build"
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    print(f"torch    {torch.__version__} ({build})")
    try:
        triton = importlib.import_module("triton")
        print(f"triton   {triton.__version__}")
    except Exception as exc:  # a broken install must not hide the rest of the report
        print(f"triton   not importable ({type(exc).__name__}: {exc})")
    print("devices:")
    print(f"  cpu      {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(index)
            print(f"  cuda:{index}   {prop.name}, {prop.total_memory / 2**30:.0f} GiB, "
                  f"sm_{prop.major}{prop.minor}")
    else:
        print("  cuda     none available")
    env = os.environ.get("C3DZOO_BACKEND")
    print("backends (best first" + (f"; C3DZOO_BACKEND={env}" if env else "") + "):")
    for name, state in c3dzoo.backends().items():
        status = "available" if state["available"] else "unavailable"
        reason = f"  ({state['reason']})" if state["reason"] else ""
        print(f"  {name:<10} {status}{reason}")
    print("models:")
    for name in c3dzoo.list_models():
        try:
            getattr(c3dzoo.models, name)
            note = ""
        except ImportError as exc:
            note = f"  (not available: {exc})"
        print(f"  {name}{note}")
    return 0


# --------------------------------------------------------------------------------------------
# check: fused vs stock against a float64 reference
# --------------------------------------------------------------------------------------------

# The parity budget of the test suite (c3dzoo.testing): fused error vs float64 ≤ 2 × stock error
# + floor. Errors are reported in units of max(1, max|reference|) (absolute for tensors below 1).
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECK_MODES = ("train", "eval", "frozen_bn")


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    """How ``check`` builds and feeds one model: small enough for a CPU, yet with enough values
    per channel in every training-mode BatchNorm that its statistics are well conditioned."""

    kwargs: dict = dataclasses.field(default_factory=dict)
    input_size: Optional[Tuple[int, int, int]] = None  # None: the model's input_size, or 16×112×112
    batch: int = 2
    on_cpu: bool = True  # checked by default on a CPU (False: only when named with --models)


_SMALL_C3D = CheckSpec({"width_mult": 0.125, "input_size": (16, 32, 32)})  # fed its input_size
CHECK_SPECS: Dict[str, CheckSpec] = {
    "c3d_bn": _SMALL_C3D,
    "c3d": _SMALL_C3D,
    # the only input size its classifier head accepts, and a batch of 4 for its BatchNorm1d
    # (over 2 samples it is ill-conditioned); about a minute on a 2-core CPU
    "jester_convcolumn": CheckSpec({}, (18, 84, 84), batch=4, on_cpu=False),
    # 2 frames keep the number of ReLUs (and so of ties, see check_model) low; 32 × 32 pixels
    # leave layer4's BatchNorms 1 × 2 × 2 positions per clip
    "r3d_18": CheckSpec({}, (2, 32, 32)),
    "mc3_18": CheckSpec({}, (2, 32, 32)),
    "r2plus1d_18": CheckSpec({}, (2, 32, 32)),
}


@dataclasses.dataclass
class CheckRow:
    model: str
    mode: str
    quantity: str
    fused_err: float
    stock_err: float
    ok: bool
    worst: str = ""  # for a group of tensors: the one with the largest fused error
    attempt: int = 1

    @property
    def ratio(self) -> str:
        if self.stock_err > 0:
            return f"{self.fused_err / self.stock_err:.2f}"
        return "-" if self.fused_err == 0 else "inf"


def _max_abs_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| in float64; inf when ``value`` has a NaN or an infinity."""
    if reference.numel() == 0:
        return 0.0
    diff = (value.detach().double() - reference).abs().max().item()
    return diff if math.isfinite(diff) else math.inf


def _judge_group(fused: Dict[str, torch.Tensor], stock: Dict[str, torch.Tensor],
                 reference: Dict[str, torch.Tensor], dtype: torch.dtype) -> Tuple[float, float, bool, str]:
    """The budget applied to a group of tensors (e.g. all parameter gradients).

    Each tensor's error is normalised by max(1, max|reference|) (as the floor is), and the group's
    error is the worst tensor's. Comparing the fused group's worst with the stock group's worst is
    far steadier than judging dozens of tensors one by one, where some tensor's stock error is
    always small by luck. Returns (fused error, stock error, ok, the fused worst tensor's name).
    """
    fused_err, stock_err, worst = 0.0, 0.0, ""
    for name, ref in reference.items():
        f, s = fused.get(name), stock.get(name)
        if f is None or s is None or f.shape != ref.shape:
            return math.inf, 0.0, False, f"{name} (missing or misshaped)"
        ref = ref.detach().double()
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        err = _max_abs_diff(f, ref) / scale
        if err > fused_err or not worst:
            fused_err, worst = err, name
        stock_err = max(stock_err, _max_abs_diff(s, ref) / scale)
    return fused_err, stock_err, fused_err <= PARITY_FACTOR * stock_err + FLOOR[dtype], worst


def _run_once(model: nn.Module, x: torch.Tensor, grad_seed: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Forward and backward of ``sum(out · g)`` for a fixed random ``g``; everything to compare."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    generator = torch.Generator().manual_seed(grad_seed)
    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
    (out.double() * weight).sum().backward()
    return {
        "output": {"output": out.detach()},
        "input grad": {"input": x.grad},
        "param grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "running stats": {n: b.detach() for n, b in model.named_buffers()},
    }


def _randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval and frozen-BN modes test
    more than an identity BatchNorm."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                if module.track_running_stats:
                    module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                    module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))


def check_model(name: str, device: torch.device, dtype: torch.dtype, backend: Optional[str],
                seed: int = 0, attempts: int = 3) -> List[CheckRow]:
    """Fused and stock ``name`` in ``dtype`` against the stock model in float64, in every mode.

    A ReLU or max-pool decision within rounding of a tie (a pre-activation within ~1e-7 of zero)
    may go either way in either dtype, and when it goes differently in the fused and the stock
    model, the gradients differ far beyond rounding; which input hits such a tie is luck. So a
    mode that fails is run again on fresh inputs, up to ``attempts`` times in all: a real error
    fails every time. The rows of the last attempt are returned, with its number.

    Raises ImportError if the model is not available in this installation.
    """
    spec = CHECK_SPECS.get(name, CheckSpec())
    torch.manual_seed(seed)
    stock = c3dzoo.get_model(name, fused=False, **spec.kwargs)
    _randomise_batch_norm(stock, torch.Generator().manual_seed(seed))
    state = copy.deepcopy(stock.state_dict())
    fused = c3dzoo.get_model(name, fused=True, backend=backend, **spec.kwargs)
    reference = copy.deepcopy(stock)
    input_size = spec.input_size or tuple(getattr(stock, "input_size", (16, 112, 112)))
    copies = ((reference, torch.float64), (stock, dtype), (fused, dtype))
    for model, model_dtype in copies:
        model.to(device, model_dtype)

    rows: List[CheckRow] = []
    for mode in CHECK_MODES:
        for attempt in range(1, attempts + 1):
            input_seed = seed + 1 + 1000 * (attempt - 1)
            x = torch.randn(spec.batch, 3, *input_size, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(input_seed)).to(device)
            results = []
            for model, model_dtype in copies:
                model.load_state_dict(state)  # every mode and attempt starts from the same state
                _set_mode(model, mode)
                # dropout draws different masks in each copy; the check is about the conv chains
                for module in model.modules():
                    if isinstance(module, nn.modules.dropout._DropoutNd):
                        module.eval()
                results.append(_run_once(model, x.to(model_dtype), grad_seed=input_seed + 1))
            ref, stock_result, fused_result = results
            mode_rows = []
            for quantity, ref_group in ref.items():
                if not ref_group:  # e.g. running stats of a model without BatchNorm
                    continue
                fused_err, stock_err, ok, worst = _judge_group(
                    fused_result[quantity], stock_result[quantity], ref_group, dtype)
                mode_rows.append(CheckRow(name, mode, quantity, fused_err, stock_err, ok,
                                          worst if len(ref_group) > 1 else "", attempt))
            if all(r.ok for r in mode_rows):
                break
        rows += mode_rows
    return rows


def _print_table(rows: Sequence[CheckRow]) -> None:
    header = ("model", "mode", "quantity", "fused err", "stock err", "ratio", "result", "attempt",
              "worst tensor")
    table = [header] + [
        (r.model, r.mode, r.quantity, f"{r.fused_err:.2e}", f"{r.stock_err:.2e}", r.ratio,
         "PASS" if r.ok else "FAIL", str(r.attempt), r.worst)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _cmd_check(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.attempts < 1:
        raise UsageError(f"--attempts must be at least 1, got {args.attempts}")
    unknown = [n for n in args.models or () if n not in c3dzoo.list_models()]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(c3dzoo.list_models())}")
    print(f"fused vs stock PyTorch on {device}, {args.dtype}, backend {args.backend}; reference: "
          f"the stock model in float64. Budget: fused err <= {PARITY_FACTOR:g} x stock err + "
          f"{FLOOR[dtype]:g}; errors are max|x - reference| / max(1, max|reference|)")
    rows: List[CheckRow] = []
    for name in args.models or c3dzoo.list_models():
        if not args.models and device.type == "cpu" and not CHECK_SPECS.get(name, CheckSpec()).on_cpu:
            print(f"{name}: skipped (slow on a CPU; name it with --models to check it)")
            continue
        start = time.perf_counter()
        try:
            model_rows = check_model(name, device, dtype, _backend_arg(args.backend),
                                     seed=args.seed, attempts=args.attempts)
        except ImportError as exc:  # the model's module is not part of this installation
            print(f"{name}: skipped ({exc})")
            continue
        rows += model_rows
        status = "ok" if all(r.ok for r in model_rows) else "FAILED"
        note = ""
        for mode in CHECK_MODES:
            mode_rows = [r for r in model_rows if r.mode == mode]
            if mode_rows and mode_rows[0].attempt > 1 and all(r.ok for r in mode_rows):
                note += f"; {mode} passed on attempt {mode_rows[0].attempt} (an earlier input hit a tie)"
        print(f"{name}: {status} ({time.perf_counter() - start:.1f} s{note})", flush=True)
    print()
    _print_table(rows)
    failed = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - failed} PASS, {failed} FAIL")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

# Defaults by device: a small C3D-BN that trains in a few minutes on a laptop CPU, the full model
# on a GPU. Anything given on the command line wins.
# On an idle 2-core CPU the cpu defaults train at ~90-100 clips/s (the fused ops run the
# reference backend there, which recomputes each conv in the backward): ~12 s an epoch, ~2 minutes
# in all, ending at ~85-90 % top-1 on the 10 classes (chance: 10 %).
TRAIN_DEFAULTS = {
    "cpu": dict(width_mult=0.125, frames=16, size=(32, 32), batch_size=16, epochs=10,
                train_samples=1024, val_samples=256, workers=0, amp=False),
    "cuda": dict(width_mult=1.0, frames=16, size=(112, 112), batch_size=32, epochs=10,
                 train_samples=8192, val_samples=1024, workers=min(8, os.cpu_count() or 1), amp=True),
}
METRICS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
           "epoch_seconds", "train_clips_per_s")


def _model_kwargs(args: argparse.Namespace) -> dict:
    """Builder arguments from the command line; only those the model's builder takes."""
    kwargs = {"num_classes": args.num_classes}
    if _builder_accepts(args.model, "input_size"):
        kwargs["input_size"] = (args.frames, *args.size)
    if _builder_accepts(args.model, "width_mult"):
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
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def _warmup_cosine(total_steps: int):
    """Linear warm-up over the first 5 % of steps (at most 200), then cosine decay to zero:
    a fast, robust schedule for runs of a few hundred steps as for long ones."""
    warmup = max(1, min(200, total_steps // 20))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # channels-last 3D is what cuDNN's and our kernels prefer
        return x.to(device, non_blocking=True, memory_format=torch.channels_last_3d)
    return x


def _evaluate(model, loader, device, amp, progress) -> Tuple[float, float, float]:
    """(mean loss, top-1 %, top-5 %) on ``loader``; top-5 is top-min(5, classes)."""
    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    with torch.no_grad(), tqdm(total=len(loader.dataset), desc="  val", unit="clip",
                               leave=False, disable=not progress) as bar:
        for clips, labels in loader:
            clips, labels = _to_device(clips, device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(clips)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = ranked == labels[:, None]
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            seen += labels.numel()
            bar.update(labels.numel())
    return loss_sum / seen, 100.0 * top1 / seen, 100.0 * top5 / seen


def _build_model(args: argparse.Namespace, device: torch.device, example: torch.Tensor):
    """The model to train, on ``device``, and its builder arguments. Arguments it rejects are
    usage errors, found here rather than after the data loaders have started."""
    model_kwargs = _model_kwargs(args)
    torch.manual_seed(args.seed)
    try:
        model = c3dzoo.get_model(args.model, fused=args.fused, backend=_backend_arg(args.backend),
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
    ``skip`` batches can be left out, so a run resumed mid-epoch sees the batches it had left."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, seed
        self.epoch, self.skip = 1, 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        # hash of a tuple of ints is not randomised per process: the same order in every run
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & (2**63 - 1))
        order = torch.randperm(self.n, generator=generator).tolist()
        for b in range(self.skip, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


@dataclasses.dataclass
class _Progress:
    """Where training stands; updated only after a step has completed, so it always describes the
    weights (``updating`` is True while a step is changing them, from the forward on)."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in epoch + 1
    global_step: int = 0
    loss_sum: float = 0.0  # sums over the batches of the current epoch
    correct: int = 0
    seen: int = 0
    updating: bool = False
    best: Tuple[float, int] = (-1.0, 0)  # (val top-1, epoch)

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.correct, self.seen = 0, 0.0, 0, 0


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


def _train_epoch(model, loader, optimizer, scheduler, device, amp: bool, bar, progress: _Progress,
                 stop: _DeferredInterrupt) -> None:
    """The rest of one pass over ``loader``, accumulating into ``progress``. Raises CommandError
    on a non-finite loss (before the step, so the weights stay finite) and KeyboardInterrupt at a
    batch boundary once ``stop`` was requested."""
    model.train()
    batches = iter(loader)
    while True:
        try:
            batch = next(batches, None)
        except Exception:  # loader workers die on Ctrl-C too; that is the interrupt, not an error
            if stop.requested:
                raise KeyboardInterrupt from None
            raise
        if batch is None:
            return
        clips, labels = _to_device(batch[0], device), batch[1].to(device)
        progress.updating = True  # from the forward on: it updates the BatchNorm running stats
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(clips)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):  # last.pt is left as it was: it has the last good weights
            raise CommandError(f"the training loss became {loss.item()} at epoch {progress.epoch + 1} "
                               f"step {progress.global_step + 1}; stopped (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.updating = False
        progress.batch += 1
        progress.global_step += 1
        progress.loss_sum += loss.item() * labels.numel()
        progress.correct += (logits.argmax(1) == labels).sum().item()
        progress.seen += labels.numel()
        bar.update(labels.numel())
        bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.3f}", refresh=False)
        if stop.requested:
            raise KeyboardInterrupt


# Options a resumed run takes from the checkpoint unless given again (the machine-dependent ones,
# device, amp, workers and backend, come from this machine as for a new run)
RESUMED_OPTIONS = ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "num_classes",
                   "train_samples", "val_samples", "frames", "size", "fused", "seed")


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


def _checkpoint_payload(args, model, optimizer, scheduler, model_kwargs, class_names,
                        progress: _Progress, metrics: Optional[dict]) -> dict:
    return {
        # fused and stock models have the same state_dict: this loads into either
        "model": ckpt.plain_state_dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch,
        "epoch_sums": {"loss_sum": progress.loss_sum, "correct": progress.correct, "seen": progress.seen},
        "global_step": progress.global_step,
        "best": progress.best,
        "rng": ckpt.rng_state(),
        "model_name": args.model,
        "model_kwargs": model_kwargs,
        "class_names": class_names,
        "metrics": metrics,
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "given")},
        "c3dzoo_version": c3dzoo.__version__,
    }


def _save(path: str, payload: dict) -> None:
    try:
        ckpt.save_atomic(payload, path)
    except OSError as exc:
        raise CommandError(f"cannot write checkpoint {path}: {exc}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    checkpoint = None
    if args.resume:
        args.resume = _resume_path(args)
        checkpoint = ckpt.load(args.resume)
        _apply_resumed_options(args, checkpoint, args.given)
        if not args.out:  # a resumed run goes on writing where it was
            args.out = os.path.dirname(os.path.abspath(args.resume))
    _apply_train_defaults(args, device)
    if args.progress is None:  # bars redrawn with \r only make a mess of a log file
        args.progress = sys.stderr.isatty()
    data = dict(num_classes=args.num_classes, frames=args.frames, size=args.size, seed=args.seed)
    try:
        train_set = SyntheticVideoDataset(num_samples=args.train_samples, split="train", **data)
        val_set = SyntheticVideoDataset(num_samples=args.val_samples, split="val", **data)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if checkpoint is not None:  # before building: a mismatch is a usage error, not a shape error
        ckpt.check_matches(checkpoint, args.resume, args.model, _model_kwargs(args))
    model, model_kwargs = _build_model(args, device, train_set[0][0])

    # the loaders get their own generators, so that starting an iterator does not draw from the
    # global RNG (which dropout uses): a resumed run draws the same dropout masks
    loader_args = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                       persistent_workers=args.workers > 0)
    # drop the last partial batch (a batch of one breaks BatchNorm) unless there is only one
    drop_last = len(train_set) > args.batch_size
    batches = _EpochBatches(len(train_set), args.batch_size, drop_last, args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=batches, generator=torch.Generator().manual_seed(args.seed), **loader_args)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.batch_size, shuffle=False,
        generator=torch.Generator().manual_seed(args.seed), **loader_args)
    clips_per_epoch = len(train_loader) * args.batch_size if drop_last else len(train_set)
    optimizer = _make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(args.epochs * len(train_loader)))

    progress = _Progress()
    if checkpoint is not None:
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

    params = sum(p.numel() for p in model.parameters())
    print(f"training {args.model} ({', '.join(f'{k}={v}' for k, v in model_kwargs.items())}; "
          f"{params / 1e6:.2f} M parameters) {'fused' if args.fused else 'stock'} on {device}"
          f"{' with bf16 autocast' if args.amp else ''}: {args.epochs} epochs of {len(train_set)} "
          f"synthetic clips {args.frames}x{args.size[0]}x{args.size[1]}, batch {args.batch_size}, "
          f"{args.optimizer} lr {args.lr:g}; chance is {100 / args.num_classes:.1f} %")
    if checkpoint is not None:
        print(f"resuming from {args.resume} at epoch {progress.epoch + 1}, batch {progress.batch + 1} "
              f"(step {progress.global_step})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    last_path = os.path.join(args.out, "last.pt") if args.out else None
    metrics_path = os.path.join(args.out, "metrics.csv") if args.out else None
    append = checkpoint is not None and os.path.isfile(metrics_path) and os.path.getsize(metrics_path) > 0
    start = time.perf_counter()
    row = None
    payload = lambda metrics: _checkpoint_payload(args, model, optimizer, scheduler, model_kwargs,
                                                  train_set.class_names, progress, metrics)
    with (open(metrics_path, "a" if append else "w", newline="") if args.out
          else contextlib.nullcontext()) as metrics_file, _DeferredInterrupt() as stop:
        writer = csv.DictWriter(metrics_file, fieldnames=METRICS) if metrics_file else None
        if writer and not append:
            writer.writeheader()
        try:
            while progress.epoch < args.epochs:
                epoch = progress.epoch + 1
                epoch_start = time.perf_counter()
                batches.epoch, batches.skip = epoch, progress.batch
                with tqdm(total=clips_per_epoch, initial=progress.seen, desc=f"epoch {epoch}/{args.epochs}",
                          unit="clip", disable=not args.progress) as bar:
                    seen_before = progress.seen
                    _train_epoch(model, train_loader, optimizer, scheduler, device, args.amp, bar,
                                 progress, stop)
                clips_per_s = (progress.seen - seen_before) / (time.perf_counter() - epoch_start)
                train_loss = progress.loss_sum / max(1, progress.seen)
                train_top1 = 100.0 * progress.correct / max(1, progress.seen)
                val_loss, val_top1, val_top5 = _evaluate(model, val_loader, device, args.amp, args.progress)
                progress.epoch += 1
                progress.start_epoch()
                progress.best = max(progress.best, (val_top1, epoch))
                row = dict(epoch=epoch, lr=f"{optimizer.param_groups[0]['lr']:.6g}",
                           train_loss=f"{train_loss:.4f}", train_top1=f"{train_top1:.2f}",
                           val_loss=f"{val_loss:.4f}", val_top1=f"{val_top1:.2f}", val_top5=f"{val_top5:.2f}",
                           epoch_seconds=f"{time.perf_counter() - epoch_start:.1f}",
                           train_clips_per_s=f"{clips_per_s:.1f}")
                tqdm.write(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} top-1 {train_top1:.1f} % "
                           f"| val loss {val_loss:.4f} top-1 {val_top1:.1f} % top-5 {val_top5:.1f} % "
                           f"| {clips_per_s:.1f} clips/s")
                if writer:
                    writer.writerow(row)
                    metrics_file.flush()
                    _save(last_path, payload(row))
        except KeyboardInterrupt:
            if progress.updating:  # the weights are half-updated: keep the previous checkpoint
                note = f"not saved (mid-step); {last_path} is the previous checkpoint" if last_path \
                    else "nothing saved (no --out)"
            elif last_path:
                _save(last_path, payload(None))
                note = f"saved {last_path}; continue with --resume --out {args.out}"
            else:
                note = "nothing saved (no --out)"
            print(f"{PROG}: interrupted at epoch {progress.epoch + 1} step {progress.global_step}: {note}",
                  file=sys.stderr)
            return 130
    saved = f"; wrote metrics.csv and last.pt to {args.out}" if args.out else "; nothing saved (no --out)"
    if row is None:
        print(f"nothing to do: the checkpoint has finished all {args.epochs} epochs (raise --epochs "
              f"to train on)")
        return 0
    print(f"done in {time.perf_counter() - start:.0f} s: final val top-1 {val_top1:.1f} % top-5 "
          f"{val_top5:.1f} %, best top-1 {progress.best[0]:.1f} % (epoch {progress.best[1]}), chance "
          f"{100 / args.num_classes:.1f} %{saved}")
    return 0


# --------------------------------------------------------------------------------------------
# predict and export
# --------------------------------------------------------------------------------------------


def _load_input(path: str) -> torch.Tensor:
    """A clip ``3 × T × H × W`` from a ``.pt`` tensor file; video files need PyAV (not yet read)."""
    if not path.endswith(".pt"):
        if importlib.util.find_spec("av") is None:
            raise UsageError(f"{path}: reading video files needs PyAV (pip install av), which is "
                             f"not installed; give .pt clip tensors or --synthetic N")
        raise UsageError(f"{path}: reading video files is not supported yet; give .pt clip tensors")
    if not os.path.isfile(path):
        raise UsageError(f"input not found: {path}")
    try:
        clip = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[0] != 3:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise UsageError(f"{path}: expected a clip tensor 3 x T x H x W, got {shape}")
    return clip.float()


def _cmd_predict(args: argparse.Namespace) -> int:
    checkpoint = ckpt.load(args.checkpoint)
    if args.synthetic is None and not args.inputs:
        raise UsageError("give clip files (.pt) or --synthetic N")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    device = _resolve_device(args.device)
    model = ckpt.stock_model(checkpoint, args.checkpoint).to(device).eval()
    num_classes = checkpoint["model_kwargs"].get("num_classes")
    names = checkpoint.get("class_names") or [f"class {i}" for i in range(num_classes or 0)]
    items = []  # (label to print, clip, true class or None)
    if args.synthetic is not None:
        saved = checkpoint.get("args", {})
        try:  # the validation split the checkpoint was trained beside
            val_set = SyntheticVideoDataset(num_classes=saved["num_classes"], frames=saved["frames"],
                                            size=tuple(saved["size"]), seed=saved.get("seed", 0),
                                            num_samples=args.synthetic, split="val")
        except (KeyError, ValueError) as exc:
            raise UsageError(f"--synthetic: cannot rebuild the checkpoint's synthetic data ({exc})") from None
        items += [(f"synthetic val[{i}]", *val_set[i]) for i in range(len(val_set))]
    items += [(path, _load_input(path), None) for path in args.inputs]
    k = min(args.top_k, len(names) or args.top_k)
    with torch.no_grad():
        for label, clip, truth in items:
            try:
                probs = model(clip[None].to(device)).float().softmax(1)[0]
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"{label}: clip of shape {tuple(clip.shape)} does not fit the model: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            top = probs.topk(k)
            ranked = ", ".join(f"{names[i] if i < len(names) else i} {p:.1%}"
                               for p, i in zip(top.values.tolist(), top.indices.tolist()))
            true = f"  (true: {names[truth]})" if truth is not None else ""
            print(f"{label}: {ranked}{true}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    checkpoint = ckpt.load(args.checkpoint)
    model = ckpt.stock_model(checkpoint, args.checkpoint)  # proves it loads strictly before writing
    state = ckpt.plain_state_dict(model.state_dict())
    try:
        ckpt.save_atomic(state, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in checkpoint["model_kwargs"].items())
    print(f"wrote {args.out}: {len(state)} tensors; load with c3dzoo.get_model("
          f"{checkpoint['model_name']!r}, {kwargs}).load_state_dict(torch.load(path))")
    return 0


# --------------------------------------------------------------------------------------------
# bench: the pytest-benchmark suite of the source tree (bench/), tables, CSV and plot
# --------------------------------------------------------------------------------------------

BENCH_MODELS = ("c3d_bn", "r3d_18")  # bench/_harness.py MODELS
BENCH_MODES = {"inference": ("inference",), "training": ("train",), "both": ("inference", "train")}
BENCH_CSV = ("group", "contestant", "batch", "median_ms", "clips_per_s", "speedup", "peak_mem_bytes")


def _batch_list(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 8,16,32, got {text!r}")
    return sizes


def _bench_report(bench_dir: str):
    """bench/report.py, loaded by path (as bench/conftest.py does)."""
    spec = importlib.util.spec_from_file_location("c3dzoo_bench_report", os.path.join(bench_dir, "report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench_plot(recs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for (group, name) in dict.fromkeys((r.group, r.contestant) for r in recs):
        points = sorted((r.batch, r.clips_per_s, r.peak_mem_bytes) for r in recs
                        if (r.group, r.contestant) == (group, name))
        label = f"{group}: {name}"
        ax_tp.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        mem = [(b, m / 1e9) for b, _, m in points if m is not None]
        if mem:
            ax_mem.plot([b for b, _ in mem], [m for _, m in mem], marker="o", label=label)
    ax_tp.set(xlabel="batch", ylabel="clips/s", title="throughput")
    ax_mem.set(xlabel="batch", ylabel="GB", title="peak memory")
    if not ax_mem.lines:  # the suite records GPU memory only
        ax_mem.text(0.5, 0.5, "not recorded on this device", ha="center", va="center", transform=ax_mem.transAxes)
    ax_tp.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cmd_bench(args: argparse.Namespace) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(c3dzoo.__file__)))
    bench_dir = os.path.join(repo, "bench")
    if not os.path.isfile(os.path.join(bench_dir, "_harness.py")):
        raise UsageError("the benchmark suite ships with the source tree (bench/), which this "
                         "installation does not have: run it from a checkout")
    report = _bench_report(bench_dir)
    out = args.out or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(out, exist_ok=True)
    modes = " or ".join(f"-{m}-" for m in BENCH_MODES[args.mode])
    tests = f"test_model and {args.model}-"
    if args.layers and args.model == "c3d_bn":  # the per-layer benchmarks are C3D's layers
        tests = f"({tests} or test_layer)"
    select = f"{tests} and ({modes})"
    if args.k:
        select = f"({select}) and ({args.k})"

    benchmarks, data = [], None
    for batch in args.batch or [None]:  # None: the suite's default batch size
        suffix = "" if batch is None else f"-batch{batch}"
        json_path = os.path.join(out, f"bench{suffix}.json")
        log_path = os.path.join(out, f"pytest{suffix}.log")
        env = dict(os.environ)
        if batch is not None:
            env["C3DZOO_BENCH_BATCH"] = str(batch)  # the suite takes one batch size per session
        command = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                   "-k", select, f"--benchmark-json={json_path}"]
        print(f"running the benchmarks{'' if batch is None else f' at batch {batch}'} (log: {log_path})",
              flush=True)
        with open(log_path, "w") as log:
            done = subprocess.run(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not os.path.isfile(json_path):
            raise CommandError(f"the benchmark run exited with status {done.returncode}; see {log_path}")
        run = report.load(json_path)
        data = data or run
        benchmarks += run.get("benchmarks", [])
    data = dict(data, benchmarks=benchmarks)
    recs = report.records(data)
    if not recs:
        raise CommandError(f"no benchmark results (every selected benchmark was skipped?); see {out}")
    if len(args.batch or []) > 1:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(data, f, indent=1)

    csv_path = os.path.join(out, "bench.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BENCH_CSV)
        for batch in sorted({r.batch for r in recs}):
            at_batch = [r for r in recs if r.batch == batch]
            print(f"\n{report.headline(data, at_batch)}")  # per-group detail: report.py --groups
            for group, members in report.by_group(at_batch).items():
                ratios = report.speedups(members, report.baseline_of(members))
                for r in members:
                    ratio = ratios.get(r.contestant)
                    writer.writerow([group, r.contestant, r.batch, f"{r.median_s * 1e3:.4f}",
                                     f"{r.clips_per_s:.3f}", "" if ratio is None else f"{ratio:.4f}",
                                     "" if r.peak_mem_bytes is None else r.peak_mem_bytes])
    print(f"\nwrote {csv_path}")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is missing (pip install matplotlib)")
    else:
        _bench_plot(recs, os.path.join(out, "bench.png"))
        print(f"wrote {os.path.join(out, 'bench.png')}")
    return 0


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------


def _size(text: str) -> Tuple[int, int]:
    """``56`` or ``64x48`` (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}")
    return tuple(parts)


def _by_device(key: str) -> str:
    """Help text for an option whose default depends on the device."""
    values = {device: defaults[key] for device, defaults in TRAIN_DEFAULTS.items()}
    values = {d: "x".join(map(str, v)) if isinstance(v, tuple) else v for d, v in values.items()}
    return "default by device: " + ", ".join(f"{d} {v}" for d, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="3D-CNN video models with fused Conv3d+BN+ReLU kernels.")
    parser.add_argument("--version", action="version", version=f"{PROG} {c3dzoo.__version__}")
    # --debug is accepted before or after the command
    debug = dict(action="store_true", help="show tracebacks")
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, devices, backends and models")
    info.set_defaults(func=_cmd_info)

    check = sub.add_parser("check", help="check fused models against stock PyTorch in float64")
    check.add_argument("--models", nargs="+", metavar="NAME",
                       help="models to check (default: all; on a CPU all but the slow jester_convcolumn)")
    check.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    check.add_argument("--dtype", choices=list(DTYPES), default="float32")
    check.add_argument("--backend", choices=_backend_choices(), default="auto")
    check.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    check.add_argument("--attempts", type=int, default=3,
                       help="inputs to try before a mode fails (a ReLU tie can fail one; default 3)")
    check.set_defaults(func=_cmd_check)

    train = sub.add_parser(
        "train", help="train a zoo model on the built-in synthetic motion data set",
        description="Train a zoo model on the built-in SyntheticVideoDataset, whose classes are "
                    "defined by motion. The defaults by device are a small model that trains in a "
                    "few minutes on a CPU, and the full model on CUDA.")
    train.add_argument("--model", default="c3d_bn", choices=c3dzoo.list_models(),
                       help="zoo model (default %(default)s)")
    train.add_argument("--epochs", type=int, help=_by_device("epochs"))
    train.add_argument("--batch-size", type=int, help=_by_device("batch_size"))
    train.add_argument("--lr", type=float, default=0.02,
                       help="peak learning rate, after a short warm-up; cosine decay to 0 (default 0.02)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                       help="SGD with Nesterov momentum 0.9, or Adam (default %(default)s)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="(default %(default)s)")
    train.add_argument("--num-classes", type=int, default=10,
                       help=f"motion classes, 1 to {len(MOTIONS)} (default %(default)s)")
    train.add_argument("--train-samples", type=int, help=_by_device("train_samples"))
    train.add_argument("--val-samples", type=int, help=_by_device("val_samples"))
    train.add_argument("--frames", type=int, help="frames per clip; " + _by_device("frames"))
    train.add_argument("--size", type=_size, help="frame size, N or HxW; " + _by_device("size"))
    train.add_argument("--width-mult", type=float, help="channel multiplier; " + _by_device("width_mult"))
    train.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="run conv chains through the fused op (default) or stock PyTorch")
    train.add_argument("--backend", choices=_backend_choices(), default="auto")
    train.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on for CUDA; CUDA only)")
    train.add_argument("--workers", type=int, help="data loader workers; " + _by_device("workers"))
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data and shuffling (default 0)")
    train.add_argument("--out", metavar="DIR", help="write metrics.csv and last.pt here")
    train.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                       help="continue from checkpoint CKPT (default with --out: DIR/last.pt); "
                            "options not given again are taken from the checkpoint")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="tqdm progress bars (default: when stderr is a terminal)")
    train.set_defaults(func=_cmd_train)
    parser.train_parser = train  # main() asks it which options were given (for --resume)

    predict = sub.add_parser("predict", help="top-k classes of clips from a training checkpoint")
    predict.add_argument("--checkpoint", required=True, metavar="CKPT", help="from c3dzoo train")
    predict.add_argument("inputs", nargs="*", metavar="CLIP",
                         help=".pt files holding a clip tensor 3 x T x H x W")
    predict.add_argument("--synthetic", type=int, metavar="N",
                         help="the first N clips of the checkpoint's synthetic validation split")
    predict.add_argument("--top-k", type=int, default=5, help="(default %(default)s)")
    predict.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    predict.set_defaults(func=_cmd_predict)

    export = sub.add_parser("export", help="a training checkpoint's weights as a plain state_dict")
    export.add_argument("--checkpoint", required=True, metavar="CKPT", help="from c3dzoo train")
    export.add_argument("--out", required=True, metavar="FILE", help="the state_dict file to write")
    export.set_defaults(func=_cmd_export)

    bench = sub.add_parser("bench", help="run the benchmark suite of the source tree (bench/)",
                           description="Run bench/ (pytest-benchmark) in a subprocess; print its "
                                       "tables and write DIR/bench.json, bench.csv and bench.png.")
    bench.add_argument("--model", choices=BENCH_MODELS, default="c3d_bn", help="(default %(default)s)")
    bench.add_argument("--mode", choices=list(BENCH_MODES), default="both", help="(default %(default)s)")
    bench.add_argument("--batch", type=_batch_list, metavar="N[,N...]",
                       help="batch sizes, one session each (default: the suite's, GPU 32, CPU 2)")
    bench.add_argument("--out", metavar="DIR", help="output folder (default ./bench-out)")
    bench.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                       help="also the per-layer C3D benchmarks (c3d_bn; default on)")
    bench.add_argument("-k", metavar="EXPR", help="further pytest -k selection within the suite")
    bench.set_defaults(func=_cmd_bench)

    for command in (info, check, train, predict, export, bench):
        command.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return parser


def _given_options(argv: Sequence[str]) -> set:
    """The ``train`` options named on the command line (argparse fills in the others' defaults)."""
    parser = build_parser()
    for action in parser.train_parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func", "debug"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``c3dzoo`` command. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: info, check, train, predict, export or bench "
                             "(c3dzoo --help for details)")
        if args.command == "train":
            args.given = _given_options(argv)
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as exc:  # a bad --checkpoint/--resume is a bad argument
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
