"""One serving benchmark run against a URL: warm-up, load, server-side figures,
summary. And `llmopt serve` started as a subprocess, so that the local engine is
measured through the same HTTP path, in its own process, as any other server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmopt.bench.loadgen import LoadSpec, RequestResult, Target, run_load
from llmopt.bench.metrics import SLO, summarize
from llmopt.bench.server_stats import ServerStats
from llmopt.bench.workloads import Conversation
from llmopt.errors import UsageError


async def _measure(
    target: Target,
    conversations: list[Conversation],
    spec: LoadSpec,
    warmup: list[Conversation],
    console: Console,
    label: str,
) -> tuple[list[RequestResult], float, dict[str, float]]:
    if warmup:
        first_turns = [replace(c, turns=c.turns[:1]) for c in warmup]
        await run_load(target, first_turns, LoadSpec(concurrency=1, seed=spec.seed))
    stats = ServerStats(target)
    stats.start()
    total = None if spec.duration_s else sum(len(c.turns) for c in conversations)
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task(label, total=total)
        results, elapsed = await run_load(
            target, conversations, spec, lambda r: progress.advance(task)
        )
    return results, elapsed, await stats.stop()


def run_benchmark(
    target: Target,
    conversations: list[Conversation],
    spec: LoadSpec,
    warmup: list[Conversation],  # sent first, one at a time, not measured
    percentiles: tuple[float, ...],
    slo: SLO | None,
    num_devices: int,
    console: Console,
    label: str = "requests",
) -> tuple[dict, list[RequestResult]]:
    results, elapsed, server = asyncio.run(
        _measure(target, conversations, spec, warmup, console, label)
    )
    summary = summarize(results, elapsed, percentiles, slo, num_devices)
    return summary | server, results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(model: str | None, serve_args: list[str], console: Console) -> Iterator[Target]:
    """`llmopt serve MODEL ARGS` on a free loopback port until the block ends."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "llmopt",
        "serve",
        *([model] if model else []),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *serve_args,
    ]
    console.print(f"[dim]starting: llmopt serve {' '.join(cmd[4:])}[/dim]", highlight=False)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                raise UsageError(f"llmopt serve failed: {err[-1] if err else proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise UsageError("llmopt serve did not become healthy in 10 minutes")
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        yield Target(url, name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
