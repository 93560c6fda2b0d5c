"""A draft model: a smaller (or more quantized) model with the target's vocabulary
proposes k tokens by decoding k steps on its own, batched over the sequences.

It has its own runner and paged KV cache, kept in step with the target lazily: each
sequence has a mirror that holds the tokens the draft has seen. At every proposal the
mirror is cut back to what it shares with the target's sequence (its rejected drafts
drop out; their slots are overwritten later), the target's new tokens run through
the draft in one step (as decode rows, the native step, when few), then the draft
decodes. Full blocks of tokens the target has
accepted enter the draft cache's prefix cache, so requests that share a prompt share
the draft's blocks too; blocks that ever held a draft token never do.

Its cost per drafted token (one draft decode step, timed) goes to the controller,
which weighs it against the target's step.
"""

from __future__ import annotations

import time

import torch

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.runner import Runner
from llmopt.engine.sampler import draw, greedy_tokens, make_generator, probabilities
from llmopt.engine.scheduler import Step
from llmopt.engine.sequence import Sequence, SequenceStatus
from llmopt.engine.spec.drafter import Draft, Drafter

FORGET = 0.9  # of the step-time average


class DraftModelDrafter(Drafter):
    name = "draft"

    def __init__(self, runner: Runner, max_context: int, prefix_cache: bool = True) -> None:
        self.runner = runner
        self.max_context = max_context  # the draft model's own context limit
        # No window: a mirror goes back to where it last matched the target (its
        # num_computed_tokens can fall), so a block behind its window may be read again.
        self.blocks = BlockManager(runner.cache.num_blocks, runner.block_size, prefix_cache)
        self._mirrors: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator] = {}
        self.step_seconds = 0.0  # a draft decode step, averaged

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in seqs]
        live = []  # (index, mirror, k) of the sequences that draft
        for i, (seq, k) in enumerate(zip(seqs, ks, strict=True)):
            if k and seq.num_tokens + k <= self.max_context:
                mirror = self._sync(seq)
                if mirror is not None:
                    live.append((i, mirror, k))
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in live}
        index = {id(m): i for i, m, _ in live}
        for j in range(max((k for _, _, k in live), default=0)):
            step = Step()
            for i, mirror, k in live:
                n = mirror.num_uncomputed_tokens
                if len(drafts[i].tokens) < k and self.blocks.reserve(mirror, n):
                    step.add(mirror, n)
            if not step.seqs:
                break
            start = time.perf_counter()
            out, logits = self.runner.execute(step)
            for mirror, n in zip(step.seqs, step.num_tokens, strict=True):
                mirror.num_computed_tokens += n
            assert logits is not None
            argmax = greedy_tokens(logits)  # one call for the greedy rows
            for row, mirror in enumerate(out):
                i = index[id(mirror)]
                token, q = self._sample(mirror, logits[row], argmax[row])
                mirror.append(token)
                drafts[i].tokens.append(token)
                if q is not None:
                    probs[i].append(q)
            if j:  # the first step also catches up on the target's tokens: not a decode
                spent = time.perf_counter() - start
                self.step_seconds = self.step_seconds * FORGET + spent * (1 - FORGET)
        for i, rows in probs.items():
            if rows:
                drafts[i].probs = torch.stack(rows)
        return drafts

    def _sync(self, seq: Sequence) -> Sequence | None:
        """seq's mirror, cut back to the tokens it shares with seq and extended by the
        rest of seq's tokens (not yet run); None when the draft cache has no room."""
        mirror = self._mirrors.get(seq.request_id)
        if mirror is None:
            tokens, params = list(seq.token_ids), seq.params
            mirror = Sequence(seq.request_id, tokens, seq.num_prompt_tokens, params)
            if not self.blocks.allocate(mirror):
                return None
            mirror.status = SequenceStatus.RUNNING
            self._mirrors[seq.request_id] = mirror
            self._generators[seq.request_id] = make_generator(
                None if seq.params.seed is None else seq.params.seed + 1, self.runner.device
            )
            return mirror
        shared = 0
        limit = min(mirror.num_computed_tokens, seq.num_tokens - 1)
        while shared < limit and mirror.token_ids[shared] == seq.token_ids[shared]:
            shared += 1
        mirror.token_ids = list(seq.token_ids)
        mirror.num_computed_tokens = shared
        # Only now, with the target's tokens, may full blocks enter the prefix cache.
        self.blocks.register_full_blocks(mirror)
        self.blocks.trim(mirror)
        return mirror

    def _sample(
        self, mirror: Sequence, logits: torch.Tensor, argmax: int
    ) -> tuple[int, torch.Tensor | None]:
        """The draft's next token, and the distribution it came from (None: greedy,
        where the token is the row's argmax; penalties do not steer a draft's guess)."""
        params = mirror.params
        if params.greedy:
            return argmax, None
        # The token history only where a penalty reads it.
        pen = params.penalized
        device = logits.device
        prompt = mirror.token_ids[: mirror.num_prompt_tokens] if pen else []
        history = mirror.output_ids if pen else []
        q = probabilities(
            logits,
            params,
            torch.tensor(prompt, dtype=torch.long, device=device),
            torch.tensor(history, dtype=torch.long, device=device),
        )
        return draw(q, self._generators[mirror.request_id]), q

    def release(self, request_id: str) -> None:
        mirror = self._mirrors.pop(request_id, None)
        self._generators.pop(request_id, None)
        if mirror is not None:
            self.blocks.free(mirror)
