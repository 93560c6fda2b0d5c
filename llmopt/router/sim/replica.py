"""One simulated llmopt replica: a continuous-batching engine as a timeline of
activities, each ending at a time the event loop wakes it for.

- a prefill: the next waiting request's prompt, minus a cached shared prefix, at the
  calibrated prefill rate, after loading its model if that was a cold start; its first
  token comes out at the end, and it joins the batch;
- a decode run: steps of the whole batch (one token per sequence), each taking the
  calibrated step time for the batch size, until the next sequence finishes, or, if a
  request arrives meanwhile, until the step under way ends (then it is prefilled).

Decode pauses during a prefill (no chunked prefill), the batch is capped at the largest
measured batch size, and KV memory never runs out: what bounds the replica is compute.
Its prefix cache is an LRU of shared prefixes up to `cache_tokens`, of loaded models.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from llmopt.router.sim.calibration import Calibration
from llmopt.router.sim.workload import Request
from llmopt.router.state import ReplicaState, RouteRequest


@dataclass(eq=False)
class Job:
    request: Request
    route: RouteRequest
    cold: bool
    prefix_hit: bool = False
    prefill_s: float = 0.0  # its own load and prefill: TTFT minus this is queueing
    first_token: float = 0.0
    end: float = 0.0


class SimReplica:
    def __init__(self, state: ReplicaState, cal: Calibration, cache_tokens: int) -> None:
        self.state = state
        self.cal = cal
        self.max_batch = cal.max_batch
        self.cache_tokens = cache_tokens
        self.cache: OrderedDict[tuple[str, int], int] = OrderedDict()  # (model, prefix)
        self.cached = 0  # tokens in the cache
        self.waiting: deque[Job] = deque()
        self.batch: list[tuple[int, int, Job]] = []  # (finishing step, serial, job)
        self.steps = 0  # decode steps since the start
        self.serial = 0
        self.activity: Job | int | None = None  # prefilling job, decode steps, or idle
        self.started = 0.0  # when the activity began
        self.version = 0  # bumped when a planned wake-up is replaced

    def admit(self, job: Job, now: float) -> float | None:
        """A routed request arrives; the new wake-up time if the plan changed."""
        self.waiting.append(job)
        if self.activity is None:
            return self._next(now, [])
        if isinstance(self.activity, int) and len(self.batch) < self.max_batch:
            # Cut the decode run at the end of the step under way.
            dt = self.cal.step_s(len(self.batch))
            done = math.ceil((now - self.started) / dt - 1e-9)
            if done < self.activity:
                self.activity = done
                self.version += 1
                return self.started + done * dt
        return None

    def wake(self, now: float, finished: list[Job]) -> float | None:
        """The activity ended at `now`: record what it finished, start the next one."""
        if isinstance(self.activity, Job):
            job = self.activity
            job.first_token = now
            if job.request.output_tokens <= 1:
                self._finish(job, now, finished)
            else:
                self.serial += 1
                entry = (self.steps + job.request.output_tokens - 1, self.serial, job)
                heapq.heappush(self.batch, entry)
        elif isinstance(self.activity, int):
            self.steps += self.activity
            while self.batch and self.batch[0][0] <= self.steps:
                self._finish(heapq.heappop(self.batch)[2], now, finished)
        return self._next(now, finished)

    def _finish(self, job: Job, now: float, finished: list[Job]) -> None:
        job.end = now
        self.state.finish(job.route)
        finished.append(job)

    def _next(self, now: float, finished: list[Job]) -> float | None:
        self.started = now
        self.version += 1
        if self.waiting and len(self.batch) < self.max_batch:
            job = self.waiting.popleft()
            self.activity = job
            job.prefill_s = self._prefill_s(job)
            return now + job.prefill_s
        if self.batch:
            steps = self.batch[0][0] - self.steps
            self.activity = steps
            return now + steps * self.cal.step_s(len(self.batch))
        self.activity = None
        return None

    def _prefill_s(self, job: Job) -> float:
        r = job.request
        seconds = 0.0
        if job.cold:
            seconds += self.cal.load_s
            # The evicted model's cached prefixes went with it.
            for key in [k for k in self.cache if k[0] not in self.state.loaded]:
                self.cached -= self.cache.pop(key)
        tokens = r.prompt_tokens
        if r.prefix >= 0:
            key = (r.model, r.prefix)
            if key in self.cache:
                job.prefix_hit = True
                tokens -= r.prefix_tokens
                self.cache.move_to_end(key)
            else:
                self.cache[key] = r.prefix_tokens
                self.cached += r.prefix_tokens
                while self.cached > self.cache_tokens:
                    self.cached -= self.cache.popitem(last=False)[1]
        return seconds + max(tokens, 1) / self.cal.prefill_tokens_per_s
