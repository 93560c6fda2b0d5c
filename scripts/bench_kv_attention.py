"""Decode attention over the paged KV cache, per cache type: the native kernel alone
(kernels/paged_decode.c), one layer's call for B sequences of L keys each in scattered
16-token blocks, SmolLM2's heads (9 query heads, 3 KV heads, D 64) unless told.

Usage: python scripts/bench_kv_attention.py [--batch 16] [--keys 2000] [--threads 2]
           [--types fp32,int8,bf16,fp8] [--rounds 2] [--layers 30] [--shared 0]
Each layer has a cache of its own, and the calls go through the layers in turn, as a
decode step does: the keys come from memory, not from a cache level that one layer's
repeated calls would keep them in. Prints ms per layer call and per step of all layers,
the types alternated round by round.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmopt.layers.attention_metadata import DecodeBatch
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.kv_types import KV_TYPES
from llmopt.layers.native_attention import NativeCpuAttention

BLOCK = 16


def layer_cache(k: torch.Tensor, v: torch.Tensor, kind: str) -> LayerKV:
    t = KV_TYPES[kind]
    (kc, ks), (vc, vs) = t.quantize(k), t.quantize(v)
    return LayerKV(kc, vc, ks, vs, t, t, torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="fp32,int8,bf16,fp8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument(
        "--shared", type=int, default=0, help="Keys every sequence shares (a cached prefix)."
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    native = NativeCpuAttention.load()
    if native is None:
        raise SystemExit("no C compiler: the native kernel did not build")
    blocks_each = -(-a.keys // BLOCK)
    slots_total = a.batch * blocks_each * BLOCK
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(a.batch * blocks_each, generator=g)  # blocks scattered
    rows = []
    for b in range(a.batch):
        blocks = order[b * blocks_each : (b + 1) * blocks_each]
        rows.append((blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[: a.keys])
    for row in rows[1:]:  # the first sequence's first keys are everyone's
        row[: a.shared] = rows[0][: a.shared]
    batch = DecodeBatch(torch.stack(rows), torch.full((a.batch,), a.keys), None)
    q = torch.randn(a.batch, a.heads, a.dim, generator=g)
    shape = (slots_total, a.kv_heads, a.dim)
    k = [torch.randn(shape, generator=g) for _ in range(a.layers)]
    v = [torch.randn(shape, generator=g) for _ in range(a.layers)]
    caches = {t: [layer_cache(k[i], v[i], t) for i in range(a.layers)] for t in a.types.split(",")}
    del k, v
    for r in range(a.rounds):
        for name, layers in caches.items():
            for kv in layers:  # warm-up
                native._decode(q, kv, batch, a.dim**-0.5)
            steps = 5
            t0 = time.perf_counter()
            for _ in range(steps):
                for kv in layers:
                    native._decode(q, kv, batch, a.dim**-0.5)
            ms = (time.perf_counter() - t0) / steps * 1e3
            print(
                f"round {r + 1} {name:5s} {ms / a.layers:6.2f} ms per layer call, "
                f"{ms:6.1f} ms a step of {a.layers} layers"
            )


if __name__ == "__main__":
    main()
