"""``c3dzoo check``: fused models against stock PyTorch, both measured against float64."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import c3dzoo
from c3dzoo.testing import FLOOR, PARITY_FACTOR

from ._common import UsageError, backend_arg, backend_choices, resolve_device, set_mode


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
    "r2plus1d_34": CheckSpec({}, (2, 32, 32)),
    # near its smallest input (5 × 17 × 17, c3dzoo.models.separable_inception.MIN_INPUT): the last Inception
    # blocks keep 1 × 1 × 2 positions per clip, and a batch of 4 gives their BatchNorms 8 values.
    # 8 frames, not 5-7: torch 2.13's CPU conv3d (oneDNN) returns a garbage weight gradient, or
    # crashes, for the stem's 7×1×1 stride-2 conv on 5-7 frames in batches over 1
    "s3d": CheckSpec({}, (8, 17, 33), batch=4),
    # 4 frames of 32 × 32 (2 after I3D's and C2D's temporal pool) leave stage 4's BatchNorms
    # 1 × 1 positions a frame; a batch of 4 gives them 16 values (8)
    "slow_r50": CheckSpec({}, (4, 32, 32), batch=4),
    "i3d_r50": CheckSpec({}, (4, 32, 32), batch=4),
    "c2d_r50": CheckSpec({}, (4, 32, 32), batch=4),
    # CSN strides time too: 8 frames of 64 × 64 leave stage 4's BatchNorms 1 × 2 × 2 positions a
    # clip (16 values in a batch of 4); its 101 layers' float64 depthwise convs are slow on a CPU,
    # so there only when named
    "csn_r101": CheckSpec({}, (8, 64, 64), batch=4, on_cpu=False),
    # R(2+1)D R50 strides space in every stage (its stem has no max-pool) and time in stages 3-4:
    # 4 frames of 64 × 64 leave stage 4's BatchNorms 1 × 2 × 2 positions a clip (16 values in a
    # batch of 4); slow_r50 stands for it on a CPU
    "r2plus1d_r50": CheckSpec({}, (4, 64, 64), batch=4, on_cpu=False),
    # 8 frames for the fast pathway (a multiple of its alpha, 4), 2 for the slow one; about 20 s
    # on a 2-core CPU, so there only when named
    "slowfast_r50": CheckSpec({}, (8, 32, 32), batch=4, on_cpu=False),
    "slowfast_r101": CheckSpec({}, (8, 32, 32), batch=4, on_cpu=False),
    "slowfast_16x8_r101_50_50": CheckSpec({}, (8, 32, 32), batch=4, on_cpu=False),
    # X3D strides space by 32, not time: 4 frames of 64 × 64 leave stage 4's BatchNorms 4 × 2 × 2
    # positions a clip (64 values in a batch of 4). X3D-XS (about 10 s on a 2-core CPU) stands for
    # -S and -M, which have its blocks (only their head pools differ), and those and X3D-L (55
    # blocks) run only when named
    "x3d_xs": CheckSpec({}, (4, 64, 64), batch=4),
    **{name: CheckSpec({}, (4, 64, 64), batch=4, on_cpu=False) for name in ("x3d_s", "x3d_m", "x3d_l")},
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
                set_mode(model, mode)
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
    device = resolve_device(args.device)
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
            model_rows = check_model(name, device, dtype, backend_arg(args.backend),
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


def add_parser(sub) -> argparse.ArgumentParser:
    check = sub.add_parser("check", help="check fused models against stock PyTorch in float64")
    check.add_argument("--models", nargs="+", metavar="NAME",
                       help="models to check (default: all; on a CPU all but the slow jester_convcolumn)")
    check.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    check.add_argument("--dtype", choices=list(DTYPES), default="float32")
    check.add_argument("--backend", choices=backend_choices(), default="auto")
    check.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    check.add_argument("--attempts", type=int, default=3,
                       help="inputs to try before a mode fails (a ReLU tie can fail one; default 3)")
    check.set_defaults(func=_cmd_check)
    return check
