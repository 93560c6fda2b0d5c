"""One API request's generation: its n x prompts choices run as engine requests at
once, their deltas merged into one stream of (choice index, Delta) events.

Leaving the stream early (a client that went away, a timeout) cancels every choice,
which aborts its engine request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.outputs import Delta, RequestStats, TokenLogprob
from llmopt.engine.sampling_params import SamplingParams

Event = tuple[int, Delta]  # (choice index, delta)


class RequestTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request ran past the server's timeout of {timeout_s:g} s")


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams


async def run_jobs(
    engine: AsyncEngine,
    jobs: list[Job],
    timeout_s: float | None,
    on_finish: Callable[[RequestStats], None] = lambda s: None,
) -> AsyncIterator[Event]:
    """Yield every job's deltas as they come; job i's deltas carry index i."""
    q: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for delta in engine.stream(job.prompt_ids, job.params):
                q.put_nowait((i, delta))
        except Exception as e:
            q.put_nowait((i, e))

    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    remaining = len(jobs)
    try:
        while remaining:
            try:
                async with asyncio.timeout_at(deadline):
                    i, item = await q.get()
            except TimeoutError:
                raise RequestTimeout(timeout_s or 0) from None
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
                if item.stats is not None:
                    on_finish(item.stats)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()  # each stream's own clean-up aborts its engine request
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    """Everything one choice produced: what a cache stores and a response is built from."""

    deltas: list[Delta] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1].finish_reason if self.deltas else None

    @property
    def stats(self) -> RequestStats:
        last = self.deltas[-1].stats if self.deltas else None
        return last or RequestStats()

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [lp for d in self.deltas for lp in d.logprobs or []]


def replay(results: list[ChoiceResult]) -> list[Event]:
    """A cached answer as the events a live one would have produced."""
    return [(i, d) for i, r in enumerate(results) for d in r.deltas]
