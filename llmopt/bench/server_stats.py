"""Server-side figures, when the server is llmopt: read from its /metrics during a
run (peak KV blocks and queue) and across it (prefix-cache hit rate of the run, and
speculative decoding's acceptance rate and mean accepted length where it ran)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from llmopt.bench.loadgen import Target
from llmopt.engine.outputs import RequestStats


def _parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("llmopt_") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class ServerStats:
    """Poll /metrics while the run goes on; `summary()` afterwards."""

    def __init__(self, target: Target, interval_s: float = 0.5) -> None:
        base = target.url.rstrip("/").removesuffix("/v1")
        self.url = base + "/metrics"
        self.headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self.interval_s = interval_s
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    async def _read(self, client: httpx.AsyncClient) -> dict[str, float] | None:
        try:
            r = await client.get(self.url, headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return None
        m = _parse(r.text) if r.status_code == 200 else {}
        return m if "llmopt_kv_blocks_total" in m else None  # not an llmopt server

    async def _poll(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                m = await self._read(client)
                if m is None:
                    return
                self.first = self.first or m
                self.last = m
                for k in (
                    "llmopt_kv_blocks_used",
                    "llmopt_requests_running",
                    "llmopt_requests_waiting",
                ):
                    self.peak[k] = max(self.peak.get(k, 0.0), m.get(k, 0.0))
                await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with httpx.AsyncClient() as client:
            final = await self._read(client)
        if final is None or self.first is None:
            return {}
        first = self.first

        def grew(counter: str) -> float:
            # .get: a server older than a counter lacks it
            return final.get(counter, 0.0) - first.get(counter, 0.0)

        hit = grew("llmopt_prefix_cache_hit_tokens_total")
        miss = grew("llmopt_prefix_cache_miss_tokens_total")
        # The run's speculation counts, into RequestStats for its rates' arithmetic.
        spec = RequestStats(
            spec_rounds=int(grew("llmopt_spec_decode_num_drafts_total")),
            spec_draft_tokens=int(grew("llmopt_spec_decode_num_draft_tokens_total")),
            spec_accepted_tokens=int(grew("llmopt_spec_decode_num_accepted_tokens_total")),
        )
        total = final["llmopt_kv_blocks_total"]  # 0 until the engine's first step
        return {
            "server_prefix_cache_hit_rate": hit / (hit + miss) if hit + miss else 0.0,
            "server_peak_kv_blocks_used_fraction": (
                self.peak["llmopt_kv_blocks_used"] / total if total else 0.0
            ),
            "server_peak_requests_running": self.peak["llmopt_requests_running"],
            "server_peak_requests_waiting": self.peak["llmopt_requests_waiting"],
        } | {f"server_{k}": v for k, v in spec.spec_dict().items()}
