"""Host time of fused models on the ``triton`` backend, measured on a CPU: what each eval forward and
each training step (forward + backward) costs in Python and small torch ops before the GPU sees any
work, and how many Triton kernels it launches.

The Triton kernels run under the interpreter with every launch replaced by a counter, so the time
left is the host side of a GPU step: argument checks, backend choice, launch plans, weight packing,
the small torch ops between kernels (on tiny CPU tensors here, launches of their own on a GPU).
Triton's own launch cost (its Python binder, ~10-20 µs a launch on a GPU machine) is not in it.
Tensor copies whose size grows with the model (packing big weights) are real CPU work here, so
models with large weights (the ResNets) read high; the small models below do not.

    python bench/host_time.py [--models c3d_bn,x3d_m] [--repeats 20]

When a GPU step takes less than this, the GPU waits on the host: capture the model in a CUDA graph
(README, Backends). The benchmarks' ``host_s`` / ``host_bound`` fields measure it on the GPU itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from typing import Dict, Iterator, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are interpreted

import torch  # noqa: E402

import c3dzoo  # noqa: E402

# builder arguments and clip shape (N, C, T, H, W) per model: small enough that the few real CPU
# operations stay negligible, shaped as each model takes a clip
MODELS: Dict[str, Tuple[dict, Tuple[int, ...]]] = {
    "c3d_bn": (dict(width_mult=0.125, input_size=(16, 32, 32)), (1, 3, 16, 32, 32)),
    "x3d_m": ({}, (1, 3, 4, 32, 32)),
    "x3d_xs": ({}, (1, 3, 4, 32, 32)),
    "s3d": ({}, (2, 3, 8, 32, 32)),  # two clips: its last stage has one position per clip
}


@contextlib.contextmanager
def counted_launches() -> Iterator[collections.Counter]:
    """Every interpreted Triton launch is counted by kernel name instead of run (the kernels'
    outputs stay uninitialised: only the host side is measured)."""
    from triton.runtime import interpreter

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("host_time needs the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")
    counts: collections.Counter = collections.Counter()
    original = interpreter.InterpretedFunction.run

    def count(self, *args, grid=None, warmup=False, **kwargs):
        counts[self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = count
    try:
        yield counts
    finally:
        interpreter.InterpretedFunction.run = original


@contextlib.contextmanager
def gpu_memory_policy() -> Iterator[None]:
    """Training keeps and recomputes what it would on a GPU: a stem recomputes its conv in the
    backward there (on the CPU it keeps the conv output; see ``c3dzoo.ops.keeps_conv_output``)."""
    ops = sys.modules["c3dzoo.ops.conv3d_bn_act"]
    policy = ops.keeps_conv_output
    ops.keeps_conv_output = lambda keep, norm, in_channels, needs_grad, device_type: policy(
        keep, norm, in_channels, needs_grad, "cuda")
    try:
        yield
    finally:
        ops.keeps_conv_output = policy


def build(name: str) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The fused model on the triton backend (channels_last_3d) and a random clip for it."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    model = c3dzoo.get_model(name, num_classes=10, fused=True, backend="triton", **kwargs)
    model = model.to(memory_format=torch.channels_last_3d)
    return model, torch.randn(shape).to(memory_format=torch.channels_last_3d)


def measure(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> Dict[str, dict]:
    """{"eval": ..., "train": ...}: seconds per call (median of ``repeats``) and Triton launches per
    call, by kernel, of an eval forward under no_grad and of a training forward + backward."""

    def eval_forward():
        with torch.no_grad():
            model(x)

    def train_step():  # as a training loop runs it: gradients set afresh, not accumulated
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    results = {}
    with counted_launches() as counts, gpu_memory_policy():
        for mode, call in (("eval", eval_forward), ("train", train_step)):
            model.train(mode == "train")
            for _ in range(3):  # plans, caches and backend choices are made on first calls
                call()
            counts.clear()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            times.sort()
            results[mode] = dict(seconds=times[len(times) // 2],
                                 launches={k: v // repeats for k, v in sorted(counts.items())})
    model.zero_grad(set_to_none=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="c3d_bn,x3d_m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; Triton launches stubbed (interpreter)")
    print(f"{'model':10s} {'clip':>18s} {'eval ms':>8s} {'launches':>8s} {'train ms':>9s} {'launches':>8s}")
    for name in names:
        model, x = build(name)
        r = measure(model, x, args.repeats)
        fallbacks = c3dzoo.fallbacks()
        print(f"{name:10s} {'x'.join(map(str, x.shape)):>18s} {r['eval']['seconds'] * 1e3:8.2f} "
              f"{sum(r['eval']['launches'].values()):8d} {r['train']['seconds'] * 1e3:9.2f} "
              f"{sum(r['train']['launches'].values()):8d}" + (f"  ({len(fallbacks)} fallbacks)" if fallbacks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
