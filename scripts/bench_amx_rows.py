"""qgemv on AMX tiles against the VNNI tile by rows of x: two builds of the kernel
source, one with AMX_MIN_ROWS 1 (every call of several rows on the tiles) and one that
never uses them, loaded in one process and alternated. SmolLM2's four linears of a
layer (qkv, o, gate_up, down), RTN int4 group 32. For choosing AMX_MIN_ROWS on a CPU
with AMX-INT8 (elsewhere both builds run the VNNI or AVX2 path).

Usage: python scripts/bench_amx_rows.py [ROWS ...] (default 1 4 8 10 12 16 32 64)
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmopt.kernels import qgemv
from llmopt.kernels.build import FLAGS, c_compiler
from llmopt.layers.quant_linear import QuantLinear
from llmopt.weights.qweight import quantize_rtn

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def build(folder: Path, min_rows: int) -> qgemv.QGemv:
    """qgemv.c compiled with AMX_MIN_ROWS = min_rows, from a copy of the kernel folder."""
    src = Path(qgemv.__file__).parent
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    c = folder / "qgemv.c"
    text = re.sub(r"#define AMX_MIN_ROWS \d+", f"#define AMX_MIN_ROWS {min_rows}", c.read_text())
    c.write_text(text)
    out = folder / "qgemv.so"
    subprocess.run([c_compiler() or "cc", *FLAGS, str(c), "-o", str(out), "-lm"], check=True)
    fn = ctypes.CDLL(str(out)).qgemv
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [ptr, i32, i32, i32, ptr, i32, ptr, ptr, i32, i32, i32, ptr, ptr, i32]
    fn.restype = i32
    return qgemv.QGemv(fn, None, min_rows < 1 << 30)


def main() -> None:
    rows = [int(r) for r in sys.argv[1:]] or [1, 4, 8, 10, 12, 16, 32, 64]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layers = {
        k: QuantLinear(quantize_rtn(torch.randn(n, kk) * 0.02, 4, 32), None, torch.device("cpu"))
        for k, (n, kk) in SHAPES.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {
            "amx": build(Path(tmp) / "amx", 1),
            "vnni": build(Path(tmp) / "vnni", 1 << 30),
        }
        for m in rows:
            xs = {k: torch.randn(m, kk) for k, (_, kk) in SHAPES.items()}
            best: dict[str, float] = {}
            for _ in range(3):  # rounds, the builds alternated; the best of each
                for name, kernel in kernels.items():
                    calls = {k: kernel.bind(layer.operands) for k, layer in layers.items()}
                    for k, call in calls.items():
                        call(xs[k])
                    n = max(3, 600 // m)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        for k, call in calls.items():
                            call(xs[k])
                    ms = (time.perf_counter() - t0) / n * 1e3
                    best[name] = min(best.get(name, ms), ms)
            print(
                f"rows {m:4d}: AMX {best['amx']:.3f} ms, VNNI tile {best['vnni']:.3f} ms "
                f"a layer's linears (VNNI time / AMX time {best['vnni'] / best['amx']:.2f})"
            )


if __name__ == "__main__":
    main()
