"""csrc/*.cu compiles for sm_90 (H100/H200) without a GPU, and no kernel spills registers.

``nvcc -arch=sm_90 -c -Xptxas -v`` prints, per kernel, its registers and spill bytes; a spill is a
performance bug that can be seen on a CPU-only machine. Skipped (with the reason) without nvcc.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from ptx import atomics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu")) if os.path.isdir(CSRC) else []

pytestmark = [
    pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (needs the CUDA toolkit)"),
    pytest.mark.skipif(not CU_FILES, reason="no csrc/*.cu sources"),
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_report(path, tmp_path):
    obj = tmp_path / (os.path.basename(path) + ".o")
    proc = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-c", path, "-o", str(obj), "-Xptxas", "-v", f"-I{CSRC}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"nvcc failed on {path}:\n{proc.stderr[-4000:]}"
    kernels, current = {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = {"arch": m.group(2)}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels, proc.stdout + proc.stderr


@pytest.mark.parametrize("source", CU_FILES)
def test_compiles_for_sm90_without_spills(source, tmp_path):
    kernels, log = _ptxas_report(os.path.join(CSRC, source), tmp_path)
    assert kernels, f"ptxas reported no kernels for {source}:\n{log[-2000:]}"
    for name, info in kernels.items():
        assert info["arch"] == "sm_90", (name, info)
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, (
            f"{name} spills registers: {info}\n{log[-3000:]}"
        )
        assert info.get("registers", 0) <= 255, (name, info)


@pytest.mark.parametrize("source", CU_FILES)
def test_no_atomics(source, tmp_path):
    """Sums are reduced in a fixed order, so a run repeats bit for bit (torch's deterministic mode)."""
    ptx = tmp_path / (source + ".ptx")
    proc = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-ptx", os.path.join(CSRC, source),
                           "-o", str(ptx), f"-I{CSRC}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"nvcc -ptx failed on {source}:\n{proc.stderr[-4000:]}"
    text = ptx.read_text()
    assert ".entry" in text, f"no kernel in the PTX of {source}"
    assert atomics(text) == [], f"{source}: atomics in the sm_90 PTX {atomics(text)}"


def test_stem_kernel_fits_two_blocks_per_sm(tmp_path):
    """The stem kernel runs 256-thread blocks; ≤ 128 registers keeps at least two resident per SM."""
    kernels, log = _ptxas_report(os.path.join(CSRC, "stem.cu"), tmp_path)
    stem = {k: v for k, v in kernels.items() if "stem_conv_bias_act_pool_kernel" in k}
    assert len(stem) == 3, f"expected fp32/fp16/bf16 stem kernels, got {list(stem)}"
    for name, info in stem.items():
        assert info["registers"] <= 128, (name, info)
