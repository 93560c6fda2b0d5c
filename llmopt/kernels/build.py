"""Compile a kernel's C source once per source version and load it with ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from llmopt.home import llmopt_home

# -fno-math-errno lets expf vectorise (glibc libmvec) under omp simd.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]


@cache
def _cpu_identity() -> bytes:
    """What -march=native compiles for: a library built on one CPU may not run on another
    (AVX-512 code on an AVX2 machine dies of an illegal instruction), and LLMOPT_HOME may
    outlive the machine (a copied home, a VM moved to other hardware)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.startswith(wanted)})).encode()


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@cache
def load(name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library for llmopt/kernels/NAME.c (with the preprocessor `defines`:
    a variant for tests), or None without a C compiler."""
    src = Path(__file__).with_name(f"{name}.c")
    compiler = c_compiler()
    if compiler is None:
        return None
    flags = [*FLAGS, *(f"-D{d}" for d in defines)]
    # Every source and header of the folder goes into the key: a kernel may include
    # another's code (decode_layers.c does), and an edit to it must rebuild both.
    sources = sorted(src.parent.glob("*.[ch]"))
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in sources) + " ".join(flags).encode() + _cpu_identity()
    ).hexdigest()[:16]
    lib = llmopt_home() / "kernels" / f"{name}-{digest}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run(
                [compiler, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True
            )
            if proc.returncode != 0:
                return None
            os.replace(out, lib)  # complete libraries only
    return ctypes.CDLL(str(lib))


def function(
    name: str,
    argtypes: list,
    restype: object = None,
    symbol: str | None = None,
    defines: tuple[str, ...] = (),
):
    """The function NAME of llmopt/kernels/NAME.c (each kernel file exports the one it is
    named after, and may export helpers: `symbol`) with its C signature declared, or None
    without a C compiler."""
    lib = load(name, defines)
    if lib is None:
        return None
    fn = getattr(lib, symbol or name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
