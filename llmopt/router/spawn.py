"""`llmopt router --spawn N MODEL`: N local `llmopt serve` processes behind the router,
each on a free loopback port with its share of the CPU threads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from llmopt.errors import LlmoptError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalReplicas:
    def __init__(self, model: str, count: int, threads: int, serve_args: list[str]) -> None:
        # Each engine gets an equal share: N engines each on every core would contend
        # for them, and a decode step is only as fast as its slowest thread.
        per = max(1, threads // count)
        self.urls: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for _ in range(count):
            port = _free_port()
            cmd = [sys.executable, "-m", "llmopt", "serve", model, "--port", str(port)]
            cmd += ["--threads", str(per), "--log-level", "warning", *serve_args]
            self.procs.append(subprocess.Popen(cmd))
            self.urls.append(f"http://127.0.0.1:{port}")

    def wait_ready(self, timeout_s: float) -> None:
        """Until every replica answers /health; a LlmoptError if one exits or is late
        (its own error is on stderr above)."""
        deadline = time.monotonic() + timeout_s
        pending = list(zip(self.urls, self.procs, strict=True))
        while pending:
            url, proc = pending[0]
            if proc.poll() is not None:
                self.stop()
                raise LlmoptError(f"the replica at {url} exited with code {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LlmoptError(f"the replica at {url} did not start in {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (each drains its requests in flight), then SIGKILL the late ones."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
