"""Where a step's new tokens go in the paged KV cache and which slots each query
reads: the runner builds it once per step, every layer's attention reads it.

The runner lays a step out as one flat run of N new tokens: first the sequences that
decode (one query token each), then the chunks of sequences that prefill. Keys and
values live in a cache of fixed-size blocks, addressed by slot = block * block_size +
offset.

A model whose layers see different spans (Gemma 3: sliding-window layers among global
ones) gets metadata laid out for its widest; `for_window` derives each narrower view.

Shapes: N new tokens, S cache slots, B decoding sequences, L their longest key count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """One sequence's run of query tokens in the flat batch (prompt prefill or recompute)."""

    q_start: int  # offset of its first query in the flat batch
    q_len: int
    start: int  # position of its first query (tokens already cached before it)
    lo: int  # position of its first visible key (> 0 only with a sliding window)
    slots: torch.Tensor  # (start + q_len - lo,) cache slots of keys lo .. start + q_len - 1
    contiguous: int | None = None  # first slot, when the slots are one consecutive run
    _mask: tuple[int | None, torch.Tensor] | None = field(default=None, repr=False)

    def sees_all(self, window: int | None) -> bool:
        """Whether every query sees all keys before it: from position 0, none of them
        out of the window (a causal mask is then the whole mask)."""
        return window is None or (self.lo == 0 and self.start + self.q_len <= window)

    def windowed(self, window: int) -> PrefillChunk:
        """The chunk as a layer with this sliding window reads it: its keys from the
        first one its first query sees."""
        lo = max(self.lo, self.start + 1 - window)
        cut = lo - self.lo
        first = None if self.contiguous is None else self.contiguous + cut
        return PrefillChunk(self.q_start, self.q_len, self.start, lo, self.slots[cut:], first)

    def additive_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(q_len, keys) 0 where query i (position start + i) sees key j (position
        lo + j), -inf elsewhere: in the attention's type, built once per step and shared
        by all layers rather than rebuilt in each (a chunk meets one window: narrower
        ones read their own view, AttentionMetadata.for_window)."""
        if self._mask is None or self._mask[0] != window or self._mask[1].dtype != dtype:
            device = self.slots.device
            qpos = torch.arange(self.start, self.start + self.q_len, device=device)[:, None]
            kpos = torch.arange(self.lo, self.lo + self.slots.shape[0], device=device)[None]
            hidden = kpos > qpos
            if window is not None:
                hidden |= kpos <= qpos - window
            mask = torch.zeros(hidden.shape, dtype=dtype, device=device)
            self._mask = (window, mask.masked_fill_(hidden, float("-inf")))
        return self._mask[1]


@dataclass
class DecodeBatch:
    """The sequences with one query token each, at the head of the flat batch."""

    slots: torch.Tensor  # (B, L) cache slots of each sequence's visible keys, padded
    lens: torch.Tensor  # (B,) int64: how many of each row's slots are real
    valid: torch.Tensor | None  # (B, L) bool, False on padding; None when nothing is padded
    contiguous: int | None = None  # B == 1 and one consecutive run: its first slot

    def windowed(self, window: int) -> DecodeBatch:
        """Each row's last `window` keys (its own among them), padded as the runner pads:
        with the row's first key."""
        lens = self.lens.clamp(max=window)
        skip = self.lens - lens  # (B,) keys each row drops at its start
        if not bool(skip.any()):
            return self
        width = int(lens.max())
        cols = torch.arange(width, device=self.slots.device)[None, :]
        valid = cols < lens[:, None]  # (B, width)
        index = torch.where(valid, skip[:, None] + cols, skip[:, None])
        first = None if self.contiguous is None else self.contiguous + int(skip[0])
        padded = None if bool(valid.all()) else valid
        return DecodeBatch(self.slots.gather(1, index), lens, padded, first)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) where each new token's key and value are written
    decode: DecodeBatch | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    window: int | None = None  # the sliding window the reads were laid out for
    _prefill_layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _views: dict[int, AttentionMetadata] = field(default_factory=dict, repr=False)

    @property
    def num_decode(self) -> int:
        return 0 if self.decode is None else self.decode.slots.shape[0]

    def for_window(self, window: int | None) -> AttentionMetadata:
        """The step as a layer with this sliding window reads it: the same writes, each
        query's keys cut to its window. Built once per step and window, for all the
        layers that share it."""
        if window == self.window:
            return self
        assert window is not None and (self.window is None or window < self.window)
        view = self._views.get(window)
        if view is None:
            decode = None if self.decode is None else self.decode.windowed(window)
            chunks = [c.windowed(window) for c in self.prefills]
            view = self._views[window] = AttentionMetadata(
                self.slot_mapping, decode, chunks, window
            )
        return view

    def prefill_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks for the native kernel, built once per step for all layers:
        their slots concatenated (int64), and (chunks, 4) int64 rows of q_start, q_len,
        start and the offset of the chunk's slots."""
        if self._prefill_layout is None:
            rows, at = [], 0
            for c in self.prefills:
                rows.append((c.q_start, c.q_len, c.start, at))
                at += c.slots.shape[0]
            slots = torch.cat([c.slots for c in self.prefills]).to(torch.int64).contiguous()
            self._prefill_layout = (slots, torch.tensor(rows, dtype=torch.int64))
        return self._prefill_layout
