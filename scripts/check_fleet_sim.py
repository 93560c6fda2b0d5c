"""Does the fleet simulation (llmopt/router/sim/) reproduce a real run? Issue 27's
check, on a small fleet of this machine: `llmopt router --spawn N` local replicas.

    python scripts/check_fleet_sim.py                  # 2 replicas of SmolLM2, 1 thread each
    python scripts/check_fleet_sim.py --replicas 4 --threads 4 --load 0.7 --duration 90

1. Starts N `llmopt serve` replicas (as `llmopt router --spawn N` does: --threads
   split between them) and `llmopt router --replica ...` over them, then calibrates
   the simulator in this run, on this machine, through the replicas as they serve, all
   at once (they share the machine in the real run), the median of their figures:
   prefill tokens/s (one prompt at a time) and the decode step time at batch 1, 2, 4,
   8 and 16 (that many streamed answers at once), the overheads of serving (HTTP, the
   engine's own process) included, which an in-process engine would leave out.
2. Draws Poisson arrivals at --load of the calibrated capacity, with the simulator's
   own workload generator (one model, shared prefixes, lognormal lengths), and sends
   them to the router at their arrival times as streamed /v1/completions of token ids
   (the prompt's exact length, shared prefixes as the same ids, the answer's exact
   length with ignore_eos).
3. Replays the same requests in the simulator, behind the same policy class.
4. Prints real against simulated P50/P99 time to first token and end-to-end latency
   and throughput, with sim / real ratios, and PASS when the medians and throughput
   agree within --tolerance (default 25%); P99s are shown, not judged (a small run has
   few requests past its P99). Exit code 1 on FAIL.

Run it from the repository root, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import httpx
from rich.console import Console

from llmopt.loader.load import hf_folder_for
from llmopt.router.policies import make_policy
from llmopt.router.prefix_index import PrefixMatch
from llmopt.router.sim.calibration import Calibration
from llmopt.router.sim.fleet import FleetSpec, capacity_rps, replay
from llmopt.router.sim.replica import Job
from llmopt.router.sim.report import RunFigures, figures
from llmopt.router.sim.workload import Generator, Request, Workload, model_names
from llmopt.router.spawn import LocalReplicas, _free_port
from llmopt.router.state import RouteRequest
from llmopt.store.resolve import resolve
from llmopt.store.store import Store
from llmopt.tokenizer import Tokenizer

BATCHES = (1, 2, 4, 8, 16)
# Small requests, so that a run of a minute has enough of them on 2 cores.
WORKLOAD = Workload(
    models=1,
    prefixes_per_model=4,
    shared_prefix_share=0.5,
    prefix_median=256,
    prefix_sigma=0.3,
    prompt_median=64,
    prompt_sigma=0.5,
    output_median=48,
    output_sigma=0.5,
    max_tokens=512,
)


class Calibrated(NamedTuple):
    cal: Calibration
    kv_tokens: int  # the replica's KV cache: the simulated prefix cache's size
    vocab: int  # for random prompt ids


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float]:
    """One streamed completion: (seconds to its first chunk, seconds to its end)."""
    started, first = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            chunk = line.startswith("data: {") and json.loads(line[6:])
            if first is None and chunk and chunk.get("choices"):
                first = time.perf_counter() - started
    end = time.perf_counter() - started
    return (end if first is None else first), end


async def calibrate(
    urls: list[str], model: str, vocab: int, repeats: int, tg: int = 32
) -> Calibration:
    """Prefill tokens/s and decode tokens/s by batch of one replica, measured on all the
    replicas at `urls` at once (the median over them): in the real run they share the
    machine's cores and memory, and one replica measured alone while the others idle
    ran faster than any of them does there."""
    rng = random.Random(0)

    def body(prompt_tokens: int, max_tokens: int) -> dict:
        ids = [rng.randrange(100, vocab) for _ in range(prompt_tokens)]  # never cached
        return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip

    async def on_all(make: Callable[[str], Awaitable[float]]) -> float:
        return statistics.median(await asyncio.gather(*(make(url) for url in urls)))

    async with httpx.AsyncClient(timeout=600) as client:

        async def prefill_of(url: str, pp: int = 256) -> float:
            return pp / (await _stream(client, url, body(pp, 1)))[0]

        async def decode_of(url: str, b: int) -> float:
            runs = await asyncio.gather(*(_stream(client, url, body(64, tg)) for _ in range(b)))
            # every answer's decode, from its first token to its end, at batch b
            return b * (tg - 1) / statistics.median(end - first for first, end in runs)

        await asyncio.gather(*(_stream(client, url, body(16, 4)) for url in urls))  # warm-up
        prefill = statistics.median([await on_all(prefill_of) for _ in range(repeats)])
        decode = {}
        for b in BATCHES:
            rates = [await on_all(lambda url, b=b: decode_of(url, b)) for _ in range(repeats)]
            decode[b] = statistics.median(rates)
    rates = ", ".join(f"{b}: {r:.0f}" for b, r in decode.items())
    source = f"measured in this run: prefill {prefill:.0f} tok/s, decode tok/s by batch {{{rates}}}"
    return Calibration(prefill, decode, 0.0, source)


def prompts_of(requests: list[Request], vocab: int, seed: int) -> list[list[int]]:
    """Token ids of each request's prompt: its shared prefix's ids (the same for every
    request with that prefix), then its own."""
    rng, prefixes = random.Random(seed), {}
    out = []
    for r in requests:
        head: list[int] = []
        if r.prefix >= 0:
            key = (r.prefix, r.prefix_tokens)
            if key not in prefixes:
                prefixes[key] = [rng.randrange(100, vocab) for _ in range(r.prefix_tokens)]
            head = prefixes[key]
        own = r.prompt_tokens - len(head)
        out.append(head + [rng.randrange(100, vocab) for _ in range(own)])
    return out


async def real_run(url: str, model: str, requests: list[Request], prompts: list[list[int]]):
    """Each request sent at its arrival time, streamed; (first token, end) per request,
    in seconds from the run's start."""
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = loop.time() + 0.5  # every task scheduled before the first is due

        async def one(r: Request, ids: list[int]) -> tuple[float, float]:
            await asyncio.sleep(max(0.0, start + r.arrival - loop.time()))
            sent = loop.time() - start
            body = {"model": model, "prompt": ids, "max_tokens": r.output_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
            first, end = await _stream(client, url, body)
            return sent + first, sent + end

        return await asyncio.gather(*(one(r, p) for r, p in zip(requests, prompts, strict=True)))


def as_jobs(requests: list[Request], times: list[tuple[float, float]]) -> list[Job]:
    """The real run's timings as the simulator's jobs, so that one function (figures)
    computes both sides' percentiles."""
    jobs = []
    for r, (first, end) in zip(requests, times, strict=True):
        route = RouteRequest(r.model, r.prompt_tokens + r.output_tokens, PrefixMatch([], 0))
        jobs.append(Job(r, route, cold=False, first_token=first, end=end))
    return jobs


def start_router(a: argparse.Namespace, replica_urls: list[str]) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{_free_port()}"
    cmd = [
        sys.executable, "-m", "llmopt", "router", "--port", url.rsplit(":", 1)[1],
        "--policy", a.policy, "--health-interval", "0.5", "--log-level", "warning",
    ]  # fmt: skip
    for r in replica_urls:
        cmd += ["--replica", r]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the router exited with code {proc.returncode}")
        try:
            up = httpx.get(url + "/health", timeout=2).json().get("healthy_replicas")
            if up == len(replica_urls):
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    sys.exit("error: the router did not see every replica healthy in 60 s")


def compare(real: RunFigures, sim: RunFigures, tolerance: float) -> tuple[str, bool]:
    rows = [  # (label, real, sim, judged)
        ("TTFT P50 (s)", real.ttft_p50, sim.ttft_p50, True),
        ("TTFT P99 (s)", real.ttft_p99, sim.ttft_p99, False),
        ("E2E P50 (s)", real.e2e_p50, sim.e2e_p50, True),
        ("E2E P99 (s)", real.e2e_p99, sim.e2e_p99, False),
        ("output tok/s", real.tokens_per_s, sim.tokens_per_s, True),
    ]
    lines = [f"| metric | real | simulated | sim / real | within ±{tolerance:.0%} |"]
    lines.append("|---|---|---|---|---|")
    ok = True
    for label, r, s, judged in rows:
        ratio = s / r if r else float("inf")
        inside = abs(ratio - 1) <= tolerance
        ok &= inside or not judged
        verdict = ("yes" if inside else "NO") if judged else "(not judged)"
        lines.append(f"| {label} | {r:.3f} | {s:.3f} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines), ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split)")
    p.add_argument("--policy", default="least-connections")
    p.add_argument("--load", type=float, default=0.6, help="share of the calibrated capacity")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=0.5,
        help="GB per replica: room for every answer at once (the simulator has no limit)",
    )
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3, help="calibration repetitions")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.replicas < 1 or a.threads < a.replicas:
        sys.exit("error: --replicas must be at least 1 and at most --threads")
    make_policy(a.policy)  # an unknown name fails now, not after the replicas start
    console = Console(stderr=True)
    name, path = resolve(a.model, Store(), console)
    threads = a.threads // a.replicas  # as `router --spawn` splits them
    serve_args = ["--no-response-cache", "--kv-cache-memory", str(a.kv_cache_memory)]
    replicas = LocalReplicas(str(path), a.replicas, a.threads, serve_args)
    try:
        replicas.wait_ready(timeout_s=300)
        first = replicas.urls[0]
        served = httpx.get(first + "/v1/models").json()["data"][0]["id"]
        status = httpx.get(first + "/v1/status").json()["models"][0]
        vocab = Tokenizer(hf_folder_for(path, Store(), console)).vocab_size
        cal = asyncio.run(calibrate(replicas.urls, served, vocab, a.repeats))
        print(f"calibration: {cal.source}", file=sys.stderr)
        rate = a.load * a.replicas * capacity_rps(cal, WORKLOAD, a.seed, batch=cal.max_batch)
        requests = Generator(WORKLOAD, a.seed).arrivals(rate, a.duration)
        print(f"{len(requests)} requests at {rate:.2f}/s ({a.load:.0%} load)", file=sys.stderr)
        prompts = prompts_of(requests, vocab, a.seed)
        proc, url = start_router(a, replicas.urls)
        try:
            times = asyncio.run(real_run(url, served, requests, prompts))
        finally:
            proc.send_signal(signal.SIGTERM)  # drains
            proc.wait(timeout=120)
    finally:
        replicas.stop()
    real = figures(a.policy, a.load, as_jobs(requests, times))
    kv_tokens = status["kv_cache_tokens_total"]

    spec = FleetSpec(replicas=a.replicas, model_slots=1, cache_tokens=kv_tokens)
    models = [[model_names(WORKLOAD)[0]] for _ in range(a.replicas)]
    sim = figures(a.policy, a.load, replay(make_policy(a.policy), cal, spec, requests, models))

    table, ok = compare(real, sim, a.tolerance)
    print(
        f"{a.replicas} replicas of {name}, {threads} thread(s) each, {a.policy}, "
        f"{len(requests)} requests over {a.duration:g} s at {a.load:.0%} load"
    )
    print(table)
    print(f"\n{'PASS' if ok else 'FAIL'}: medians and throughput within ±{a.tolerance:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
