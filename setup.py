"""Build script. Package metadata lives in pyproject.toml; this file builds the native modules:

* ``c3dzoo._C_host`` — host (g++) reference loops over csrc/stem_math.h, built whenever pybind11 is
  importable at build time (pyproject's build-system requires lists it).
* ``c3dzoo._C`` — the CUDA kernels of csrc/*.cu, compiled with nvcc for sm_90 (+ compute_90 PTX) and
  linked with the static CUDA runtime; no libtorch linkage (raw device pointers + stream integers).

``C3DZOO_BUILD_CUDA``: "1" builds ``_C`` and fails loudly if that is impossible; "0" skips it;
unset (auto) builds it when nvcc is found and only warns (the package still installs) on failure.
``C3DZOO_CUDA_ARCH`` overrides the SASS target (default 90). ``CUDA_HOME``/``CUDA_PATH`` or nvcc on
PATH locate the toolkit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CUDA_EXT = "c3dzoo._C"
HOST_EXT = "c3dzoo._C_host"


def _pybind11_include():
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def _cuda_mode() -> str:
    value = os.environ.get("C3DZOO_BUILD_CUDA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    return "auto"


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _cuda_home(nvcc: str) -> str:
    def ok(home):
        return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    for home in candidates:
        if ok(home):
            return os.path.realpath(home)
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one): ask nvcc itself.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stderr + out.stdout).splitlines():
            if "TOP=" in line:
                top = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
                if ok(top):
                    return top
    except Exception:
        pass
    if ok("/usr/local/cuda"):
        return "/usr/local/cuda"
    raise RuntimeError(f"cannot locate the CUDA toolkit of {nvcc} (set CUDA_HOME)")


class BuildExt(build_ext):
    """build_ext that builds ``c3dzoo._C`` with nvcc (and the host compiler for its pybind11 glue)."""

    def run(self):
        if _cuda_mode() == "off":
            # an in-place/editable build must not keep a _C module from an earlier CUDA build
            suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
            stale = os.path.join(ROOT, "c3dzoo", "_C" + suffix)
            if (self.inplace or getattr(self, "editable_mode", False)) and os.path.exists(stale):
                print(f"C3DZOO_BUILD_CUDA=0: removing {stale}", file=sys.stderr)
                os.remove(stale)
        super().run()

    def _skip(self, ext):
        """Leave ``ext`` out of this build's outputs (install/editable steps must not look for it)."""
        self.extensions = [e for e in self.extensions if e.name != ext.name]

    def build_extension(self, ext):
        if ext.name != CUDA_EXT:
            return super().build_extension(ext)
        mode = _cuda_mode()
        if mode == "off":
            print(f"C3DZOO_BUILD_CUDA=0: not building {CUDA_EXT}", file=sys.stderr)
            return self._skip(ext)
        if mode == "auto" and _find_nvcc() is None:
            print(f"NOTE: nvcc not found; {CUDA_EXT} is not built (set C3DZOO_BUILD_CUDA=1 to require it)",
                  file=sys.stderr)
            return self._skip(ext)
        try:
            self._build_cuda(ext)
        except Exception as exc:  # noqa: BLE001 - auto mode must never break the install
            if mode == "on":
                raise RuntimeError(f"C3DZOO_BUILD_CUDA=1 but building {CUDA_EXT} failed: {exc}") from exc
            msg = (f"WARNING: building the optional CUDA extension {CUDA_EXT} failed; installing without it "
                   f"(the 'cuda' backend will report why). Set C3DZOO_BUILD_CUDA=1 to make this an error. "
                   f"Cause: {exc}")
            self.warn(msg)
            print(msg, file=sys.stderr)
            # do not leave a stale module from an earlier successful build next to the new one
            target = self.get_ext_fullpath(ext.name)
            if os.path.exists(target):
                os.remove(target)
            if self.inplace or getattr(self, "editable_mode", False):
                stale = os.path.join(ROOT, "c3dzoo", os.path.basename(target))
                if os.path.exists(stale):
                    os.remove(stale)
            self._skip(ext)

    def _run(self, cmd):
        print(" ".join(shlex.quote(c) for c in cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.stdout.strip():
            print(proc.stdout)
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        if proc.stderr.strip():
            print(proc.stderr, file=sys.stderr)

    def _build_cuda(self, ext):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        pybind_inc = _pybind11_include()
        if pybind_inc is None:
            raise RuntimeError("pybind11 is not importable")
        cuda_home = _cuda_home(nvcc)
        arch = os.environ.get("C3DZOO_CUDA_ARCH", "90").strip()
        py_inc = sysconfig.get_paths()["include"]
        csrc = os.path.join(ROOT, CSRC)
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
        build_dir = os.path.join(os.path.abspath(self.build_temp), "c3dzoo_cuda")
        os.makedirs(build_dir, exist_ok=True)
        cu_sources = sorted(f for f in os.listdir(csrc) if f.endswith(".cu"))
        objects, jobs = [], []
        for src in cu_sources:
            obj = os.path.join(build_dir, src[:-3] + ".cu.o")
            objects.append(obj)
            # No --use_fast_math: the BN finalize math (sqrt, division) must stay IEEE; the stem's
            # inner loop uses explicit fmaf and needs no fast-math intrinsics.
            jobs.append([
                nvcc, "-c", os.path.join(csrc, src), "-o", obj, "-std=c++17", "-O3",
                f"-gencode=arch=compute_{arch},code=sm_{arch}",
                f"-gencode=arch=compute_{arch},code=compute_{arch}",
                "-Xptxas", "-v", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                f"-I{csrc}",
            ])
        bind_obj = os.path.join(build_dir, "bindings.o")
        objects.append(bind_obj)
        jobs.append([
            cxx, "-c", os.path.join(csrc, "bindings.cpp"), "-o", bind_obj, "-std=c++17", "-O2", "-fPIC",
            "-fvisibility=hidden", f"-I{csrc}", f"-I{pybind_inc}", f"-I{py_inc}",
        ])
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for fut in [pool.submit(self._run, cmd) for cmd in jobs]:
                fut.result()
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lib_dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "lib64/stubs")
                    if os.path.isdir(os.path.join(cuda_home, d))]
        static = any(os.path.isfile(os.path.join(d, "libcudart_static.a")) for d in lib_dirs)
        cudart = ["-lcudart_static", "-lrt", "-lpthread", "-ldl"] if static else ["-lcudart"]
        rpath = [] if static else [f"-Wl,-rpath,{d}" for d in lib_dirs]
        self._run([cxx, "-shared", "-o", target, *objects, *[f"-L{d}" for d in lib_dirs], *cudart, *rpath])


