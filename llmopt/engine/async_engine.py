"""The engine for asyncio servers: a background thread steps the engine while there
is work, and each request's deltas reach its coroutine through an asyncio queue.

    async for delta in async_engine.stream(prompt_ids, params):
        ...

Only the engine thread touches the engine. Coroutines hand it new requests and
aborts through an inbox that it drains before every step, so the event loop never
waits for a step (a long prefill chunk) to finish: other streams keep flushing.
Leaving the loop early (a client that disconnects, a cancelled task) aborts the
request, which frees its KV blocks before the next step. If a step fails, the
requests in flight end with an error (their streams raise) and the thread keeps
serving.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

import torch

from llmopt.engine.engine import Engine
from llmopt.engine.outputs import Delta
from llmopt.engine.sampling_params import SamplingParams


class EngineLoad(NamedTuple):
    """What the engine holds right now, for metrics and backpressure."""

    running: int  # requests in the running batch
    waiting: int  # accepted, not yet scheduled (or preempted)
    kv_blocks_used: int  # referenced by a request (cached, unreferenced blocks are free)
    kv_blocks_total: int
    prefix_hit_tokens: int
    prefix_miss_tokens: int


class GenerationError(RuntimeError):
    """A request the engine could not run (a failed step, a refused request)."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        # request id -> (its event loop, its queue of deltas, or the error that ended it)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        # torch's thread count is per OS thread: the engine thread keeps its creator's.
        self._num_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
        self._thread.start()

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self._num_threads)
        while not self._stopped:
            self._drain_inbox()
            busy = self.engine.has_unfinished()
            if busy:
                try:
                    out = {rid: self.engine.take(rid) for rid in self.engine.step()}
                except Exception as e:  # a failed step fails its requests, not the server
                    self._fail_all(e)
                    continue
                for rid, deltas in out.items():
                    self._deliver(rid, deltas)
            elif self._inbox.empty():
                self._wake.wait()
                self._wake.clear()

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            command, rid, *args = self._inbox.get()
            if command == "abort":
                self.engine.abort(rid)
                if rid in self.engine.requests:
                    self.engine.take(rid)  # drop its final delta: nobody reads it
                continue
            try:
                self.engine.add_request(*args, request_id=rid)
            except Exception as e:
                self._deliver(rid, [e])

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self.engine.take(rid)
        for rid in list(self._queues):
            self._deliver(rid, [error])

    def _deliver(self, rid: str, items: list[Delta] | list[Exception]) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, q = target
        for item in items:
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _send(self, *command: object) -> None:
        self._inbox.put(command)
        self._wake.set()

    # -- the asyncio side -----------------------------------------------------------------

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Yield the request's deltas as they are produced; the last has finish_reason.
        Raises ContextLengthError at once for a prompt that cannot fit."""
        self.engine.check_fits(len(prompt_ids), params.max_tokens)  # reads no mutable state
        rid = request_id or uuid.uuid4().hex
        q: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), q)
        self._send("add", rid, prompt_ids, params)
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True  # the engine thread has already dropped it
                    raise GenerationError(f"generation failed: {item}") from item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        self._send("abort", request_id)

    def load(self) -> EngineLoad:
        """A snapshot read without stopping the engine thread (each field is one read)."""
        blocks = self.engine.blocks
        running = len(self.engine.scheduler.running)
        return EngineLoad(
            running=running,
            waiting=max(0, len(self._queues) - running),
            kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
            kv_blocks_total=blocks.num_blocks,
            prefix_hit_tokens=blocks.hit_tokens,
            prefix_miss_tokens=blocks.miss_tokens,
        )

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
