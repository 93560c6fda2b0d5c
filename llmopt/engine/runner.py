"""Executes one scheduled step: lays the sequences' new tokens out as one flat batch,
builds the attention metadata (slots to write, slots to read), runs the model and
returns next-token logits for the sequences that caught up. It decides nothing.
"""

from __future__ import annotations

import torch

from llmopt.distributed.steps import CacheSpec, Peers
from llmopt.engine.scheduler import Step
from llmopt.engine.sequence import Sequence
from llmopt.layers.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.models.llama import LlamaForCausalLM


class Runner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_types: tuple[str, str] = ("auto", "auto"),  # the cache's K and V types
        decode_chunk: int = 1,
        peers: Peers | None = None,
    ) -> None:
        """decode_chunk: a sequence's run of up to this many new tokens, after some in
        the cache, goes as decode rows (the native step) rather than as a prefill chunk:
        a draft model catching up on the tokens its target accepted.

        peers: the other ranks of a model split over several (`model` is this rank's
        part): each step's inputs go to them, and the logits come back."""
        self.model = model
        self.peers = peers
        self.decode_chunk = decode_chunk
        cfg = model.config
        p = next(model.parameters())
        self.device = p.device
        self.block_size = block_size
        # Reads are laid out for the widest window; a layer with a narrower one reads
        # its view of them (AttentionMetadata.for_window).
        self.window = cfg.widest_window
        self.cache = PagedKVCache.for_model(
            cfg, num_blocks, block_size, p.dtype, p.device, kv_types
        )
        model.bind_cache(self.cache)
        if peers is not None:
            peers.bind(CacheSpec(num_blocks, block_size, kv_types))

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()

    def _slots(self, seq: Sequence, lo: int, hi: int) -> tuple[torch.Tensor, int | None]:
        """Cache slots of positions lo..hi-1, and the first one if they are consecutive."""
        bs = self.block_size
        first, last = lo // bs, (hi - 1) // bs
        table = seq.block_table[first : last + 1]
        if table == list(range(table[0], table[0] + len(table))):
            start = table[0] * bs + lo % bs
            return torch.arange(start, start + hi - lo, device=self.device), start
        bt = torch.tensor(seq.block_table, device=self.device)
        pos = torch.arange(lo, hi, device=self.device)
        return bt[pos // bs] * bs + pos % bs, None

    def _lo(self, end: int) -> int:
        """First key position visible from the query at end - 1 (sliding window)."""
        return 0 if self.window is None else max(0, end - self.window)

    def prepare(self, step: Step) -> tuple[list[Sequence], list[int], dict]:
        """Order the step (decode rows first) and build the model inputs.

        A sequence that carries k drafted tokens (`draft_ids`) is verified as k + 1
        decode rows: its last token and the drafts, row j reading the keys up to its
        own position. The rows' keys are all stored before any row attends, so one pass
        scores every position with exactly the arithmetic of k + 1 separate decodes."""
        decodes = [  # one row per position
            d or (n <= self.decode_chunk and s.num_computed_tokens > 0)
            for d, s, n in zip(step.decode_rows(), step.seqs, step.num_tokens, strict=True)
        ]
        order = sorted(range(len(step.seqs)), key=lambda i: not decodes[i])
        ids, positions, writes = [], [], []
        decode_slots: list[torch.Tensor] = []
        decode_first: int | None = None
        prefills: list[PrefillChunk] = []
        sample_seqs, sample_rows = [], []
        row = 0
        for i in order:
            seq, n = step.seqs[i], step.num_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += (
                seq.token_ids[start:] + seq.draft_ids if seq.draft_ids else seq.token_ids[start:end]
            )
            positions += range(start, end)
            lo = self._lo(start + 1)
            slots, first = self._slots(seq, lo, end)
            writes.append(slots[start - lo :])
            if decodes[i]:
                for pos in range(start, end):
                    decode_slots.append(slots[self._lo(pos + 1) - lo : pos + 1 - lo])
                decode_first = first
            else:
                prefills.append(PrefillChunk(row, n, start, lo, slots, first))
            row += n
            if end >= seq.num_tokens:  # caught up: sample its last row (every row verified)
                sample_seqs.append(seq)
                sample_rows += range(row - len(seq.draft_ids) - 1, row)
        decode = None
        if decode_slots:
            decode = self._decode_batch(decode_slots, decode_first)
        meta = AttentionMetadata(torch.cat(writes), decode, prefills, self.window)
        inputs = {
            "input_ids": torch.tensor(ids, device=self.device),
            "positions": torch.tensor(positions, device=self.device),
            "meta": meta,
        }
        return sample_seqs, sample_rows, inputs

    def _decode_batch(self, slots: list[torch.Tensor], first: int | None) -> DecodeBatch:
        lengths = torch.tensor([len(s) for s in slots], device=self.device)
        if len(slots) == 1:
            return DecodeBatch(slots[0][None], lengths, None, first)
        longest = max(len(s) for s in slots)
        # Pad with each sequence's own first slot: a real key, so no garbage in the matmuls.
        padded = torch.stack(
            [torch.cat([s, s[:1].expand(longest - len(s))]) for s in slots]
        )  # (B, L)
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        return DecodeBatch(padded, lengths, valid)

    @torch.inference_mode()
    def execute(self, step: Step) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the step; return the sequences to sample and their logits (M, V) fp32:
        one row each, or 1 + len(draft_ids) consecutive rows for a verified sequence."""
        if not step.seqs:
            return [], None
        if self.peers is not None:
            return self._execute_on_ranks(step)
        seqs, rows, inputs = self.prepare(step)
        if self.model.cache is not self.cache:  # a scorer (models/scoring.py) used it since
            self.model.bind_cache(self.cache)
        hidden = self.model(**inputs)
        if not seqs:
            return [], None
        return seqs, self.model.logits(hidden[rows])

    def _execute_on_ranks(self, step: Step) -> tuple[list[Sequence], torch.Tensor | None]:
        """execute's plan with the model on several ranks: the step cut into the
        peers' micro-batches, their logits in the order of their sequences."""
        assert self.peers is not None
        parts = [self.prepare(sub) for sub in step.split(self.peers.microbatches)]
        logits = self.peers.forward(self.model, [(inputs, rows) for _, rows, inputs in parts])
        seqs = [seq for part in parts for seq in part[0]]
        if not seqs:
            return [], None
        return seqs, torch.cat([x for x in logits if x is not None])
