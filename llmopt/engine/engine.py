"""The engine: continuous batching over one copy of the weights. `run`, `serve` and
`bench` all generate through it.

Each `step()` asks the scheduler who runs, has the runner execute it, samples the
next token of every sequence that caught up, and turns tokens into text deltas
(detokenization, stop strings, finish conditions). Requests finish with their KV
blocks freed at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.config import EngineConfig
from llmopt.engine.detokenizer import Detokenizer
from llmopt.engine.outputs import Delta, RequestStats, TokenLogprob
from llmopt.engine.runner import Runner
from llmopt.engine.sampler import (
    greedy_tokens,
    make_generator,
    probabilities,
    sample,
    token_logprob,
    verify_token,
)
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import Scheduler, Step
from llmopt.engine.sequence import Sequence, SequenceStatus
from llmopt.engine.spec.adaptive import SpecController
from llmopt.engine.spec.drafter import Drafter
from llmopt.engine.stop import StopMatcher
from llmopt.errors import ContextLengthError
from llmopt.tokenizer import Tokenizer


@dataclass
class _Request:
    seq: Sequence
    limit: int  # most tokens it may generate
    generator: torch.Generator
    detok: Detokenizer
    stop: StopMatcher
    prompt_t: torch.Tensor
    stats: RequestStats
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float = 0.0
    scheduled: bool = False  # has it been in a step yet (for its queue time)
    pending: list[Delta] = field(default_factory=list)  # produced, not yet consumed
    finished: bool = False
    draft_probs: torch.Tensor | None = None  # (k, V): the distributions seq.draft_ids came from


def check_fits(
    prompt_tokens: int, max_tokens: int | None, max_context: int, kv_capacity: int
) -> None:
    """Refuse, with the numbers, a prompt that (with max_tokens) overflows the context."""
    need = prompt_tokens + (max_tokens or 1)
    limit = min(max_context, kv_capacity)
    if need > limit:
        what = "context" if limit == max_context else "KV cache capacity"
        asked = f" + max_tokens {max_tokens}" if max_tokens else " (plus one generated token)"
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens{asked} = {need}, more than the "
            f"model's {what} of {limit} tokens; shorten the prompt"
            + (" or lower max_tokens" if max_tokens else "")
        )


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        eos_ids: set[int],
        max_context: int,
        config: EngineConfig,
        drafter: Drafter | None = None,
    ) -> None:
        """drafter: proposes tokens for speculative decoding (None: off)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.config = config
        self.blocks = BlockManager(
            runner.cache.num_blocks, runner.block_size, config.prefix_cache, runner.window
        )
        self.scheduler = Scheduler(config, self.blocks)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.drafter = drafter
        self.spec = (
            SpecController(config.num_speculative_tokens, adaptive=config.speculative_adaptive)
            if drafter
            else None
        )

    def close(self) -> None:
        """Stop what the engine runs outside this process (a tensor-parallel model's
        worker ranks). Idempotent; also done at exit."""
        self.runner.close()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def kv_cache_description(self) -> str:
        return self.runner.cache.describe()

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        check_fits(prompt_tokens, max_tokens, self.max_context, self.kv_capacity_tokens)

    # -- requests ---------------------------------------------------------------------

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        self.check_fits(len(prompt_ids), params.max_tokens)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid} is already in use")
        room = min(self.max_context, self.kv_capacity_tokens) - len(prompt_ids)
        seq = Sequence.from_prompt(rid, prompt_ids, params)
        device = self.runner.device
        self.requests[rid] = _Request(
            seq=seq,
            limit=min(params.max_tokens or room, room),
            generator=make_generator(params.seed, device),
            detok=Detokenizer(self.tokenizer),
            stop=StopMatcher(params.stop),
            prompt_t=torch.tensor(prompt_ids, device=device),
            stats=RequestStats(prompt_tokens=len(prompt_ids)),
        )
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed and it ends with reason 'abort'."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        self.scheduler.abort(request_id)
        self._finish(req, "abort", "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop -----------------------------------------------------------------------

    def step(self) -> list[str]:
        """Run one scheduled step; return the ids of requests that produced output."""
        if self.spec is not None:
            self._propose()
        step = self.scheduler.schedule()
        now = time.perf_counter()
        for seq in step.seqs:
            req = self.requests[seq.request_id]
            if not req.scheduled:
                req.scheduled = True
                req.stats.queue_s = now - req.arrival
        seqs, logits = self.runner.execute(step)
        self._observe_cost(step, now)
        self.scheduler.computed(step)
        # Plain greedy rows take their argmax in one call and one device read for the
        # whole batch, not one per sequence (each a GPU sync).
        plain = [s.params.greedy and not s.params.penalized for s in seqs]
        argmax = greedy_tokens(logits) if logits is not None and any(plain) else []
        touched = []
        row = 0
        for i, seq in enumerate(seqs):
            req = self.requests[seq.request_id]
            n = 1 + len(seq.draft_ids)  # its rows of logits: 1, or k + 1 when verified
            rows, row = slice(row, row + n), row + n
            if req.seq.num_uncomputed_tokens != 0 or req.finished:
                continue
            assert logits is not None
            greedy = argmax[rows] if plain[i] else None
            if seq.draft_ids:
                self._verify(req, logits[rows], greedy)
            else:
                self._advance(req, logits[rows.start], greedy[0] if greedy else None)
            touched.append(seq.request_id)
        return touched

    def _propose(self) -> None:
        """Have the drafter propose tokens for the decoding sequences, as many each as
        the controller allows (speculative decoding)."""
        assert self.drafter is not None and self.spec is not None
        seqs = [
            s for s in self.scheduler.running
            if s.num_uncomputed_tokens == 1 and s.status is SequenceStatus.RUNNING
        ]  # fmt: skip
        if not seqs:
            return
        # A sequence proposes no more than it may still generate, less the token that
        # verification adds: its positions stay inside the context.
        caps = [self.requests[s.request_id].limit - s.num_output_tokens - 1 for s in seqs]
        fixed, _ = self.spec.cost.fit()
        if self.drafter.step_seconds and fixed > 0:
            self.spec.draft_cost = self.drafter.step_seconds / fixed
        # Seeded sampling must draw the same whatever the timing and the batch.
        reproducible = [s.params.seed is not None and not s.params.greedy for s in seqs]
        ks = self.spec.budgets([s.request_id for s in seqs], caps, reproducible)
        for seq, k, draft in zip(seqs, ks, self.drafter.propose(seqs, ks), strict=True):
            seq.draft_ids = draft.tokens[:k]
            probs = draft.probs
            self.requests[seq.request_id].draft_probs = None if probs is None else probs[:k]

    def _observe_cost(self, step: Step, started: float) -> None:
        """Feed the controller a decode step's time against its rows."""
        if self.spec is not None and step.seqs and all(step.decode_rows()):
            self.spec.cost.observe(step.total_tokens, time.perf_counter() - started)

    def _verify(self, req: _Request, logits: torch.Tensor, greedy: list[int] | None) -> None:
        """Judge req's drafts against the target's logits (k + 1, V), in order: accept a
        prefix of them, then append the target's own token at the first rejection (or
        after the last draft). Greedy: a draft is accepted when it is the token plain
        decoding would pick, so the output is the same token for token. Sampling:
        `verify_token`, so the output follows the target's distribution."""
        seq, params = req.seq, req.seq.params
        drafts, q = list(seq.draft_ids), req.draft_probs
        req.draft_probs = None
        judged = accepted = 0
        for j, d in enumerate(drafts):
            judged += 1
            if params.greedy:
                token = greedy[j] if greedy else self._sample(req, logits[j])
                ok = token == d
            else:
                p = probabilities(logits[j], params, req.prompt_t, self._history(req))
                replacement = verify_token(p, d, None if q is None else q[j], req.generator)
                ok, token = replacement is None, replacement
            if not ok:
                self._advance(req, logits[j], token)
                break
            accepted += 1
            self._advance(req, logits[j], d, draft=True)
            if req.finished:
                break
        else:
            k = len(drafts)
            self._advance(req, logits[k], greedy[k] if greedy else None)
        assert self.spec is not None
        self.spec.observe_round(seq.request_id, judged, accepted)
        req.stats.spec_rounds += 1
        req.stats.spec_draft_tokens += len(drafts)
        req.stats.spec_accepted_tokens += accepted
        self.scheduler.verified(seq)

    def _history(self, req: _Request) -> torch.Tensor:
        """The generated tokens (N,) on the logits' device where a penalty reads them."""
        seq = req.seq
        history = seq.output_ids if seq.params.penalized else []
        return torch.tensor(history, dtype=torch.long, device=req.prompt_t.device)

    def _sample(self, req: _Request, logits: torch.Tensor) -> int:
        return sample(logits, req.seq.params, req.generator, req.prompt_t, self._history(req))

    def _advance(
        self, req: _Request, logits: torch.Tensor, token: int | None, draft: bool = False
    ) -> None:
        """Append the next token (drawn from logits (V,) unless given) and emit it.
        draft: it is an accepted draft, whose keys the step already stored."""
        seq = req.seq
        if token is None:
            token = self._sample(req, logits)
        k = seq.params.logprobs
        lp = None if k is None else [token_logprob(logits, token, k)]
        now = time.perf_counter()
        if seq.num_output_tokens == 0:
            req.stats.ttft_s = now - req.arrival
            req.stats.cached_prompt_tokens = seq.num_cached_tokens
        else:
            req.stats.itl_s.append(now - req.last_token_time)
        req.last_token_time = now
        seq.append(token)
        if draft:
            self.scheduler.accept_draft(seq)
        if token in self.eos_ids and not seq.params.ignore_eos:
            self._finish(req, "stop", self._tail(req), token, lp)
            return
        text = req.stop.feed(req.detok.add(token))
        if req.stop.stopped:
            self._finish(req, "stop", text, token, lp)
        elif seq.num_output_tokens >= req.limit:
            self._finish(req, "length", text + self._tail(req), token, lp)
        else:
            req.pending.append(Delta(text, [token], logprobs=lp))

    @staticmethod
    def _tail(req: _Request) -> str:
        """Text still held back at the end: incomplete characters, a partial stop string."""
        return req.stop.feed(req.detok.flush()) + req.stop.flush()

    def _finish(
        self,
        req: _Request,
        reason: str,
        text: str,
        token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        if req.seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(req.seq)
        req.finished = True
        if self.spec is not None:
            assert self.drafter is not None
            self.drafter.release(req.seq.request_id)
            self.spec.release(req.seq.request_id)
        req.stats.completion_tokens = req.seq.num_output_tokens
        req.stats.total_s = time.perf_counter() - req.arrival
        ids = [] if token is None else [token]
        req.pending.append(
            Delta(text, ids, finish_reason=reason, stats=req.stats, logprobs=logprobs)
        )

    def take(self, request_id: str) -> list[Delta]:
        """Deltas produced for a request since the last call; forgets it once finished."""
        req = self.requests[request_id]
        out, req.pending = req.pending, []
        if req.finished:
            del self.requests[request_id]
        return out

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Delta]:
        """One request, streamed: yield text deltas as tokens are produced; the last
        carries the finish reason and stats. `cancelled` is polled between steps."""
        rid = self.add_request(prompt_ids, params)
        try:
            while True:
                if cancelled():
                    self.abort(rid)
                else:
                    self.step()
                for delta in self.take(rid):
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            self.abort(rid)  # a consumer that stops early frees the request's blocks
            self.requests.pop(rid, None)
