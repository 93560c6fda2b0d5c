"""The models one server serves, each in an engine of its own, loaded on demand within
a memory budget.

A request leases its model (`acquire`): a model not loaded is loaded first, and every
request for it waits for that one load. A leased model is never unloaded; its lease
ends with the request's response. Loads and unloads run one at a time, under one
lock, so that the budget is always decided on settled numbers: to make room, the
least recently used idle models are unloaded first; a model that cannot fit even
then is refused with 503 and Retry-After. A model idle for the keep-alive time is
unloaded.

A model's bytes (weights plus KV cache, budget.py) are estimated from its files until
it has been loaded once, then measured by its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine_loop import EngineLoad
from llmopt.errors import LlmoptError, UsageError
from llmopt.openai_wire import APIError
from llmopt.server.budget import (
    default_budget_bytes,
    estimate_bytes,
    fits_at_once,
    gb,
    with_kv_size,
)
from llmopt.server.generation import RequestTimeout
from llmopt.tokenizer import Tokenizer

RETRY_AFTER_S = "5"  # a busy model may have finished by then; another replica may have room
DEFAULT_KEEP_ALIVE_S = 300.0  # several models: Ollama's default, five minutes


@dataclass(eq=False)
class ServedModel:
    name: str  # the id clients send as "model"
    config: EngineConfig  # its model resolved to a path
    engine: AsyncEngine | None = None  # None: not loaded
    bytes: int = 0  # expected bytes: estimated before the first load, then measured
    in_flight: int = 0  # requests holding a lease (also those waiting for the load)
    last_used: float = 0.0  # time.monotonic() when the last lease ended
    loading: asyncio.Task | None = None
    max_context: int | None = None  # known once loaded
    loads: int = 0
    load_seconds: float = 0.0
    unloads: Counter[str] = field(default_factory=Counter)  # by reason: room, idle

    def __post_init__(self) -> None:
        if not self.bytes:
            self.bytes = estimate_bytes(self.config)

    @property
    def idle(self) -> bool:
        return self.engine is not None and self.in_flight == 0


class Lease:
    """One request's hold on a loaded model; release() once, when its response is done."""

    def __init__(self, model: ServedModel, on_release: Callable[[], None]) -> None:
        self.model = model
        self.name = model.name
        self._on_release: Callable[[], None] | None = on_release

    @property
    def engine(self) -> AsyncEngine:
        assert self.model.engine is not None, "a leased model stays loaded"
        return self.model.engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def release(self) -> None:
        if self._on_release is not None:
            self.model.in_flight -= 1
            self.model.last_used = time.monotonic()
            self._on_release, on_release = None, self._on_release
            on_release()


