"""One HTTP request to an ASGI app in this process, its answer as a stream: first the
response's head (status, headers), then its body in the pieces the app sent them.

An engine replica answers through llmopt's own server app this way, with no socket
and no second HTTP server. httpx's ASGITransport would do it but buffers the whole
body, which would hold a streamed answer back until its last token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

Head = tuple[int, list[tuple[str, str]]]

log = logging.getLogger(__name__)


def _scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def call(
    app: ASGIApp, method: str, path: str, body: bytes, headers: dict[str, str]
) -> AsyncIterator[Head | bytes]:
    """Yield the head, then each non-empty body piece. Leaving early (the caller's
    client went away) tells the app the client disconnected and cancels it, which
    cancels the generation and frees its KV cache."""
    sent: asyncio.Queue[Message] = asyncio.Queue()
    gone = asyncio.Event()
    read = False

    async def receive() -> Message:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(_scope(method, path, headers), receive, sent.put))
    complete = False
    try:
        while not complete:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app's own error, if it raised one
                raise RuntimeError(f"{method} {path}: the app ended without a whole response")
            message = getter.result()
            if message["type"] == "http.response.start":
                pairs = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                yield message["status"], pairs
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                complete = not message.get("more_body", False)
    finally:
        gone.set()
        if not complete:
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            # Its 500 has been sent already (Starlette's error middleware answers, then
            # re-raises for the server to log): log it here, as a server would.
            log.exception("%s %s failed", method, path)
