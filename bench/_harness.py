"""Shared machinery of the c3dzoo benchmarks (bench/test_bench_*.py).

A benchmark is one *case* — a C3D conv → BN → ReLU (→ pool) layer at the shape it sees inside the
network, or a whole model; inference or one training step — run by one *contestant*: stock eager
PyTorch in some precision, torch.compile, or the c3dzoo fused op on one backend. All contestants of
a case run in the same session, so their ratios never mix machines or runs.

Timing: pytest-benchmark's ``pedantic`` mode with a timer that synchronises the device (``device_timer``),
so a round covers the GPU work and not only the launches. The first call (torch.compile, Triton
JIT, cuDNN autotuning) and a few warm-up calls are excluded; inputs are random (never zeros) and,
on a GPU, rotate over enough sets that they come from DRAM rather than the L2 cache.

Sizes and knobs (environment variables):
  C3DZOO_BENCH_BATCH              clips per batch (GPU 32, CPU 2)
  C3DZOO_BENCH_TIME               seconds of timed rounds per benchmark (GPU 0.3, CPU 0.25)
  C3DZOO_BENCH_COMPILE            torch.compile contestants: on by default on a GPU (0 skips them),
                                  off on CPU (1 adds them)
  C3DZOO_BENCH_AUTOTUNE=1         also torch.compile mode="max-autotune-no-cudagraphs" (minutes per graph)
  C3DZOO_BENCH_TRITON_INTERPRET=1 on CPU, the triton backend under the Triton interpreter (slow)
  C3DZOO_BENCH_BUDGET_S           time budget of the session: a benchmark that would not fit in what
                                  is left is skipped with the reason (bench/gpu_session.sh sets it)
  C3DZOO_BENCH_CUDNN_BENCHMARK    torch.backends.cudnn.benchmark (default 1: the strongest stock baseline)
  C3DZOO_BENCH_THREADS            torch threads on CPU (default 1: steady numbers on a shared machine)
  C3DZOO_BENCH_JSONL              also append every result to this file as it is measured, so a
                                  session killed by a time limit still leaves its numbers
  C3DZOO_BENCH_PREWARMED=1        recorded with the results: an untimed run filled the compile caches
                                  first, so first-call and compile times are warm-cache times
  C3DZOO_BENCH_FIRST_CALLS_JSONL  with --benchmark-disable (one untimed call per case, e.g. that
                                  warm-up), append each case's first-call seconds to this file
  C3DZOO_COMMIT                   the commit to record when the tree has no .git (a copy on a lent GPU)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import subprocess
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch._dynamo  # at module level: a local import would make `torch` local to run()
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct, stock_conv_bn_act
from c3dzoo.ops import batch_statistics

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODES = ("inference", "train")
# UCF101 and Kinetics-400, as usually trained; S3D (like R3D-18 on the CPU profile's 8 frames)
# and the ResNet-50s, R(2+1)D R50, CSN R101 and X3D-M (at R3D-18's clip size) run only when asked
# for: C3DZOO_BENCH_MODELS=s3d, or c3dzoo bench --model s3d
NUM_CLASSES = {"c3d_bn": 101, "r3d_18": 400, "s3d": 400, "slow_r50": 400, "r2plus1d_r50": 400, "slowfast_r50": 400,
               "csn_r101": 400, "x3d_m": 400}
MODELS = tuple(m.strip() for m in os.environ.get("C3DZOO_BENCH_MODELS", "c3d_bn,r3d_18").split(",") if m.strip())
_unknown = sorted(set(MODELS) - set(NUM_CLASSES))
if _unknown:
    raise ValueError(f"C3DZOO_BENCH_MODELS: unknown model(s) {', '.join(_unknown)}; "
                     f"the suite runs {', '.join(NUM_CLASSES)}")
SEED = 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# results measured in this session, in the shape of pytest-benchmark's JSON "benchmarks" entries
# (conftest.py prints them as tables at the end of the session)
RESULTS = pytest.StashKey[list]()


# --------------------------------------------------------------------------------------------
# profile: what this machine runs
# --------------------------------------------------------------------------------------------


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_flag(name: str, default: bool) -> bool:
    value = _env(name)
    return default if value is None else value.lower() not in ("0", "false", "no", "off")


def _env_number(name: str, default, cast=float):
    value = _env(name)
    return default if value is None else cast(value)


@dataclasses.dataclass(frozen=True)
class Profile:
    device: str
    batch: int
    width_mult: float  # C3D channel scale: the CPU runs a narrow C3D so the session takes minutes
    c3d_input: Tuple[int, int, int]  # frames, height, width
    r3d_input: Tuple[int, int, int]
    target_s: float  # timed seconds per benchmark
    min_rounds: int
    max_rounds: int
    min_round_s: float  # a round lasts at least this long, so one synchronisation per round is noise
    warmup_calls: int  # after the first call
    warmup_rounds: int  # pytest-benchmark warm-up rounds, after the extra input sets exist
    compile: bool
    autotune: bool
    triton_interpret: bool
    cudnn_benchmark: bool
    budget_s: Optional[float]
    cpu_threads: Optional[int]  # torch intra-op threads on CPU (None: torch's default)
    # an untimed pass filled the Triton and Inductor caches on disk first (bench/gpu_session.sh):
    # first-call and compile times are then warm-cache times
    caches_prewarmed: bool


def make_profile() -> Profile:
    common = dict(
        autotune=_env_flag("C3DZOO_BENCH_AUTOTUNE", False),
        cudnn_benchmark=_env_flag("C3DZOO_BENCH_CUDNN_BENCHMARK", True),
        budget_s=_env_number("C3DZOO_BENCH_BUDGET_S", None),
        caches_prewarmed=_env_flag("C3DZOO_BENCH_PREWARMED", False),
    )
    if CUDA:  # the real sizes: C3D at 16×112×112, batch 32 (as in baselines.md)
        return Profile(
            device="cuda", batch=_env_number("C3DZOO_BENCH_BATCH", 32, int), width_mult=1.0,
            c3d_input=(16, 112, 112), r3d_input=(16, 112, 112),
            target_s=_env_number("C3DZOO_BENCH_TIME", 0.3), min_rounds=5, max_rounds=50,
            min_round_s=0.005, warmup_calls=3, warmup_rounds=1, compile=_env_flag("C3DZOO_BENCH_COMPILE", True),
            triton_interpret=False, cpu_threads=None, **common,
        )
    # CPU: the same network shapes scaled down (C3D at width 1/8 and 16×32×32, R3D-18 at 8×32×32)
    # so that the whole session measures something real in well under three minutes on 2 cores
    return Profile(
        device="cpu", batch=_env_number("C3DZOO_BENCH_BATCH", 2, int), width_mult=0.125,
        c3d_input=(16, 32, 32), r3d_input=(8, 32, 32),
        target_s=_env_number("C3DZOO_BENCH_TIME", 0.25), min_rounds=5, max_rounds=30,
        # eager CPU code has nothing to compile or autotune: the first call is the warm-up
        min_round_s=0.0, warmup_calls=0, warmup_rounds=0, compile=_env_flag("C3DZOO_BENCH_COMPILE", False),
        triton_interpret=_env_flag("C3DZOO_BENCH_TRITON_INTERPRET", False),
        # one thread by default: on a small shared machine, OpenMP threads waiting at barriers for a
        # descheduled sibling made a small conv 25x slower (60 ms instead of 2.5 ms) and very noisy
        cpu_threads=_env_number("C3DZOO_BENCH_THREADS", 1, int), **common,
    )


PROFILE = make_profile()
_session_start = time.time()


def start_session() -> None:
    """Start the budget clock and set the global flags every contestant shares."""
    global _session_start
    _session_start = time.time()
    if CUDA:
        torch.backends.cudnn.benchmark = PROFILE.cudnn_benchmark
    elif PROFILE.cpu_threads:
        torch.set_num_threads(PROFILE.cpu_threads)


def device_timer() -> float:
    """perf_counter after the device has finished all queued work (pytest-benchmark's timer)."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


# every benchmark test carries this mark: the timer synchronises the device, and the garbage
# collector stays out of the timed rounds
BENCH_MARK = pytest.mark.benchmark(timer=device_timer, disable_gc=True)


# --------------------------------------------------------------------------------------------
# contestants
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contestant:
    name: str
    precision: str  # "fp32" (IEEE, TF32 off), "tf32", "bf16" (autocast)
    channels_last: bool = False  # model and input in torch.channels_last_3d
    compile_mode: Optional[str] = None  # torch.compile mode; None: eager
    # c3dzoo backend of the fused model ("auto": what c3d_bn(fused=True) runs); None: stock modules
    backend: Optional[str] = None
    # fused training recomputes every conv in the backward (model.keep_conv_outputs = False): the
    # least-memory setting, measured on whole-model training steps only
    recompute: bool = False
    # the triton backend times its shipped tile configs per shape and keeps the fastest
    # (c3dzoo.set_triton_autotune), measured on whole models only
    autotune: bool = False

    @property
    def compile_tier(self) -> int:
        """0 eager or fused, 1 torch.compile default, 2 max-autotune (the order in which they run)."""
        if self.compile_mode is None:
            return 0
        return 2 if "autotune" in self.compile_mode else 1


AUTOTUNE_MODE = "max-autotune-no-cudagraphs"
# reference, triton, cuda (whatever the registry knows, so a new backend is benchmarked too)
FUSED_BACKENDS = tuple(reversed(c3dzoo.ops.backends.names()))


def contestants(device: Optional[str] = None) -> List[Contestant]:
    """The contestants of a session on ``device`` (default: this machine's)."""
    c = Contestant
    if (device or PROFILE.device) == "cuda":
        return [
            c("eager-fp32", "fp32"),
            c("eager-tf32", "tf32"),
            c("eager-bf16", "bf16"),
            c("eager-bf16-cl", "bf16", True),
            c("compile-bf16-cl", "bf16", True, "default"),
            c("compile-maxat-bf16-cl", "bf16", True, AUTOTUNE_MODE),
            # what a user gets by default: each layer on the backend "auto" picks (conv1 on the
            # faster of the CUDA stem and Triton, measured on its first call)
            c("c3dzoo-auto-bf16-cl", "bf16", True, backend="auto"),
            *[c(f"c3dzoo-{b}-bf16-cl", "bf16", True, backend=b) for b in FUSED_BACKENDS],
            c("c3dzoo-triton-bf16-cl-recompute", "bf16", True, backend="triton", recompute=True),
            c("c3dzoo-triton-bf16-cl-autotune", "bf16", True, backend="triton", autotune=True),
        ]
    # CPU: fp32 only ("auto" runs CPU tensors on reference: no contestant of its own). bf16 is slow
    # there, the Triton interpreter computes it wrongly (kernels.md), and stock bf16-autocast conv3d
    # weight gradients on CPU (torch 2.13) were seen to differ between identical calls and now and
    # then to be NaN
    return [
        c("eager-fp32", "fp32"),
        c("compile-fp32", "fp32", compile_mode="default"),
        *[c(f"c3dzoo-{b}-fp32", "fp32", backend=b) for b in FUSED_BACKENDS],
        c("c3dzoo-reference-fp32-recompute", "fp32", backend="reference", recompute=True),
    ]


CONTESTANTS: Dict[str, Contestant] = {x.name: x for x in contestants()}


def baseline_for(device: str) -> str:
    """Speed-ups are against the strongest plain-PyTorch setting a user gets without compiling."""
    return "eager-bf16-cl" if device == "cuda" else "eager-fp32"


BASELINE = baseline_for(PROFILE.device)


def contestant_names() -> List[str]:
    return list(CONTESTANTS)


def run_order(kind: str, target: str, c: Contestant, baseline: str = BASELINE) -> Tuple[int, int, int]:
    """Sort key of a benchmark (kind "model" or "layer"). First what the issues' targets compare:
    C3D-BN whole (the baseline, the fused contestants, then torch.compile default) and its conv1
    layer (the eager bf16 contestants and the fused ones); then the other eager and fused
    contestants, models before layers; torch.compile on the rest; max-autotune last. A session cut
    short by its time budget (C3DZOO_BENCH_BUDGET_S) so loses the numbers least wanted."""
    fused = c.backend not in (None, "reference")
    if kind == "model" and target == "c3d_bn":
        headline = c.name == baseline or fused or c.compile_tier == 1
    elif kind == "layer" and target == "conv1":  # issues 4 and 6 compare it with stock eager bf16
        headline = (c.name == baseline or (fused and not c.autotune and not c.recompute)
                    or (c.compile_tier == 0 and c.backend is None and c.precision == "bf16"))
    else:
        headline = False
    return (0 if headline and c.compile_tier < 2 else 1, c.compile_tier, 0 if kind == "model" else 1)


def skip_reason(c: Contestant, case: Optional["Case"] = None) -> Optional[str]:
    """Why contestant ``c`` does not run in this session, or on ``case`` (None if it does)."""
    if c.recompute and case is not None and (case.kind, case.mode) != ("model", "train"):
        return "the recompute contestant is measured on whole-model training steps only"
    if c.autotune and case is not None and case.kind != "model":
        return "the autotune contestant is measured on whole models only"
    if c.compile_mode == AUTOTUNE_MODE and not PROFILE.autotune:
        return "torch.compile max-autotune takes minutes per graph: set C3DZOO_BENCH_AUTOTUNE=1"
    if c.compile_mode is not None and not PROFILE.compile:
        return ("torch.compile contestants are off by default on CPU: set C3DZOO_BENCH_COMPILE=1"
                if PROFILE.device == "cpu" else "torch.compile contestants are off (C3DZOO_BENCH_COMPILE=0)")
    if c.backend == "auto":
        states = c3dzoo.backends()
        if not any(s["available"] for name, s in states.items() if name != "reference"):
            return ("c3dzoo backend 'auto' would run everything on 'reference' here (measured as "
                    "its own contestant): " + "; ".join(f"{n}: {s['reason']}" for n, s in states.items()
                                                        if not s["available"]))
    elif c.backend is not None:
        if c.backend == "triton" and PROFILE.device == "cpu" and not PROFILE.triton_interpret:
            return ("the triton backend on CPU runs under the (slow) Triton interpreter: "
                    "set C3DZOO_BENCH_TRITON_INTERPRET=1")
        state = c3dzoo.backends()[c.backend]
        if not state["available"]:
            return f"c3dzoo backend {c.backend!r} is unavailable: {state['reason']}"
    if c.backend == "cuda" and case is not None and (case.kind == "model" or not case.first):
        # everything else would fall back to reference, measured as a contestant of its own
        return ("the cuda backend runs stem convs only (the layer that reads the clip); whole models "
                "use it through c3dzoo-auto")
    return None


def _expected_seconds(case: "Case", c: Contestant, prewarmed: Optional[bool] = None) -> float:
    """A generous guess of one benchmark's wall time, to decide whether it fits the budget.
    Compile times: a cold torch.compile of C3D-BN took 93 s (inference) and 208 s (training) in
    max-autotune on an H100 (gpu-runs.md); default mode is guessed at about half. With the caches
    filled by an untimed run first (``prewarmed``, bench/gpu_session.sh does it for the default mode
    and the triton-autotune contestant on whole models), compiling mostly reads them back: a warm
    Inductor cache cut C3D's first call from 20 s to 2.6 s on the CPU machine; a third is kept."""
    prewarmed = PROFILE.caches_prewarmed if prewarmed is None else prewarmed
    train = case.mode == "train"
    model = case.kind == "model"
    seconds = (8.0 if train else 5.0) if model else 2.0
    if c.compile_tier == 1:
        compile_s = (100.0 if train else 50.0) if model else (30.0 if train else 15.0)
        seconds += compile_s / 3 if prewarmed and model else compile_s
    elif c.compile_tier == 2:
        seconds += (240.0 if train else 120.0) if model else (120.0 if train else 60.0)
    if c.autotune:  # every candidate tile config of every conv shape is compiled, then timed
        seconds += 10.0 if prewarmed else 60.0
    return seconds


def budget_skip_reason(case: "Case", c: Contestant) -> Optional[str]:
    if PROFILE.budget_s is None:
        return None
    left = PROFILE.budget_s - (time.time() - _session_start)
    need = _expected_seconds(case, c)
    if left < need:
        # one wording for all, so that pytest -rs folds these skips into one line
        return f"not enough of the session time budget left (C3DZOO_BENCH_BUDGET_S={PROFILE.budget_s:.0f})"
    return None


@contextlib.contextmanager
def precision_flags(c: Contestant):
    """TF32 on for the tf32 contestant only. cuDNN allows TF32 convolutions by default, so "fp32"
    turns it off to measure IEEE fp32. Only the legacy flags are touched: torch refuses a mix of
    the legacy and the new (fp32_precision) TF32 APIs."""
    tf32 = c.precision == "tf32"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch warns that the legacy flags will go away
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def triton_autotuning(c: Contestant):
    """c3dzoo's Triton tile-config autotuning on for the autotune contestant only, which tunes
    afresh, so that its record lists the choices of this case alone."""
    previous = c3dzoo.set_triton_autotune(c.autotune)
    if c.autotune:
        c3dzoo.ops.backends.reset_triton_autotune()
    try:
        yield
    finally:
        c3dzoo.set_triton_autotune(previous)


def _autocast(c: Contestant):
    if c.precision == "bf16":
        return torch.autocast(DEVICE, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# cases: layers and models, with FLOPs counted from shapes
# --------------------------------------------------------------------------------------------


def _triple(v) -> Tuple[int, int, int]:
    return (v,) * 3 if isinstance(v, int) else tuple(int(i) for i in v)


class _FlopCounter:
    """2·MACs of every Conv3d and Linear, read off the shapes of a (meta-device) forward.

    A training step costs forward + input gradient + weight gradient: 3× the forward FLOPs of a
    layer, 2× where the layer's input needs no gradient (the network input). BatchNorm,
    activations, pools, the loss and the optimizer are left out (well under 1% for these models)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.per_module: Dict[nn.Module, Tuple[int, int]] = {}

    def _hook(self, module, inputs, output):
        if isinstance(module, nn.Conv3d):
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            macs = output.numel() * module.in_features
        backward_factor = 2 if inputs[0].requires_grad else 1
        self.per_module[module] = (2 * macs, 2 * macs * (1 + backward_factor))

    def run(self, x: torch.Tensor):
        handles = [m.register_forward_hook(self._hook) for m in self.model.modules()
                   if isinstance(m, (nn.Conv3d, nn.Linear))]
        try:
            with torch.enable_grad():  # requires_grad tells which layers need an input gradient
                out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return out

    @property
    def forward_flops(self) -> int:
        return sum(f for f, _ in self.per_module.values())

    @property
    def train_flops(self) -> int:
        return sum(t for _, t in self.per_module.values())


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One C3D conv → BN → ReLU (→ MaxPool3d) at the shape it sees inside the network."""

    name: str
    in_shape: Tuple[int, ...]  # N, C, D, H, W
    out_shape: Tuple[int, ...]  # after the pool, if any
    out_channels: int
    pool: Optional[Tuple[Tuple[int, int, int], ...]]  # (kernel, stride, padding)
    first: bool  # its input is the clip: fp32, and no gradient w.r.t. it in training
    forward_flops: int
    train_flops: int


def _model_kwargs(name: str) -> dict:
    kwargs = dict(num_classes=NUM_CLASSES[name])
    if name == "c3d_bn":
        kwargs.update(width_mult=PROFILE.width_mult, input_size=PROFILE.c3d_input)
    return kwargs


def model_input_shape(name: str, batch: Optional[int] = None) -> Tuple[int, ...]:
    size = PROFILE.c3d_input if name == "c3d_bn" else PROFILE.r3d_input
    return (PROFILE.batch if batch is None else batch, 3, *size)


@functools.lru_cache(maxsize=None)
def c3d_layer_specs() -> Tuple[LayerSpec, ...]:
    """conv1 … conv5b with their pools, shapes read off a meta-device forward of C3D-BN."""
    with torch.device("meta"):
        model = c3dzoo.get_model("c3d_bn", **_model_kwargs("c3d_bn"))
    model.eval()
    in_shapes, out_shapes = {}, {}

    def record(module, inputs, output):
        in_shapes.setdefault(module, tuple(inputs[0].shape))
        out_shapes[module] = tuple(output.shape)

    counter = _FlopCounter(model)
    handles = [m.register_forward_hook(record) for m in model.children() if isinstance(m, (nn.Conv3d, nn.MaxPool3d))]
    try:
        counter.run(torch.empty(model_input_shape("c3d_bn"), device="meta"))
    finally:
        for h in handles:
            h.remove()
    # C3D registers its children as conv, bn, pool per layer, so a pool belongs to the conv before it
    layers: List[dict] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Conv3d):
            fwd, train = counter.per_module[child]
            layers.append(dict(name=name, in_shape=in_shapes[child], out_shape=out_shapes[child],
                               out_channels=child.out_channels, pool=None, first=not layers,
                               forward_flops=fwd, train_flops=train))
        elif isinstance(child, nn.MaxPool3d) and layers:
            layers[-1]["pool"] = (_triple(child.kernel_size), _triple(child.stride), _triple(child.padding))
            layers[-1]["out_shape"] = out_shapes[child]
    return tuple(LayerSpec(**layer) for layer in layers)


@functools.lru_cache(maxsize=None)
def model_flops(name: str, batch: Optional[int] = None) -> Tuple[int, int]:
    """(forward, training step) FLOPs of zoo model ``name`` for one batch at the profile's size."""
    with torch.device("meta"):
        model = c3dzoo.get_model(name, **_model_kwargs(name))
    model.eval()
    counter = _FlopCounter(model)
    counter.run(torch.empty(model_input_shape(name, batch), device="meta"))
    return counter.forward_flops, counter.train_flops


class StockChain(nn.Module):
    """conv → bn → ReLU (→ pool) with stock modules. Its children are named as Conv3dBNAct's, so
    both load the same state_dict."""

    def __init__(self, in_channels: int, out_channels: int, pool=None):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm3d(out_channels)
        self.pool = nn.MaxPool3d(*pool) if pool is not None else None

    def forward(self, x):
        return stock_conv_bn_act(x, self.conv, self.bn, "relu", 0.0, self.pool)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "layer" or "model"
    target: str  # layer name or model name
    mode: str  # "inference" or "train"
    in_shape: Tuple[int, ...]
    flops: int  # per call: a forward, or a training step
    build: Callable[[Optional[str]], nn.Module]  # c3dzoo backend (None: stock) → module
    first: bool = True  # the input is the clip (fp32, no gradient)
    out_shape: Tuple[int, ...] = ()
    num_classes: int = 0

    @property
    def batch(self) -> int:
        return self.in_shape[0]

    @property
    def group(self) -> str:
        return f"{self.kind} {self.target} {self.mode}"


def layer_case(spec: LayerSpec, mode: str) -> Case:
    c_in = spec.in_shape[1]

    def build(backend):
        if backend is None:
            return StockChain(c_in, spec.out_channels, spec.pool)
        return Conv3dBNAct(c_in, spec.out_channels, 3, padding=1, pool=spec.pool, backend=backend)

    flops = spec.train_flops if mode == "train" else spec.forward_flops
    return Case("layer", spec.name, mode, spec.in_shape, flops, build, first=spec.first, out_shape=spec.out_shape)


def model_case(name: str, mode: str) -> Case:
    """Raises if the model cannot be built (the test skips with the reason)."""
    forward, train = model_flops(name)
    kwargs = _model_kwargs(name)

    def build(backend):
        return c3dzoo.get_model(name, fused=backend is not None, backend=backend, **kwargs)

    return Case("model", name, mode, model_input_shape(name), train if mode == "train" else forward,
                build, num_classes=NUM_CLASSES[name])


# --------------------------------------------------------------------------------------------
# weights, inputs, steps
# --------------------------------------------------------------------------------------------

_STATES: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
_REFERENCE_OUTPUTS: Dict[Tuple[str, str], torch.Tensor] = {}
_FP32 = Contestant("fp32-reference", "fp32")


def random_tensor(shape, seed: int, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Standard normal values rounded to bf16, so that fp32 and bf16 contestants see exactly the
    same numbers and an fp32 reference on them measures only the arithmetic's error."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=DEVICE).to(torch.bfloat16).to(dtype)
    if channels_last and t.dim() == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def seeded_state(case: Case) -> Dict[str, torch.Tensor]:
    """The weights every contestant of ``case`` loads (kept on the CPU, so cached states never
    count in a benchmark's device memory). BatchNorm gets random affine parameters and the running
    statistics of real activations, so the folded inference path computes something non-trivial."""
    key = (case.kind, case.target)
    if key not in _STATES:
        torch.manual_seed(SEED)
        with torch.device(DEVICE):
            model = case.build(None)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
        with torch.no_grad():
            for bn in bns:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
        # one training-mode pass with momentum=None (a cumulative average: over one batch, that
        # batch's statistics) sets the running statistics
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        calibration = random_tensor((min(case.batch, 4), *case.in_shape[1:]), seed=SEED + 7)
        with precision_flags(_FP32), torch.no_grad():
            model.train()(calibration)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        _STATES[key] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        del model
    return _STATES[key]


def build_model(case: Case, c: Contestant, train: bool) -> nn.Module:
    # built on the meta device (no initialisation cost), then given the seeded weights
    with torch.device("meta"):
        model = case.build(c.backend)
    model = model.to_empty(device=DEVICE)
    model.load_state_dict(seeded_state(case))
    model.train(train)
    if c.recompute:
        model.keep_conv_outputs = False
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def make_inputs(case: Case, c: Contestant, train: bool, index: int) -> tuple:
    """The arguments of one step: (x,), (x, labels) or (x, grad_out). Seeded by ``index`` so every
    contestant sees the same data."""
    # inside a bf16-autocast network the activations between layers are bf16; the clip is fp32
    low = case.kind == "layer" and not case.first and c.precision == "bf16"
    dtype = torch.bfloat16 if low else torch.float32
    x = random_tensor(case.in_shape, seed=1000 + index, dtype=dtype, channels_last=c.channels_last)
    if not train:
        return (x,)
    if case.kind == "model":
        g = torch.Generator(device=DEVICE).manual_seed(3000 + index)
        return (x, torch.randint(0, case.num_classes, (case.batch,), generator=g, device=DEVICE))
    if not case.first:  # a layer inside the network also produces the gradient of its input
        x.requires_grad_(True)
    out_dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
    grad_out = random_tensor(case.out_shape, seed=2000 + index, dtype=out_dtype, channels_last=c.channels_last)
    return (x, grad_out)


def make_step(case: Case, model: nn.Module, c: Contestant, train: bool) -> Callable:
    run = torch.compile(model, mode=c.compile_mode) if c.compile_mode else model
    if case.kind == "model" and train:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(x, labels):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(c):
                loss = F.cross_entropy(run(x), labels)
            loss.backward()
            optimizer.step()
            return loss.detach()

    elif train:  # a layer: forward and backward, the gradients returned rather than accumulated
        params = [p for p in model.parameters() if p.requires_grad]

        def step(x, grad_out):
            with _autocast(c):
                out = run(x)
            return torch.autograd.grad(out, params + [x] if x.requires_grad else params, grad_out)

    else:

        def step(x):
            with torch.no_grad(), _autocast(c):
                return run(x)

    return step


def _reference_output(case: Case) -> torch.Tensor:
    """Stock fp32 (IEEE) output of the inference case on input set 0 (cached on the CPU)."""
    key = (case.kind, case.target)
    if key not in _REFERENCE_OUTPUTS:
        with precision_flags(_FP32):
            model = build_model(case, _FP32, train=False)
            (x,) = make_inputs(case, _FP32, False, 0)
            with torch.no_grad():
                _REFERENCE_OUTPUTS[key] = model(x).float().cpu()
        del model, x
    return _REFERENCE_OUTPUTS[key]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(out.device, torch.float64)
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _all_finite(result) -> bool:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _input_bytes(args: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))


def _input_sets_needed(set_bytes: int) -> int:
    """Enough input sets that one pass over them is 3× the L2 cache (at most 32): inputs then come
    from DRAM, as they do inside a real network, instead of staying cached between rounds."""
    if not CUDA:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(2, min(32, math.ceil(3 * l2 / max(set_bytes, 1))))


def _schedule(t_call: float) -> Tuple[int, int]:
    """(rounds, iterations): rounds of back-to-back calls, each at least min_round_s long, for
    about target_s in all."""
    p = PROFILE
    iterations = max(1, math.ceil(p.min_round_s / max(t_call, 1e-9)))
    rounds = round(p.target_s / (t_call * iterations))
    return int(min(p.max_rounds, max(p.min_rounds, rounds))), int(iterations)


def _host_time(call: Callable, calls: int = 5) -> float:
    """Median seconds the host spends issuing one call (Python, dispatch, launches), each started on
    an idle device and timed until it returns, before its kernels finish. A step whose host time
    approaches its device time is bound by the CPU: CUDA graphs or torch.compile would help it."""
    times = []
    for _ in range(calls):
        device_timer()
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        del result
    device_timer()
    return sorted(times)[len(times) // 2]


def _peak_memory(call: Callable) -> Tuple[Optional[int], Optional[int]]:
    """(peak bytes allocated during one call, bytes allocated before it)."""
    if not CUDA:
        return None, None
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return int(peak), int(resident)


# --------------------------------------------------------------------------------------------
# device facts: peaks, nvml, versions
# --------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) datasheet peaks in TFLOP/s: fp32 on CUDA cores, tf32 and bf16 on tensor
# cores; matched against the device name, most specific first. "% of peak" is against these. The
# best bf16 GEMM measured on an H100 SXM reaches about 800 (baselines.md), i.e. ~81% of 989.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # the H100 SXM's compute, more memory
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
)


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name() if CUDA else None


def peak_tflops(precision: str) -> Optional[float]:
    name = gpu_name() or ""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(precision)
    return None


@functools.lru_cache(maxsize=1)
def _nvml_handle():
    """The nvml handle of the device torch uses (matched by PCI bus), or None without nvml."""
    if not CUDA:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, or no driver library
        return None
    try:  # CUDA_VISIBLE_DEVICES may renumber devices: match by PCI location
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            if (pci.bus, pci.device, pci.domain) == (props.pci_bus_id, props.pci_device_id, props.pci_domain_id):
                return handle
    except Exception:  # e.g. a torch without PCI ids in its device properties
        pass
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:
        return None


def _nvml(query: str, *args):
    handle = _nvml_handle()
    if handle is None:
        return None
    try:
        import pynvml

        value = getattr(pynvml, query)(handle, *args)
        return value.decode() if isinstance(value, bytes) else value
    except Exception:
        return None


def gpu_state() -> Optional[dict]:
    """Clocks, memory in use, temperature and power, now."""
    if not CUDA:
        return None
    try:
        import pynvml
    except ImportError:
        return {"name": gpu_name(), "nvml": "nvidia-ml-py is not installed"}
    memory = _nvml("nvmlDeviceGetMemoryInfo")
    power = _nvml("nvmlDeviceGetPowerUsage")
    reasons = _nvml("nvmlDeviceGetCurrentClocksEventReasons")
    if reasons is None:
        reasons = _nvml("nvmlDeviceGetCurrentClocksThrottleReasons")
    return {
        "name": _nvml("nvmlDeviceGetName") or gpu_name(),
        "driver": _driver_version(),
        "sm_clock_mhz": _nvml("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _nvml("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM),
        "max_sm_clock_mhz": _nvml("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_SM),
        "memory_used_bytes": None if memory is None else int(memory.used),
        "memory_total_bytes": None if memory is None else int(memory.total),
        "temperature_c": _nvml("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU),
        "power_w": None if power is None else power / 1000.0,
        # nvml bit mask: 0x1 idle; 0x4 power cap, 0x8/0x40 hardware slowdown/thermal, 0x20
        # software thermal, 0x80 power brake: any of those during a benchmark means throttled
        "clock_event_reasons": reasons,
    }


def gpu_state_under_load(call: Callable, t_call: float, busy_s: float = 0.05) -> Optional[dict]:
    """``gpu_state()`` read while the device runs queued calls (about ``busy_s`` of them, untimed),
    as it does during the timed rounds: read after them, an idle GPU may already report lower clocks."""
    if not CUDA:
        return None
    device_timer()
    for _ in range(max(1, math.ceil(busy_s / max(t_call, 1e-6)))):
        result = call()
    state = gpu_state()
    del result
    device_timer()
    return state


def _driver_version() -> Optional[str]:
    try:
        import pynvml

        if _nvml_handle() is None:
            return None
        value = pynvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else value
    except Exception:
        return None


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """HEAD and whether the tracked files differ from it; C3DZOO_COMMIT where there is no .git."""
    def git(*args):
        # --no-optional-locks: a read must never write the index
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        sha = git("rev-parse", "HEAD")
        if sha:
            changes = git("status", "--porcelain", "--untracked-files=no")
            return {"id": sha, "dirty": None if changes is None else bool(changes), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    env = _env("C3DZOO_COMMIT")
    return {"id": env or "unknown", "dirty": None, "source": "C3DZOO_COMMIT" if env else None}


def session_info() -> dict:
    """Machine-level facts for the JSON's machine_info: GPU, driver, versions, commit, settings."""
    info = {
        "gpu_name": gpu_name(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "c3dzoo": c3dzoo.__version__,
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "nvidia_ml_py": _dist_version("nvidia-ml-py"),
        "c3dzoo_commit": git_commit(),
        "c3dzoo_backends": {n: ("available" if s["available"] else s["reason"]) for n, s in c3dzoo.backends().items()},
        # which BatchNorm statistics finalize / running update the fused training contestants ran
        "c3dzoo_batch_statistics": batch_statistics.implementation(torch.empty(0, device=DEVICE)),
        "c3dzoo_bench": {
            **dataclasses.asdict(PROFILE),
            "baseline": BASELINE,
            "peak_tflops": {p: peak_tflops(p) for p in ("fp32", "tf32", "bf16")},
            "peak_source": "datasheet dense peaks (bench/_harness.py GPU_PEAK_TFLOPS)",
            "flops": "2 x MACs of Conv3d and Linear; training step = forward + input grad + weight grad",
        },
    }
    if CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        state = gpu_state() or {}
        info["gpu"] = {
            "name": gpu_name(),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "count": torch.cuda.device_count(),
            **{k: state.get(k) for k in ("driver", "max_sm_clock_mhz", "memory_total_bytes")},
        }
        limit_mw = _nvml("nvmlDeviceGetPowerManagementLimit")
        info["gpu"]["power_limit_w"] = None if limit_mw is None else limit_mw / 1000.0
    return info


def describe_profile() -> str:
    p = PROFILE
    return (f"device={p.device} ({gpu_name() or 'cpu'}), batch={p.batch}, C3D width x{p.width_mult} at "
            f"{'x'.join(map(str, p.c3d_input))}, R3D-18 at {'x'.join(map(str, p.r3d_input))}, "
            f"baseline={BASELINE}, compile={p.compile}, autotune={p.autotune}, budget_s={p.budget_s}"
            + (f", cpu_threads={p.cpu_threads}" if p.device == "cpu" else ""))


# --------------------------------------------------------------------------------------------
# one benchmark
# --------------------------------------------------------------------------------------------


def _record(config, benchmark, median: float) -> None:
    entry = {"group": benchmark.group, "name": benchmark.name, "stats": {"median": median},
             "extra_info": dict(benchmark.extra_info)}
    config.stash.setdefault(RESULTS, []).append(entry)
    _append_jsonl("C3DZOO_BENCH_JSONL", entry)


def _record_first_call(case: Case, c: Contestant, seconds: float) -> None:
    """Cold first-call (compile) times of an untimed run, kept apart from the timed results."""
    _append_jsonl("C3DZOO_BENCH_FIRST_CALLS_JSONL", {"group": case.group, "contestant": c.name,
                                                     "first_call_s": seconds,
                                                     "caches_prewarmed": PROFILE.caches_prewarmed})


def _append_jsonl(env_var: str, entry: dict) -> None:
    """One JSON line appended to the file ``$env_var`` names, if it names one."""
    path = _env(env_var)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def run(benchmark, request, case: Case, c: Contestant) -> None:
    """Measure ``c`` on ``case`` and fill ``benchmark.extra_info``; skips with the reason when the
    contestant is unavailable or the session budget is spent."""
    reason = skip_reason(c, case) or budget_skip_reason(case, c)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.group
    train = case.mode == "train"
    model = step = sets = result = cycle = None
    try:
        with precision_flags(c), triton_autotuning(c), warnings.catch_warnings():
            # an explicitly requested backend that falls back warns; c3dzoo.fallbacks() has the reasons
            warnings.filterwarnings("ignore", message="c3dzoo: backend", category=RuntimeWarning)
            c3dzoo.ops.backends.clear_fallbacks()
            if c.compile_mode:
                torch._dynamo.reset()  # a fresh cache: no recompile limit carried over from other cases
            model = build_model(case, c, train)
            step = make_step(case, model, c, train)
            sets = [make_inputs(case, c, train, 0)]
            if benchmark.disabled:  # --benchmark-disable: the fixture makes one call (a smoke test, a warm-up)
                t0 = device_timer()
                benchmark.pedantic(step, args=sets[0])
                _record_first_call(case, c, device_timer() - t0)
                return

            # the first call compiles (torch.compile, Triton JIT) and autotunes (cuDNN): timed apart
            t0 = device_timer()
            result = step(*sets[0])
            first_call_s = device_timer() - t0
            t_call = first_call_s  # re-estimated on the last warm-up call, when there is one
            for _ in range(PROFILE.warmup_calls):
                t0 = device_timer()
                result = step(*sets[0])
                t_call = device_timer() - t0
            if not _all_finite(result):
                raise AssertionError(f"{c.name} on {case.group}: non-finite output")
            rel_err = None if train else _rel_err(result, _reference_output(case))
            result = None
            host_s = _host_time(lambda: step(*sets[0])) if CUDA else None  # on CPU: the wall time
            peak, resident = _peak_memory(lambda: step(*sets[0]))

            sets += [make_inputs(case, c, train, i) for i in range(1, _input_sets_needed(_input_bytes(sets[0])))]
            cycle = itertools.cycle(sets)

            def target():
                return step(*next(cycle))

            rounds, iterations = _schedule(t_call)
            benchmark.pedantic(target, rounds=rounds, iterations=iterations,
                               warmup_rounds=PROFILE.warmup_rounds)
            gpu = gpu_state_under_load(target, t_call)

        median = benchmark.stats.stats.median
        peak_t = peak_tflops(c.precision) if CUDA else None
        tflops = case.flops / median / 1e12
        benchmark.extra_info.update(
            kind=case.kind, target=case.target, mode=case.mode, contestant=c.name, baseline=BASELINE,
            device=DEVICE, batch=case.batch, input_shape=list(case.in_shape), precision=c.precision,
            channels_last=c.channels_last, compile_mode=c.compile_mode, backend=c.backend,
            keep_conv_outputs=False if c.recompute else None,
            flops_per_call=case.flops, gflop_per_clip=case.flops / case.batch / 1e9,
            median_s=median, clips_per_s=case.batch / median, tflops=tflops, peak_tflops=peak_t,
            pct_peak=None if peak_t is None else 100.0 * tflops / peak_t,
            peak_mem_bytes=peak, resident_mem_bytes=resident,
            first_call_s=first_call_s, compile_s=first_call_s if c.compile_mode else None,
            caches_prewarmed=PROFILE.caches_prewarmed,
            host_s=host_s, host_bound=None if not CUDA else host_s > 0.9 * median,
            rel_err_vs_fp32=rel_err, fallbacks=sorted(set(c3dzoo.fallbacks().values())),
            triton_autotune=c3dzoo.ops.backends.triton_autotune_timings() if c.autotune else None,
            auto_choices=c3dzoo.ops.backends.tuning(),  # which backend "auto" measured faster, where several could run
            rounds=rounds, iterations=iterations, input_sets=len(sets), gpu=gpu,
        )
        _record(request.config, benchmark, median)
    except BaseException as exc:
        # pytest keeps a failure's traceback (sys.last_traceback) until the next one: its frames'
        # locals (a model, activations) would stay allocated and count in the next cases' memory
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        # drop every reference to the model and the inputs (target() reaches them through the
        # cycle) so that the device memory can go back before the next benchmark
        model = step = sets = result = cycle = None
        if c.compile_mode:
            torch._dynamo.reset()  # drop the compiled graphs and the module they hold
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
