"""Backend registry: which implementation runs a fused call, and why.

This module is the only place in c3dzoo that chooses a backend. The order of choice is:
the explicit ``backend=`` argument, then the ``C3DZOO_BACKEND`` environment variable, then the
best available backend. A backend that is unavailable, or that cannot run one configuration,
falls back to ``reference``; the reason is kept (``fallbacks()``) and warned about once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

ENV_VAR = "C3DZOO_BACKEND"
AUTOTUNE_ENV_VAR = "C3DZOO_AUTOTUNE"  # "0": "auto" measures no contenders, preference order decides
# Best first: "auto" takes the first available backend that supports the configuration.
PREFERENCE = ("cuda", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class ConvBNActConfig:
    """Everything about a fused call that decides whether a backend can run it."""

    # "batch" (batch statistics), "running" (folded running statistics), "none", or "stats" (the conv
    # output itself, raw, with its batch statistics: the next layer normalises it, see InputNorm)
    norm: str
    activation: str  # "none", "relu", "leaky_relu" or "silu"
    stride: Tuple[int, int, int]
    padding: Tuple[int, int, int]
    dilation: Tuple[int, int, int]
    kernel_size: Tuple[int, int, int]
    pool: Tuple[int, ...]  # () or kernel(3) + stride(3) + padding(3)
    dtype: str  # e.g. "torch.bfloat16"
    device: str  # device type: "cpu", "cuda"
    in_channels: int
    out_channels: int
    input_norm: bool = False  # x is a raw conv output to normalise + activate on load (InputNorm)
    residual: bool = False  # a tensor of the output's shape is added before the activation (inference)
    groups: int = 1  # the conv's groups (in_channels when depthwise)


@dataclasses.dataclass(frozen=True)
class LayerParams:
    """What a fused call computes, besides its tensors: the ``params`` of every backend's forward
    and backward (see ``c3dzoo.ops.reference``)."""

    norm: str  # as ConvBNActConfig.norm
    eps: float
    stride: Tuple[int, int, int]
    padding: Tuple[int, int, int]
    dilation: Tuple[int, int, int]
    activation: str
    negative_slope: float
    pool: Tuple[int, ...]  # () or kernel(3) + stride(3) + padding(3)

    def __post_init__(self):
        if self.norm == "stats" and (self.activation != "none" or self.pool):
            # "stats" returns the raw conv output: the next layer normalises and activates it
            raise ValueError(f"norm 'stats' takes activation 'none' and no pool, got {self.activation!r} "
                             f"and pool {self.pool!r}")

    @classmethod
    def of(cls, norm, eps, stride, padding, dilation, activation, negative_slope, pool) -> "LayerParams":
        """From the custom ops' plain arguments (lists become tuples, numbers Python numbers; a pool
        of None is no pool)."""
        return cls(str(norm), float(eps), tuple(map(int, stride)), tuple(map(int, padding)),
                   tuple(map(int, dilation)), str(activation), float(negative_slope), tuple(map(int, pool or ())))

    def geometry(self) -> Dict[str, Tuple[int, int, int]]:
        """stride / padding / dilation as keywords."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


class InputNorm(NamedTuple):
    """A training-mode BatchNorm + activation of the PREVIOUS layer, deferred into this layer's input
    (prologue fusion): the conv reads ``activation(batch_norm(x))`` where x is the previous conv's raw
    output and ``stats`` its per-channel [4, C_in] rows (batch mean, biased batch var, γ, β) in the
    statistics dtype (fp32; fp64 for fp64).

    The batch statistics must be those of x itself: the gradient a backend returns for x is then the
    total derivative through the statistics (BatchNorm's full backward), and the gradient for
    ``stats`` has zero mean/var rows and γ/β's gradients in rows 2 and 3."""

    stats: "object"  # torch.Tensor (kept untyped: this module does not import torch)
    eps: float
    activation: str
    negative_slope: float


