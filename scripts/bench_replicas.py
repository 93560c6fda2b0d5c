"""Issue 27's real run: 2 local replicas behind `llmopt router` against 1 `llmopt
serve`, on the same total cores, the same workload through `llmopt bench --url`.

    python scripts/bench_replicas.py                        # SmolLM2, 2 threads in all
    python scripts/bench_replicas.py --threads 4 --replicas 4 -n 128 -c 16

Run it from the repository root (`python -m llmopt` starts this checkout's servers).
First one `llmopt serve MODEL --threads T`; then `llmopt router --spawn N MODEL
--threads T`, which gives each of its N replicas T // N threads (router/spawn.py). Each
configuration gets the machine alone, one after the other. Prints, for each, request
and output throughput, TTFT P50/P99 and end-to-end P50/P99, and router / server ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmopt.router.spawn import LocalReplicas, _free_port

ROWS = [  # (label, key of `llmopt bench --json`)
    ("requests/s", "request_throughput"),
    ("output tok/s", "output_throughput"),
    ("TTFT P50 (ms)", "median_ttft_ms"),
    ("TTFT P99 (ms)", "p99_ttft_ms"),
    ("E2E P50 (ms)", "median_e2el_ms"),
    ("E2E P99 (ms)", "p99_e2el_ms"),
]


def llmopt(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmopt", *args]


def bench(url: str, a: argparse.Namespace, name: str) -> dict:
    """`llmopt bench --url` on the workload; its JSON summary."""
    load = os.getloadavg()[0]
    print(f"== {name}: load average {load:.2f} before the run", file=sys.stderr)
    cmd = llmopt(
        "bench", "--url", url, "--workload", a.workload, "-n", str(a.num_prompts),
        "-c", str(a.concurrency), "--input-len", str(a.input_len),
        "--output-len", str(a.output_len), "--seed", str(a.seed), "--percentiles", "50,99",
        "--json",
    )  # fmt: skip
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def wait_router(url: str, replicas: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until the router reports every replica healthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the router exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("healthy_replicas") == replicas:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"error: the router's {replicas} replicas were not healthy in {timeout_s:.0f} s")


def run_single(a: argparse.Namespace) -> dict:
    server = LocalReplicas(a.model, 1, a.threads, shlex.split(a.serve_args))
    try:
        server.wait_ready(timeout_s=300)
        return bench(server.urls[0], a, f"1 server, {a.threads} threads")
    finally:
        server.stop()


def run_router(a: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{_free_port()}"
    cmd = llmopt(
        "router", "--spawn", str(a.replicas), a.model, "--threads", str(a.threads),
        "--port", url.rsplit(":", 1)[1], "--policy", a.policy, "--serve-args", a.serve_args,
        "--health-interval", "0.5", "--log-level", "warning",
    )  # fmt: skip
    proc = subprocess.Popen(cmd)
    try:
        wait_router(url, a.replicas, proc, timeout_s=300)
        per = max(1, a.threads // a.replicas)
        return bench(url, a, f"router over {a.replicas} replicas of {per} thread(s)")
    finally:
        proc.send_signal(signal.SIGTERM)  # drains, then stops its replicas
        proc.wait(timeout=60)


def report(single: dict, routed: dict, a: argparse.Namespace) -> str:
    per = max(1, a.threads // a.replicas)
    head = f"1 serve ({a.threads} threads)"
    tail = f"router, {a.replicas} x {per} thread(s)"
    lines = [f"| metric | {head} | {tail} | router / serve |", "|---|---|---|---|"]
    for label, key in ROWS:
        s, r = single[key], routed[key]
        lines.append(f"| {label} | {s:,.2f} | {r:,.2f} | {r / s:.2f}x |")
    failed = single["failed"] + routed["failed"]
    lines.append(f"\n{single['completed']} + {routed['completed']} requests, {failed} failed")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, both ways")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policy", default="least-connections")
    p.add_argument("--workload", default="random")
    p.add_argument("-n", "--num-prompts", type=int, default=64)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--serve-args",
        default="--no-response-cache --kv-cache-memory 0.2",
        help="options for every `llmopt serve`, both ways",
    )
    p.add_argument("--json", type=Path, help="write both bench summaries here")
    a = p.parse_args()
    if a.replicas < 1 or a.threads < a.replicas:
        sys.exit("error: --replicas must be at least 1 and at most --threads")
    single = run_single(a)
    routed = run_router(a)
    if a.json:
        a.json.write_text(json.dumps({"single": single, "router": routed}, indent=2))
    print(report(single, routed, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
