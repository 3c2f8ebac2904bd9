"""``c3dzoo info``: versions, devices, backends and models."""

from __future__ import annotations

import argparse
import importlib
import os
import platform

import torch

import c3dzoo


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


def add_parser(sub) -> argparse.ArgumentParser:
    info = sub.add_parser("info", help="versions, devices, backends and models")
    info.set_defaults(func=_cmd_info)
    return info
