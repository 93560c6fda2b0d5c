"""The engine for asyncio servers: each request's deltas reach its coroutine through
an asyncio queue, while the engine loop (engine_loop.py) runs elsewhere:

- in a thread of this process (`AsyncEngine(engine)`), for tests and embedding;
- in a process of its own (`AsyncEngine.spawn(config)`, what `llmopt serve` uses), so
  that neither the GIL nor OpenMP's thread pools of the HTTP side slow its steps.

    async for delta in async_engine.stream(prompt_ids, params):
        ...

Coroutines hand requests and aborts to the loop, which applies them before its
next step, so the event loop never waits for a step. Leaving the stream early (a
client that disconnects, a cancelled task) aborts the request, which frees its KV
blocks before the next step. If a step fails, the requests in flight end with an
error (their streams raise) and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from llmopt.engine.engine import Engine, check_fits
from llmopt.engine.engine_loop import Command, EngineLoad, Outputs, load_of, run_engine_loop
from llmopt.engine.footprint import held_bytes, resident_bytes
from llmopt.engine.outputs import Delta
from llmopt.engine.sampling_params import SamplingParams
from llmopt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmopt.engine.config import EngineConfig
    from llmopt.engine.engine_process import EngineProcess


class GenerationError(RuntimeError):
    """A request the engine could not run (a failed step, a refused request)."""


class AsyncEngine:
    def __init__(self, engine: Engine | None = None) -> None:
        # request id -> (its event loop, its queue of deltas or the error that ended it)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._load = EngineLoad(0, 0, 0, 0, 0, 0, 0)
        if engine is None:
            return  # spawn() sets up the process transport
        self.tokenizer: Tokenizer = engine.tokenizer
        self.max_context = engine.max_context
        self.kv_capacity_tokens = engine.kv_capacity_tokens
        self.kv_cache_description = engine.kv_cache_description
        self.memory_bytes = held_bytes(engine)  # weights and KV cache
        self.resident_bytes = resident_bytes()  # the process's, with the model loaded
        self._load = load_of(engine)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # torch's thread count is per OS thread: the engine thread keeps its creator's.
        threads = torch.get_num_threads()

        def receive(block: bool) -> list[Command]:
            commands = [self._inbox.get()] if block else []
            while not self._inbox.empty():
                commands.append(self._inbox.get())
            return commands

        def loop() -> None:
            torch.set_num_threads(threads)
            run_engine_loop(engine, receive, self._deliver)

        self._send = self._inbox.put
        self._thread = threading.Thread(target=loop, name="llmopt-engine", daemon=True)
        self._thread.start()

    @classmethod
    def spawn(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model in an engine process of its own and serve it from there."""
        from llmopt.engine.engine_process import EngineProcess

        self = cls()
        proc = EngineProcess(config, self._deliver, self._fail_all)
        self.tokenizer = proc.tokenizer
        self.max_context = proc.max_context
        self.kv_capacity_tokens = proc.kv_capacity_tokens
        self.kv_cache_description = proc.kv_cache_description
        self.memory_bytes = proc.memory_bytes
        self.resident_bytes = proc.resident_bytes
        # Its cache's size until the first step reports the whole load.
        blocks = self.kv_capacity_tokens // config.block_size
        self._load = EngineLoad(0, 0, 0, blocks, config.block_size, 0, 0)
        self._send = proc.send
        self._thread = proc
        return self

    # -- outputs from the loop (its thread, or the process's reader thread) ------------

    def _deliver(self, outputs: Outputs, load: EngineLoad) -> None:
        self._load = load
        for rid, items in outputs.items():
            target = self._queues.get(rid)
            if target is None:
                continue
            loop, q = target
            for item in items:
                loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        self._deliver({rid: [error] for rid in list(self._queues)}, self._load)

    # -- the asyncio side ------------------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        check_fits(prompt_tokens, max_tokens, self.max_context, self.kv_capacity_tokens)

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Yield the request's deltas as they are produced; the last has finish_reason.
        Raises ContextLengthError at once for a prompt that cannot fit."""
        self.check_fits(len(prompt_ids), params.max_tokens)
        rid = request_id or uuid.uuid4().hex
        q: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), q)
        self._send(("add", rid, prompt_ids, params))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True  # the loop has already dropped it
                    raise GenerationError(f"generation failed: {item}") from item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        self._send(("abort", request_id))

    def load(self) -> EngineLoad:
        """As of the last step; `waiting` also counts requests not yet handed over."""
        load = self._load
        return load._replace(waiting=max(load.waiting, len(self._queues) - load.running))

    @property
    def process(self) -> EngineProcess | None:
        """The engine's own process (None: a thread of this one)."""
        from llmopt.engine.engine_process import EngineProcess

        return self._thread if isinstance(self._thread, EngineProcess) else None

    def shutdown(self) -> None:
        self._send(("stop",))
        self._thread.join(timeout=10)