class ModelManager:
    def __init__(
        self,
        models: list[ServedModel],
        budget_bytes: int | None = None,  # None: no limit
        keep_alive_s: float | None = None,  # None: never unload an idle model
        spawn: Callable[[EngineConfig], AsyncEngine] = AsyncEngine.spawn,  # blocking
    ) -> None:
        self.models = {m.name: m for m in models}
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self._spawn = spawn
        self.log: Callable[[str], None] = lambda message: None  # loads and unloads
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._released = asyncio.Event()  # a lease ended: the keep-alive clock restarts
        # Prefix-cache counts of engines since unloaded, so that the server's totals
        # never go backwards.
        self.retired_prefix = (0, 0)

    @classmethod
    def with_defaults(
        cls,
        models: list[tuple[str, EngineConfig]],  # served name, config (model resolved)
        device: torch.device,
        memory_budget_gb: float | None,
        keep_alive_s: float | None,  # -1: never unload
    ) -> ModelManager:
        """`llmopt serve`'s defaults where the settings are None: one model has no budget
        and stays loaded; several share a part of the device's memory
        (budget.default_budget_bytes), each KV cache sized within it, and unload after
        DEFAULT_KEEP_ALIVE_S idle."""
        several = len(models) > 1
        budget: int | None = None
        if memory_budget_gb is not None:
            budget = int(memory_budget_gb * 1e9)
        elif several:
            budget = default_budget_bytes(device)
        if keep_alive_s is None:
            keep_alive_s = DEFAULT_KEEP_ALIVE_S if several else -1
        served = [
            ServedModel(name, with_kv_size(config, budget) if budget else config)
            for name, config in models
        ]
        return cls(served, budget, None if keep_alive_s == -1 else keep_alive_s)

    # -- what the API reports -------------------------------------------------------------

    @property
    def managed(self) -> bool:
        """Whether models are ever loaded or unloaded while serving."""
        return self.budget_bytes is not None or self.keep_alive_s is not None

    def loaded(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.engine is not None]

    def held_bytes(self) -> int:
        return sum(m.bytes for m in self.loaded())

    def max_loaded(self) -> int | None:
        """How many models fit at once (None: every model stays loaded), as the router's
        model-aware policy counts slots."""
        if not self.managed:
            return None
        return fits_at_once([m.bytes for m in self.models.values()], self.budget_bytes)

    def load(self) -> EngineLoad:
        """Every loaded engine's load, summed: the server's totals for /metrics."""
        loads = [m.engine.load() for m in self.loaded() if m.engine is not None]
        hit, miss = self.retired_prefix
        return EngineLoad(
            running=sum(s.running for s in loads),
            waiting=sum(s.waiting for s in loads),
            kv_blocks_used=sum(s.kv_blocks_used for s in loads),
            kv_blocks_total=sum(s.kv_blocks_total for s in loads),
            # one EngineConfig for all: the same block size
            kv_block_size=next(iter(self.models.values())).config.block_size,
            prefix_hit_tokens=hit + sum(s.prefix_hit_tokens for s in loads),
            prefix_miss_tokens=miss + sum(s.prefix_miss_tokens for s in loads),
            prefix_cached_blocks=sum(s.prefix_cached_blocks for s in loads),
        )

    def find(self, name: str | None) -> ServedModel:
        names = ", ".join(f"'{n}'" for n in self.models)
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name is None:
            raise APIError(400, f"name a model: this server serves {names}", param="model")
        model = self.models.get(name)
        if model is None:
            raise APIError(
                404,
                f"model '{name}' is not served here; this server serves {names}",
                param="model",
                code="model_not_found",
            )
        return model

    # -- leases -----------------------------------------------------------------------------

    async def acquire(self, name: str | None, timeout_s: float | None) -> Lease:
        """Lease the model, loading it first if need be (waiting at most timeout_s)."""
        model = self.find(name)
        model.in_flight += 1  # before any wait: from here on it is never unloaded
        lease = Lease(model, self._released.set)
        try:
            if model.engine is None:
                if model.loading is None or model.loading.done():
                    model.loading = asyncio.create_task(self._load(model))
                    model.loading.add_done_callback(_retrieve)
                # The load goes on for the others if this request gives up.
                try:
                    async with asyncio.timeout(timeout_s):
                        await asyncio.shield(model.loading)
                except TimeoutError:
                    raise RequestTimeout(timeout_s or 0) from None
        except BaseException:
            lease.release()
            raise
        return lease

    # -- loading and unloading --------------------------------------------------------------

    def _victims(self, model: ServedModel) -> list[ServedModel] | None:
        """The least recently used idle models to unload so that `model` fits in the
        budget beside the others (None: it cannot, the others being busy)."""
        assert self.budget_bytes is not None
        others = [m for m in self.loaded() if m is not model]
        held = sum(m.bytes for m in others)
        chosen = []
        for m in sorted((m for m in others if m.idle), key=lambda m: m.last_used):
            if held + model.bytes <= self.budget_bytes:
                break
            chosen.append(m)
            held -= m.bytes
        return chosen if held + model.bytes <= self.budget_bytes else None

    def _make_room(self, model: ServedModel) -> list[AsyncEngine]:
        """Detach the engines to unload so that `model` fits, at once (a request that
        arrives for one of them from now on loads it anew); the caller shuts them down."""
        if self.budget_bytes is None:
            return []
        budget = gb(self.budget_bytes)
        if model.bytes > self.budget_bytes:
            raise APIError(
                503,
                f"model '{model.name}' needs about {gb(model.bytes)} of weights and KV "
                f"cache, more than the server's memory budget of {budget}",
                type="server_error",
                code="model_too_large",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        chosen = self._victims(model)
        if chosen is None:
            busy = ", ".join(f"'{m.name}'" for m in self.loaded() if not m.idle)
            raise APIError(
                503,
                f"model '{model.name}' does not fit in the memory budget of {budget} "
                f"while {busy} serve requests; retry shortly",
                type="server_error",
                code="model_not_loaded",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        return [self._detach(m, "room") for m in chosen]

    def _detach(self, model: ServedModel, reason: str) -> AsyncEngine:
        engine, model.engine = model.engine, None
        assert engine is not None
        hit, miss = self.retired_prefix
        s = engine.load()
        self.retired_prefix = (hit + s.prefix_hit_tokens, miss + s.prefix_miss_tokens)
        model.unloads[reason] += 1
        why = "to make room" if reason == "room" else "idle"
        self.log(f"unloaded {model.name} ({why}; {gb(model.bytes)} freed)")
        return engine

    def _install(self, model: ServedModel, engine: AsyncEngine, seconds: float) -> None:
        model.engine, model.bytes = engine, engine.memory_bytes
        model.max_context = engine.max_context
        model.loads += 1
        model.load_seconds += seconds
        model.last_used = time.monotonic()
        self.log(
            f"loaded {model.name} in {seconds:.1f} s (context {engine.max_context} tokens, "
            f"KV cache {engine.kv_capacity_tokens} tokens: {engine.kv_cache_description}; "
            f"{gb(model.bytes)} held, {gb(self.held_bytes())} in all)"
        )

    async def _load(self, model: ServedModel) -> None:
        async with self._lock:
            if model.engine is not None:
                return
            for old in self._make_room(model):
                await asyncio.to_thread(old.shutdown)  # its memory is free after this
            started = time.monotonic()
            try:
                engine = await asyncio.to_thread(self._spawn, model.config)
            except LlmoptError as e:
                raise APIError(
                    500, f"model '{model.name}' could not be loaded: {e.message}", "server_error"
                ) from None
            self._install(model, engine, time.monotonic() - started)
            if self.budget_bytes is not None:
                # It may measure more than its files said: unload more, where idle.
                extra = [self._detach(m, "room") for m in self._victims(model) or []]
                for old in extra:
                    await asyncio.to_thread(old.shutdown)

    def preload(self) -> None:
        """Load every model now, before serving (blocking; nothing is leased yet). With a
        budget too small for all, the least recently loaded make room for the others."""
        for model in self.models.values():
            try:
                unloading = self._make_room(model)
            except APIError as e:
                raise UsageError(e.message) from None
            for old in unloading:
                old.shutdown()
            started = time.monotonic()
            self._install(model, self._spawn(model.config), time.monotonic() - started)

    async def keep_alive(self) -> None:
        """Unload models idle for keep_alive_s, until cancelled (the app runs it)."""
        assert self.keep_alive_s is not None
        while True:
            self._released.clear()
            now = time.monotonic()
            due = [m for m in self.loaded() if m.idle]
            wait = None
            for m in due:
                left = m.last_used + self.keep_alive_s - now
                if left > 0:
                    wait = left if wait is None else min(wait, left)
                    continue
                async with self._lock:
                    if m.idle and m.last_used + self.keep_alive_s <= time.monotonic():
                        await asyncio.to_thread(self._detach(m, "idle").shutdown)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._released.wait()

    def shutdown(self) -> None:
        """Stop every engine (the server is exiting; its requests have drained)."""
        for m in self.loaded():
            assert m.engine is not None
            m.engine.shutdown()
            m.engine = None


def _retrieve(task: asyncio.Task) -> None:
    """A failed load is reported to the requests that waited for it; if all of them gave
    up first, nobody did, which asyncio would log as an error."""
    if not task.cancelled():
        task.exception()
