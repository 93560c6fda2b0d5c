"""The simulated traffic: Poisson arrivals; models by Zipf popularity; most prompts start
with one of a few shared prefixes (system prompts, documents) of their model, also
Zipf-popular; prompt, prefix and answer lengths lognormal, so heavy-tailed."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

CHARS_PER_TOKEN = 4  # as the router estimates (llmopt/router/request_view.py)


@dataclass(frozen=True)
class Workload:
    models: int = 20
    model_zipf: float = 1.0
    prefixes_per_model: int = 64
    prefix_zipf: float = 1.0
    shared_prefix_share: float = 0.8  # requests whose prompt starts with a shared prefix
    prefix_median: int = 400  # tokens
    prefix_sigma: float = 0.5
    prompt_median: int = 100  # tokens after the prefix
    prompt_sigma: float = 1.0
    output_median: int = 100
    output_sigma: float = 1.0
    max_tokens: int = 4096  # a length cap, as a context window would put


@dataclass(eq=False)
class Request:
    arrival: float
    model: str
    prefix: int  # shared prefix id within its model; -1: none
    prefix_tokens: int
    prompt_tokens: int  # the whole prompt, prefix included
    output_tokens: int
    text: str  # what the router's prefix index reads


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def model_names(w: Workload) -> list[str]:
    return [f"model-{i:02d}" for i in range(w.models)]


def popularity(w: Workload) -> list[float]:
    weights = _zipf_weights(w.models, w.model_zipf)
    return [x / sum(weights) for x in weights]


class Generator:
    def __init__(self, w: Workload, seed: int) -> None:
        self.w = w
        self.rng = random.Random(seed)
        self.names = model_names(w)
        self.model_weights = _zipf_weights(w.models, w.model_zipf)
        self.prefix_weights = _zipf_weights(w.prefixes_per_model, w.prefix_zipf)
        rng = random.Random(seed + 1)
        self.prefix_len = [
            [self._lognormal(rng, w.prefix_median, w.prefix_sigma) for _ in self.prefix_weights]
            for _ in self.names
        ]
        self.serial = 0

    def _lognormal(self, rng: random.Random, median: int, sigma: float) -> int:
        return max(1, min(self.w.max_tokens, round(median * math.exp(rng.gauss(0, sigma)))))

    def request(self, arrival: float) -> Request:
        w, rng = self.w, self.rng
        m = rng.choices(range(w.models), self.model_weights)[0]
        shared = rng.random() < w.shared_prefix_share
        p = rng.choices(range(w.prefixes_per_model), self.prefix_weights)[0] if shared else -1
        prefix = self.prefix_len[m][p] if shared else 0
        own = self._lognormal(rng, w.prompt_median, w.prompt_sigma)
        output = self._lognormal(rng, w.output_median, w.output_sigma)
        self.serial += 1
        # The prefix's text is the same for every request that shares it; the rest is
        # the request's own. Only lengths and sharing matter to the index.
        head = f"[{m}:{p}]".ljust(prefix * CHARS_PER_TOKEN, ".") if shared else ""
        tail = f"<{self.serial}>".ljust(own * CHARS_PER_TOKEN, "~")
        name = self.names[m]
        return Request(arrival, name, p, prefix, prefix + own, output, f"{name}\n{head}{tail}")

    def arrivals(self, rate: float, duration: float) -> list[Request]:
        """Poisson arrivals at `rate` per second for `duration` seconds."""
        out, t = [], self.rng.expovariate(rate)
        while t < duration:
            out.append(self.request(t))
            t += self.rng.expovariate(rate)
        return out
