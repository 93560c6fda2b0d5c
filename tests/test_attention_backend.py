"""The native CPU attention kernels against the torch backend: decode reads the paged
cache in place, in each of its element types, and agrees with gather-then-matmul over
the dequantized rows; rotary + KV store writes the torch path's bits."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.kv_types import KV_TYPES
from llmopt.layers.native_attention import NativeCpuAttention
from llmopt.layers.rotary import RotaryEmbedding
from tests.conftest import require_kernel

# (K, V) cache types: each type on both halves, and mixed pairs.
TYPE_PAIRS = [
    ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("int8", "int8"), ("fp8", "fp8"),
    ("int8", "fp32"), ("fp8", "bf16"),
]  # fmt: skip


def layer_kv(k: torch.Tensor, v: torch.Tensor, types=("fp32", "fp32")) -> LayerKV:
    """A layer's cache holding k, v (S, KV, D) stored in the given (K, V) types."""
    kt, vt = KV_TYPES[types[0]], KV_TYPES[types[1]]
    (kc, ks), (vc, vs) = kt.quantize(k), vt.quantize(v)
    return LayerKV(kc, vc, ks, vs, kt, vt, torch.float32)


def empty_kv(slots: int, kv_heads: int, dim: int, types=("fp32", "fp32")) -> LayerKV:
    return layer_kv(torch.zeros(slots, kv_heads, dim), torch.zeros(slots, kv_heads, dim), types)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("lens", [[37, 5, 120, 1], [300], [390, 3]])  # the last two: split-K
@pytest.mark.parametrize("dim", [64, 128, 40])  # AVX2 value loops for 64 and 128; 40 generic
@pytest.mark.parametrize("types", TYPE_PAIRS)
@pytest.mark.parametrize("avx2", [False, True])  # True: the AVX2 loops where AVX-512 runs
def test_native_decode_matches_torch(heads, kv_heads, lens, dim, types, avx2) -> None:
    native = require_kernel(NativeCpuAttention.load(avx2=avx2))
    torch.manual_seed(0)
    slots_total = 400
    k = torch.randn(slots_total, kv_heads, dim)
    v = torch.randn(slots_total, kv_heads, dim)
    q = torch.randn(len(lens), heads, dim)
    longest = max(lens)
    # Each sequence's keys scattered over the cache in a random order of slots.
    rows = [torch.randperm(slots_total)[:n] for n in lens]
    padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])
    lengths = torch.tensor(lens)
    valid = torch.arange(longest)[None, :] < lengths[:, None]
    batch = DecodeBatch(padded, lengths, valid)
    kv = layer_kv(k, v, types)
    expected = TorchAttention()._decode(q, kv, batch, 0.125)
    got = native._decode(q, kv, batch, 0.125)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def _cache_with_two_prefixes(total: int, shared: int, tail: int, dim: int = 64):
    """A random KV cache (total slots, 3 KV heads of dim), two prefixes of `shared`
    scattered slots, and an iterator over runs of `tail` free slots."""
    k, v = torch.randn(total, 3, dim), torch.randn(total, 3, dim)
    perm = torch.randperm(total)
    free = perm[2 * shared :]
    return k, v, perm[:shared], perm[shared : 2 * shared], iter(free.split(tail))


