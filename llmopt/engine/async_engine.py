"""The engine for asyncio servers: a background thread steps the engine while there
is work, and each request's deltas reach its coroutine through an asyncio queue.

    async for delta in async_engine.stream(prompt_ids, params):
        ...

Leaving the loop early (a client that disconnects, a cancelled task) aborts the
request, which frees its KV blocks at once. If a step fails, the requests in flight
end with an error (their streams raise) and the engine thread keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from llmopt.engine.engine import Engine
from llmopt.engine.outputs import Delta
from llmopt.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # the engine is not thread-safe: one caller at a time
        self._wake = threading.Event()
        # request id -> (its event loop, its queue of deltas, or the error that ended it)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            try:
                with self._lock:
                    busy = self.engine.has_unfinished()
                    out = {rid: self.engine.take(rid) for rid in self.engine.step()} if busy else {}
            except Exception as e:  # a failed step fails its requests, not the server
                self._fail_all(e)
                continue
            for rid, deltas in out.items():
                self._deliver(rid, deltas)
            if not busy:
                self._wake.wait()
                self._wake.clear()

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
                self.engine.take(rid)
        for rid in list(self._queues):
            self._deliver(rid, [error])

    def _deliver(self, rid: str, items: list[Delta | Exception]) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, queue = target
        for item in items:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt_ids, params, request_id)
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True  # already aborted by the engine thread
                    raise RuntimeError(f"generation failed: {item}") from item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            if request_id in self.engine.requests:
                self.engine.take(request_id)  # drop its final delta: nobody reads it

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
