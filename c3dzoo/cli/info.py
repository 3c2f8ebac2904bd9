"""``c3dzoo info``: versions, devices, backends and models."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform

import torch

import c3dzoo
from c3dzoo import weights as published_weights


# optional features: (what they give, {module: the pip package that provides it})
OPTIONAL_FEATURES = (
    ("video files", {"av": "av"}),
    ("frame folders", {"PIL": "pillow"}),
    ("ONNX export", {"onnx": "onnx", "onnxscript": "onnxscript"}),
    ("ONNX Runtime check of exports", {"onnxruntime": "onnxruntime"}),
    ("plots (PNG)", {"matplotlib": "matplotlib"}),
    ("linear-probe --classifier svm", {"sklearn": "scikit-learn"}),
    ("train --tensorboard", {"tensorboard": "tensorboard"}),
    ("GPU clocks and memory in benchmarks", {"pynvml": "nvidia-ml-py"}),
)


def _optional_features():
    """(feature, pip packages missing for it) for each optional feature."""
    return [(feature, [package for module, package in modules.items() if importlib.util.find_spec(module) is None])
            for feature, modules in OPTIONAL_FEATURES]


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
    print("models (published weights: --checkpoint/--pretrained MODEL:WEIGHTS, downloaded once):")
    width = max(map(len, c3dzoo.list_models())) + 1  # the weights in one column
    for name in c3dzoo.list_models():
        try:
            getattr(c3dzoo.models, name)
            note = ", ".join(f"{name}:{w}" for _, w in published_weights.available(name))
        except ImportError as exc:
            note = f"(not available: {exc})"
        print(f"  {name:<{width}} {note}".rstrip())
    print("optional features:")
    for feature, missing in _optional_features():
        state = "yes" if not missing else f"no (pip install {' '.join(missing)})"
        print(f"  {feature:<37} {state}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    info = sub.add_parser("info", help="versions, devices, backends and models")
    info.set_defaults(func=_cmd_info)
    return info