@dataclasses.dataclass
class Backend:
    """One implementation of the fused ops.

    ``probe`` returns None when the backend can run at all, else the reason it cannot;
    ``supports`` returns None when it can run a configuration, else the reason.
    ``forward``/``backward`` have the signatures of ``c3dzoo.ops.reference``'s functions; a backend
    whose ``supports`` accepts ``cfg.input_norm`` also provides ``normalize_input`` and
    ``input_norm_backward`` (see ``InputNorm``) and a forward that takes ``input_norm=``; one whose
    ``input_norm_backward`` can read the op's normalised input instead of recomputing it takes it as
    ``normalized=`` and says for which activations with
    ``input_norm_backward_reads_normalized(activation, negative_slope)`` (without it, or where it says
    no, the op frees that tensor first: it is a whole activation). A forward that returns a
    non-empty pool argmax (its fifth result) says when with ``keeps_pool_argmax`` (see
    ``reference.keeps_pool_argmax``): the op's fake implementation asks it; without one, none.
    """

    name: str
    probe: Callable[[], Optional[str]]
    supports: Callable[[ConvBNActConfig], Optional[str]]
    load: Callable[[], object]  # returns an object with forward() and backward()
    # device types on which "auto" may pick this backend (None: all). The Triton interpreter runs
    # on CPU when asked for by name, but is far too slow to be chosen automatically.
    auto_devices: Optional[Tuple[str, ...]] = None
    # why it cannot take tensors of a device type right now (None: it can): checked on every run
    # of the custom ops, which carry the backend chosen when they were traced (see runnable_on)
    device_reason: Callable[[str], Optional[str]] = lambda device_type: None


_REGISTRY: Dict[str, Backend] = {}
_FALLBACKS: Dict[Tuple[str, ConvBNActConfig], str] = {}
_FALLBACK_LIMIT = 256
_lock = threading.Lock()
_probe_cache: Dict[str, Optional[str]] = {}


# resolve()'s answers. An eager fused call resolves on every call (~10 µs of probes and checks); the
# answer is a function of the request, the configuration, the environment variables below, the
# registry and the measurements of several contenders, so it is kept per value of all of them, and
# register(), set_timer() and clear_fallbacks() (which must see fallbacks recorded again) forget it.
_CHOICE_ENV_VARS = (ENV_VAR, "TRITON_INTERPRET", AUTOTUNE_ENV_VAR)  # read by the choice and the probes
_RESOLVED: Dict[tuple, str] = {}
_RESOLVED_LIMIT = 4096
_generation = 0  # counts the times resolve's answers were forgotten (see choice_state)


def _forget_resolved() -> None:
    global _generation
    with _lock:
        _RESOLVED.clear()
        _generation += 1


def choice_state() -> tuple:
    """Everything besides the request and the configuration that ``resolve``'s answer depends on:
    the environment variables it and the probes read, the deterministic flag, the registry, the
    preference order, and a count of the times its answers were forgotten (``register``,
    ``set_timer``, ``clear_fallbacks``). Equal states give equal answers to equal questions, so a
    caller may keep an answer under it (``c3dzoo.ops.conv3d_bn_act``'s inference plans)."""
    return (tuple(map(os.environ.get, _CHOICE_ENV_VARS)), _deterministic(), id(_REGISTRY), PREFERENCE, _generation)


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _probe_cache.pop(backend.name, None)
    _forget_resolved()


def names() -> Tuple[str, ...]:
    return tuple(n for n in PREFERENCE if n in _REGISTRY) + tuple(
        n for n in _REGISTRY if n not in PREFERENCE
    )


def _unavailable_reason(name: str) -> Optional[str]:
    # The interpreter switch can change between calls (tests toggle it), so triton is probed each time.
    if name not in _probe_cache or name == "triton":
        try:
            _probe_cache[name] = _REGISTRY[name].probe()
        except Exception as exc:  # a probe must never take the package down
            _probe_cache[name] = f"probe failed: {type(exc).__name__}: {exc}"
    return _probe_cache[name]


def backends() -> Dict[str, Dict[str, object]]:
    """Each backend's availability and, when unavailable, why.

    Returns ``{name: {"available": bool, "reason": str | None}}`` in order of preference.
    """
    out = {}
    for name in names():
        reason = _unavailable_reason(name)
        out[name] = {"available": reason is None, "reason": reason}
    return out


