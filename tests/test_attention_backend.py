"""The native CPU decode kernel reads the paged cache in place and agrees with the
torch backend's gather-then-matmul."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers.attention_backend import DecodeBatch, NativeCpuAttention, TorchAttention


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_native_decode_matches_torch(heads, kv_heads) -> None:
    native = NativeCpuAttention.load()
    assert native is not None, "the kernel should build where a C compiler exists"
    torch.manual_seed(0)
    dim, slots_total, lens = 64, 400, [37, 5, 120, 1]
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
    expected = TorchAttention()._decode(q, k, v, batch, 0.125)
    got = native._decode(q, k, v, batch, 0.125)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