@pytest.mark.parametrize("dim", [64, 128, 40])  # with AVX-512, 64 and 128 go through tiles
@pytest.mark.parametrize("shared", [300, 64, 63, 600])
@pytest.mark.parametrize("types", TYPE_PAIRS)
@pytest.mark.parametrize("avx2", [False, True])
def test_native_decode_over_shared_prefixes_matches_torch(shared, dim, types, avx2) -> None:
    """Sequences whose first keys lie in the same slots (a cached prefix) are attended a
    chunk of the prefix at a time for the whole group (cascade): two groups of different
    prefixes, own tails of different lengths (one empty past the prefix but for its new
    token, one that diverges inside a chunk), and a sequence alone. 63 shared keys: under
    the minimum, nothing is shared. 300: a range of 256 keys and one of 44 (a partial
    chunk); three members of 3 query heads each: 9 rows, not a whole number of tiles."""
    native = require_kernel(NativeCpuAttention.load(avx2=avx2))
    torch.manual_seed(2)
    heads = 9
    k, v, prefix_a, prefix_b, tails = _cache_with_two_prefixes(2400, shared, 40, dim)
    rows = [
        torch.cat([prefix_a, next(tails)[:1]]),  # only its new token of its own
        torch.cat([prefix_a, next(tails)]),
        torch.cat([prefix_a[: shared - 7], next(tails)]),  # diverges inside the prefix
        torch.cat([prefix_b, next(tails)[:13]]),
        next(tails)[:29],  # alone
        torch.cat([prefix_b, next(tails)[:3]]),
    ]
    lens = [len(r) for r in rows]
    longest = max(lens)
    padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])
    lengths = torch.tensor(lens)
    valid = torch.arange(longest)[None, :] < lengths[:, None]
    batch = DecodeBatch(padded, lengths, valid)
    q = torch.randn(len(rows), heads, dim)
    kv = layer_kv(k, v, types)
    expected = TorchAttention()._decode(q, kv, batch, 0.125)
    got = native._decode(q, kv, batch, 0.125)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("start", [70, 300, 509])  # under one range; over; across two
@pytest.mark.parametrize("dim", [64, 40])
@pytest.mark.parametrize("avx2", [False, True])
def test_rows_attend_as_each_alone_grouped_or_not(start, dim, avx2) -> None:
    """Batch invariance of decode attention: k + 1 rows of one sequence (a speculative
    verification: positions start .. start + k, each reading the keys up to its own)
    give each row's decode alone, bit for bit, and so do they beside another sequence
    that shares their prefix (grouped as a cached prefix, read once for all)."""
    native = require_kernel(NativeCpuAttention.load(avx2=avx2))
    torch.manual_seed(3)
    k, v, prefix, _, tails = _cache_with_two_prefixes(2400, start, 8, dim)
    seq = torch.cat([prefix, next(tails)])  # keys of positions 0 .. start + 7
    other = torch.cat([prefix, next(tails)[:2]])  # a sibling behind the same prefix
    rows = [seq[: start + 1 + j] for j in range(6)] + [other]
    q = torch.randn(len(rows), 9, dim)
    kv = layer_kv(k, v)

    def attend(rows: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        longest = max(len(r) for r in rows)
        padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])
        lens = torch.tensor([len(r) for r in rows])
        valid = torch.arange(longest)[None, :] < lens[:, None]
        return native._decode(q, kv, DecodeBatch(padded, lens, valid), 0.125)

    together = attend(rows[:6], q[:6])
    for j in range(6):
        assert torch.equal(together[j], attend([rows[j]], q[j : j + 1])[0]), j
    with_sibling = attend(rows, q)
    assert torch.equal(with_sibling[:6], together)
    assert torch.equal(with_sibling[6], attend(rows[6:], q[6:])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [100, 67, 40])
@pytest.mark.parametrize("types", [("fp32", "fp32"), ("int8", "fp8")])
def test_prefill_over_a_shared_prefix_matches_per_chunk_attention(shared, dtype, types) -> None:
    """Prefill chunks behind one cached prefix go through one call over the prefix plus
    one per chunk over its own keys, merged (cascade): the same as attending each chunk
    alone. A group of three (one that diverges inside the prefix: the group shares up to
    there), a chunk behind another prefix, and a first chunk (nothing cached). 40 (37
    shared): under the minimum, per-chunk calls."""
    from llmopt.layers.attention_metadata import PrefillChunk
    from llmopt.layers.cascade import CASCADE_MIN_SHARED, shared_prefix_groups

    torch.manual_seed(3)
    heads = 9
    k, v, prefix, other, own = _cache_with_two_prefixes(1000, shared, 30)
    specs = [  # (cached keys, new queries)
        (torch.cat([prefix, next(own)[:5]]), 7),
        (prefix, 12),
        (torch.cat([prefix[: shared - 3], next(own)[:9]]), 4),
        (other, 6),
        (torch.zeros(0, dtype=torch.long), 11),
    ]
    chunks, at = [], 0
    for cached, n in specs:
        slots = torch.cat([cached, next(own)[:n]])
        chunks.append(PrefillChunk(at, n, len(cached), 0, slots))
        at += n
    groups, alone = shared_prefix_groups(chunks)
    cascades = shared - 3 >= CASCADE_MIN_SHARED
    assert [(len(g), n) for g, n in groups] == ([(3, shared - 3)] if cascades else [])
    assert len(alone) == (2 if cascades else 5)
    q = torch.randn(at, heads, 64)
    backend = TorchAttention()
    backend.prefill_dtype = dtype  # bf16: what runs on CPUs with AMX
    kv = layer_kv(k, v, types)
    got = backend.attend(q, kv, AttentionMetadata(torch.zeros(at), prefills=chunks), 0.125, None)
    assert got.dtype == torch.float32  # computed in bf16, handed back in the cache's type
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 2e-2}
    for c in chunks:
        rows = slice(c.q_start, c.q_start + c.q_len)
        want = backend._prefill(q[rows], kv, c, 0.125, None, dtype)
        torch.testing.assert_close(got[rows], want, **tol)
        exact = backend._prefill(q[rows], kv, c, 0.125, None, torch.float32)
        torch.testing.assert_close(got[rows], exact, rtol=0, atol=2e-2)  # bf16's rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("types", TYPE_PAIRS)