def fallbacks() -> Dict[str, str]:
    """Configurations that asked for a backend but ran on ``reference``, with the reason."""
    with _lock:
        return {f"{name}: {cfg}": reason for (name, cfg), reason in _FALLBACKS.items()}


def clear_fallbacks() -> None:
    with _lock:
        _FALLBACKS.clear()
    _forget_resolved()  # (answers kept elsewhere too, which must record their fallbacks again)


def set_triton_autotune(enabled: bool) -> bool:
    """Let the triton backend time its shipped tile configurations on the first GPU launch of each
    shape and keep the fastest, like ``torch.backends.cudnn.benchmark`` (``C3DZOO_TRITON_AUTOTUNE=1`` in the
    environment at start does the same). Off by default: a per-shape rule picks the configuration.
    The first call per shape then compiles every candidate and synchronises once; warm up before
    capturing a CUDA graph. Returns the previous setting."""
    from c3dzoo.kernels import _autotune  # needs torch only: works without triton too

    previous = _autotune.enabled()
    _autotune.set_enabled(enabled)
    return previous


def reset_triton_autotune() -> None:
    """Forget the tile configurations tuned so far: the next launch of each shape tunes again
    (after a change of GPU clocks or power limit, say, or to see one workload's own choices)."""
    from c3dzoo.kernels import _autotune

    _autotune.clear()


def triton_autotune_timings() -> Dict[str, Dict[str, float]]:
    """What autotuning measured: {"<kernel> <shape key>": {tile config: ms per launch}}."""
    from c3dzoo.kernels import _autotune

    return _autotune.timings()


