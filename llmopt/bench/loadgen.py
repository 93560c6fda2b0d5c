"""The load generator: streams chat completions from any OpenAI-compatible server and
times them from the client side, from the streamed chunks.

Arrivals are a fixed concurrency (N conversations in flight) or Poisson at a request
rate (optionally capped by a concurrency). A failure (HTTP error, error event,
dropped connection, timeout) is recorded with its reason, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from llmopt.bench.workloads import Conversation


@dataclass
class RequestResult:
    start: float  # seconds since the run began
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # seconds to the first content chunk
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""


@dataclass(frozen=True)
class Target:
    url: str  # base, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None
    api_key: str | None = None
    timeout_s: float = 600.0

    @property
    def chat_url(self) -> str:
        base = self.url.rstrip("/")
        return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def send(
    client: httpx.AsyncClient,
    target: Target,
    messages: list[dict[str, str]],
    max_tokens: int,
    ignore_eos: bool,
    t0: float,
    clock: Callable[[], float] = time.perf_counter,  # seconds; t0 is on it
) -> RequestResult:
    payload = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        "cache": False,  # llmopt's response cache would not measure the engine
    }
    if target.model:
        payload["model"] = target.model
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    start = clock()
    res = RequestResult(start=start - t0)
    pieces: list[str] = []
    chunks = 0
    last = start
    done = False
    try:
        async with client.stream(
            "POST", target.chat_url, json=payload, headers=headers, timeout=target.timeout_s
        ) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    body = json.loads(body)["error"]["message"]
                res.error = f"HTTP {r.status_code}: {body[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    res.error = f"error event: {err.get('message', err)}"[:200]
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                for choice in obj.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = clock()
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(content)
    except (httpx.HTTPError, ValueError, OSError) as e:
        res.error = _reason(e)
        return res
    res.e2e = clock() - start
    res.output_tokens = res.output_tokens or chunks  # a server without usage: chunks
    res.text = "".join(pieces)
    # A stream cut short (no [DONE]) or one without any text is a failure: every request
    # asks for at least one token, and a benchmark must not count what it did not get.
    if not done:
        res.error = "the stream ended before [DONE]"
    elif res.ttft is None:
        res.error = "the response had no text"
    res.ok = res.error is None
    return res


@dataclass
class LoadSpec:
    concurrency: int | None = None  # conversations in flight (None: unbounded)
    request_rate: float | None = None  # Poisson arrivals per second (None: all at once)
    duration_s: float | None = None  # keep cycling the workload until then
    seed: int = 0


async def run_load(
    target: Target,
    conversations: list[Conversation],
    spec: LoadSpec,
    on_done: Callable[[RequestResult], None] = lambda r: None,
) -> tuple[list[RequestResult], float]:
    """Run every conversation (or cycle them for duration_s); return the results of
    every request and the wall time of the run."""
    rng = random.Random(spec.seed)
    limit = asyncio.Semaphore(spec.concurrency or 1_000_000)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()

        async def converse(conv: Conversation) -> None:
            async with limit:
                history = [{"role": "system", "content": conv.system}] if conv.system else []
                history += conv.history
                for turn in conv.turns:
                    history.append({"role": "user", "content": turn.content})
                    res = await send(client, target, history, turn.max_tokens, conv.ignore_eos, t0)
                    results.append(res)
                    on_done(res)
                    if not res.ok:
                        return
                    history.append({"role": "assistant", "content": res.text})

        tasks = []
        source = itertools.cycle(conversations) if spec.duration_s else iter(conversations)
        for conv in source:
            elapsed = time.perf_counter() - t0
            if spec.duration_s is not None and elapsed >= spec.duration_s:
                break
            if spec.concurrency and not spec.request_rate:
                await limit.acquire()  # fixed concurrency: start one as one finishes
                limit.release()
            tasks.append(asyncio.create_task(converse(conv)))
            if spec.request_rate:
                await asyncio.sleep(rng.expovariate(spec.request_rate))
            else:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0
