"""How many tokens each sequence may propose this step, from what speculation has
measured: each sequence's acceptance rate and the cost of a verification row.

A step of R rows costs a + b R (fit online, `StepCost`). Proposing the j-th token of a
sequence whose tokens are accepted with probability alpha each gains alpha**j expected
tokens at a cost of one row (plus the drafter's own cost per token). Adding it raises
the step's throughput exactly when its gain exceeds the step's current tokens per unit
of time times that cost, so proposals are added best first while that holds. At batch
1 a row is cheap against the weight read and good sequences propose up to the limit;
in a large batch, rows cost nearly their share of the step and only sequences that are
almost always right propose at all. Low acceptance switches a sequence off the same way.
"""

from __future__ import annotations

import heapq
import math

PRIOR_ROW_COST = 0.2  # b / a before any measurement (0.18-0.29 measured: BENCHMARKS.md)
PRIOR_ACCEPTANCE = 0.5  # of a sequence's first proposals, before the global rate is known
FORGET = 0.98  # per observed step (StepCost) or verification round (acceptance)
PROBE_EVERY = 16  # rounds: a switched-off sequence proposes one token this often


class StepCost:
    """Least squares of step time against rows with exponential forgetting, seeded by a
    weak prior so that steps that all have the same rows still give a slope."""

    def __init__(self, prior_ratio: float = PRIOR_ROW_COST) -> None:
        self.prior_ratio = prior_ratio
        self.sums: list[float] | None = None  # weight, x, y, xx, xy

    def observe(self, rows: int, seconds: float) -> None:
        if self.sums is None:
            a0 = seconds / (1 + self.prior_ratio * rows)
            self.sums = [0.0] * 5
            for x in (1, 17):  # the prior: two points on a0 * (1 + ratio * x), weight 2
                self._add(x, a0 * (1 + self.prior_ratio * x), 2.0)
        self.sums = [s * FORGET for s in self.sums]
        self._add(rows, seconds, 1.0)

    def _add(self, x: float, y: float, w: float) -> None:
        s = self.sums
        assert s is not None
        s[0] += w
        s[1] += w * x
        s[2] += w * y
        s[3] += w * x * x
        s[4] += w * x * y

    def fit(self) -> tuple[float, float]:
        """(a, b) in seconds: a step's fixed cost and a row's; (0, 0) before any step."""
        if self.sums is None:
            return 0.0, 0.0
        w, x, y, xx, xy = self.sums
        var = w * xx - x * x
        b = (w * xy - x * y) / var if var > 0 else 0.0
        return (y - b * x) / w, b

    @property
    def row_ratio(self) -> float:
        """b / a: what one more row adds to a step, relative to a step's fixed cost."""
        if self.sums is None:
            return self.prior_ratio
        a, b = self.fit()
        if a <= 0:
            return 1.0
        return min(max(b / a, 0.005), 1.0)


class _Acceptance:
    """Decayed counts of accepted tokens and of rejections (one per round at most):
    their ratio estimates the per-token acceptance probability of a geometric run."""

    def __init__(self, alpha: float) -> None:
        self.accepted, self.rejected = 2 * alpha, 2 * (1 - alpha)
        self.idle = 0  # rounds since it last proposed

    def observe(self, proposed: int, accepted: int) -> None:
        self.accepted = self.accepted * FORGET + accepted
        self.rejected = self.rejected * FORGET + (accepted < proposed)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def cautious(self) -> float:
        """alpha less one standard error of its estimate: a sequence with few rounds
        behind it (or a lucky run) proposes as if less sure, which is what keeps
        speculation from costing where its margin is thin (a large batch)."""
        a, n = self.alpha, self.accepted + self.rejected
        return max(a - math.sqrt(a * (1 - a) / (n + 1)), 0.0)


class SpecController:
    def __init__(self, max_tokens: int, draft_cost: float = 0.0, adaptive: bool = True) -> None:
        self.max_tokens = max_tokens
        self.adaptive = adaptive  # False: every sequence proposes max_tokens (up to its cap)
        self.draft_cost = draft_cost  # the drafter's cost of a token, in 1-row steps
        self.cost = StepCost()
        self.overall = _Acceptance(PRIOR_ACCEPTANCE)  # all sequences: a new one's prior
        self._seqs: dict[str, _Acceptance] = {}

    def budgets(
        self, request_ids: list[str], caps: list[int], reproducible: list[bool] | None = None
    ) -> list[int]:
        """Tokens each sequence may propose (at most its cap) this step. A reproducible
        sequence (seeded sampling) decides alone, on its own acceptance and the prior
        row cost: what it draws then depends on its seed, not on the machine's timing
        or on what shares its steps."""
        if not self.adaptive:
            return [max(0, min(c, self.max_tokens)) for c in caps]
        fixed = reproducible or [False] * len(caps)
        states = [self._state(rid, f) for rid, f in zip(request_ids, fixed, strict=True)]
        ks = [0] * len(states)
        r = self.cost.row_ratio
        shared = [i for i, f in enumerate(fixed) if not f]
        together = self._allocate(shared, states, caps, r, r + self.draft_cost, ks)
        limit = dict.fromkeys(shared, together)
        for i in (i for i, f in enumerate(fixed) if f):
            limit[i] = self._allocate([i], states, caps, PRIOR_ROW_COST, PRIOR_ROW_COST, ks)
        for i, s in enumerate(states):
            if ks[i] == 0 and caps[i] > 0 and self.max_tokens:
                s.idle += 1
                # A probe, or a sequence once bad stays off for good; none where even a
                # good sequence would not pay (a large batch).
                if s.idle >= PROBE_EVERY and limit[i] < PRIOR_ACCEPTANCE:
                    ks[i], s.idle = 1, 0
            else:
                s.idle = 0
        return ks

    def _allocate(
        self,
        seqs: list[int],
        states: list[_Acceptance],
        caps: list[int],
        r: float,
        row: float,
        ks: list[int],
    ) -> float:
        """Add proposals to ks for the sequences `seqs` that share a step whose row costs
        r (a drafted token: `row`), best first while they pay; returns the gain a first
        proposal needed."""
        tokens, time = float(len(seqs)), 1 + r * len(seqs)  # the step without drafts
        # Each sequence's next proposal, best first: (-gain, index).
        alphas = {i: states[i].cautious for i in seqs}
        heap = [(-alphas[i], i) for i in seqs if caps[i] > 0 and self.max_tokens]
        heapq.heapify(heap)
        threshold = tokens * row / time
        while heap:
            neg_gain, i = heapq.heappop(heap)
            if -neg_gain * time <= tokens * row:
                break
            ks[i] += 1
            tokens, time = tokens - neg_gain, time + row
            if ks[i] < min(caps[i], self.max_tokens):
                heapq.heappush(heap, (neg_gain * alphas[i], i))
        return threshold

    def observe_round(self, request_id: str, proposed: int, accepted: int) -> None:
        if proposed:
            self._state(request_id).observe(proposed, accepted)
            self.overall.observe(proposed, accepted)

    def release(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)

    def _state(self, request_id: str, reproducible: bool = False) -> _Acceptance:
        state = self._seqs.get(request_id)
        if state is None:
            prior = PRIOR_ACCEPTANCE if reproducible else self.overall.alpha
            state = self._seqs[request_id] = _Acceptance(prior)
        return state