def _extensions():
    exts = []
    pybind_inc = _pybind11_include()
    if pybind_inc is not None:
        from pybind11.setup_helpers import Pybind11Extension

        exts.append(Pybind11Extension(
            HOST_EXT, [os.path.join(CSRC, "host_bindings.cpp")], include_dirs=[CSRC],
            depends=[os.path.join(CSRC, "stem_math.h")], cxx_std=17, extra_compile_args=["-O2"],
        ))
    else:
        print("WARNING: pybind11 is not importable; c3dzoo._C_host and c3dzoo._C are not built", file=sys.stderr)
    has_sources = os.path.isfile(os.path.join(ROOT, CSRC, "bindings.cpp"))
    if pybind_inc is not None and has_sources:
        # Always declared (so sdists carry the sources); BuildExt.build_extension compiles it with
        # nvcc, or skips it per C3DZOO_BUILD_CUDA / nvcc availability.
        exts.append(Extension(
            CUDA_EXT, sources=[os.path.join(CSRC, "bindings.cpp")],
            depends=[os.path.join(CSRC, f) for f in ("stem.cu", "stem_math.h")],
        ))
    elif _cuda_mode() == "on":
        raise RuntimeError(f"C3DZOO_BUILD_CUDA=1 but {CUDA_EXT} cannot be built: "
                           + ("pybind11 is not importable" if pybind_inc is None else "csrc/bindings.cpp is missing"))
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
