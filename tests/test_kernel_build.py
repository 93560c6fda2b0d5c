"""Every native kernel compiles for the other x86 CPUs it may meet, not only this one:
the kernels are built with -march=native, so code under `#ifdef __AVX512F__` or
`__AMX_INT8__` hides compile errors in the other branches from a machine that has those
features (an AVX2-only build of paged_decode.c once failed on a macro defined only for
AVX-512, which would have left a whole native attention path unbuilt there)."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import pytest

from llmopt.kernels import build

KERNELS = Path(build.__file__).parent
# Baseline x86-64 with SSE4.2, AVX2 (the AMD EPYC of earlier sessions), AVX-512, and AMX.
TARGETS = ["x86-64-v2", "x86-64-v3", "x86-64-v4", "sapphirerapids"]


def _entry_points() -> list[str]:
    """The kernel files build.function loads: each exports the function it is named after."""
    names = []
    for src in sorted(KERNELS.glob("*.c")):  # some are only included by others
        exported = re.compile(rf"^(?!static)\w[\w *]*\b{src.stem}\(", re.MULTILINE)
        if exported.search(src.read_text()):
            names.append(src.stem)
    return names


def test_every_kernel_file_is_found() -> None:
    names = set(_entry_points())
    assert {"decode_layers", "paged_decode", "paged_prefill", "qgemv"} <= names
    assert "qgemm_amx" not in names  # included by qgemv.c, not built on its own


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("march", TARGETS)
def test_kernels_compile_for(march, tmp_path) -> None:
    compiler = build.c_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    flags = [f for f in build.FLAGS if not f.startswith(("-O", "-march"))]
    for name in _entry_points():
        proc = subprocess.run(
            [compiler, "-O1", f"-march={march}", *flags, str(KERNELS / f"{name}.c"), "-o",
             str(tmp_path / f"{name}.so"), "-lm"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, f"{name}.c for {march}:\n{proc.stderr[-2000:]}"