def requested_backend(backend: Optional[str]) -> str:
    """The backend the caller asked for: argument, then environment, then "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "") or "auto"
    name = name.strip().lower()
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(
            f"unknown c3dzoo backend {name!r} (from "
            f"{'the backend argument' if backend is not None else ENV_VAR}); "
            f"choose one of {('auto',) + names()}"
        )
    return name


def _record_fallback(requested: str, cfg: ConvBNActConfig, reason: str, warn: bool) -> None:
    key = (requested, cfg)
    with _lock:
        if key in _FALLBACKS:
            return
        if len(_FALLBACKS) >= _FALLBACK_LIMIT:
            _FALLBACKS.pop(next(iter(_FALLBACKS)))
        _FALLBACKS[key] = reason
    if warn:  # only an explicit request deserves a warning; "auto" just records why
        warnings.warn(
        f"c3dzoo: backend {requested!r} cannot run this call, using 'reference': {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


def record_runtime_fallback(backend: str, reason: str) -> None:
    """A backend found, while running a call, that it cannot run it (a tensor beyond its kernels'
    int32 index range, say) and ran it with ``reference``: recorded in ``fallbacks()`` and warned
    about once per reason."""
    _record_fallback(backend, f"<at run time> {reason}", reason, warn=True)  # type: ignore[arg-type]


def resolve(backend: Optional[str], cfg: ConvBNActConfig) -> str:
    """Name of the backend that will run ``cfg``.

    "auto" takes the first backend in preference order that can run ``cfg``; where several
    non-reference backends can (C3D's conv1: the CUDA stem kernel and the Triton kernel), the faster
    one, measured once per configuration (see ``set_timer``) when a timer is set and may run now."""
    return resolution(backend, cfg)[0]


def resolution(backend: Optional[str], cfg: ConvBNActConfig) -> Tuple[str, bool]:
    """(``resolve``'s answer, whether it is final: the same ``choice_state()`` will give it again;
    not final while "auto" waits to measure several contenders)."""
    key = (backend, choice_state(), cfg)
    name = _RESOLVED.get(key)
    if name is not None:
        return name, True
    name, final = _resolve(backend, cfg)
    if final:  # not a stand-in for a measurement that could not run now
        with _lock:
            if len(_RESOLVED) >= _RESOLVED_LIMIT:
                _RESOLVED.clear()
            _RESOLVED[key] = name
    return name, final


def _resolve(backend: Optional[str], cfg: ConvBNActConfig) -> Tuple[str, bool]:
    """(resolve's answer, whether it is final: False when "auto" fell back to preference order only
    because measuring was not allowed at that moment)."""
    requested = requested_backend(backend)
    candidates = names() if requested == "auto" else (requested,)
    runnable, declined = [], []
    for name in candidates:
        auto_devices = _REGISTRY[name].auto_devices
        if requested == "auto" and auto_devices is not None and cfg.device not in auto_devices:
            continue
        unavailable = _unavailable_reason(name)
        reason = unavailable if unavailable is not None else _REGISTRY[name].supports(cfg)
        if reason is None:
            runnable.append(name)
            if requested != "auto":
                break
            continue
        if requested != "auto":
            _record_fallback(name, cfg, reason, warn=True)
        elif unavailable is None:  # available but not for this configuration
            declined.append((name, reason))
    contenders = [name for name in runnable if name != "reference"]
    if len(contenders) > 1:
        return _fastest(contenders, cfg)
    chosen = runnable[0] if runnable else "reference"
    if chosen == "reference":  # "auto" fell back: say why each available GPU backend declined
        for name, reason in declined:
            _record_fallback(name, cfg, reason, warn=False)
    return chosen, True


# --------------------------------------------------------------------------------------------
# "auto" between several capable backends: measured, once per configuration
# --------------------------------------------------------------------------------------------

_timer: Optional[Callable[[str, ConvBNActConfig], float]] = None
_can_measure: Callable[[], bool] = lambda: True
_TUNED: Dict[ConvBNActConfig, Dict[str, float]] = {}


def set_timer(timer: Optional[Callable[[str, ConvBNActConfig], float]],
              can_measure: Callable[[], bool] = lambda: True) -> None:
    """Install how "auto" measures a backend on a configuration: ``timer(name, cfg)`` returns the
    time of one forward (any unit; inf if it failed); ``can_measure()`` says whether measuring is
    allowed right now (not while a CUDA graph is being captured, say). Clears earlier results."""
    global _timer, _can_measure
    _timer, _can_measure = timer, can_measure
    with _lock:
        _TUNED.clear()
    _forget_resolved()


def tuning() -> Dict[str, Dict[str, float]]:
    """The measurements "auto" chose by: ``{configuration: {backend: time}}``."""
    with _lock:
        return {str(cfg): dict(times) for cfg, times in _TUNED.items()}


def _deterministic() -> bool:
    from c3dzoo.kernels import _autotune  # needs torch only: works without triton too

    return _autotune.deterministic_requested()


def _fastest(contenders, cfg: ConvBNActConfig) -> Tuple[str, bool]:
    """(the fastest contender, whether that is final: see ``_resolve``). Preference order while the
    user asks for deterministic algorithms: a timing differs between runs, and the backends' results
    differ in their last bits, so a measured choice would not repeat."""
    if _deterministic():
        return contenders[0], True
    with _lock:
        times = _TUNED.get(cfg)
    if times is None:
        if _timer is None or os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() == "0":
            return contenders[0], True  # preference order
        if not _can_measure():
            return contenders[0], False  # for now; measured on a later call
        times = {name: float(_timer(name, cfg)) for name in contenders}
        with _lock:
            _TUNED[cfg] = times
    return min(contenders, key=lambda name: (times.get(name, float("inf")), contenders.index(name))), True


def runnable_on(name: str, device_type: str) -> str:
    """``name`` if that backend can take tensors of ``device_type``, else "reference" (recorded in
    ``fallbacks()`` and warned about once). The custom ops run the backend chosen when they were
    called or traced: a program exported (``torch.export``) on a GPU machine and run on CPU tensors
    gets a correct answer from stock ops instead of a kernel launched on the wrong device."""
    if name == "reference":
        return name
    reason = _REGISTRY[name].device_reason(device_type)
    if reason is None:
        return name
    record_runtime_fallback(name, f"{reason} (the backend was chosen when the call was traced or exported)")
    return "reference"


def get(name: str):
    """The loaded implementation object of backend ``name``."""
    return _REGISTRY[name].load()
