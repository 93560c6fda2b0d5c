"""Cascade attention for prefill chunks that share a cached prefix, on the CPU."""

from __future__ import annotations

import torch

from llmopt.layers.attention_metadata import PrefillChunk
from llmopt.layers.kv_cache import LayerKV

# Prefill chunks of several sequences behind one cached prefix (16 requests with a
# 1,000-token system prompt, each with a question of its own): attended as one batched
# call over the prefix's keys, gathered once, plus each chunk's own keys, merged by
# log-sum-exp (cascade attention), instead of one call per chunk that gathers and reads
# the whole prefix again.
CASCADE_MIN_SHARED = 64  # keys; below this, per-chunk calls


def shared_prefix_groups(
    chunks: list[PrefillChunk],
) -> tuple[list[tuple[list[PrefillChunk], int]], list[PrefillChunk]]:
    """([(chunks, shared key count)], the chunks left alone): chunks whose first keys
    lie in the same slots and before all their queries, grouped by their first slot."""
    by_first: dict[int, list[PrefillChunk]] = {}
    alone: list[PrefillChunk] = []
    for c in chunks:
        if c.lo == 0 and c.start >= CASCADE_MIN_SHARED:
            by_first.setdefault(int(c.slots[0]), []).append(c)
        else:
            alone.append(c)
    groups = []
    for members in by_first.values():
        lead = members[0].slots
        shared = min(c.start for c in members)
        for c in members[1:]:
            same = (c.slots[:shared] == lead[:shared]).logical_not().nonzero()
            shared = int(same[0]) if len(same) else shared
        if len(members) > 1 and shared >= CASCADE_MIN_SHARED:
            groups.append((members, shared))
        else:
            alone.extend(members)
    return groups, alone


def _heads(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, KV, D) cache rows -> (1, H, S, D) in dtype, KV heads repeated for their
    query heads."""
    return x.to(dtype).transpose(0, 1).repeat_interleave(heads // x.shape[1], dim=0)[None]


def cascade_prefill(q, kv: LayerKV, chunks, shared: int, scale, dtype, out) -> None:
    """out[rows of chunks] = attention of their queries over the shared prefix (keys
    0 .. shared-1, the same slots for all) and their own keys, causal; computed in dtype,
    merged in q's."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    h = q.shape[1]
    rows = [slice(c.q_start, c.q_start + c.q_len) for c in chunks]
    qs = torch.cat([q[r] for r in rows]).to(dtype).transpose(0, 1)[None]  # (1, H, N, D)
    prefix = chunks[0].slots[:shared]
    o_pre, lse_pre = flash(
        qs, _heads(kv.keys(prefix), h, dtype), _heads(kv.values(prefix), h, dtype), scale=scale
    )  # (1, H, N, D), (1, H, N) fp32
    o_pre = o_pre.to(q.dtype)
    at = 0
    for c, r in zip(chunks, rows, strict=True):
        own = c.slots[shared:]  # keys at positions shared .. start + q_len - 1
        qpos = torch.arange(c.start, c.start + c.q_len)[:, None]
        kpos = torch.arange(shared, shared + own.shape[0])[None, :]
        mask = torch.zeros(qpos.shape[0], kpos.shape[1], dtype=dtype)
        mask.masked_fill_(kpos > qpos, float("-inf"))
        o_own, lse_own = flash(
            qs[:, :, at : at + c.q_len],
            _heads(kv.keys(own), h, dtype),
            _heads(kv.values(own), h, dtype),
            attn_mask=mask,
            scale=scale,
        )
        lp, lo = lse_pre[:, :, at : at + c.q_len], lse_own
        m = torch.maximum(lp, lo)
        wp, wo = (lp - m).exp()[..., None], (lo - m).exp()[..., None]
        merged = (o_pre[:, :, at : at + c.q_len] * wp + o_own.to(q.dtype) * wo) / (wp + wo)
        out[r] = merged[0].transpose(0, 1)  # (q_len, H, D)
        at += c.q_len
