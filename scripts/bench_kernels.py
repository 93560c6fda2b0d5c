"""llmopt's native CPU decode kernels against the torch ops they replace, at SmolLM2's
shapes, one call at a time (weights that fit the caches: this is the kernels'
arithmetic speed; whole-model decode is scripts/bench_decode.py and bench_quant.py).

    python scripts/bench_kernels.py [--threads 2] [--repeats 300] [--json]

Rows: one-row linears (bf16; int4 group 64; int8 per row), and decode attention of
one sequence over its paged KV cache at several context lengths. Each pair is timed
alternately, best of 5 rounds. Then the quantized GEMM at M = 1 .. 256 rows (int4 group
32 with fp16 scales and minimums, Q4_1's form), in multiply-adds per second against
the CPU's int8 peak with the same instructions (kernels/int8_peak.c).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from llmopt.bench.setup import machine_info
from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.attention_metadata import DecodeBatch
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.kv_types import KV_TYPES
from llmopt.layers.linear import Linear
from llmopt.layers.native_attention import NativeCpuAttention
from llmopt.layers.quant_linear import QuantLinear
from llmopt.weights.qweight import quantize_rtn

LINEARS = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # (out, in)
CONTEXTS = [64, 512, 2048]
GEMM_ROWS = [1, 4, 16, 64, 256]


def best_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best * 1e6


def linear_rows(repeats: int) -> list[dict]:
    rows = []
    for out, n in LINEARS:
        w = torch.randn(out, n) * 0.02
        x = torch.randn(1, n).bfloat16()
        dense = Linear(n, out)
        dense.weight = torch.nn.Parameter(w.bfloat16(), requires_grad=False)
        wb = dense.weight
        pairs = [("bf16", dense, lambda wb=wb, x=x: torch.nn.functional.linear(x, wb))]
        for bits, group, label in [(4, 64, "int4 g64"), (8, n, "int8 per row")]:
            qw = quantize_rtn(w, bits, group, bits == 8)
            layer = QuantLinear(qw, None, torch.device("cpu"))
            if layer.kernel != "qgemv":
                continue
            if bits == 4:
                w4 = torch._convert_weight_to_int4pack_for_cpu(qw.q.to(torch.int32), 2)
                sz = torch.stack([qw.scale.T, ((8 - qw.zero) * qw.scale).T], dim=-1)
                sz = sz.bfloat16().contiguous()
                peer = lambda x=x, w4=w4, sz=sz: torch._weight_int4pack_mm_for_cpu(x, w4, 64, sz)  # noqa: E731
            else:
                w8 = (qw.q.to(torch.int16) - 128).to(torch.int8)
                s8 = qw.scale[:, 0].bfloat16()
                peer = lambda x=x, w8=w8, s8=s8: torch._weight_int8pack_mm(x, w8, s8)  # noqa: E731
            pairs.append((label, layer, peer))
        for label, ours, peer in pairs:
            us, them = best_us(lambda o=ours, x=x: o(x), repeats), best_us(peer, repeats)
            rows.append(
                {"kernel": f"linear {label}", "shape": f"{out}x{n}", "llmopt_us": round(us, 1),
                 "torch_us": round(them, 1), "speedup": round(them / us, 2)}
            )  # fmt: skip
    return rows


def attention_rows(repeats: int) -> list[dict]:
    native = NativeCpuAttention.load()
    if native is None:
        return []
    heads, kv_heads, dim, slots = 9, 3, 64, 4096
    fp32 = KV_TYPES["fp32"]
    kv = LayerKV(
        torch.randn(slots, kv_heads, dim), torch.randn(slots, kv_heads, dim), None, None,
        fp32, fp32, torch.float32,
    )  # fmt: skip
    rows = []
    for n in CONTEXTS:
        q = torch.randn(1, heads, dim)
        order = torch.randperm(slots)[:n][None].contiguous()  # scattered blocks
        batch = DecodeBatch(order, torch.tensor([n]), None)
        ours = best_us(lambda b=batch, q=q: native._decode(q, kv, b, 0.125), repeats)
        them = best_us(lambda b=batch, q=q: TorchAttention()._decode(q, kv, b, 0.125), repeats)
        rows.append(
            {"kernel": "decode attention", "shape": f"{n} keys", "llmopt_us": round(ours, 1),
             "torch_us": round(them, 1), "speedup": round(them / ours, 2)}
        )  # fmt: skip
    return rows


def int8_peak_macs() -> float:
    """Multiply-adds per second of the int8 instructions qgemv uses, all threads."""
    import ctypes

    from llmopt.kernels.build import function

    fn = function("int8_peak", [ctypes.c_int64, ctypes.c_int], ctypes.c_int64)
    if fn is None or fn(1000, 1) == 0:
        return float("nan")
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        macs = fn(2_000_000, 1)
        best = max(best, macs / (time.perf_counter() - t))
    return best


def gemm_rows(repeats: int) -> list[dict]:
    """Quantized linears at M rows, in SmolLM2's Q4_1 file's forms: one block's linears
    in int4 group 32, the output projection in int8 group 32 (Q8_0). GMAC/s and their
    share of the int8 peak."""
    peak = int8_peak_macs()
    cases = [("int4 g32, one block", 4, LINEARS[:4]), ("int8 g32, output head", 8, LINEARS[4:])]
    rows = []
    for label, bits, shapes in cases:
        layers = []
        for out, n in shapes:
            qw = quantize_rtn(torch.randn(out, n) * 0.02, bits, 32, bits == 8)
            layers.append(QuantLinear(qw, None, torch.device("cpu")))
        if any(layer.kernel != "qgemv" for layer in layers):
            return []
        for m in GEMM_ROWS:
            seconds = macs = 0.0
            for layer in layers:
                x = torch.randn(m, layer.in_features)
                calls = max(3, repeats // m)
                seconds += best_us(lambda x=x, layer=layer: layer.qgemv(x), calls) / 1e6
                macs += m * layer.out_features * layer.in_features
            rows.append(
                {"kernel": f"GEMM {label}", "shape": f"M={m}",
                 "llmopt_us": round(seconds * 1e6, 1), "GMAC_per_s": round(macs / seconds / 1e9, 1),
                 "peak_fraction": round(macs / seconds / peak, 3)}
            )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    with torch.inference_mode():
        rows = linear_rows(args.repeats) + attention_rows(args.repeats)
        gemm = gemm_rows(args.repeats)
    if args.json:
        print(json.dumps({**info, "rows": rows, "gemm": gemm}, indent=2))
        return
    table = Table(title=f"native kernels vs torch, {info['machine']}, {args.threads} threads")
    for col in ("kernel", "shape", "llmopt us", "torch us", "speedup"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["kernel"], r["shape"], str(r["llmopt_us"]), str(r["torch_us"]), f"{r['speedup']}x"
        )
    Console().print(table)
    gemm_table = Table(title="quantized GEMM (qgemv) at SmolLM2's shapes, against the int8 peak")
    for col in ("kernel", "rows", "us", "GMAC/s", "of int8 peak"):
        gemm_table.add_column(col)
    for r in gemm:
        gemm_table.add_row(
            r["kernel"], r["shape"], str(r["llmopt_us"]), str(r["GMAC_per_s"]),
            f"{r['peak_fraction']:.0%}",
        )  # fmt: skip
    Console().print(gemm_table)


if __name__ == "__main__":
    main()