def test_native_rope_and_store_matches_torch(dtype, types) -> None:
    """Rotary + KV store in one native call: bit-identical to the torch ops in bf16 (the
    rounding of every product is part of the model), to fp32 rounding in fp32. The
    stored codes and scales are the torch path's bits where the values rotated are
    (bf16, and the values half in fp32), else within one step of the type."""
    native = require_kernel(NativeCpuAttention.load())
    torch.manual_seed(1)
    heads, kv_heads, dim, n = 9, 3, 64, 5
    rotary = RotaryEmbedding(dim, 10000.0, None, 64)
    cos, sin = rotary(torch.tensor([0, 3, 4, 17, 40]), dtype)
    # A row of qkv wider than its heads (a view into a bigger buffer), as a fused
    # projection with padding would give.
    wide = (torch.randn(n, (heads + 2 * kv_heads) * dim + 8) * 4).to(dtype)
    qkv = wide[:, : (heads + 2 * kv_heads) * dim]
    meta = AttentionMetadata(torch.tensor([7, 1, 30, 9, 2]))
    results = []
    for backend in (TorchAttention(), native):
        kv = empty_kv(32, kv_heads, dim, types)
        q = backend.rope_and_store(qkv, cos, sin, kv, meta, heads)
        results.append((q.float(), kv))
    (q_native, native_kv), (q_torch, torch_kv) = results[1], results[0]
    exact = dtype == torch.bfloat16
    tol = 0 if exact else 1e-5
    torch.testing.assert_close(q_native, q_torch, rtol=tol, atol=tol)
    slots = meta.slot_mapping
    # Values are copied, not computed: the same bits in either dtype.
    assert torch.equal(native_kv.v[slots].view(torch.uint8), torch_kv.v[slots].view(torch.uint8))
    if types[1] in ("int8", "fp8"):
        assert torch.equal(native_kv.v_scale[slots], torch_kv.v_scale[slots])
    if exact:
        assert torch.equal(
            native_kv.k[slots].view(torch.uint8), torch_kv.k[slots].view(torch.uint8)
        )
    # The keys read back agree to the type's step (fp32 rotary may differ in the last bit,
    # which can move a code by one).
    step = {"fp32": 1e-5, "bf16": 2**-7, "fp16": 2**-10, "int8": 1 / 127, "fp8": 2**-3}
    k_native, k_torch = native_kv.keys(slots), torch_kv.keys(slots)
    bound = step[types[0]] * k_torch.abs().amax(-1, keepdim=True) + 1e-6
    assert ((k_native - k_torch).abs() <= bound).all()


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("types", TYPE_PAIRS)
def test_native_prefill_matches_torch(dim, types) -> None:
    """Every prefill chunk of a step in one native call (AVX-512 CPUs), reading the cache
    in place: the same as torch's per-chunk attention, next to decodes in the same step.
    Chunks: a first one (nothing cached) longer than a run of 64 tokens, one behind a
    cached prefix that is not a whole number of key chunks, one of a single token, one
    behind 512 cached keys in scattered slots."""
    native = require_kernel(NativeCpuAttention.load(), isa="AVX-512")
    assert native.prefill is not None, "paged_prefill.c should build with AVX-512"
    torch.manual_seed(4)
    heads, kv_heads, total = 9, 3, 3000
    k, v = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
    free = iter(torch.randperm(total).tolist())
    decode_rows = [torch.tensor([next(free) for _ in range(n)]) for n in (5, 40)]
    at = len(decode_rows)
    chunks = []
    for start, n in [(0, 70), (100, 5), (0, 1), (512, 130)]:
        slots = torch.tensor([next(free) for _ in range(start + n)])
        chunks.append(PrefillChunk(at, n, start, 0, slots))
        at += n
    longest = max(len(r) for r in decode_rows)
    padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in decode_rows])
    lens = torch.tensor([len(r) for r in decode_rows])
    valid = torch.arange(longest)[None, :] < lens[:, None]
    q = torch.randn(at, heads, dim)

    def meta() -> AttentionMetadata:  # a fresh one: each caches what it builds
        copies = [PrefillChunk(c.q_start, c.q_len, c.start, c.lo, c.slots) for c in chunks]
        return AttentionMetadata(torch.zeros(at), DecodeBatch(padded, lens, valid), copies)

    kv = layer_kv(k, v, types)
    got = native.attend(q, kv, meta(), 0.125, None)
    expected = TorchAttention().attend(q, kv, meta(), 0.125, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _dense_attention(q, k, v, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """One query (H, D) over the cache rows `keys`, heads grouped: (H, D)."""
    group = q.shape[0] // k.shape[1]
    ks = k[keys].repeat_interleave(group, dim=1)  # (L, H, D)
    vs = v[keys].repeat_interleave(group, dim=1)
    probs = (torch.einsum("hd,lhd->hl", q, ks) * scale).softmax(-1)
    return torch.einsum("hl,lhd->hd", probs, vs)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_window_view_reads_each_querys_last_keys(backend) -> None:
    """Metadata laid out for every key (a model's global layers), read through its view
    for a sliding window (AttentionMetadata.for_window): each query, in decode rows and
    in prefill chunks fresh or behind cached keys, attends to exactly the `window` keys
    up to its own; the global layers' metadata is left as it was."""
    attn = TorchAttention() if backend == "torch" else require_kernel(NativeCpuAttention.load())
    torch.manual_seed(5)
    heads, kv_heads, dim, window, scale = 4, 2, 64, 8, 0.125
    k, v = torch.randn(600, kv_heads, dim), torch.randn(600, kv_heads, dim)
    free = iter(torch.randperm(600).tolist())
    decode_rows = [torch.tensor([next(free) for _ in range(n)]) for n in (3, 20, 9)]
    queries = [(r, len(r) - 1) for r in decode_rows]  # (the sequence's slots, position)
    at = len(decode_rows)
    chunks = []
    for start, n in [(0, 5), (0, 30), (30, 6), (4, 3)]:  # fresh, fresh past the window, cached
        slots = torch.tensor([next(free) for _ in range(start + n)])
        chunks.append(PrefillChunk(at, n, start, 0, slots))
        queries += [(slots, start + i) for i in range(n)]
        at += n
    longest = max(len(r) for r in decode_rows)
    padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in decode_rows])
    lens = torch.tensor([len(r) for r in decode_rows])
    valid = torch.arange(longest)[None, :] < lens[:, None]
    meta = AttentionMetadata(torch.zeros(at), DecodeBatch(padded, lens, valid), chunks)
    q = torch.randn(at, heads, dim)
    kv = layer_kv(k, v)
    local = attn.attend(q, kv, meta.for_window(window), scale, window)
    full = attn.attend(q, kv, meta, scale, None)
    for row, (slots, pos) in enumerate(queries):
        want = _dense_attention(q[row], k, v, slots[max(0, pos + 1 - window) : pos + 1], scale)
        torch.testing.assert_close(local[row], want, rtol=1e-4, atol=1e-5)
        want = _dense_attention(q[row], k, v, slots[: pos + 1], scale)
        torch.testing.assert_close(full[row], want, rtol=1e-4, atol=1e-5)
    assert meta.for_window(window) is meta.for_window(window)  # built once per step
