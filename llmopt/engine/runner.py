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
        peers: Peers | None = None,
    ) -> None:
        """peers: the other ranks of a model split over several (`model` is this rank's
        part): each step's inputs go to them, and the logits come back."""
        self.model = model
        self.peers = peers
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

        A position's arithmetic is fixed by what it is, never by how the step that runs
        it was batched: prompt positions go through the prefill kernel (in chunks of any
        size: its result per row does not depend on them), generated positions through
        the decode kernel, one query row each, also when they run again after a
        preemption (recompute) or as a draft model catching up on accepted tokens. The
        two kernels sum in different orders, so a recomputed token run as a prefill row
        would give other keys and values than it had, and the greedy text would change
        after a preemption.

        A sequence that carries k drafted tokens (`draft_ids`) is verified as k + 1
        decode rows: its last token and the drafts, row j reading the keys up to its
        own position. The rows' keys are all stored before any row attends, so one pass
        scores every position with exactly the arithmetic of k + 1 separate decodes."""
        spans = []  # per sequence: start, the first generated position in the step, end
        for seq, n in zip(step.seqs, step.num_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            spans.append((start, min(max(seq.num_prompt_tokens, start), end), end))
        ids, positions, writes = [], [], []
        decode_slots: list[torch.Tensor] = []
        decode_first: int | None = None
        prefills: list[PrefillChunk] = []
        last_row: dict[int, int] = {}  # sequence index -> its last row in the flat batch
        row = 0
        for i, (seq, (_, cut, end)) in enumerate(zip(step.seqs, spans, strict=True)):
            if cut == end:
                continue
            ids += seq.token_ids[cut:end] + (seq.draft_ids if end > seq.num_tokens else [])
            positions += range(cut, end)
            lo = self._lo(cut + 1)
            slots, decode_first = self._slots(seq, lo, end)
            writes.append(slots[cut - lo :])
            for pos in range(cut, end):
                decode_slots.append(slots[self._lo(pos + 1) - lo : pos + 1 - lo])
            row += end - cut
            last_row[i] = row - 1
        for i, (seq, (start, cut, _)) in enumerate(zip(step.seqs, spans, strict=True)):
            if start == cut:
                continue
            ids += seq.token_ids[start:cut]
            positions += range(start, cut)
            lo = self._lo(start + 1)
            slots, first = self._slots(seq, lo, cut)
            writes.append(slots[start - lo :])
            prefills.append(PrefillChunk(row, cut - start, start, lo, slots, first))
            row += cut - start
            last_row.setdefault(i, row - 1)
        sample_seqs, sample_rows = [], []
        for i, (seq, (_, _, end)) in enumerate(zip(step.seqs, spans, strict=True)):
            if end >= seq.num_tokens:  # caught up: sample its last row (every row verified)
                sample_seqs.append(seq)
                sample_rows += range(last_row[i] - len(seq.draft_ids), last_row[i] + 1)
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
