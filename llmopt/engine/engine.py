"""The generation loop shared by `run`, `serve` and `bench`: prompt ids in, a stream of
text deltas out, with stop conditions and per-request timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from llmopt.engine.detokenizer import Detokenizer
from llmopt.engine.outputs import Delta, RequestStats
from llmopt.engine.runner import Runner
from llmopt.engine.sampler import make_generator, sample
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.stop import StopMatcher
from llmopt.errors import ContextLengthError
from llmopt.tokenizer import Tokenizer


class Engine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, eos_ids: set[int]) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """Refuse, with the numbers, a prompt that (with max_tokens) overflows the context."""
        need = prompt_tokens + (max_tokens or 1)
        if need > self.max_context:
            asked = f" + max_tokens {max_tokens}" if max_tokens else " (plus one generated token)"
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens{asked} = {need}, more than the "
                f"model's context of {self.max_context} tokens; shorten the prompt"
                + (" or lower max_tokens" if max_tokens else "")
            )

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Delta]:
        """Yield text deltas as tokens are produced; the last delta carries the stats.

        `cancelled` is polled between tokens; when it returns True generation ends
        with finish_reason "abort".
        """
        self.check_fits(len(prompt_ids), params.max_tokens)
        limit = params.max_tokens or self.max_context - len(prompt_ids)
        limit = min(limit, self.max_context - len(prompt_ids))
        stats = RequestStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        device = self.runner.device
        generator = make_generator(params.seed, device)
        prompt_t = torch.tensor(prompt_ids, device=device)
        output: list[int] = []
        detok = Detokenizer(self.tokenizer)
        stop = StopMatcher(params.stop)
        reused = self.runner.reusable_prefix(prompt_ids)
        stats.cached_prompt_tokens = reused
        logits = self.runner.prefill(prompt_ids[reused:], reused)
        last = start
        reason: str | None = None
        while reason is None:
            token = sample(logits, params, generator, prompt_t, torch.tensor(output, device=device))
            now = time.perf_counter()
            if output:
                stats.itl_s.append(now - last)
            else:
                stats.ttft_s = now - start
            last = now
            output.append(token)
            if token in self.eos_ids and not params.ignore_eos:
                reason, text = "stop", stop.feed(detok.flush()) + stop.flush()
            else:
                text = stop.feed(detok.add(token))
                if stop.stopped:
                    reason = "stop"
                elif len(output) >= limit:
                    reason, text = "length", text + stop.feed(detok.flush()) + stop.flush()
                elif cancelled():
                    reason = "abort"
            if reason is None:
                yield Delta(text, [token])
                logits = self.runner.decode(token, len(prompt_ids) + len(output) - 1)
        stats.completion_tokens = len(output)
        stats.total_s = time.perf_counter() - start
        yield Delta(text, [token], finish_reason=reason, stats=stats)
